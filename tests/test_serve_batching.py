"""The detection batcher: photos waiting together share a batch, and the answers are those of one at a time."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from jointface.engines import Face
from jointface.server.batching import BatcherBusy, DetectionBatcher


class RecordingEngine:
    """A fake engine: one face per photo whose score is the photo's mean pixel; records each batch."""

    name, version, dim, default_threshold = "fake", "1", 2, 0.5

    def __init__(self, hold_first: threading.Event | None = None):
        self.batches: list[int] = []
        self.hold_first = hold_first
        self.first_started = threading.Event()

    def detect(self, image):
        return [Face(box=(0, 0, 1, 1), score=float(image.mean()), embedding=np.array([1, 0], np.float32),
                     engine=self.name, engine_version=self.version)]

    def detect_batch(self, images):
        if not self.batches and self.hold_first is not None:
            self.first_started.set()
            assert self.hold_first.wait(30)
        self.batches.append(len(images))
        return [self.detect(image) for image in images]


def photos(count, shape=(8, 8, 3)):
    return [np.full(shape, value, np.uint8) for value in range(count)]


def test_photos_waiting_together_share_one_batch_with_the_same_answers():
    release = threading.Event()
    engine = RecordingEngine(hold_first=release)
    batcher = DetectionBatcher(engine, max_batch=8, max_wait_s=0.0)
    try:
        first = batcher.submit(photos(1)[0])  # the worker takes it and holds in the engine
        assert engine.first_started.wait(30)
        images = photos(6) + photos(2, shape=(4, 4, 3))  # two sizes: detected in two groups of one batch
        futures = [batcher.submit(image) for image in images]
        release.set()
        answers = [future.result(30) for future in futures]
        assert first.result(30)[0].score == 0
        assert engine.batches[0] == 1 and sum(engine.batches[1:]) == 8 and batcher.stats.largest_batch == 8
        alone = [engine.detect(image) for image in images]
        assert [[f.score for f in faces] for faces in answers] == [[f.score for f in faces] for faces in alone]
    finally:
        release.set()
        batcher.close()


def test_full_queue_and_slow_detector_are_busy_errors_and_the_worker_survives_errors():
    release = threading.Event()
    engine = RecordingEngine(hold_first=release)
    batcher = DetectionBatcher(engine, max_batch=1, max_wait_s=0.0, max_queue=2)
    try:
        batcher.submit(photos(1)[0])
        assert engine.first_started.wait(30)
        with pytest.raises(BatcherBusy, match="did not answer"):
            batcher.detect_many(photos(1), timeout=0.2)
        queued = batcher.submit(photos(1)[0])  # the queue now holds the abandoned photo and this one
        with pytest.raises(BatcherBusy, match="waiting"):
            batcher.submit(photos(1)[0])
        release.set()
        assert queued.result(30)[0].score == 0
        assert batcher.detect_many(photos(2), timeout=30)[1][0].score == 1
    finally:
        release.set()
        batcher.close()

    class Broken(RecordingEngine):
        def detect_batch(self, images):
            if images[0].mean() == 0:
                raise RuntimeError("engine failed")
            return super().detect_batch(images)

    batcher = DetectionBatcher(Broken(), max_batch=1)
    try:
        with pytest.raises(RuntimeError, match="engine failed"):
            batcher.detect(photos(1)[0])
        assert batcher.detect(photos(2)[1])[0].score == 1
    finally:
        batcher.close()
