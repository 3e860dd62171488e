"""Would aligning each face's RoI help the joint network's identity? (issue 15)

    python benchmarks/joint_v2/alignment/upright.py [WEIGHTS ...] [--labels runs/labels/lfw.jsonl] [--out DIR]

dlib's descriptor, and every recogniser trained on aligned chips, sees a face
whose eyes are level; the joint network's identity reads an axis-aligned RoI
of the face box, whatever the head's roll. This measures, with no training,
how much roll costs the read-out as it is: every photo of the LFW P2 people
(2-5 photos each, never trained on) is rotated about its face's centre before
the one pass, and dlib's landmark box of that face (same centre, same size)
is embedded at the engine's 192 px (fp32 torch, no detection), under three
conditions:

* ``as is``: the photo unrotated (the face keeps its own roll);
* ``upright``: rotated by minus its roll (eyes level, as dlib's chips);
* ``roll doubled``: rotated by plus its roll (the face's roll doubled).

The roll is the angle of the line between the eye centres of dlib's 5-point
landmarks (``shape_predictor_5_face_landmarks``). If ``upright`` names people
clearly better than ``as is`` (and ``roll doubled`` worse), an RoI aligned to
the face (landmarks predicted in the same pass) is worth building; if the
three agree, the read-out is already insensitive to roll and alignment is not
where the identity gap is. Per condition: rank-1 over all P2 people (first
photo enrolled), the open-set TPIR at FPIR 0.01 of ``item4/evaluate.py`` and
the mean cosine to dlib's centred descriptor (computed on the unrotated
photo, as dlib aligns it itself). Writes ``results.json``, ``results.md``,
``results.png`` (rank-1 and TPIR per condition, and the roll histogram).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "item4"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "face_size"))
from evaluate import arguments_or_replot, p2_photos  # noqa: E402 - item 4's P2 photos and script arguments
from sweep import centred_teachers, p2_figures, teacher_vectors  # noqa: E402 - the face-size sweep's measures

CONDITIONS = {"as is": 0.0, "upright": -1.0, "roll doubled": 1.0}  # rotation = factor x the face's roll


def face_rolls(images: list[np.ndarray], boxes: list[list[float]]) -> np.ndarray:
    """The roll of each face in degrees (image y down: positive when the face's right side is lower)."""
    import dlib

    from jointface.engines.dlib_engine import _load

    predictor = _load("landmarks_5")
    rolls = []
    for image, box in zip(images, boxes):
        shape = predictor(np.ascontiguousarray(image), dlib.rectangle(*(int(round(v)) for v in box)))
        points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
        first, second = points[0:2].mean(axis=0), points[2:4].mean(axis=0)  # the two eyes' corner pairs
        left, right = sorted((first, second), key=lambda p: p[0])
        rolls.append(math.degrees(math.atan2(right[1] - left[1], right[0] - left[0])))
    return np.asarray(rolls)


def rotate_about(image: np.ndarray, centre: tuple[float, float], degrees: float) -> np.ndarray:
    """``image`` (H, W, 3) uint8 turned by ``degrees`` about ``centre`` (x, y), bilinear, edges replicated.
    Positive degrees turn the content clockwise on screen (with y down), which levels a face whose roll is
    ``-degrees``."""
    import torch
    import torch.nn.functional as F

    if degrees == 0:
        return image
    height, width = image.shape[:2]
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    dx, dy = xs - centre[0], ys - centre[1]
    # output pixel p takes the input at centre + R(angle) (p - centre): content turns by -angle in the output
    sx, sy = centre[0] + cos * dx - sin * dy, centre[1] + sin * dx + cos * dy
    grid = torch.stack((2 * sx / (width - 1) - 1, 2 * sy / (height - 1) - 1), dim=-1)[None]
    tensor = torch.from_numpy(np.ascontiguousarray(image).copy()).permute(2, 0, 1)[None].float()
    out = F.grid_sample(tensor, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def write_outputs(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| weights | condition | rank-1, all P2 people | TPIR at FPIR 0.01 | cosine to teacher |",
             "|---|---|---|---|---|"]
    for name, rows in results["weights"].items():
        for condition, row in rows.items():
            lines.append(f"| {name} | {condition} | {row['rank1@all']:.2%} | {row['open_tpir']:.2%} | "
                         f"{row['teacher_cos']:.3f} |")
    rolls = np.asarray(results["rolls"])
    lines.append("")
    lines.append(f"Roll of the {len(rolls)} P2 faces: mean {rolls.mean():.1f} deg, sd {rolls.std():.1f} deg, "
                 f"{np.mean(np.abs(rolls) > 10):.1%} beyond 10 deg, {np.mean(np.abs(rolls) > 20):.1%} beyond 20 deg.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = list(results["weights"])
    width = 0.8 / max(1, len(names))
    for axis, key, title in ((axes[0], "rank1@all", f"rank-1, all {results['people']} P2 people (%)"),
                             (axes[1], "open_tpir", "TPIR at FPIR 0.01 (%)")):
        for i, name in enumerate(names):
            values = [100 * results["weights"][name][c][key] for c in CONDITIONS]
            bars = axis.bar(np.arange(len(CONDITIONS)) + i * width, values, width, label=Path(name).parent.name or name)
            axis.bar_label(bars, fmt="%.1f", fontsize=7)
        axis.set_xticks(np.arange(len(CONDITIONS)) + width * (len(names) - 1) / 2, list(CONDITIONS))
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    axes[2].hist(rolls, bins=40)
    axes[2].set_xlabel("roll (deg), dlib's 5-point landmarks")
    axes[2].set_title("roll of the P2 faces", fontsize=10)
    fig.suptitle("Identity against head roll: P2 photos turned about the face before the one pass (192 px)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="*", type=Path, default=[Path("jointface/weights/jointface.pt")])
    parser.add_argument("--size", type=int, default=192)
    args = arguments_or_replot(parser, argv, write_outputs, Path(__file__).parent)
    if args is None:
        return 0

    import torch

    from jointface.train.v2 import embed_boxes, v2_network

    torch.set_num_threads(2)
    photos, people, images = p2_photos(args.labels)
    boxes = [box for _, _, box in photos]
    rolls = face_rolls(images, boxes)
    print(f"roll: mean {rolls.mean():.1f} deg, sd {rolls.std():.1f} deg", flush=True)
    raw_teachers = teacher_vectors(args.labels, photos)
    turned = {}
    for condition, factor in CONDITIONS.items():
        turned[condition] = [rotate_about(image, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), -factor * roll)
                             for image, b, roll in zip(images, boxes, rolls)]
    results = {"labels": args.labels, "size": args.size, "people": len(set(people)), "photos": len(photos),
               "rolls": [round(float(r), 2) for r in rolls], "weights": {}}
    for weights in args.weights:
        model = v2_network(weights)
        teachers = centred_teachers(raw_teachers, model)
        rows = {}
        for condition, condition_images in turned.items():
            with torch.inference_mode():
                vectors = np.stack([embed_boxes(model, image, [box], args.size)[0]
                                    for image, box in zip(condition_images, boxes)])
            rows[condition] = p2_figures(people, vectors, teachers)
            print(weights, condition, {k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in rows[condition].items()}, flush=True)
        results["weights"][str(weights)] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_outputs(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
