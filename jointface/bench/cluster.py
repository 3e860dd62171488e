"""``jointface bench cluster``: how well ``jointface cluster`` groups faces by person, per engine.

Data (deterministic, see :func:`cluster_split`): every image of the LFW
people with 2 to 5 images (P2's enrolled people: 1,369 people, 3,739 images)
plus the first 1,000 people (sorted by name) with a single image: 4,739
images of 2,369 people. A good clustering makes 1,369 clusters and leaves
the 1,000 singletons (21.1% of the images) unclustered.

Each engine runs the library code of ``jointface cluster``
(:func:`jointface.clustering.scan` then :func:`jointface.clustering.recluster`
at its defaults) on a temporary gallery. Every face found takes part in the
clustering (bystanders too); each image is scored by its subject face (the
face nearest the image centre, as in P3). A face left unclustered counts as
a cluster of its own. Figures:

* pairwise precision, recall and F1 over all pairs of scored images
  (a pair is predicted "same" when both faces share a cluster);
* BCubed precision, recall and F1 (per image, averaged);
* clusters found against the true people with 2 or more images, and the share
  of images left unclustered (ideal: the singletons' share).

The same faces are then clustered again by each method over its main
parameter (a sweep; the PNG shows pairwise and BCubed F1 against it).
Speed: ``jointface cluster``'s scan and clustering on an uncached engine, on
an evenly spread sample of the images (the full run reuses the detection
cache).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .common import subset
from .protocols import LabelledImage, p2_split

#: How many one-image people (sorted by name) join the clustered images.
SINGLETONS = 1000
#: Cosine similarity thresholds swept for Chinese whispers and DBSCAN: every 0.01 from 0.40, every 0.005 from
#: 0.90 (both engines' F1 rises and falls within a few hundredths there).
THRESHOLDS = tuple(sorted({round(float(t), 3) for t in np.arange(0.40, 0.9, 0.01)}
                          | {round(float(t), 3) for t in np.arange(0.90, 0.9951, 0.005)}))
#: HDBSCAN's min_samples values swept (min_cluster_size is 2).
HDBSCAN_MIN_SAMPLES = (1, 2, 3, 5, 8)
#: Photos in the uncached speed sample.
SPEED_PHOTOS = 200


def cluster_split(lfw_root: Path, singletons: int = SINGLETONS) -> list[LabelledImage]:
    """All images of the LFW people with 2 to 5 images, then the first ``singletons`` one-image people."""
    split = p2_split(lfw_root)
    images = sorted(split.gallery + split.mated, key=lambda image: (image.person, image.position))
    return images + sorted(split.nonmated)[:singletons]


# -- metrics -------------------------------------------------------------------------------------


def _pairs(counts: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    return float((counts * (counts - 1) / 2).sum())


def _singletons_apart(predicted: Sequence[int]) -> np.ndarray:
    """Labels where every -1 (unclustered) becomes a label of its own."""
    predicted = np.asarray(predicted, dtype=np.int64).copy()
    loose = predicted < 0
    predicted[loose] = predicted.max(initial=0) + 1 + np.arange(int(loose.sum()))
    return predicted


def pairwise_scores(truth: Sequence, predicted: Sequence[int]) -> dict:
    """Pairwise precision, recall, F1 (an unclustered item, label -1, is a cluster of its own).

    Precision is 1 when no pair is predicted (nothing claimed, nothing wrong).
    """
    _, true_ids = np.unique(np.asarray(truth, dtype=object).astype(str), return_inverse=True)
    pred_ids = _singletons_apart(predicted)
    _, pred_ids = np.unique(pred_ids, return_inverse=True)
    joint = np.unique(true_ids * (pred_ids.max() + 1) + pred_ids, return_counts=True)[1]
    same_both = _pairs(joint)
    predicted_pairs = _pairs(np.bincount(pred_ids))
    true_pairs = _pairs(np.bincount(true_ids))
    precision = same_both / predicted_pairs if predicted_pairs else 1.0
    recall = same_both / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "true_pairs": true_pairs,
            "predicted_pairs": predicted_pairs}


def bcubed_scores(truth: Sequence, predicted: Sequence[int]) -> dict:
    """BCubed precision, recall and F1 (Bagga and Baldwin 1998; Amigo et al. 2009), unclustered = own cluster."""
    _, true_ids = np.unique(np.asarray(truth, dtype=object).astype(str), return_inverse=True)
    _, pred_ids = np.unique(_singletons_apart(predicted), return_inverse=True)
    joint_key = true_ids * (pred_ids.max() + 1) + pred_ids
    keys, inverse, joint_counts = np.unique(joint_key, return_inverse=True, return_counts=True)
    shared = joint_counts[inverse].astype(np.float64)
    precision = float(np.mean(shared / np.bincount(pred_ids)[pred_ids]))
    recall = float(np.mean(shared / np.bincount(true_ids)[true_ids]))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def score_labels(truth: Sequence, predicted: Sequence[int]) -> dict:
    predicted = np.asarray(predicted, dtype=np.int64)
    pairwise, bcubed = pairwise_scores(truth, predicted), bcubed_scores(truth, predicted)
    return {"pairwise_precision": pairwise["precision"], "pairwise_recall": pairwise["recall"],
            "pairwise_f1": pairwise["f1"], "bcubed_precision": bcubed["precision"],
            "bcubed_recall": bcubed["recall"], "bcubed_f1": bcubed["f1"],
            "clusters": int(len(np.unique(predicted[predicted >= 0]))),
            "unclustered_share": float(np.mean(predicted < 0)) if len(predicted) else 0.0}


# -- the run -------------------------------------------------------------------------------------


def _library_faces(gallery, engine) -> tuple[dict[str, list], np.ndarray, list]:
    """sha256 -> [(position, box, cluster id)], the vectors, and the rows, of every library face."""
    rows = gallery.library.faces_with_photos(engine.name)
    by_photo: dict[str, list] = {}
    for position, row in enumerate(rows):
        by_photo.setdefault(row.sha256, []).append(position)
    vectors = (np.frombuffer(b"".join(row.embedding for row in rows), dtype=np.float32).reshape(len(rows), -1)
               if rows else np.zeros((0, engine.dim), np.float32))
    return by_photo, vectors, rows


def _subject_positions(images: Sequence[LabelledImage], shas: Sequence[str], by_photo: dict, rows) -> list:
    """Per image, the position of its subject face (nearest the image centre), or None."""
    chosen = []
    for image, sha in zip(images, shas):
        positions = by_photo.get(sha, [])
        if not positions:
            chosen.append(None)
            continue

        def off_centre(position: int) -> float:
            row = rows[position]
            return (((row.box_x1 + row.box_x2) / 2 - row.width / 2) ** 2
                    + ((row.box_y1 + row.box_y2) / 2 - row.height / 2) ** 2)

        chosen.append(min(positions, key=off_centre))
    return chosen


def _sweep(vectors: np.ndarray, subjects: np.ndarray, truth: list, progress, stage: str) -> dict:
    from jointface.clustering import cluster_embeddings, neighbours

    graph = neighbours(vectors)
    runs = [("chinese-whispers", t) for t in THRESHOLDS] + [("dbscan", t) for t in THRESHOLDS] + \
        [("hdbscan", m) for m in HDBSCAN_MIN_SAMPLES]
    sweep: dict[str, list] = {"chinese-whispers": [], "dbscan": [], "hdbscan": []}
    for count, (method, value) in enumerate(runs, 1):
        start = time.perf_counter()
        if method == "hdbscan":
            labels = cluster_embeddings(vectors, method=method, min_faces=2, min_samples=int(value))
        else:
            labels = cluster_embeddings(vectors, method=method, threshold=float(value), min_faces=2, graph=graph)
        row = score_labels(truth, labels[subjects])
        row.update(parameter=value, seconds=time.perf_counter() - start)
        sweep[method].append(row)
        progress(stage, count, len(runs))
    return sweep


def _speed(engine, images: Sequence[LabelledImage]) -> dict:
    """``cluster``'s scan + clustering on the uncached engine, timed, on a sample of the photos."""
    from index import Gallery
    from jointface.clustering import recluster, scan
    from jointface.imageio import load_image

    inner = getattr(engine, "inner", engine)
    step = max(1, len(images) // SPEED_PHOTOS)
    sample = [image.path for image in images[::step]][:SPEED_PHOTOS]
    inner.detect(load_image(sample[0]))  # warm-up
    with tempfile.TemporaryDirectory(prefix="jointface-cluster-speed-") as home, Gallery.open(home) as gallery:
        start = time.perf_counter()
        report = scan(gallery, inner, sample, loader=load_image)
        scanned = time.perf_counter()
        recluster(gallery, inner.name, inner.version, match_threshold=None)
        end = time.perf_counter()
    return {"photos": len(sample), "faces": report.faces_found, "seconds": end - start,
            "photos_per_second": len(sample) / (end - start), "faces_per_second": report.faces_found / (end - start),
            "scan_seconds": scanned - start, "cluster_seconds": end - scanned}


def run_cluster(engines: Sequence, ctx, out_dir: Path | None = None) -> dict:
    """The cluster benchmark over ``engines`` (already wrapped in the detection cache)."""
    from index import Gallery
    from jointface.clustering import (DEFAULT_METHOD, cluster_detail, default_threshold, list_clusters, recluster,
                                      scan, write_contact_sheet)
    from jointface.imageio import load_image
    from jointface.service import file_sha256

    images = cluster_split(ctx.lfw_root)
    if ctx.limit:  # a quick run keeps whole people, evenly spread
        multi = sorted({image.person for image in images[:-SINGLETONS]})
        keep = set(subset(multi, ctx.limit)) | set(subset([i.person for i in images[-SINGLETONS:]], ctx.limit))
        images = [image for image in images if image.person in keep]
    truth_all = [image.person for image in images]
    shas = [file_sha256(image.path) for image in images]
    true_people = len(set(truth_all))
    people_multi = sum(1 for count in np.unique(truth_all, return_counts=True)[1] if count >= 2)
    ideal_unclustered = (true_people - people_multi) / len(images)
    figures: dict[str, dict] = {}
    sweeps: dict[str, dict] = {}
    sheets: dict[str, str] = {}
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix="jointface-cluster-") as home, Gallery.open(home) as gallery:
            done = [0]

            def tick(_outcome) -> None:
                done[0] += 1
                if done[0] % 50 == 0 or done[0] == len(images):
                    ctx.progress(f"cluster {engine.name} scan", done[0], len(images))

            start = time.perf_counter()
            report = scan(gallery, engine, [image.path for image in images], loader=load_image, on_progress=tick)
            scanned = time.perf_counter()
            summary = recluster(gallery, engine.name, engine.version, match_threshold=None)
            clustered = time.perf_counter()
            by_photo, vectors, rows = _library_faces(gallery, engine)
            if out_dir is not None:  # what a user sees: the contact sheet of the largest cluster
                largest = list_clusters(gallery, engine.name)
                if largest:
                    sheet = Path(out_dir) / f"cluster_sheet_{engine.name}.png"
                    write_contact_sheet(cluster_detail(gallery, largest[0].id), sheet)
                    sheets[engine.name] = str(sheet)
        subject = _subject_positions(images, shas, by_photo, rows)
        scored = [i for i, position in enumerate(subject) if position is not None]
        truth = [truth_all[i] for i in scored]
        subjects = np.array([subject[i] for i in scored], dtype=np.int64)
        library_labels = np.array([-1 if row.cluster_id is None else row.cluster_id for row in rows], np.int64)
        row = score_labels(truth, library_labels[subjects])
        row.update(method=summary.method, threshold=summary.threshold, min_faces=summary.min_faces,
                   clusters_in_library=summary.clusters, true_people_with_2_or_more=people_multi,
                   true_people=true_people, ideal_unclustered_share=ideal_unclustered, images=len(images),
                   scored_images=len(scored), no_face=len(images) - len(scored), faces=len(rows),
                   failed=report.count("failed"), full_run_scan_seconds=scanned - start,
                   full_run_cluster_seconds=clustered - scanned,
                   detection_cache={"hits": getattr(engine, "hits", None), "misses": getattr(engine, "misses", None)})
        sweep = _sweep(vectors, subjects, truth, ctx.progress, f"cluster {engine.name} sweep")
        row["best"] = {method: max(values, key=lambda r: r["pairwise_f1"]) for method, values in sweep.items()}
        row["speed"] = _speed(engine, images)
        row["default_threshold"] = default_threshold(engine.name)
        figures[engine.name] = row
        sweeps[engine.name] = sweep
    result = {"protocol": "CLUSTER", "figures": figures, "sweeps": sweeps,
              "config": {"images": len(images), "singletons": SINGLETONS, "default_method": DEFAULT_METHOD,
                         "min_faces": 2, "thresholds": list(THRESHOLDS),
                         "hdbscan_min_samples": list(HDBSCAN_MIN_SAMPLES), "speed_photos": SPEED_PHOTOS,
                         "subset": ctx.limit}}
    if out_dir is not None:
        result["plots"] = {"f1": str(plot_sweeps(sweeps, figures, Path(out_dir) / "cluster_f1.png")),
                           **{f"largest cluster, {name}": path for name, path in sheets.items()}}
    return result


def plot_sweeps(sweeps: dict, figures: dict, path: Path) -> Path:
    """Pairwise F1 (solid) and BCubed F1 (dashed) against each method's main parameter, one line per engine."""
    from .plots import _new_figure, _save

    figure = _new_figure((13.0, 4.2))
    methods = ("chinese-whispers", "dbscan", "hdbscan")
    colours = {}
    for column, method in enumerate(methods, 1):
        axes = figure.add_subplot(1, len(methods), column)
        for engine, sweep in sweeps.items():
            values = sweep.get(method, [])
            xs = [value["parameter"] for value in values]
            (line,) = axes.plot(xs, [value["pairwise_f1"] for value in values], label=f"{engine} pairwise",
                                color=colours.get(engine))
            colours[engine] = line.get_color()
            axes.plot(xs, [value["bcubed_f1"] for value in values], linestyle="--", color=line.get_color(),
                      label=f"{engine} BCubed")
            if method == figures[engine].get("method") and figures[engine].get("threshold") is not None:
                axes.axvline(figures[engine]["threshold"], color=line.get_color(), linewidth=0.8, linestyle=":")
        axes.set_title(method)
        axes.set_xlabel("min_samples" if method == "hdbscan" else "cosine similarity threshold")
        axes.set_ylim(0, 1)
        axes.grid(True, linewidth=0.3, alpha=0.6)
        if column == 1:
            axes.set_ylabel("F1")
            axes.legend(loc="lower left", fontsize="small")
    figure.suptitle("jointface cluster on LFW (people with 2-5 images + 1,000 singletons); dotted: default")
    return _save(figure, path)


def markdown_cluster(result: dict) -> str:
    from .plots import markdown_table

    percent = lambda value: "-" if value is None else f"{100 * value:.2f}%"  # noqa: E731
    rows = {}
    for engine, row in result["figures"].items():
        rows[engine] = {
            "method (threshold)": f"{row['method']} ({row['threshold']})" if row.get("threshold") is not None
            else row["method"],
            "pairwise P / R": f"{percent(row['pairwise_precision'])} / {percent(row['pairwise_recall'])}",
            "pairwise F1": percent(row["pairwise_f1"]),
            "BCubed P / R": f"{percent(row['bcubed_precision'])} / {percent(row['bcubed_recall'])}",
            "BCubed F1": percent(row["bcubed_f1"]),
            "clusters / true people (2+ images)": f"{row['clusters']:,} / {row['true_people_with_2_or_more']:,}",
            "unclustered (ideal)": f"{percent(row['unclustered_share'])} ({percent(row['ideal_unclustered_share'])})",
            "no face": row["no_face"],
            "faces/s": f"{row['speed']['faces_per_second']:.1f}",
        }
    text = markdown_table(rows, row_header="engine")
    best = {}
    for engine, row in result["figures"].items():
        for method, value in row["best"].items():
            best[f"{engine}, {method}"] = {
                "best parameter": value["parameter"], "pairwise F1": percent(value["pairwise_f1"]),
                "BCubed F1": percent(value["bcubed_f1"]), "clusters": f"{value['clusters']:,}",
                "unclustered": percent(value["unclustered_share"])}
    text += "\nBest of each method's sweep (the same faces, clustered again):\n\n" + markdown_table(
        best, row_header="engine, method")
    speed = {engine: {"photos": row["speed"]["photos"], "faces": row["speed"]["faces"],
                      "seconds": f"{row['speed']['seconds']:.1f}",
                      "photos/s": f"{row['speed']['photos_per_second']:.1f}",
                      "faces/s": f"{row['speed']['faces_per_second']:.1f}"}
             for engine, row in result["figures"].items()}
    text += ("\n`jointface cluster` speed (scan and clustering, uncached engine, an evenly spread sample of the "
             "images):\n\n" + markdown_table(speed, row_header="engine"))
    subset = result.get("config", {}).get("subset")
    note = f"\n\nSubset run: {subset} (not the full protocol).\n" if subset else "\n"
    return f"## Cluster\n\n{text}{note}"
