"""How close the int8 path stays to the fp32 reference, by calibration (issue 15, item 6).

    python benchmarks/int8_calibration/study.py WEIGHTS [--photos 300] [--out benchmarks/int8_calibration]

The int8 model of WEIGHTS is made several ways (calibration photos: the first
64 of LFW's P1 training split, evenly spaced, as `jointface quantize` takes
them), then every variant and the reference (fp32 torch, BatchNorm unfolded:
``jointface-reference``) run on P1 test photos, at the engine's own input size.
For each reference face, the variant's face of best IoU is its twin; the
figures are the twins' embedding cosine (mean, 1st percentile, minimum), their
box IoU, and faces the variant misses or adds (IoU < 0.5). The decision is made
on these; P1 and P2 themselves are measured with `jointface bench`.

Writes ``results.json`` and ``study.log`` in --out. Training photos calibrate;
the measured photos are test photos, never used for calibration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jointface.bench.metrics import box_iou_np
from jointface.bench.p6 import greedy_match

VARIANTS = {  # name: calibration sizes (None: the photo as it is)
    "320 (before)": (320,),
    "photo + 320": (None, 320),
    "photo": (None,),
}


def compare(reference: list[list], variant: list[list]) -> dict:
    """Each reference face's twin in the variant (P6's greedy IoU match, IoU >= 0.5): embedding cosine, IoU."""
    cosines, ious, missed, extra = [], [], 0, 0
    for ref_faces, faces in zip(reference, variant):
        matching = greedy_match([f.box for f in ref_faces], [f.box for f in faces], 0.5)
        overlaps = box_iou_np([f.box for f in ref_faces], [f.box for f in faces])
        for index, (ref, twin) in enumerate(zip(ref_faces, matching.detection_of_box)):
            if twin is None:
                missed += 1
                continue
            ious.append(float(overlaps[index, twin]))
            cosines.append(float(np.dot(ref.embedding, faces[twin].embedding)))
        extra += matching.false_detections
    cos = np.array(cosines)
    return {"faces": len(cos), "cos_mean": round(float(cos.mean()), 5), "cos_p1": round(float(np.percentile(cos, 1)), 5),
            "cos_min": round(float(cos.min()), 5), "iou_mean": round(float(np.mean(ious)), 4),
            "missed": missed, "extra": extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--photos", type=int, default=300, help="P1 test photos measured (evenly spaced)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)

    from jointface.datasets.protocols import default_shared_data, p1_split
    from jointface.engines.joint_engine import JointEngine, quantize_weights
    from jointface.imageio import load_image

    split = p1_split(default_shared_data() / "lfw")
    calibration = [image.path for image in split.train]
    tests = sorted(image.path for image in split.test)
    tests = tests[::max(1, len(tests) // args.photos)][:args.photos]
    images = [load_image(path) for path in tests]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "study.log"
    log.write_text("")

    def say(line: str) -> None:
        print(line, flush=True)
        with log.open("a") as handle:
            handle.write(line + "\n")

    say(f"weights {args.weights}, {len(calibration)} calibration photos (64 used), {len(images)} P1 test photos")
    reference_engine = JointEngine(args.weights, conf_threshold=0.5, fuse=False, channels_last=False)
    reference = [reference_engine.detect(image) for image in images]
    say(f"reference (fp32 torch): {sum(map(len, reference))} faces at confidence >= 0.5")
    results = {"weights": str(args.weights), "weights_version": reference_engine.version,
               "test_photos": len(images), "reference_faces": sum(map(len, reference)), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="int8-study-") as scratch:
        for name, sizes in VARIANTS.items():
            folder = Path(scratch) / name.replace(" ", "_").replace("+", "_")
            folder.mkdir()
            weights = folder / "jointface.pt"
            shutil.copy(args.weights, weights)
            started = time.perf_counter()
            summary = quantize_weights(weights, calibration, count=64, sizes=sizes)
            took = time.perf_counter() - started
            engine = JointEngine(weights, conf_threshold=0.5, runtime="int8")
            figures = compare(reference, [engine.detect(image) for image in images])
            figures.update(input_sizes=summary["input_sizes"], quantize_seconds=round(took, 1))
            results["variants"][name] = figures
            say(f"{name}: {json.dumps(figures)}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
