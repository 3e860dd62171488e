"""P4: speed of the whole recognition pipeline, dlib against the joint network.

Pipeline measured (PROTOCOLS.md P4): decoded RGB uint8 image in memory ->
every face with box, embedding and the identity found in a gallery (the P2
gallery, enrolled through the library). File decoding is timed apart.

* Inputs: (a) the P1 test images at 320 px; (b) 2x2 mosaics of four of them
  (640x640, four faces).
* Same run, same images, both cores for both: the joint engine runs torch
  with 2 threads, single-image and batched; dlib's calls use one core, so
  the baseline runs as two worker processes (its one-process figure is
  reported too).
* Alternation: the inputs are cut into rounds and every pipeline runs each
  round in turn, so load changes on this shared machine hit all of them.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from index import Gallery
from jointface.engines import Engine, get_engine
from jointface.engines.joint_engine import JointEngine
from jointface.imageio import load_image, mosaic
from jointface.service import enroll, identify

from .cache import CachingEngine
from .common import protocol_markdown
from .protocols import p1_split, p2_split

ROUNDS = 4
BATCH = 8


def _enrol_p2_gallery(home: Path, engine: Engine, lfw_root: Path, cache_dir: Path, limit: int | None) -> None:
    split = p2_split(lfw_root)
    images = split.gallery if limit is None else split.gallery[:limit * 4]
    cached = CachingEngine(engine, cache_dir)
    try:
        with Gallery.open(home) as gallery:
            enroll(gallery, cached, [(image.person, image.path) for image in images], choice="best",
                   batch_size=512)
    finally:
        cached.close()


# -- the dlib baseline in worker processes -----------------------------------------------------

_worker: dict = {}


def _worker_init(home: str) -> None:
    _worker["engine"] = get_engine("dlib")
    _worker["gallery"] = Gallery.open(home)


def _worker_run(image: np.ndarray) -> int:
    engine, gallery = _worker["engine"], _worker["gallery"]
    faces = engine.detect(image)
    identify(gallery, engine, faces, top_k=1, threshold=engine.default_threshold)
    return len(faces)


def _pipeline_single(engine: Engine, gallery: Gallery, images: Sequence[np.ndarray]) -> int:
    found = 0
    for image in images:
        faces = engine.detect(image)
        identify(gallery, engine, faces, top_k=1, threshold=engine.default_threshold)
        found += len(faces)
    return found


def _pipeline_batched(engine: Engine, gallery: Gallery, images: Sequence[np.ndarray]) -> int:
    """Batches of ``BATCH`` photos: one network pass and one gallery search (all their faces) per batch."""
    found = 0
    for start in range(0, len(images), BATCH):
        faces = [face for image_faces in engine.detect_batch(images[start:start + BATCH]) for face in image_faces]
        identify(gallery, engine, faces, top_k=1, threshold=engine.default_threshold)
        found += len(faces)
    return found


def profile_steps(engine: Engine, gallery: Gallery, images: Sequence[np.ndarray], batch: int = BATCH) -> dict:
    """Milliseconds per image in each step of the joint engine's pipeline (batched), gallery search included."""
    timings: dict[str, float] = {}
    for start in range(0, len(images), batch):
        found = engine.detect_batch(images[start:start + batch], timings=timings)
        began = time.perf_counter()
        identify(gallery, engine, [face for faces in found for face in faces], top_k=1,
                 threshold=engine.default_threshold)
        timings["gallery_search"] = timings.get("gallery_search", 0.0) + time.perf_counter() - began
    return {step: 1000 * seconds / len(images) for step, seconds in timings.items()}


def camera_photo_decode_ms(tile: np.ndarray, max_side: int, repeats: int = 5) -> dict:
    """Decoding a 12 MP camera-sized JPEG (4000x3000, made from ``tile``) in full and at ``max_side`` (draft)."""
    from PIL import Image

    from jointface.imageio import load_image_reduced

    with tempfile.TemporaryDirectory(prefix="jointface-p4-decode-") as scratch:
        path = Path(scratch) / "camera.jpg"
        Image.fromarray(tile).resize((4000, 3000), Image.Resampling.BILINEAR).save(path, quality=90)
        timings = {"full": [], "reduced": []}
        for _ in range(repeats):
            for name, load in (("full", lambda: load_image(path)), ("reduced", lambda: load_image_reduced(path, max_side))):
                start = time.perf_counter()
                load()
                timings[name].append(1000 * (time.perf_counter() - start))
    return {"size": [4000, 3000], "max_side": max_side,
            **{f"{name}_ms": float(np.median(values)) for name, values in timings.items()}}


def run_p4(engines: Sequence[Engine], ctx, out_dir: Path | None = None) -> dict:
    import torch

    split = p1_split(ctx.lfw_root)
    tests = split.test if ctx.limit is None else split.test[:ctx.limit * 4]
    start = time.perf_counter()
    decoded = [load_image(image.path) for image in tests]
    decode_ms = 1000 * (time.perf_counter() - start) / len(tests)
    from jointface.imageio import resize_shorter_side

    start = time.perf_counter()
    singles = [resize_shorter_side(image, 320) for image in decoded]
    resize_ms = 1000 * (time.perf_counter() - start) / len(tests)
    mosaics = [mosaic(singles[i:i + 4]) for i in range(0, len(singles) - 3, 4)]
    inputs = {"single_320": singles, "mosaic_640": mosaics}

    torch.set_num_threads(2)
    timings: dict[str, dict[str, float]] = {name: {} for name in inputs}
    faces_found: dict[str, dict[str, int]] = {name: {} for name in inputs}
    with tempfile.TemporaryDirectory(prefix="jointface-p4-") as scratch:
        galleries: dict[str, Gallery] = {}
        for engine in engines:
            home = Path(scratch) / engine.name
            ctx.progress(f"P4 enrol P2 gallery ({engine.name})", 0, 1)
            _enrol_p2_gallery(home, engine, ctx.lfw_root, ctx.cache_dir, ctx.limit)
            galleries[engine.name] = Gallery.open(home)
            ctx.progress(f"P4 enrol P2 gallery ({engine.name})", 1, 1)
        pool = None
        if any(engine.name == "dlib" for engine in engines):
            pool = mp.get_context("spawn").Pool(2, initializer=_worker_init, initargs=(str(Path(scratch) / "dlib"),))
            pool.map(_worker_run, singles[:2])  # warm-up: models loaded in both workers
        pipelines = []
        for engine in engines:
            gallery = galleries[engine.name]
            _pipeline_single(engine, gallery, singles[:2])  # warm-up
            if engine.name == "dlib":
                pipelines.append(("dlib, 1 process", lambda ims, e=engine, g=gallery: _pipeline_single(e, g, ims)))
                pipelines.append(("dlib, 2 processes", lambda ims: sum(pool.map(_worker_run, ims, chunksize=4))))
            else:
                pipelines.append((f"{engine.name}, single image",
                                  lambda ims, e=engine, g=gallery: _pipeline_single(e, g, ims)))
                pipelines.append((f"{engine.name}, batch {BATCH}",
                                  lambda ims, e=engine, g=gallery: _pipeline_batched(e, g, ims)))
        profiles: dict[str, dict] = {}
        try:
            for engine in engines:  # where the joint engine's time goes, step by step (after the warm-up)
                if isinstance(engine, JointEngine):
                    profiles[engine.name] = {name: profile_steps(engine, galleries[engine.name], images)
                                             for name, images in inputs.items()}
            for input_name, images in inputs.items():
                rounds = np.array_split(np.arange(len(images)), ROUNDS)
                for round_index, chosen in enumerate(rounds):
                    batch = [images[i] for i in chosen]
                    for name, run in pipelines:
                        start = time.perf_counter()
                        found = run(batch)
                        timings[input_name][name] = timings[input_name].get(name, 0.0) + time.perf_counter() - start
                        faces_found[input_name][name] = faces_found[input_name].get(name, 0) + found
                    ctx.progress(f"P4 {input_name}", round_index + 1, len(rounds))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
            for gallery in galleries.values():
                gallery.close()
    figures: dict[str, dict] = {}
    for input_name, images in inputs.items():
        per_second = {name: len(images) / seconds for name, seconds in timings[input_name].items()}
        baseline = per_second.get("dlib, 2 processes")
        for name, rate in per_second.items():
            figures[f"{input_name}: {name}"] = {
                "images_per_second": rate,
                "ms_per_image": 1000 / rate,
                "faces_per_image": faces_found[input_name][name] / len(images),
                "ratio_to_dlib_2_processes": rate / baseline if baseline else None,
            }
    joint = [engine for engine in engines if engine.max_useful_side]
    decoding = camera_photo_decode_ms(mosaics[0], joint[0].max_useful_side) if joint and mosaics else None
    return {"protocol": "P4", "figures": figures, "step_profile_ms_per_image": profiles,
            "camera_photo_decoding": decoding,
            "config": {"single_images": len(singles), "mosaics": len(mosaics), "rounds": ROUNDS, "batch": BATCH,
                       "torch_threads": torch.get_num_threads(), "decode_ms_per_image": decode_ms,
                       "resize_ms_per_image": resize_ms, "subset": ctx.limit}}


def markdown_p4(result: dict) -> str:
    return protocol_markdown(result, ["images_per_second", "ms_per_image", "faces_per_image",
                                      "ratio_to_dlib_2_processes"],
                             {"images_per_second": "{:.2f}", "ms_per_image": "{:.1f}", "faces_per_image": "{:.2f}",
                              "ratio_to_dlib_2_processes": "{:.2f}x"})
