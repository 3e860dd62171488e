"""Does the int8 path pick the same best face as the fp32 reference, photo by photo? (issue 15, item 6)

For each weights file: every ``--step``-th LFW person from ``--start`` (their first photo at a shorter side
of 320 px, batches of 8, as ``test_fast_paths_match_the_reference_path`` runs them), the best face of
``jointface-reference@W`` against that of ``jointface@W`` (int8): box IoU and embedding cosine. Prints a
line per weights file and writes ``best_face_agreement.json`` beside this script.

    python benchmarks/int8_calibration/best_face_agreement.py WEIGHTS.pt [...] [--start 0 --stop 1200 --step 6]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jointface.bench.metrics import box_iou_np
from jointface.datasets.protocols import require_shared_data
from jointface.engines import get_engine
from jointface.imageio import load_image, resize_shorter_side


def agreement(weights: str, images: list[np.ndarray]) -> dict:
    reference, fast = get_engine(f"jointface-reference@{weights}"), get_engine(f"jointface@{weights}")
    ious, cosines = [], []
    for start in range(0, len(images), 8):
        batch = images[start:start + 8]
        for ref, quick in zip(reference.detect_batch(batch), fast.detect_batch(batch)):
            if ref and quick:
                ious.append(float(box_iou_np(np.array([ref[0].box]), np.array([quick[0].box]))[0, 0]))
                cosines.append(float(np.dot(ref[0].embedding, quick[0].embedding)))
    ious_a, cos_a = np.array(ious), np.array(cosines)
    return {"weights": weights, "version": fast.version, "photos": len(ious), "iou_min": float(ious_a.min()),
            "iou_median": float(np.median(ious_a)), "under_iou_0.95": int((ious_a < 0.95).sum()),
            "cosine_min": float(cos_a.min()), "under_cosine_0.99": int((cos_a < 0.99).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=1200)
    parser.add_argument("--step", type=int, default=6)
    args = parser.parse_args()
    lfw = require_shared_data() / "lfw"
    lfw = lfw / "lfw" if (lfw / "lfw").is_dir() else lfw
    people = sorted(p for p in lfw.iterdir() if p.is_dir())[args.start:args.stop:args.step]
    images = [resize_shorter_side(load_image(sorted(p.glob("*.jpg"))[0]), 320) for p in people]
    rows = []
    for weights in args.weights:
        row = {**agreement(weights, images), "people": f"[{args.start}:{args.stop}:{args.step}]"}
        rows.append(row)
        print(json.dumps(row))
    out = Path(__file__).with_name("best_face_agreement.json")
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(previous + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
