"""Mixup views of the crop bank, each with dlib's own descriptor of the view (issue 15).

Why: the student fits the teacher on the faces it trains on far better than on faces it never saw
(``benchmarks/joint_v2/loss_balance/``: with distillation alone, 1 - cos 0.31 on training faces against
0.41 on held-out ones) -- it learns the teacher at ~16,000 points of face space and no more. Distillation
works best when the student matches the teacher's *function* on many inputs, the teacher evaluated on the
very image the student sees ("a good teacher is patient and consistent", Beyer et al. 2022, whose strongest
ingredient was mixup). Every crop of the bank holds its face at the same place and width
(:func:`jointface.train.crops.build_bank`), so a pixel blend of two crops is one ghosted face at that place:
a new input whose target is not the blend of the two descriptors but dlib's descriptor of the blend,
computed here once (dlib's 5-point landmarks on the blend, then its recognition network), about 50-100 ms
a view on this CPU, in worker processes. The views join the crop bank with no identity
(``crops.mixup_views`` / ``crops.view_share``, :func:`jointface.train.crops.with_views`).

Cutting resumes after an interrupt: views are made in chunks, a chunk's images go straight into the
memory-mapped ``views.tmp.npy`` and its descriptors into ``views.progress.npz``; a rerun with the same
settings makes only the chunks not yet done.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

CHUNK = 200  # views per work item (and per saved progress step), by default


class Views(NamedTuple):
    """``images`` ``(N, side, side, 3)`` uint8 (a memory map), ``boxes`` ``(N, 4)``, ``teachers`` ``(N, 128)``."""

    images: np.ndarray
    boxes: np.ndarray
    teachers: np.ndarray


def view_recipe(count: int, bank_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Which two bank faces each view blends, ``(count, 2)``, and the first one's weight ``(count,)`` in
    [0.2, 0.8] (deterministic under ``seed``; never a face with itself)."""
    rng = np.random.default_rng([seed, 7_919])
    first = rng.integers(bank_size, size=count)
    second = (first + rng.integers(1, bank_size, size=count)) % bank_size
    return np.stack([first, second], axis=1), rng.uniform(0.2, 0.8, size=count)


def blend(images: np.ndarray, pair: np.ndarray, weight: float) -> np.ndarray:
    """The view of one pair: the two crops blended pixel by pixel (``weight`` on the first)."""
    a, b = (np.asarray(images[i], dtype=np.float32) for i in pair)
    return np.clip(np.round(weight * a + (1 - weight) * b), 0, 255).astype(np.uint8)


_worker: dict = {}


def _start_worker(bank_path: str, views_path: str) -> None:
    from jointface.engines.dlib_engine import _load

    _worker.update(predictor=_load("landmarks_5"), network=_load("descriptor"),
                   bank=np.load(bank_path, mmap_mode="r"), views=np.load(views_path, mmap_mode="r+"))


def _make_chunk(job: tuple[int, np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray]:
    """Blend one chunk's views into the views file; returns ``(first view's index, descriptors (n, 128))``."""
    import dlib

    start, pairs, weights, view_boxes = job
    predictor, network, bank, views = (_worker[k] for k in ("predictor", "network", "bank", "views"))
    descriptors = np.zeros((len(pairs), 128), dtype=np.float32)
    for row, (pair, weight) in enumerate(zip(pairs, weights)):
        view = blend(bank, pair, float(weight))
        box = view_boxes[row]
        shape = predictor(view, dlib.rectangle(*(int(round(float(v))) for v in box)))
        descriptors[row] = np.asarray(network.compute_face_descriptor(view, shape), dtype=np.float32)
        views[start + row] = view
    views.flush()
    return start, descriptors


def build_views(bank, bank_path: Path, count: int, seed: int, folder: Path, workers: int = 2,
                progress: bool = True, chunk_size: int = CHUNK) -> Views:
    """Cut (or reopen, or finish) ``count`` mixup views of ``bank`` (a :class:`jointface.train.crops.CropBank`
    stored at ``bank_path``) in ``folder`` (``views.npy`` + ``views.npz``)."""
    pairs, weights = view_recipe(count, len(bank), seed)
    side = bank.images.shape[1]
    images_path, meta_path = folder / "views.npy", folder / "views.npz"
    if images_path.exists() and meta_path.exists():
        try:
            meta = np.load(meta_path)
            images = np.load(images_path, mmap_mode="r")
            if images.shape == (count, side, side, 3) and np.array_equal(meta["pairs"], pairs) \
                    and int(meta["bank_size"]) == len(bank):
                return Views(images, meta["boxes"], meta["teachers"])
        except (OSError, ValueError, KeyError, EOFError) as error:
            print(f"mixup views in {folder} are unreadable ({error}): cutting them again", flush=True)
    boxes = (weights[:, None] * bank.boxes[pairs[:, 0]] + (1 - weights[:, None]) * bank.boxes[pairs[:, 1]]
             ).astype(np.float32)
    temporary, progress_path = folder / "views.tmp.npy", folder / "views.progress.npz"
    chunks = (count + chunk_size - 1) // chunk_size
    teachers, done = np.zeros((count, 128), dtype=np.float32), np.zeros(chunks, dtype=bool)
    resumed = False
    if temporary.exists() and progress_path.exists():
        try:
            saved = np.load(progress_path)
            if np.array_equal(saved["pairs"], pairs) and int(saved["bank_size"]) == len(bank) and \
                    len(saved["done"]) == chunks and \
                    np.load(temporary, mmap_mode="r").shape == (count, side, side, 3):
                teachers, done, resumed = saved["teachers"].copy(), saved["done"].copy(), True
        except (OSError, ValueError, KeyError, EOFError):
            pass
    if not resumed:
        folder.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(count, side, side, 3)).flush()
    todo = [c for c in range(chunks) if not done[c]]
    if progress:
        print(f"mixup views: {count} ({int(done.sum())} chunks already made), {len(todo)} chunks of "
              f"{chunk_size} to make in {workers} processes", flush=True)
    jobs = [(c * chunk_size, pairs[c * chunk_size:(c + 1) * chunk_size],
             weights[c * chunk_size:(c + 1) * chunk_size], boxes[c * chunk_size:(c + 1) * chunk_size]) for c in todo]
    started = time.time()
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(str(bank_path), str(temporary))) as pool:
        for finished, (start, descriptors) in enumerate(pool.imap_unordered(_make_chunk, jobs), 1):
            teachers[start:start + len(descriptors)] = descriptors
            done[start // chunk_size] = True
            np.savez(progress_path.with_suffix(".tmp.npz"), pairs=pairs, bank_size=len(bank), teachers=teachers,
                     done=done)
            progress_path.with_suffix(".tmp.npz").replace(progress_path)
            if progress and (finished % 10 == 0 or finished == len(jobs)):
                rate = finished * chunk_size / (time.time() - started)
                print(f"mixup views: {int(done.sum())}/{chunks} chunks, {rate:.1f} views/s", flush=True)
    temporary.replace(images_path)
    np.savez(meta_path, pairs=pairs, weights=weights, bank_size=len(bank), boxes=boxes, teachers=teachers,
             side=side)
    progress_path.unlink(missing_ok=True)
    return Views(np.load(images_path, mmap_mode="r"), boxes, teachers)


class StackedImages:
    """Two image arrays (memory maps) read as one along the first axis: the bank, then its views."""

    def __init__(self, first: np.ndarray, second: np.ndarray):
        self.parts, self.split = (first, second), len(first)
        self.shape = (len(first) + len(second), *first.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            index = int(index)
            return self.parts[0][index] if index < self.split else self.parts[1][index - self.split]
        index = np.asarray(index)
        return np.stack([self[int(i)] for i in index])
