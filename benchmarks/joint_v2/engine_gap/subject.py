"""Which face the joint engine judges an LFW P2 photo by, against the photo's subject (issue 15).

    python benchmarks/joint_v2/engine_gap/subject.py [--engine jointface] [--labels runs/labels/lfw.jsonl]
                                                     [--out benchmarks/joint_v2/engine_gap]

P2 enrols each person's first photo and judges each probe by its highest-confidence face (as P1 and
dlib's reference figures do). For every photo of the 1,369 P2 people (gallery and mated probes), with
the engine's own settings: no face found; the highest-confidence face is not the subject (IoU < 0.3 with
dlib's landmark box of the labelled person), and whether the subject was found too; with the scores and
sizes of both. Each such photo loses its person (a gallery photo: all of that person's probes). Writes
``subject.json`` and ``subject.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def side(box) -> float:
    return float(((box[2] - box[0]) * (box[3] - box[1])) ** 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="jointface")
    parser.add_argument("--labels", default="runs/labels/lfw.jsonl")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)

    from jointface.bench.common import best_face
    from jointface.bench.metrics import box_iou_np
    from jointface.engines import get_engine
    from jointface.imageio import load_image
    from jointface.train.v2 import p2_proxy_set

    engine = get_engine(args.engine)
    photos = p2_proxy_set(args.labels, 100_000)
    rows = []
    for count, (person, path, box) in enumerate(photos, 1):
        faces = engine.detect(load_image(path))
        best = best_face(faces)
        overlaps = box_iou_np([face.box for face in faces], [box])[:, 0]
        subject = faces[int(np.argmax(overlaps))] if faces and overlaps.max() >= 0.3 else None
        rows.append({"photo": str(Path(path).name), "faces": len(faces),
                     "best_is_subject": best is not None and bool(overlaps[faces.index(best)] >= 0.3),
                     "subject_score": subject.score if subject else None,
                     "subject_side": side(subject.box) if subject else None,
                     "best_score": best.score if best else None, "best_side": side(best.box) if best else None})
        if count % 500 == 0 or count == len(photos):
            print(f"{count}/{len(photos)}", file=sys.stderr, flush=True)
    no_face = [r for r in rows if r["faces"] == 0]
    other = [r for r in rows if r["faces"] and not r["best_is_subject"]]
    beaten = [r for r in other if r["subject_score"] is not None]
    summary = {"engine": args.engine, "photos": len(rows), "several_faces": sum(r["faces"] > 1 for r in rows),
               "no_face": len(no_face), "best_not_subject": len(other), "best_not_subject_subject_found": len(beaten),
               "beaten_subject_score_median": float(np.median([r["subject_score"] for r in beaten])) if beaten else None,
               "beaten_best_score_median": float(np.median([r["best_score"] for r in beaten])) if beaten else None,
               "beaten_subject_side_median": float(np.median([r["subject_side"] for r in beaten])) if beaten else None,
               "beaten_best_side_median": float(np.median([r["best_side"] for r in beaten])) if beaten else None}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "subject.json").write_text(json.dumps({"summary": summary, "photos": [r for r in rows if r in other
                                                                                      or r in no_face]}, indent=2) + "\n")
    lines = [f"Engine `{args.engine}` on the {summary['photos']} photos of the LFW P2 people "
             f"({summary['several_faces']} with several faces found):", "",
             f"* no face: {summary['no_face']}",
             f"* highest-confidence face not the subject: {summary['best_not_subject']} "
             f"({summary['best_not_subject_subject_found']} with the subject found too)"]
    if beaten:
        lines.append(f"* in those, median score subject {summary['beaten_subject_score_median']:.3f} against "
                     f"{summary['beaten_best_score_median']:.3f}, median side {summary['beaten_subject_side_median']:.0f} "
                     f"against {summary['beaten_best_side_median']:.0f} px")
    (args.out / "subject.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
