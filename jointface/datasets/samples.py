"""Training samples that look like real photos: every face scale, several faces, and no-face images.

:class:`SampleComposer` turns labelled photos (:class:`Photo`) into square
canvases with face boxes, each face keeping its teacher descriptor and, where
known, its identity. Three kinds of canvas, chosen per sample:

* ``zoom``: one photo scaled so that its subject face is ``face_range`` px wide
  (log-uniform: 12 px at the back of a group up to 95% of the canvas for a
  close-up), placed at a random position; the photo's other faces come along;
* ``mosaic``: a ``k x k`` grid (k = 2 or 3) of photos, each zoomed into its
  tile: several small faces per canvas;
* ``negative``: a region of a photo away from every teacher box (enlarged by
  half its size), scaled to the canvas: hands, windows, clothes and walls
  with no face, as negatives for the detector.

A face cut by the canvas edge keeps its clipped box when at least
``min_visible`` of it is inside, else it is dropped; a canvas whose dropped
face is partly visible marks that area as ``ignore`` for the detector. Faces
narrower than ``identity_min_face`` px keep their box but lose their teacher
and identity (too few pixels of a person to learn from).

Everything is a pure function of ``(seed, index)``: the same sample comes out
in every process and after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image

PAD_COLOUR = (124, 116, 104)


@dataclass
class Face:
    """One labelled face of a photo, in the photo's pixels."""

    box: tuple[float, float, float, float]
    teacher: np.ndarray | None = None
    identity: int = -1
    subject: bool = False


@dataclass
class Photo:
    """A labelled photo: where to read it, its size and its faces (possibly none)."""

    path: str
    width: int
    height: int
    faces: list[Face] = field(default_factory=list)
    collection: str = ""

    @property
    def subject(self) -> Face | None:
        for face in self.faces:
            if face.subject:
                return face
        return self.faces[0] if self.faces else None


@dataclass
class Sample:
    """A training canvas: ``image`` ``(S, S, 3)`` uint8; ``boxes`` ``(F, 4)`` xyxy canvas pixels;
    ``teachers`` ``(F, 128)`` (zeros where invalid); ``teacher_valid`` ``(F,)``; ``identities`` ``(F,)``
    (-1 unknown); ``kind``: ``zoom`` / ``mosaic`` / ``negative``."""

    image: np.ndarray
    boxes: np.ndarray
    teachers: np.ndarray
    teacher_valid: np.ndarray
    identities: np.ndarray
    kind: str


@dataclass
class ComposerSettings:
    size: int = 224
    face_range: tuple[float, float] = (12.0, 0.95)   # px at the low end, share of the canvas at the high end
    mosaic_probability: float = 0.3
    negative_probability: float = 0.1
    min_visible: float = 0.6
    identity_min_face: float = 20.0
    flip_probability: float = 0.5
    colour_jitter: float = 0.25
    #: share of zoom and mosaic canvases whose background is a face-free region of another photo
    #: rather than the flat pad colour (so a face is not "whatever sits on grey")
    scene_background: float = 0.7


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def paste(canvas: np.ndarray, image: np.ndarray, scale: float, offset_x: float, offset_y: float,
          region: tuple[int, int, int, int] | None = None) -> None:
    """Draw ``image`` scaled by ``scale`` with its origin at canvas ``(offset_x, offset_y)``, clipped to
    ``region`` (x1, y1, x2, y2 of the canvas; default the whole canvas). Canvas pixel ``c`` shows photo pixel
    ``(c - offset) / scale``."""
    x1, y1, x2, y2 = region or (0, 0, canvas.shape[1], canvas.shape[0])
    height, width = image.shape[:2]
    # photo area that lands in the region, in photo pixels (one pixel of slack for the resampling)
    px1, py1 = max(0.0, (x1 - offset_x) / scale - 1), max(0.0, (y1 - offset_y) / scale - 1)
    px2, py2 = min(float(width), (x2 - offset_x) / scale + 1), min(float(height), (y2 - offset_y) / scale + 1)
    if px2 <= px1 or py2 <= py1:
        return
    crop_x1, crop_y1 = int(math.floor(px1)), int(math.floor(py1))
    crop = image[crop_y1:int(math.ceil(py2)), crop_x1:int(math.ceil(px2))]
    scaled = _resize(crop, scale)
    left, top = round(offset_x + crop_x1 * scale), round(offset_y + crop_y1 * scale)
    cx1, cy1 = max(left, x1), max(top, y1)
    cx2, cy2 = min(left + scaled.shape[1], x2), min(top + scaled.shape[0], y2)
    if cx2 > cx1 and cy2 > cy1:
        canvas[cy1:cy2, cx1:cx2] = scaled[cy1 - top:cy2 - top, cx1 - left:cx2 - left]


def colour_jitter(canvas: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast-like gain and per-channel colour changes of up to ``strength``; 10% grey."""
    gain = 1.0 + rng.uniform(-strength, strength)
    bias = rng.uniform(-strength, strength) * 40
    channel = 1.0 + rng.uniform(-strength / 2, strength / 2, size=3)
    out = canvas.astype(np.float32) * gain * channel + bias
    if rng.uniform() < 0.1:  # some grey photos
        out = out.mean(axis=2, keepdims=True).repeat(3, axis=2)
    return out.clip(0, 255).astype(np.uint8)


def transform_box(box, scale: float, offset_x: float, offset_y: float) -> tuple[float, float, float, float]:
    return (box[0] * scale + offset_x, box[1] * scale + offset_y, box[2] * scale + offset_x,
            box[3] * scale + offset_y)


def clip_box(box, region) -> tuple[tuple[float, float, float, float], float]:
    """``box`` clipped to ``region`` and the share of its area left inside."""
    x1, y1 = max(box[0], region[0]), max(box[1], region[1])
    x2, y2 = min(box[2], region[2]), min(box[3], region[3])
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    inside = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return (x1, y1, x2, y2), (inside / area if area > 0 else 0.0)


class SampleComposer:
    """Makes :class:`Sample` canvases from photos (see the module docstring).

    ``load(photo)`` returns the photo's RGB uint8 pixels (``(height, width, 3)``
    as recorded); ``face_photos`` are indices of photos with at least one face.
    """

    def __init__(self, photos: Sequence[Photo], load: Callable[[Photo], np.ndarray],
                 settings: ComposerSettings | None = None, seed: int = 0, teacher_dim: int = 128):
        self.photos = list(photos)
        self.load = load
        self.settings = settings or ComposerSettings()
        self.seed = int(seed)
        self.teacher_dim = teacher_dim
        self.face_photos = [i for i, p in enumerate(self.photos) if p.subject is not None]
        if not self.face_photos:
            raise ValueError("no photo with a face to compose training samples from")

    def __len__(self) -> int:
        return len(self.face_photos)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def _target_width(self, rng: np.random.Generator, low: float, high: float) -> float:
        return float(math.exp(rng.uniform(math.log(low), math.log(max(high, low * 1.01)))))

    def _place(self, canvas, photo: Photo, region, rng, faces_out: list, face_width: float) -> None:
        """Zoom ``photo`` into ``region`` so its subject face is ``face_width`` px wide, at a random place."""
        image = self.load(photo)
        subject = photo.subject
        x1, y1, x2, y2 = region
        region_w, region_h = x2 - x1, y2 - y1
        face_w = max(subject.box[2] - subject.box[0], 1.0)
        face_h = max(subject.box[3] - subject.box[1], 1.0)
        scale = face_width / face_w
        scaled_w, scaled_h = face_width, face_h * scale
        # the subject's centre anywhere that keeps the whole face inside the region (centred if it cannot)
        low_x, high_x = x1 + scaled_w / 2, x2 - scaled_w / 2
        low_y, high_y = y1 + scaled_h / 2, y2 - scaled_h / 2
        centre_x = rng.uniform(low_x, high_x) if high_x > low_x else (x1 + x2) / 2
        centre_y = rng.uniform(low_y, high_y) if high_y > low_y else (y1 + y2) / 2
        offset_x = centre_x - (subject.box[0] + subject.box[2]) / 2 * scale
        offset_y = centre_y - (subject.box[1] + subject.box[3]) / 2 * scale
        paste(canvas, image, scale, offset_x, offset_y, region)
        for face in photo.faces:
            box, visible = clip_box(transform_box(face.box, scale, offset_x, offset_y), region)
            if visible >= self.settings.min_visible and box[2] - box[0] >= 4 and box[3] - box[1] >= 4:
                faces_out.append((box, face))
        del region_w, region_h

    def _negative(self, canvas, rng, attempts: int = 8) -> bool:
        """A face-free region of some photo scaled to the canvas; False when none was found."""
        size = self.settings.size
        for _ in range(attempts):
            photo = self.photos[int(rng.integers(len(self.photos)))]
            side_max = min(photo.width, photo.height)
            if side_max < 24:
                continue
            side = rng.uniform(0.25, 0.8) * side_max
            x = rng.uniform(0, photo.width - side)
            y = rng.uniform(0, photo.height - side)
            crop = (x, y, x + side, y + side)
            blocked = False
            for face in photo.faces:
                fx1, fy1, fx2, fy2 = face.box
                grow_x, grow_y = (fx2 - fx1) / 2, (fy2 - fy1) / 2
                grown = (fx1 - grow_x, fy1 - grow_y, fx2 + grow_x, fy2 + grow_y)
                if grown[0] < crop[2] and grown[2] > crop[0] and grown[1] < crop[3] and grown[3] > crop[1]:
                    blocked = True
                    break
            if blocked:
                continue
            image = self.load(photo)
            scale = size / side
            paste(canvas, image, scale, -x * scale, -y * scale)
            return True
        return False

    def compose(self, index: int) -> Sample:
        """Sample number ``index`` (deterministic; see the module docstring)."""
        settings, size = self.settings, self.settings.size
        rng = self._rng(index)
        canvas = np.empty((size, size, 3), dtype=np.uint8)
        canvas[:] = PAD_COLOUR
        placed: list[tuple[tuple, Face]] = []
        choice = rng.uniform()
        kind = "zoom"
        if choice < settings.negative_probability and self._negative(canvas, rng):
            kind = "negative"
        else:
            if rng.uniform() < settings.scene_background:
                self._negative(canvas, rng)
        if kind == "negative":
            pass
        elif choice < settings.negative_probability + settings.mosaic_probability:
            kind = "mosaic"
            tiles = 2 if rng.uniform() < 0.6 else 3
            tile = size / tiles
            for row in range(tiles):
                for col in range(tiles):
                    photo = self.photos[self.face_photos[int(rng.integers(len(self.face_photos)))]]
                    region = (round(col * tile), round(row * tile), round((col + 1) * tile), round((row + 1) * tile))
                    width = self._target_width(rng, settings.face_range[0], 0.8 * tile)
                    self._place(canvas, photo, region, rng, placed, width)
        else:
            photo = self.photos[self.face_photos[index % len(self.face_photos)]]
            width = self._target_width(rng, settings.face_range[0], settings.face_range[1] * size)
            self._place(canvas, photo, (0, 0, size, size), rng, placed, width)
        if rng.uniform() < settings.flip_probability:
            canvas = canvas[:, ::-1].copy()
            placed = [((size - b[2], b[1], size - b[0], b[3]), face) for b, face in placed]
        if settings.colour_jitter > 0:
            canvas = self._jitter(canvas, rng)
        return self._sample(canvas, placed, kind)

    def _jitter(self, canvas: np.ndarray, rng) -> np.ndarray:
        return colour_jitter(canvas, rng, self.settings.colour_jitter)

    def _sample(self, canvas: np.ndarray, placed, kind: str) -> Sample:
        count = len(placed)
        boxes = np.zeros((count, 4), dtype=np.float32)
        teachers = np.zeros((count, self.teacher_dim), dtype=np.float32)
        valid = np.zeros(count, dtype=bool)
        identities = np.full(count, -1, dtype=np.int64)
        for i, (box, face) in enumerate(placed):
            boxes[i] = box
            big_enough = min(box[2] - box[0], box[3] - box[1]) >= self.settings.identity_min_face
            if face.teacher is not None and big_enough:
                teachers[i] = face.teacher
                valid[i] = True
            if big_enough:
                identities[i] = face.identity
        return Sample(canvas, boxes, teachers, valid, identities, kind)
