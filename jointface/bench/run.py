"""``jointface bench``: the protocols of ``PROTOCOLS.md`` run against engines.

Each protocol function takes engines and returns a results dict; enrolment
and search go through :func:`jointface.service.enroll` and
:func:`jointface.service.identify` on a temporary gallery, exactly as the
``enroll`` and ``search`` commands do. :func:`write_results` stores a JSON
file (figures, configuration, engine versions, git commit, date, CPU,
threads), a Markdown table and PNG plots under ``benchmarks/results/``.

Detections are cached per engine version (see :mod:`jointface.bench.cache`)
so that reruns and interrupted runs are cheap; speed is measured separately,
on uncached calls.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from index import Gallery
from jointface.engines import Engine, Face
from jointface.imageio import load_image, resize_shorter_side
from jointface.service import enroll, identify

from . import metrics, plots
from .cache import CachingEngine, ResultCache, image_key
from .protocols import default_shared_data, p1_split, p2_split, p3_pairs

P1_SHORTER_SIDE = 320
REPO = Path(__file__).resolve().parents[2]
Progress = Callable[[str, int, int], None]


def load_p1(path: Path) -> np.ndarray:
    return resize_shorter_side(load_image(path), P1_SHORTER_SIDE)


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


@dataclass
class BenchContext:
    lfw_root: Path
    cache_dir: Path
    progress: Progress = lambda stage, done, total: None
    limit: int | None = None  # per-protocol subset for quick runs (CI); None = the full protocol
    notes: list[str] = field(default_factory=list)


def _subset(items: Sequence, limit: int | None) -> list:
    """Every k-th item so a subset spans the whole (sorted) list."""
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def _enrol_gallery(gallery: Gallery, engine: Engine, images, ctx: BenchContext, stage: str, loader) -> dict:
    total = len(images)
    done = [0]

    def tick(_outcome):
        done[0] += 1
        if done[0] % 25 == 0 or done[0] == total:
            ctx.progress(stage, done[0], total)

    report = enroll(gallery, engine, [(image.person, image.path) for image in images], choice="best",
                    loader=loader, batch_size=256, on_progress=tick)
    failed = [str(o.path) for o in report.outcomes if o.status == "failed"]
    return {"enrolled": report.count("enrolled"), "failed": len(failed), "failed_images": failed[:50]}


def _probe(gallery: Gallery, engine: Engine, images, loader, ctx: BenchContext, stage: str, top_k: int = 5):
    """For each probe image: (best face or None, its candidates [(name, sim)] or None)."""
    results = []
    for count, image in enumerate(images, 1):
        face = best_face(engine.detect(loader(image.path)))
        if face is None:
            results.append((None, None))
        else:
            found = identify(gallery, engine, [face], top_k=top_k, threshold=-np.inf)[0]
            results.append((face, list(found.candidates)))
        if count % 25 == 0 or count == len(images):
            ctx.progress(stage, count, len(images))
    return results


def images_per_second(engine: Engine, images: Sequence[np.ndarray], repeats: int = 1) -> float:
    inner = getattr(engine, "inner", engine)
    inner.detect(images[0])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        for image in images:
            inner.detect(image)
    return repeats * len(images) / (time.perf_counter() - start)


# -- P1 ------------------------------------------------------------------------------------


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


def run_p1(engines: Sequence[Engine], ctx: BenchContext, speed_images: int = 60) -> dict:
    split = p1_split(ctx.lfw_root)
    # A quick run (limit N) keeps N people, evenly spread, with all their P1 images.
    people = set(_subset(split.people, ctx.limit))
    train = [image for image in split.train if image.person in people]
    test = [image for image in split.test if image.person in people]
    refs = reference_boxes([image.path for image in test], ctx, load_p1)
    figures: dict[str, dict] = {}
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix="jointface-p1-") as home, Gallery.open(home) as gallery:
            enrol = _enrol_gallery(gallery, engine, train, ctx, f"P1 {engine.name} enrol", load_p1)
            probes = _probe(gallery, engine, test, load_p1, ctx, f"P1 {engine.name} test")
        predicted = [cands[0][0] if cands else None for _, cands in probes]
        truth = [image.person for image in test]
        iou = metrics.mean_iou([face.box if face is not None else None for face, _ in probes], refs)
        row = {
            "top1_nearest_train": metrics.top1_accuracy(predicted, truth),
            "correct": int(sum(p == t for p, t in zip(predicted, truth))),
            "test_images": len(test),
            "no_face": sum(face is None for face, _ in probes),
            "mean_iou": iou.mean, "iou_images": iou.n_used, "no_reference_box": iou.n_no_reference,
            "train_enrolled": enrol["enrolled"], "train_failed": enrol["failed"],
        }
        classify = getattr(getattr(engine, "inner", engine), "classify", None)
        if classify is not None:
            labels = []
            for image in test:
                faces = engine.detect(load_p1(image.path))
                face = best_face(faces)
                labels.append(classify(face) if face is not None else None)
            row["top1_classifier"] = metrics.top1_accuracy(labels, truth)
        sample = [load_p1(image.path) for image in _subset(split.test, speed_images)]
        row["images_per_second"] = images_per_second(engine, sample)
        figures[engine.name] = row
    return {"protocol": "P1", "figures": figures,
            "config": {"shorter_side": P1_SHORTER_SIDE, "train_images": len(train), "test_images": len(test),
                       "speed_images": speed_images, "subset": ctx.limit}}


# -- P2 ------------------------------------------------------------------------------------


def p2_scores(engine: Engine, ctx: BenchContext, gallery_size: int = 1) -> dict:
    split = p2_split(ctx.lfw_root, gallery_size=gallery_size)
    gallery_images = split.gallery
    mated, nonmated = _subset(split.mated, ctx.limit), _subset(split.nonmated, ctx.limit and ctx.limit * 2)
    if ctx.limit:
        wanted = {image.person for image in mated}
        gallery_images = [image for image in gallery_images if image.person in wanted] + \
            _subset([image for image in gallery_images if image.person not in wanted], ctx.limit)
    with tempfile.TemporaryDirectory(prefix="jointface-p2-") as home, Gallery.open(home) as gallery:
        enrol = _enrol_gallery(gallery, engine, gallery_images, ctx, f"P2 {engine.name} gallery", load_image)
        mated_results = _probe(gallery, engine, mated, load_image, ctx, f"P2 {engine.name} mated")
        nonmated_results = _probe(gallery, engine, nonmated, load_image, ctx, f"P2 {engine.name} non-mated")
    return {"enrol": enrol, "mated_labels": [image.person for image in mated],
            "mated": [cands for _, cands in mated_results], "nonmated": [cands for _, cands in nonmated_results]}


def transfer_experiment(engine: Engine, ctx: BenchContext) -> dict:
    """The study's Experiment 2 on never-trained people: retrain a classifier on frozen embeddings.

    P2's extension split (people with 4-5 images, first 3 enrolled): accuracy
    of enroll-only nearest neighbour (the gallery search) against a softmax
    classifier trained on the same frozen gallery embeddings, on the
    remaining images. A probe without a face counts as wrong for both.
    """
    import torch

    split = p2_split(ctx.lfw_root, gallery_size=3)
    gallery_images = _subset(split.gallery, ctx.limit and ctx.limit * 3)
    people = sorted({image.person for image in gallery_images})
    probes = [image for image in split.mated if image.person in set(people)]
    with tempfile.TemporaryDirectory(prefix="jointface-transfer-") as home, Gallery.open(home) as gallery:
        _enrol_gallery(gallery, engine, gallery_images, ctx, f"transfer {engine.name} gallery", load_image)
        results = _probe(gallery, engine, probes, load_image, ctx, f"transfer {engine.name} probes", top_k=1)
        from sqlalchemy import select

        from index.models import FaceRow, Person

        with gallery.store.session() as session:
            rows = session.execute(select(Person.name, FaceRow.embedding).join(FaceRow)).all()
    index_of = {name: i for i, name in enumerate(people)}
    train_x = torch.tensor(np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in rows]))
    train_y = torch.tensor([index_of[name] for name, _ in rows])
    torch.manual_seed(0)
    classifier = torch.nn.Linear(train_x.shape[1], len(people))
    optimiser = torch.optim.Adam(classifier.parameters(), lr=0.05, weight_decay=1e-4)
    scale = 16.0  # embeddings are unit vectors: scale the logits so softmax can become confident
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(train_x * scale), train_y)
        loss.backward()
        optimiser.step()
    truth = [image.person for image in probes]
    nearest = [cands[0][0] if cands else None for _, cands in results]
    with torch.no_grad():
        predicted = [None if face is None else people[int(classifier(torch.tensor(face.embedding) * scale).argmax())]
                     for face, _ in results]
    return {"people": len(people), "gallery_images": len(rows), "probes": len(probes),
            "nearest_neighbour_accuracy": metrics.top1_accuracy(nearest, truth),
            "retrained_classifier_accuracy": metrics.top1_accuracy(predicted, truth)}


def run_p2(engines: Sequence[Engine], ctx: BenchContext, out_dir: Path | None = None) -> dict:
    figures: dict[str, dict] = {}
    det: dict[str, tuple] = {}
    cmc_curves: dict[str, np.ndarray] = {}
    for engine in engines:
        scores = p2_scores(engine, ctx)
        report = metrics.identification_report(scores["mated"], scores["mated_labels"], scores["nonmated"])
        correct, rank1 = metrics.mated_rank1(scores["mated"], scores["mated_labels"])
        nonmated_best = metrics.best_scores(scores["nonmated"])
        n_mated, n_nonmated = len(scores["mated"]), len(scores["nonmated"])
        det[engine.name] = metrics.det_curve(correct, rank1, nonmated_best, n_mated=n_mated, n_nonmated=n_nonmated)
        cmc_curves[engine.name] = metrics.cmc_curve(scores["mated"], scores["mated_labels"], max_rank=5)
        # Calibration on held-out strangers: threshold from the even-indexed
        # non-mated probes, FPIR measured on the odd-indexed ones.
        half_a, half_b = nonmated_best[0::2], nonmated_best[1::2]
        calibration = {}
        for target in (0.01, 0.1):
            threshold = metrics.threshold_for_fpir(half_a, target)
            calibration[f"{target}"] = {
                "threshold": float(threshold),
                "fpir_held_out": metrics.fpir_at_threshold(half_b, threshold),
                "tpir": metrics.tpir_at_threshold(correct, rank1, threshold),
            }
        figures[engine.name] = {**{k: (float(v) if isinstance(v, (float, np.floating)) else v)
                                   for k, v in report.items()},
                                "gallery_enrolled": scores["enrol"]["enrolled"],
                                "gallery_failed": scores["enrol"]["failed"],
                                "mated_probes": n_mated, "nonmated_probes": n_nonmated,
                                "calibrated": calibration,
                                "default_threshold": engine.default_threshold,
                                "fpir_at_default_threshold": metrics.fpir_at_threshold(nonmated_best,
                                                                                       engine.default_threshold),
                                "tpir_at_default_threshold": metrics.tpir_at_threshold(
                                    correct, rank1, engine.default_threshold),
                                "transfer": transfer_experiment(engine, ctx)}
    result = {"protocol": "P2", "figures": figures, "config": {"gallery_size": 1, "subset": ctx.limit}}
    if out_dir is not None:
        result["plots"] = {
            "det": str(plots.plot_det(det, out_dir / "p2_det.png", title="P2 open-set identification (LFW)")),
            "cmc": str(plots.plot_cmc(cmc_curves, out_dir / "p2_cmc.png")),
        }
    return result


# -- P3 ------------------------------------------------------------------------------------


def run_p3(engines: Sequence[Engine], ctx: BenchContext) -> dict:
    folds = p3_pairs(default_shared_data() / "lfw_protocol" / "pairs.txt", ctx.lfw_root)
    pairs = [pair for fold in folds for pair in fold]
    if ctx.limit:
        pairs = _subset(pairs, ctx.limit * 10)
    figures = {}
    for engine in engines:
        embeddings: dict[Path, np.ndarray | None] = {}
        paths = sorted({p for pair in pairs for p in (pair.left_path, pair.right_path)})
        for count, path in enumerate(paths, 1):
            image = load_image(path)
            face = subject_face(engine.detect(image), image.shape[1], image.shape[0])
            embeddings[path] = None if face is None else face.embedding
            if count % 50 == 0 or count == len(paths):
                ctx.progress(f"P3 {engine.name} images", count, len(paths))

        def similarity(pair) -> float:
            left, right = embeddings[pair.left_path], embeddings[pair.right_path]
            return -1.0 if left is None or right is None else float(np.dot(left, right))

        row = {}
        for name, chosen in (("all_pairs", pairs), ("pairs_without_p1", [p for p in pairs if not p.has_p1_person])):
            scores = np.array([similarity(p) for p in chosen])
            same = np.array([p.same for p in chosen])
            fold_ids = np.array([p.fold for p in chosen])
            mean, std, _ = metrics.verification_accuracy_10fold(scores, same, fold_ids)
            row[name] = {"accuracy": mean, "std": std, "pairs": len(chosen)}
        row["images_without_face"] = sum(v is None for v in embeddings.values())
        figures[engine.name] = row
    return {"protocol": "P3", "figures": figures, "config": {"subset": ctx.limit}}


# -- results -------------------------------------------------------------------------------


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


def _fmt_percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def markdown_for(result: dict) -> str:
    protocol = result["protocol"]
    figures = result["figures"]
    if protocol == "P1":
        columns = ["top1_nearest_train", "top1_classifier", "mean_iou", "images_per_second", "no_face"]
        formats = {"top1_nearest_train": _fmt_percent, "top1_classifier": _fmt_percent,
                   "mean_iou": "{:.3f}", "images_per_second": "{:.1f}"}
    elif protocol == "P2":
        columns = ["rank1", "rank5", "tpir@fpir=0.01", "threshold@fpir=0.01", "tpir@fpir=0.1",
                   "threshold@fpir=0.1"]
        formats = {"rank1": _fmt_percent, "rank5": _fmt_percent, "tpir@fpir=0.01": _fmt_percent,
                   "tpir@fpir=0.1": _fmt_percent, "threshold@fpir=0.01": "{:.3f}", "threshold@fpir=0.1": "{:.3f}"}
    elif protocol == "P3":
        figures = {name: {"all pairs": f"{100 * row['all_pairs']['accuracy']:.2f}% ± "
                                       f"{100 * row['all_pairs']['std']:.2f}",
                          "pairs without P1 people": f"{100 * row['pairs_without_p1']['accuracy']:.2f}% ± "
                                                     f"{100 * row['pairs_without_p1']['std']:.2f}"}
                   for name, row in figures.items()}
        columns, formats = ["all pairs", "pairs without P1 people"], {}
    elif protocol == "P4":
        columns = ["images_per_second", "ms_per_image", "faces_per_image", "ratio_to_dlib_2_processes"]
        formats = {"images_per_second": "{:.2f}", "ms_per_image": "{:.1f}", "faces_per_image": "{:.2f}",
                   "ratio_to_dlib_2_processes": "{:.2f}x"}
    elif protocol == "P5":
        from .gallery_speed import markdown_p5

        return markdown_p5(result)
    elif protocol == "P6":
        from .p6 import markdown_p6

        return markdown_p6(result)
    elif protocol == "CLUSTER":
        from .cluster import markdown_cluster

        return markdown_cluster(result)
    else:
        columns, formats = None, {}
    table = plots.markdown_table(figures, columns=columns, formats=formats, row_header="engine")
    profiles = result.get("step_profile_ms_per_image") or {}
    if profiles:  # P4: where the joint engine's time goes
        rows = {f"{input_name}: {engine}": steps for engine, by_input in profiles.items()
                for input_name, steps in by_input.items()}
        steps = list(dict.fromkeys(step for row in rows.values() for step in row))
        table += ("\n\nJoint engine, batch of 8, milliseconds per image in each step:\n\n"
                  + plots.markdown_table(rows, columns=steps, formats={s: "{:.2f}" for s in steps},
                                         row_header="input: engine"))
    if protocol == "P2":
        table += _p2_details(result)
    decoding = result.get("camera_photo_decoding")
    if decoding:
        table += (f"\n\nDecoding a {decoding['size'][0]}x{decoding['size'][1]} JPEG: {decoding['full_ms']:.0f} ms in "
                  f"full, {decoding['reduced_ms']:.0f} ms at a longer side of {decoding['max_side']} px (draft "
                  f"mode, what `search` does for the joint engine).")
    subset = result.get("config", {}).get("subset")
    note = f"\n\nSubset run: {subset} (not the full protocol).\n" if subset else "\n"
    return f"## {protocol}\n\n{table}{note}"


def _p2_details(result: dict) -> str:
    """P2's further tables: how each network was trained, calibration on held-out strangers, transfer."""
    figures, records = result["figures"], result.get("engines", {})
    trained = {name: {"identity heads": " + ".join(record["identity_heads"]),
                      "start": "continued" if record.get("continued_from") else "from scratch",
                      "steps (last run)": record.get("training_steps"),
                      "P1 validation (nearest train)": (record.get("validation") or {}).get("top1_nearest")}
               for name, record in records.items() if record.get("identity_heads")}
    text = ""
    if trained:
        text += ("\nHow each joint network was trained (from its weights file):\n\n"
                 + plots.markdown_table(trained, row_header="engine",
                                        formats={"P1 validation (nearest train)": _fmt_percent}))
    calibration = {name: {f"{key} @ FPIR {target}": row["calibrated"][target][key]
                          for target in ("0.01", "0.1") for key in ("threshold", "fpir_held_out", "tpir")}
                   for name, row in figures.items() if "calibrated" in row}
    if calibration:
        text += ("\nCalibration on held-out strangers (threshold from the even-numbered non-mated probes, "
                 "FPIR measured on the odd-numbered ones, TPIR on all mated probes):\n\n"
                 + plots.markdown_table(calibration, row_header="engine",
                                        formats={c: ("{:.3f}" if c.startswith("threshold") else _fmt_percent)
                                                 for row in calibration.values() for c in row}))
    transfer = {name: {"people": row["transfer"]["people"],
                       "nearest neighbour (enrol only)": row["transfer"]["nearest_neighbour_accuracy"],
                       "classifier retrained on frozen embeddings": row["transfer"]["retrained_classifier_accuracy"]}
                for name, row in figures.items() if row.get("transfer")}
    if transfer:
        text += ("\nTransfer to the P2 people (the study's Experiment 2), top-1 accuracy on their mated "
                 "probes:\n\n"
                 + plots.markdown_table(transfer, row_header="engine",
                                        formats={"nearest neighbour (enrol only)": _fmt_percent,
                                                 "classifier retrained on frozen embeddings": _fmt_percent}))
    return text.rstrip("\n")


def write_results(result: dict, engines: Sequence[Engine], out_dir: Path, tag: str | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result["protocol"].lower() + (f"-{tag}" if tag else "")
    result = {**result, "engines": engine_records(engines), "environment": environment()}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown_for(result))
    return json_path


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value))


def caching(engines: Sequence[Engine], cache_dir: Path) -> list[Engine]:
    return [CachingEngine(engine, cache_dir) for engine in engines]


def run_protocol(name: str, engines: Sequence[Engine], ctx: BenchContext, out_dir: Path) -> dict:
    """Run one protocol (``p1`` ... ``p6``, ``cluster``) over ``engines``."""
    if name in ("p1", "p2", "p3", "p6", "cluster"):
        cached = caching(engines, ctx.cache_dir)
        try:
            if name == "cluster":
                from .cluster import run_cluster

                return run_cluster(cached, ctx, out_dir)
            if name == "p1":
                return run_p1(cached, ctx)
            if name == "p2":
                return run_p2(cached, ctx, out_dir)
            if name == "p6":
                from .p6 import run_p6

                return run_p6(cached, ctx, out_dir)
            return run_p3(cached, ctx)
        finally:
            for engine in cached:
                engine.close()
    if name == "p4":
        from .speed import run_p4

        return run_p4(engines, ctx, out_dir)
    if name == "p5":
        from .gallery_speed import run_p5

        return run_p5(ctx, out_dir)
    raise ValueError(f"unknown protocol {name!r}")
