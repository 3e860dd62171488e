"""One engine for every request: photos that arrive together are detected in one batch.

Request threads hand their decoded photos to :class:`DetectionBatcher` and
wait. A single worker thread owns the engine: it takes the first waiting
photo, waits up to ``max_wait_s`` for others (up to ``max_batch`` photos in
all), and detects them with :func:`jointface.service.detect_grouped` (photos
of the same size share one network pass; every photo is prepared exactly as
alone, so the answers are those of one photo at a time).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from jointface.engines import Engine, Face
from jointface.service import detect_grouped


class BatcherBusy(RuntimeError):
    """Too many photos are waiting for the detector, or the answer took too long."""


@dataclass
class BatchStats:
    batches: int = 0
    photos: int = 0
    largest_batch: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1,000 batch sizes

    def add(self, size: int) -> None:
        self.batches += 1
        self.photos += size
        self.largest_batch = max(self.largest_batch, size)
        self.sizes = (self.sizes + [size])[-1000:]


_STOP = object()


class DetectionBatcher:
    def __init__(self, engine: Engine, *, max_batch: int = 8, max_wait_s: float = 0.005, max_queue: int = 256):
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._run, name="jointface-detector", daemon=True)
        self._worker.start()

    # the engine's identity, so this object can stand in for it (service.calibrate, identify)
    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def version(self) -> str:
        return self.engine.version

    @property
    def dim(self) -> int:
        return self.engine.dim

    @property
    def space(self):
        """The engine's :class:`~index.space.EmbeddingSpace` (``service.identify`` searches in it)."""
        return self.engine.space

    @property
    def default_threshold(self) -> float:
        return self.engine.default_threshold

    @property
    def threshold_source(self):
        return getattr(self.engine, "threshold_source", None)

    @property
    def sized_thresholds(self) -> bool:
        return self.engine.sized_thresholds

    def default_threshold_for(self, people: int):
        """The engine's default threshold for a gallery of ``people`` (see ``Engine.default_threshold_for``)."""
        return self.engine.default_threshold_for(people)

    def submit(self, image: np.ndarray) -> Future:
        future: Future = Future()
        try:
            self._queue.put_nowait((image, future))
        except queue.Full:
            raise BatcherBusy(f"{self._queue.maxsize} photos are already waiting for the detector") from None
        return future

    def detect_many(self, images: Sequence[np.ndarray], timeout: float | None = None) -> list[list[Face]]:
        """Faces of each photo, in order; all submitted at once so they can share batches."""
        futures = [self.submit(image) for image in images]
        deadline = None if timeout is None else time.monotonic() + timeout
        answers = []
        for future in futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                answers.append(future.result(timeout=remaining))
            except FutureTimeout:
                for pending in futures:
                    pending.cancel()  # not yet taken by the worker: dropped
                raise BatcherBusy(f"the detector did not answer within {timeout:.0f} s") from None
        return answers

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_many([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return self.detect_many(images)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._worker.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            batch = [(image, future) for image, future in batch if future.set_running_or_notify_cancel()]
            if batch:
                self.stats.add(len(batch))
                try:
                    found = detect_grouped(self.engine, [image for image, _ in batch])
                except BaseException as exc:  # the requests hear of it; the worker goes on
                    for _, future in batch:
                        future.set_exception(exc)
                else:
                    for (_, future), faces in zip(batch, found):
                        future.set_result(faces)
            if stop:
                return
