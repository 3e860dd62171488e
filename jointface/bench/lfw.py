"""The LFW protocols run against engines (``PROTOCOLS.md``): P1 (closed-set identification and detection),
P2 (open-set identification, calibration, transfer) and P3 (verification on the standard pairs).

Enrolment and search go through :func:`jointface.service.enroll` and
:func:`jointface.service.identify` on a temporary gallery, exactly as the
``enroll`` and ``search`` commands do.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from index import Gallery
from jointface.engines import Engine
from jointface.imageio import load_image, resize_shorter_side
from jointface.service import enroll, identify

from . import metrics, plots
from .common import BenchContext, best_face, fmt_percent, protocol_markdown, reference_boxes, subject_face, subset
from .protocols import default_shared_data, p1_split, p2_split, p3_pairs

P1_SHORTER_SIDE = 320


def load_p1(path: Path) -> np.ndarray:
    return resize_shorter_side(load_image(path), P1_SHORTER_SIDE)


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


def run_p1(engines: Sequence[Engine], ctx: BenchContext, speed_images: int = 60) -> dict:
    split = p1_split(ctx.lfw_root)
    # A quick run (limit N) keeps N people, evenly spread, with all their P1 images.
    people = set(subset(split.people, ctx.limit))
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
        sample = [load_p1(image.path) for image in subset(split.test, speed_images)]
        row["images_per_second"] = images_per_second(engine, sample)
        figures[engine.name] = row
    return {"protocol": "P1", "figures": figures,
            "config": {"shorter_side": P1_SHORTER_SIDE, "train_images": len(train), "test_images": len(test),
                       "speed_images": speed_images, "subset": ctx.limit}}


def markdown_p1(result: dict) -> str:
    return protocol_markdown(result, ["top1_nearest_train", "top1_classifier", "mean_iou", "images_per_second",
                                      "no_face"],
                             {"top1_nearest_train": fmt_percent, "top1_classifier": fmt_percent,
                              "mean_iou": "{:.3f}", "images_per_second": "{:.1f}"})


# -- P2 ------------------------------------------------------------------------------------


def p2_scores(engine: Engine, ctx: BenchContext, gallery_size: int = 1) -> dict:
    split = p2_split(ctx.lfw_root, gallery_size=gallery_size)
    gallery_images = split.gallery
    mated, nonmated = subset(split.mated, ctx.limit), subset(split.nonmated, ctx.limit and ctx.limit * 2)
    if ctx.limit:
        wanted = {image.person for image in mated}
        gallery_images = [image for image in gallery_images if image.person in wanted] + \
            subset([image for image in gallery_images if image.person not in wanted], ctx.limit)
    with tempfile.TemporaryDirectory(prefix="jointface-p2-") as home, Gallery.open(home) as gallery:
        enrol = _enrol_gallery(gallery, engine, gallery_images, ctx, f"P2 {engine.name} gallery", load_image)
        mated_results = _probe(gallery, engine, mated, load_image, ctx, f"P2 {engine.name} mated")
        nonmated_results = _probe(gallery, engine, nonmated, load_image, ctx, f"P2 {engine.name} non-mated")
        enrolled = gallery.embeddings_by_person()
    labels = [image.person for image in mated]
    return {"enrol": enrol, "mated_labels": labels,
            "mated": [cands for _, cands in mated_results], "nonmated": [cands for _, cands in nonmated_results],
            "matrices": _score_matrices(enrolled, [face for face, _ in mated_results], labels,
                                        [face for face, _ in nonmated_results])}


def _score_matrices(enrolled, mated_faces, mated_labels, nonmated_faces) -> dict:
    """Every probe's similarity to every enrolled person (the best over the person's faces, as the gallery's
    search ranks people): ``nonmated`` ``(strangers, people)``, ``mated`` ``(probes, people)`` and
    ``mated_people`` (each mated probe's column; a probe whose person is not enrolled is left out). A probe
    without a face is a row of NaN."""
    names = sorted({name for name, _ in enrolled})
    column = {name: i for i, name in enumerate(names)}
    vectors = np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in enrolled]) if enrolled else None
    owner = np.array([column[name] for name, _ in enrolled], dtype=np.int64)

    def matrix(faces) -> np.ndarray:
        out = np.full((len(faces), len(names)), np.nan)
        found = [i for i, face in enumerate(faces) if face is not None]
        if vectors is None or not found:
            return out
        sims = np.stack([faces[i].embedding for i in found]).astype(np.float32) @ vectors.T
        best = np.full((len(found), len(names)), -np.inf)
        for person in range(len(names)):  # a person's best face
            best[:, person] = sims[:, owner == person].max(axis=1)
        out[found] = best
        return out

    keep = [i for i, label in enumerate(mated_labels) if label in column]
    return {"nonmated": matrix(nonmated_faces), "mated": matrix([mated_faces[i] for i in keep]),
            "mated_people": np.array([column[mated_labels[i]] for i in keep], dtype=np.int64)}


def transfer_experiment(engine: Engine, ctx: BenchContext) -> dict:
    """The study's Experiment 2 on never-trained people: retrain a classifier on frozen embeddings.

    P2's extension split (people with 4-5 images, first 3 enrolled): accuracy
    of enroll-only nearest neighbour (the gallery search) against a softmax
    classifier trained on the same frozen gallery embeddings, on the
    remaining images. A probe without a face counts as wrong for both.
    """
    import torch

    split = p2_split(ctx.lfw_root, gallery_size=3)
    gallery_images = subset(split.gallery, ctx.limit and ctx.limit * 3)
    people = sorted({image.person for image in gallery_images})
    probes = [image for image in split.mated if image.person in set(people)]
    with tempfile.TemporaryDirectory(prefix="jointface-transfer-") as home, Gallery.open(home) as gallery:
        _enrol_gallery(gallery, engine, gallery_images, ctx, f"transfer {engine.name} gallery", load_image)
        results = _probe(gallery, engine, probes, load_image, ctx, f"transfer {engine.name} probes", top_k=1)
        rows = gallery.embeddings_by_person()
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
        by_size = _by_gallery_size(scores, nonmated_best)
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
                                "by_gallery_size": by_size,
                                "transfer": transfer_experiment(engine, ctx)}
    result = {"protocol": "P2", "figures": figures, "config": {"gallery_size": 1, "subset": ctx.limit}}
    if out_dir is not None:
        result["plots"] = {
            "det": str(plots.plot_det(det, out_dir / "p2_det.png", title="P2 open-set identification (LFW)")),
            "cmc": str(plots.plot_cmc(cmc_curves, out_dir / "p2_cmc.png")),
        }
        sized = {name: row["by_gallery_size"] for name, row in figures.items() if row.get("by_gallery_size")}
        if sized:
            result["plots"]["by_gallery_size"] = str(_plot_by_gallery_size(sized, out_dir / "p2_gallery_size.png"))
    return result


#: FPIR targets of the calibration by gallery size (0.1: the joint engine's default threshold)
GALLERY_SIZE_FPIRS = ("0.1", "0.01")


def _by_gallery_size(scores: dict, nonmated_best: np.ndarray) -> dict | None:
    """The calibration by gallery size (:func:`jointface.calibration.thresholds_by_gallery_size`) at each FPIR of
    ``GALLERY_SIZE_FPIRS``; None when the score matrices do not reproduce the gallery's own best scores (an
    engine whose search scores people otherwise)."""
    from jointface.calibration import thresholds_by_gallery_size

    matrices = scores["matrices"]
    with warnings.catch_warnings():  # a stranger without a face: an all-NaN row
        warnings.simplefilter("ignore", RuntimeWarning)
        best = np.nanmax(matrices["nonmated"], axis=1) if matrices["nonmated"].shape[1] else None
    if best is None or not np.allclose(best, nonmated_best, atol=1e-4, equal_nan=True):
        return None
    return {fpir: thresholds_by_gallery_size(matrices["nonmated"], float(fpir), mated_scores=matrices["mated"],
                                             mated_people=matrices["mated_people"])
            for fpir in GALLERY_SIZE_FPIRS}


def _plot_by_gallery_size(sized: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, tables in sized.items():
        for fpir, style in zip(GALLERY_SIZE_FPIRS, ("-", "--")):
            rows = tables[fpir]
            people = [row["people"] for row in rows]
            left.plot(people, [row["threshold"] for row in rows], style, marker=".", label=f"{name}, FPIR {fpir}")
            right.plot(people, [row["tpir"] for row in rows], style, marker=".", label=f"{name}, FPIR {fpir}")
    for axis, label in ((left, "threshold keeping the FPIR"), (right, "TPIR at that threshold")):
        axis.set_xscale("log")
        axis.set_xlabel("people in the gallery")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle("P2: open-set thresholds and TPIR by gallery size (random sub-galleries of P2's gallery)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_p2(result: dict) -> str:
    return protocol_markdown(result, ["rank1", "rank5", "tpir@fpir=0.01", "threshold@fpir=0.01", "tpir@fpir=0.1",
                                      "threshold@fpir=0.1"],
                             {"rank1": fmt_percent, "rank5": fmt_percent, "tpir@fpir=0.01": fmt_percent,
                              "tpir@fpir=0.1": fmt_percent, "threshold@fpir=0.01": "{:.3f}",
                              "threshold@fpir=0.1": "{:.3f}"},
                             details=_p2_details(result))


def _p2_details(result: dict) -> str:
    """P2's further tables: how each network was trained, calibration on held-out strangers, transfer."""
    figures, records = result["figures"], result.get("engines", {})
    trained = {name: {"identity heads": " + ".join(record["identity_heads"]),
                      "start": f"from {Path(record['continued_from']).name}" if record.get("continued_from")
                      else "from scratch",
                      "steps (last run)": record.get("training_steps"),
                      "P1 validation (nearest train)": (record.get("validation") or {}).get("top1_nearest")}
               for name, record in records.items() if record.get("identity_heads")}
    text = ""
    if trained:
        text += ("\nHow each joint network was trained (from its weights file):\n\n"
                 + plots.markdown_table(trained, row_header="engine",
                                        formats={"P1 validation (nearest train)": fmt_percent}))
    calibration = {name: {f"{key} @ FPIR {target}": row["calibrated"][target][key]
                          for target in ("0.01", "0.1") for key in ("threshold", "fpir_held_out", "tpir")}
                   for name, row in figures.items() if "calibrated" in row}
    if calibration:
        text += ("\nCalibration on held-out strangers (threshold from the even-numbered non-mated probes, "
                 "FPIR measured on the odd-numbered ones, TPIR on all mated probes):\n\n"
                 + plots.markdown_table(calibration, row_header="engine",
                                        formats={c: ("{:.3f}" if c.startswith("threshold") else fmt_percent)
                                                 for row in calibration.values() for c in row}))
    sized = {name: row["by_gallery_size"] for name, row in figures.items() if row.get("by_gallery_size")}
    if sized:
        table = {}
        for name, tables in sized.items():
            for fpir, rows in tables.items():
                table[f"{name}, FPIR {fpir}"] = {
                    (f"{row['people']} people" if i < len(rows) - 1 else "whole gallery"):
                    f"{row['threshold']:.3f} / {row['fpir_held_out']:.1%} / {row['tpir']:.1%}"
                    for i, row in enumerate(rows)}
        text += ("\nCalibration by gallery size (random sub-galleries of P2's gallery, 20 per size; threshold / "
                 "held-out FPIR / TPIR of mated probes among their person and the others drawn; the whole gallery: P2's own "
                 "calibration). A stranger's "
                 "best score grows with the number of people it meets, so a small gallery keeps the same FPIR "
                 "at a lower threshold; the joint engine's default threshold follows this table "
                 "(`jointface bench report` writes it into the weights card):\n\n"
                 + plots.markdown_table(table, row_header="engine"))
    transfer = {name: {"people": row["transfer"]["people"],
                       "nearest neighbour (enrol only)": row["transfer"]["nearest_neighbour_accuracy"],
                       "classifier retrained on frozen embeddings": row["transfer"]["retrained_classifier_accuracy"]}
                for name, row in figures.items() if row.get("transfer")}
    if transfer:
        text += ("\nTransfer to the P2 people (the study's Experiment 2), top-1 accuracy on their mated "
                 "probes:\n\n"
                 + plots.markdown_table(transfer, row_header="engine",
                                        formats={"nearest neighbour (enrol only)": fmt_percent,
                                                 "classifier retrained on frozen embeddings": fmt_percent}))
    return text.rstrip("\n")


# -- P3 ------------------------------------------------------------------------------------


def run_p3(engines: Sequence[Engine], ctx: BenchContext) -> dict:
    folds = p3_pairs(default_shared_data() / "lfw_protocol" / "pairs.txt", ctx.lfw_root)
    pairs = [pair for fold in folds for pair in fold]
    if ctx.limit:
        pairs = subset(pairs, ctx.limit * 10)
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


def markdown_p3(result: dict) -> str:
    figures = {name: {"all pairs": f"{100 * row['all_pairs']['accuracy']:.2f}% ± "
                                   f"{100 * row['all_pairs']['std']:.2f}",
                      "pairs without P1 people": f"{100 * row['pairs_without_p1']['accuracy']:.2f}% ± "
                                                 f"{100 * row['pairs_without_p1']['std']:.2f}"}
               for name, row in result["figures"].items()}
    return protocol_markdown(result, ["all pairs", "pairs without P1 people"], {}, figures=figures)
