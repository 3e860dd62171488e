"""What the benchmark protocols share: the run context, the subset of a quick run, picking a probe's face,
the landmark reference boxes, what a results file records (engines, environment) and how a protocol's
Markdown table is laid out.

Imported by the protocol modules (:mod:`.lfw`, :mod:`.speed`, :mod:`.gallery_speed`, :mod:`.p6`,
:mod:`.cluster`) and by :mod:`.run`; imports none of them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jointface.engines import Engine, Face

from . import plots
from .cache import CachingEngine, ResultCache, image_key

REPO = Path(__file__).resolve().parents[2]
Progress = Callable[[str, int, int], None]


@dataclass
class BenchContext:
    lfw_root: Path
    cache_dir: Path
    progress: Progress = lambda stage, done, total: None
    limit: int | None = None  # per-protocol subset for quick runs (CI); None = the full protocol
    notes: list[str] = field(default_factory=list)


def subset(items: Sequence, limit: int | None) -> list:
    """Every k-th item so a subset spans the whole (sorted) list."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def best_face(faces: Sequence[Face]) -> Face | None:
    """The highest-confidence face (PROTOCOLS.md: the face a probe is judged by)."""
    return max(faces, key=lambda face: face.score) if faces else None


def subject_face(faces: Sequence[Face], width: int, height: int) -> Face | None:
    """The face whose box centre is nearest the image centre: an LFW photo's labelled person.

    PROTOCOLS.md picks the subject this way for the reference boxes; P3 (pairs
    of labelled people) uses it too, so a better-scoring bystander is not
    verified in the subject's place.
    """
    if not faces:
        return None

    def distance(face: Face) -> float:
        x1, y1, x2, y2 = face.box
        return ((x1 + x2) / 2 - width / 2) ** 2 + ((y1 + y2) / 2 - height / 2) ** 2

    return min(faces, key=distance)


def reference_boxes(paths: Sequence[Path], ctx: BenchContext, loader,
                    stage: str = "P1 reference boxes") -> list[tuple | None]:
    """PROTOCOLS.md landmark boxes (dlib), cached."""
    from jointface.engines.dlib_engine import models_fingerprint, reference_box

    cache = ResultCache(ctx.cache_dir / f"reference-boxes-{models_fingerprint()}.sqlite")
    boxes = []
    try:
        for count, path in enumerate(paths, 1):
            image = loader(path)
            key = image_key(image, "reference")
            cached = cache.get(key)
            if cached is None:
                box = reference_box(image)
                cache.put(key, box, None)
            else:
                box = cached[0]
            boxes.append(tuple(box) if box is not None else None)
            if count % 50 == 0 or count == len(paths):
                ctx.progress(stage, count, len(paths))
    finally:
        cache.close()
    return boxes


def caching(engines: Sequence[Engine], cache_dir: Path) -> list[Engine]:
    return [CachingEngine(engine, cache_dir) for engine in engines]


# -- what a results file records -------------------------------------------------------------


#: What the benchmarks write themselves (results, the README's results section, the weights card), and the
#: README's prose: changes there do not make a run's code differ from its commit.
BENCHMARK_OUTPUTS = ("benchmarks/results/", "README.md", "jointface/weights/jointface.json")


def changed_sources(porcelain: str) -> list[str]:
    """Tracked files changed since the commit (``git status --porcelain`` text), less :data:`BENCHMARK_OUTPUTS`."""
    changed = []
    for line in porcelain.splitlines():
        path = line[3:].split(" -> ")[-1].strip().strip('"')
        if path and not any(path == out or (out.endswith("/") and path.startswith(out)) for out in BENCHMARK_OUTPUTS):
            changed.append(path)
    return changed


def environment() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        changed = changed_sources(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                 cwd=REPO, capture_output=True, text=True, timeout=10).stdout)
        dirty = bool(changed)
    except (OSError, subprocess.SubprocessError):
        commit, dirty, changed = None, None, None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
            "git_dirty": dirty, "git_changed": changed, "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def engine_records(engines: Sequence[Engine]) -> dict:
    return {engine.name: getattr(engine, "inner", engine).describe() | {"version": engine.version}
            for engine in engines}


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


def fmt_percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def protocol_markdown(result: dict, columns: list[str] | None = None, formats: dict | None = None,
                      figures: dict | None = None, details: str = "") -> str:
    """A protocol's ``## P..`` section: one row per engine (``figures``, default the result's) in ``columns``
    with ``formats``; then the joint engine's step profile and the photo decoding time when the result has
    them, ``details`` (further tables), and a note when the run was a subset."""
    protocol = result["protocol"]
    figures = result["figures"] if figures is None else figures
    table = plots.markdown_table(figures, columns=columns, formats=formats or {}, row_header="engine")
    profiles = result.get("step_profile_ms_per_image") or {}
    if profiles:  # P4: where the joint engine's time goes
        rows = {f"{input_name}: {engine}": steps for engine, by_input in profiles.items()
                for input_name, steps in by_input.items()}
        steps = list(dict.fromkeys(step for row in rows.values() for step in row))
        table += ("\n\nJoint engine, batch of 8, milliseconds per image in each step:\n\n"
                  + plots.markdown_table(rows, columns=steps, formats={s: "{:.2f}" for s in steps},
                                         row_header="input: engine"))
    table += details
    decoding = result.get("camera_photo_decoding")
    if decoding:
        table += (f"\n\nDecoding a {decoding['size'][0]}x{decoding['size'][1]} JPEG: {decoding['full_ms']:.0f} ms in "
                  f"full, {decoding['reduced_ms']:.0f} ms at a longer side of {decoding['max_side']} px (draft "
                  f"mode, what `search` does for the joint engine).")
    subset = result.get("config", {}).get("subset")
    note = f"\n\nSubset run: {subset} (not the full protocol).\n" if subset else "\n"
    return f"## {protocol}\n\n{table}{note}"
