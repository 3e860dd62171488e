"""How the joint network's identity depends on the size a face has in the network's input (issue 15).

    python benchmarks/joint_v2/face_size/sweep.py [WEIGHTS ...] [--sizes 128 160 ...]
                                                  [--labels runs/labels/lfw.jsonl] [--out DIR]

Every photo of the LFW P2 people (2-5 photos each, never trained on) is
letterboxed to each input size in turn (an LFW photo is 250 px, so its face
scales with the input), and dlib's landmark box of its face is embedded from
that one pass (fp32 torch, no detection: the read-out alone). Per size:

* ``rank1@all``: every P2 person's first photo enrolled, the others probes;
* ``open_tpir``: the open-set TPIR at FPIR 0.01 of ``item4/evaluate.py``
  (even-indexed people enrolled, odd-indexed people strangers);
* ``teacher_cos``: the mean cosine of the embedding to dlib's centred
  descriptor of the same face (the distillation target);
* ``face_px``: the median side of the face box in the input.

The engine reads a photo at ``JointEngine.V2_INPUT_SCALE`` of its longer side
(an LFW photo at 192 px); this says whether that is where identity is best.
Writes ``results.json``, ``results.md`` and ``results.png`` in --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "item4"))
from evaluate import arguments_or_replot, open_set, p2_photos  # noqa: E402 - item 4's P2 photos and measures

SIZES = (128, 160, 192, 224, 256, 288, 320)


def teacher_vectors(labels: str, photos: list[tuple[str, str, list[float]]]) -> np.ndarray:
    """dlib's descriptor of each photo's subject face, in the order of ``photos``."""
    from jointface.datasets.teacher import manifest_path, read_face_labels

    root = Path(json.loads(manifest_path(Path(labels)).read_text())["root"])
    by_path = {}
    for record in read_face_labels(labels):
        subject = next((f for f in record["faces"] if f["subject"]), None)
        if subject is not None:
            by_path[str(root / record["path"])] = subject["teacher"]
    return np.asarray([by_path[path] for _, path, _ in photos], dtype=np.float32)


def centred_teachers(raw: np.ndarray, model) -> np.ndarray:
    """dlib's descriptors as the network's distillation target: minus its teacher mean, unit length."""
    teachers = raw - model.teacher_mean.numpy()
    return teachers / np.linalg.norm(teachers, axis=1, keepdims=True)


def p2_figures(people: list[str], vectors: np.ndarray, teachers: np.ndarray) -> dict:
    """Rank-1 over all P2 people, item 4's open-set figures and the mean cosine to the teacher of one set of
    embeddings (one per P2 photo)."""
    from jointface.train.v2 import proxy_rank1

    rank_all, probes = proxy_rank1(people, vectors)
    return {"rank1@all": rank_all, "probes": probes,
            "teacher_cos": float(np.mean(np.sum(vectors * teachers, axis=1)))
            if vectors.shape[1] == teachers.shape[1] else float("nan"),
            **{f"open_{k}": v for k, v in open_set(people, vectors).items()}}


def write_outputs(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| weights | input px | median face px | rank-1, all P2 people | TPIR at FPIR 0.01 | cosine to teacher |",
             "|---|---|---|---|---|---|"]
    for name, rows in results["weights"].items():
        for row in rows:
            lines.append(f"| {name} | {row['size']} | {row['face_px']:.0f} | {row['rank1@all']:.2%} | "
                         f"{row['open_tpir']:.2%} | {row['teacher_cos']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, rows in results["weights"].items():
        faces = [row["face_px"] for row in rows]
        for axis, key in zip(axes, ("rank1@all", "open_tpir", "teacher_cos")):
            scale = 1 if key == "teacher_cos" else 100
            axis.plot(faces, [scale * row[key] for row in rows], "o-", label=name)
            for row in rows:
                axis.annotate(str(row["size"]), (row["face_px"], scale * row[key]), fontsize=7,
                              textcoords="offset points", xytext=(0, 5), ha="center")
    for axis, title in zip(axes, (f"rank-1, all {results['people']} P2 people (%)", "TPIR at FPIR 0.01 (%)",
                                  "mean cosine to dlib's centred descriptor")):
        axis.set_xlabel("median face side in the input (px); labels: input size", fontsize=9)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Identity by face size: LFW P2 photos (250 px) letterboxed to each input size, dlib's boxes")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="*", type=Path, default=[Path("jointface/weights/jointface.pt")])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--roi-split", type=float, default=None,
                        help="read faces under this side (input px) from the stride-8 map instead of the weights' own")
    args = arguments_or_replot(parser, argv, write_outputs, Path(__file__).parent)
    if args is None:
        return 0

    import torch

    from jointface.train.v2 import embed_boxes, v2_network

    torch.set_num_threads(2)
    photos, people, images = p2_photos(args.labels)
    raw_teachers = teacher_vectors(args.labels, photos)
    results = {"labels": args.labels, "people": len(set(people)), "photos": len(photos), "weights": {}}
    for weights in args.weights:
        model = v2_network(weights)
        name = str(weights)
        if args.roi_split is not None:
            model.record.roi_split = args.roi_split
            name += f" (roi_split {args.roi_split:g})"
        teachers = centred_teachers(raw_teachers, model)
        rows = []
        for size in args.sizes:
            vectors, sides = [], []
            with torch.inference_mode():
                for image, (_, _, box) in zip(images, photos):
                    vectors.append(embed_boxes(model, image, [box], size)[0])
                    scale = size / max(image.shape[:2])
                    sides.append(scale * ((box[2] - box[0]) * (box[3] - box[1])) ** 0.5)
            row = {"size": size, "face_px": float(np.median(sides)),
                   **p2_figures(people, np.stack(vectors), teachers)}
            rows.append(row)
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        results["weights"][name] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_outputs(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
