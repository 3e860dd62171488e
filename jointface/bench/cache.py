"""A detection cache for benchmarks: the same engine, remembered.

:class:`CachingEngine` wraps an engine and stores each image's faces in a
small SQLite file keyed by the sha256 of the pixels, so a benchmark that is
interrupted or rerun (or a second protocol over the same LFW images) does not
run the detector again. It has the wrapped engine's name, version and
dimension, and goes through the same library path (enroll, search) as the
engine itself. Timings are never taken through it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from jointface.engines import Engine, Face


def image_key(image: np.ndarray, salt: str = "") -> str:
    digest = hashlib.sha256(salt.encode())
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class ResultCache:
    """Key -> JSON + float32 array, in SQLite (committed every ``commit_every`` writes)."""

    def __init__(self, path: Path, commit_every: int = 50):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, meta TEXT, data BLOB)")
        self._pending = 0
        self.commit_every = commit_every

    def get(self, key: str):
        row = self._db.execute("SELECT meta, data FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), np.frombuffer(row[1], dtype=np.float32) if row[1] is not None else None

    def put(self, key: str, meta, data: np.ndarray | None) -> None:
        blob = None if data is None else np.ascontiguousarray(data, dtype=np.float32).tobytes()
        self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", (key, json.dumps(meta), blob))
        self._pending += 1
        if self._pending >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        self._db.commit()
        self._pending = 0

    def close(self) -> None:
        self.commit()
        self._db.close()


class CachingEngine(Engine):
    def __init__(self, engine: Engine, cache_dir: Path):
        self.inner = engine
        self.name = engine.name
        self.dim = engine.dim
        self.default_threshold = engine.default_threshold
        # The settings that change detections (detector, thresholds, input size, precision) are part of
        # the file name, with the engine's name and weights version.
        settings = {k: v for k, v in engine.describe().items() if k not in ("weights", "name", "version")}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        self.cache = ResultCache(Path(cache_dir) / f"detections-{engine.name}-{engine.version}-{digest}.sqlite")
        self.hits = self.misses = 0

    @property
    def version(self) -> str:
        return self.inner.version

    def describe(self) -> dict:
        return self.inner.describe()

    def detect(self, image: np.ndarray) -> list[Face]:
        key = image_key(image)
        cached = self.cache.get(key)
        if cached is not None:
            self.hits += 1
            meta, data = cached
            embeddings = data.reshape(len(meta), self.dim) if meta else np.zeros((0, self.dim), np.float32)
            return [Face(box=tuple(m["box"]), score=m["score"], embedding=embedding, engine=self.name,
                         engine_version=self.version) for m, embedding in zip(meta, embeddings)]
        self.misses += 1
        faces = self.inner.detect(image)
        meta = [{"box": list(face.box), "score": face.score} for face in faces]
        data = np.stack([face.embedding for face in faces]) if faces else None
        self.cache.put(key, meta, data)
        return faces

    def close(self) -> None:
        self.cache.close()


def seed_dlib_cache(labels_path: Path, cache_dir: Path, engine: Engine, progress=None) -> dict:
    """Fill ``engine``'s (dlib, HOG at upsample 1) detection cache from every-face teacher labels.

    ``jointface preprocess --all-faces`` already ran dlib's HOG detector and
    descriptor on every photo of a collection: each photo labelled by HOG gives
    exactly the faces the dlib engine would (boxes, scores, descriptors, in the
    same order), so P2 and P3 need not compute them again. Photos where HOG
    found nothing (the labels fell back to the CNN detector) are cached with no
    face, as the HOG engine would answer. Returns counts.
    """
    from jointface.datasets.teacher import manifest_path, read_face_labels
    from jointface.imageio import load_image

    if engine.name != "dlib" or engine.describe().get("detector") != "hog" or engine.describe().get("upsample") != 1:
        raise ValueError("teacher labels hold dlib HOG (upsample 1) detections: seed the plain dlib engine only")
    labels_path = Path(labels_path)
    root = Path(json.loads(manifest_path(labels_path).read_text())["root"])
    cached = CachingEngine(engine, cache_dir)
    counts = {"photos": 0, "faces": 0, "without_hog_face": 0}
    try:
        records = [r for r in read_face_labels(labels_path) if r["status"] in ("ok", "no_face")]
        for index, record in enumerate(records, 1):
            image = load_image(root / record["path"])
            faces = record["faces"] if record.get("detector") == "hog" else []
            meta = [{"box": face["box"], "score": face["score"]} for face in faces]
            data = None
            if faces:
                teachers = np.asarray([face["teacher"] for face in faces], dtype=np.float32)
                data = teachers / np.maximum(np.linalg.norm(teachers, axis=1, keepdims=True), 1e-12)
            cached.cache.put(image_key(image), meta, data)
            counts["photos"] += 1
            counts["faces"] += len(faces)
            counts["without_hog_face"] += not faces
            if progress is not None:
                progress(index, len(records))
    finally:
        cached.close()
    return counts
