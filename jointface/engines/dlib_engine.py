"""The dlib engine: the study's baseline pipeline, and the teacher of the joint network.

detect -> 5-point landmarks -> aligned 150x150 chip -> ResNet descriptor (128-d).

* Detector: HOG + linear SVM by default (fast, frontal faces), dlib's CNN
  (MMOD) detector by option (slower, more poses).
* Descriptor: ``dlib_face_recognition_resnet_model_v1``; the raw descriptor
  (dlib's customary distance threshold is 0.6 in Euclidean distance) is kept by
  :meth:`DlibEngine.raw_descriptor`; :meth:`DlibEngine.detect` returns it
  L2-normalised like every engine's embedding.

Model files come from the ``face_recognition_models`` package. That package's
``__init__`` imports ``pkg_resources``, which setuptools >= 82 removed, so the
files are located with :func:`importlib.util.find_spec` without importing it.

dlib's calls hold the GIL and use one core.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import Engine, Face, check_image, l2_normalise

MODEL_FILES = {
    "cnn_detector": "mmod_human_face_detector.dat",
    "landmarks_5": "shape_predictor_5_face_landmarks.dat",
    "landmarks_68": "shape_predictor_68_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}


class DlibModelsMissing(FileNotFoundError):
    pass


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibModelsMissing(
            "dlib's model files were not found: install the 'face_recognition_models' package "
            "(pip install face_recognition_models==0.3.0)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_path(key: str) -> Path:
    path = models_dir() / MODEL_FILES[key]
    if not path.is_file():
        raise DlibModelsMissing(f"dlib model file missing: {path}")
    return path


@functools.lru_cache(maxsize=None)
def _load(key: str):
    """Load (once per process) one of dlib's models."""
    import dlib

    if key == "hog_detector":
        return dlib.get_frontal_face_detector()
    if key == "cnn_detector":
        return dlib.cnn_face_detection_model_v1(str(model_path("cnn_detector")))
    if key in ("landmarks_5", "landmarks_68"):
        return dlib.shape_predictor(str(model_path(key)))
    if key == "descriptor":
        return dlib.face_recognition_model_v1(str(model_path("descriptor")))
    raise KeyError(key)


@functools.lru_cache(maxsize=1)
def models_fingerprint() -> str:
    """Short hash over the descriptor and 5-point model files (the engine version)."""
    digest = hashlib.sha256()
    for key in ("landmarks_5", "descriptor"):
        digest.update(model_path(key).read_bytes())
    return digest.hexdigest()[:12]


def _rect_to_box(rect, width: int, height: int) -> tuple[float, float, float, float]:
    """dlib rectangles are inclusive; boxes here are (x1, y1, x2, y2) exclusive, clipped."""
    x1 = min(max(rect.left(), 0), width)
    y1 = min(max(rect.top(), 0), height)
    x2 = min(max(rect.right() + 1, 0), width)
    y2 = min(max(rect.bottom() + 1, 0), height)
    return float(x1), float(y1), float(x2), float(y2)


def _box_to_rect(box):
    import dlib

    x1, y1, x2, y2 = box
    return dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)) - 1, int(round(y2)) - 1)


def detect_rects(image: np.ndarray, detector: str = "hog", upsample: int = 1) -> list[tuple[object, float]]:
    """Raw dlib detections as ``(rectangle, score)``, highest score first."""
    if detector == "hog":
        rects, scores, _ = _load("hog_detector").run(image, upsample, 0.0)
        found = list(zip(rects, (float(s) for s in scores)))
    elif detector == "cnn":
        found = [(d.rect, float(d.confidence)) for d in _load("cnn_detector")(image, upsample)]
    else:
        raise ValueError(f"unknown dlib detector {detector!r}: use 'hog' or 'cnn'")
    found.sort(key=lambda item: -item[1])
    return found


def landmarks_68(image: np.ndarray, rect) -> np.ndarray:
    """68 landmarks ``(68, 2)`` (x, y) fitted inside a detector rectangle."""
    shape = _load("landmarks_68")(image, rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)


def reference_box(image: np.ndarray) -> tuple[float, float, float, float] | None:
    """The PROTOCOLS.md "landmark box" of the subject of a centred photo.

    HOG (upsample 1); when it finds nothing, the CNN detector; the face nearest
    the image centre is the subject; the box is the extent of its 68
    landmarks (x2/y2 = max + 1 so it matches the exclusive box convention).
    ``None`` when neither detector finds a face.
    """
    image = check_image(image)
    found = detect_rects(image, "hog", 1) or detect_rects(image, "cnn", 1)
    if not found:
        return None
    height, width = image.shape[:2]
    cx, cy = width / 2.0, height / 2.0

    def centre_distance(item) -> float:
        rect = item[0]
        return ((rect.left() + rect.right()) / 2 - cx) ** 2 + ((rect.top() + rect.bottom()) / 2 - cy) ** 2

    rect = min(found, key=centre_distance)[0]
    points = landmarks_68(image, rect)
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0) + 1
    return float(x1), float(y1), float(x2), float(y2)


class DlibEngine(Engine):
    """dlib HOG (or CNN) detector + 5-point alignment + ResNet descriptor."""

    name = "dlib"
    dim = 128
    # Cosine similarity of L2-normalised dlib descriptors. dlib's descriptors
    # are not centred, so cosines are compressed: on LFW, against a gallery of
    # 200 people, strangers' best match has a median of 0.913 and a 99th
    # percentile of 0.938, while 98% of same-person matches are above 0.92.
    # 0.925 keeps 96% of true matches and rejects most strangers in small
    # galleries. `jointface calibrate` replaces it for a given gallery.
    default_threshold = 0.925

    def __init__(self, detector: str = "hog", upsample: int = 1, jitter: int = 0):
        if detector not in ("hog", "cnn"):
            raise ValueError(f"unknown dlib detector {detector!r}: use 'hog' or 'cnn'")
        self.detector = detector
        self.upsample = int(upsample)
        self.jitter = int(jitter)
        self._lock = threading.Lock()  # dlib models are not documented as thread-safe

    @property
    def version(self) -> str:
        return f"dlib-resnet-v1-{models_fingerprint()}"

    def _descriptors(self, image: np.ndarray, rects: Sequence) -> np.ndarray:
        import dlib

        if not rects:
            return np.zeros((0, 128), dtype=np.float32)
        predictor = _load("landmarks_5")
        shapes = dlib.full_object_detections()
        for rect in rects:
            shapes.append(predictor(image, rect))
        descriptors = _load("descriptor").compute_face_descriptor(image, shapes, self.jitter)
        return np.array([np.array(d, dtype=np.float32) for d in descriptors], dtype=np.float32)

    def raw_descriptor(self, image: np.ndarray, box) -> np.ndarray:
        """dlib's unnormalised 128-d descriptor of the face inside ``box``."""
        image = check_image(image)
        with self._lock:
            return self._descriptors(image, [_box_to_rect(box)])[0]

    def detect(self, image: np.ndarray) -> list[Face]:
        image = check_image(image)
        height, width = image.shape[:2]
        with self._lock:
            found = detect_rects(image, self.detector, self.upsample)
            descriptors = self._descriptors(image, [rect for rect, _ in found])
        embeddings = l2_normalise(descriptors)
        version = self.version
        return [
            Face(box=_rect_to_box(rect, width, height), score=score, embedding=embedding,
                 engine=self.name, engine_version=version)
            for (rect, score), embedding in zip(found, embeddings)
        ]

    def describe(self) -> dict:
        return {**super().describe(), "detector": self.detector, "upsample": self.upsample}
