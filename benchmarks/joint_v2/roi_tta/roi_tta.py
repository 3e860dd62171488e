"""Issue 15: does averaging each face's embedding over a few jittered RoIs of the same pass help identity?

    python benchmarks/joint_v2/roi_tta/roi_tta.py [WEIGHTS] [--labels runs/labels/lfw.jsonl] [--out DIR]

The engine's boxes differ from dlib's landmark boxes by about 6% of their size (``../engine_gap``), and the
read-out is not invariant to its box. Averaging the identity head's embedding over several boxes around the
face costs only the per-face head, not a second network pass (the RoIs are pooled from the same maps), so
it would keep the one-pass design. Every photo of the 1,369 LFW P2 people is embedded at 192 px (fp32
torch, ``face_size/sweep.py``'s setting) from dlib's box and from six variants of it (scaled 0.9 / 1.1,
shifted 6% of its size left / right / up / down); per arm, rank-1 over all P2 people and item 4's open-set
TPIR at FPIR 0.01. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "item4"))
from evaluate import open_set, p2_photos  # noqa: E402 - item 4's P2 photos and open-set measure

SCALES = (1.0, 0.9, 1.1)
SHIFTS = ((0.06, 0.0), (-0.06, 0.0), (0.0, 0.06), (0.0, -0.06))
ARMS = {"dlib's box": [0], "scaled 0.9 only": [1], "scaled 1.1 only": [2], "mean over 3 scales": [0, 1, 2],
        "mean over box + 4 shifts": [0, 3, 4, 5, 6], "mean over all 7": list(range(7))}


def variants(box: list[float]) -> list[list[float]]:
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    out = [[cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2] for s in SCALES]
    return out + [[x1 + dx * w, y1 + dy * h, x2 + dx * w, y2 + dy * h] for dx, dy in SHIFTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="?", default="jointface/weights/jointface.pt")
    parser.add_argument("--labels", default="runs/labels/lfw.jsonl")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--size", type=int, default=192)
    args = parser.parse_args(argv)

    import torch

    from jointface.engines.base import l2_normalise
    from jointface.train.v2 import embed_boxes, proxy_rank1, v2_network

    torch.set_num_threads(2)
    photos, people, images = p2_photos(args.labels)
    model = v2_network(args.weights)
    with torch.inference_mode():
        embeddings = l2_normalise(np.stack([embed_boxes(model, image, variants(box), args.size)
                                    for image, (_, _, box) in zip(images, photos)]))  # (photos, 7, D)
    rows = {}
    for name, chosen in ARMS.items():
        vectors = l2_normalise(embeddings[:, chosen].sum(1))
        rank1, probes = proxy_rank1(people, vectors)
        rows[name] = {"rank1@all": rank1, "probes": probes, "open_tpir": open_set(people, vectors)["tpir"]}
        print(name, rows[name], flush=True)
    lines = [f"RoIs averaged per face, {args.weights}, {len(set(people))} P2 people, {args.size} px, dlib's boxes:", "",
             "| read-out | rank-1, all P2 people | TPIR at FPIR 0.01 (open set) |", "|---|---|---|"]
    lines += [f"| {name} | {row['rank1@all']:.2%} | {row['open_tpir']:.2%} |" for name, row in rows.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"weights": str(args.weights), "size": args.size,
                                                       "arms": rows}, indent=2) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
