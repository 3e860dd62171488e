"""Where the joint engine loses P2 points the identity sweep does not, and the face it misses in knn_examples.

    python benchmarks/joint_v2/engine_gap/misses.py [--labels runs/labels/lfw.jsonl]
                                                    [--out benchmarks/joint_v2/engine_gap]

With the shipped weights and the engine's own settings (what `search` runs), three measurements:

* ``boxes``: on every n-th LFW P1 photo (about 400), the engine's detection nearest dlib's landmark box of
  the photo's subject, against that box: centre offset (share of the box's width / height) and size ratio,
  mean and standard deviation. Does the engine read identity from a box other than the one the sweep
  (``../face_size/sweep.py``) uses?
* ``gallery_without_face``: the P2 gallery photos (each P2 person's first photo, sorted) in which the engine
  finds no face, and the score of its best candidate near the photo's centre at face threshold 0.05.
* ``knn_missed``: the candidates the engine gives near dlib's box of the girl beside Obama in
  ``knn_examples/test/obama_and_biden.jpg`` at input sizes 384-768 px, face threshold 0.15.

Writes ``results.json`` and ``results.md`` in --out (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
SHARED = ROOT.parent / "shared" / "data"


def box_agreement(labels: str, engine, count: int = 400) -> dict:
    from jointface.datasets.protocols import p1_people
    from jointface.datasets.teacher import manifest_path, read_face_labels
    from jointface.imageio import load_image

    root = Path(json.loads(manifest_path(Path(labels)).read_text())["root"])
    people = set(p1_people(root))
    records = [r for r in read_face_labels(labels) if r["path"].split("/")[0] in people and r["status"] == "ok"]
    records = records[::max(1, len(records) // count)][:count]
    rows = []
    for record in records:
        landmark = np.array(next(f for f in record["faces"] if f["subject"])["landmark_box"])
        faces = engine.detect(load_image(root / record["path"]))
        if not faces:
            continue
        boxes = np.array([f.box for f in faces])
        centre = (landmark[:2] + landmark[2:]) / 2
        found = boxes[np.argmin(np.linalg.norm((boxes[:, :2] + boxes[:, 2:]) / 2 - centre, axis=1))]
        width, height = landmark[2] - landmark[0], landmark[3] - landmark[1]
        rows.append([((found[0] + found[2]) / 2 - centre[0]) / width, ((found[1] + found[3]) / 2 - centre[1]) / height,
                     (found[2] - found[0]) / width, (found[3] - found[1]) / height])
    rows = np.array(rows)
    names = ["dx_per_width", "dy_per_height", "width_ratio", "height_ratio"]
    return {"photos": len(records), "with_a_detection": len(rows),
            "mean": dict(zip(names, rows.mean(0).round(4).tolist())),
            "sd": dict(zip(names, rows.std(0).round(4).tolist()))}


def central_candidates(engine, image: np.ndarray, margin: float = 0.24) -> list[float]:
    """Scores of the candidates whose centre lies in the middle of the photo (LFW centres its subject)."""
    height, width = image.shape[:2]
    return [round(float(f.score), 2) for f in engine.detect(image)
            if margin * width < (f.box[0] + f.box[2]) / 2 < (1 - margin) * width
            and margin * height < (f.box[1] + f.box[3]) / 2 < (1 - margin) * height]


def gallery_without_face(engine, low_engine) -> dict:
    from jointface.imageio import load_image

    lfw = SHARED / "lfw"
    gallery = {}
    for folder in sorted(p for p in lfw.iterdir() if p.is_dir()):
        photos = sorted(folder.glob("*.jpg"))
        if 2 <= len(photos) <= 5:
            gallery[folder.name] = photos[0]
    missing = defaultdict(list)
    for person, path in gallery.items():
        image = load_image(path)
        if not engine.detect(image):
            missing[path.name] = central_candidates(low_engine, image)
    return {"gallery_photos": len(gallery), "without_a_face": len(missing),
            "best_central_score_at_0.05": {name: max(scores, default=None) for name, scores in missing.items()}}


def knn_missed(weights_engine) -> dict:
    from jointface.engines import get_engine
    from jointface.imageio import load_image

    image = load_image(SHARED / "knn_examples" / "test" / "obama_and_biden.jpg")
    dlib_boxes = [f.box for f in get_engine("dlib").detect(image)]
    girl = max(dlib_boxes, key=lambda b: b[1])  # the lowest face in the photo
    centre = np.array([(girl[0] + girl[2]) / 2, (girl[1] + girl[3]) / 2])
    width = girl[2] - girl[0]
    by_size = {}
    for size in (384, 512, 640, 768):
        faces = weights_engine(input_size=size, conf_threshold=0.15).detect(image)
        near = [f for f in faces
                if np.linalg.norm(np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2]) - centre) < width / 2]
        by_size[size] = {"candidates": len(faces), "near_the_girl": [round(float(f.score), 2) for f in near]}
    return {"dlib_box": [int(v) for v in girl], "by_input_size": by_size}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    boxes, gallery, knn = results["boxes"], results["gallery_without_face"], results["knn_missed"]
    lines = ["# Where the joint engine misses (shipped weights, the engine's own settings)", "",
             f"Engine box against dlib's landmark box on {boxes['with_a_detection']} of {boxes['photos']} LFW P1 "
             "photos (share of the box; mean / sd):", "",
             "| centre dx / width | centre dy / height | width ratio | height ratio |", "|---|---|---|---|",
             "| " + " | ".join(f"{boxes['mean'][k]:.4f} / {boxes['sd'][k]:.4f}" for k in boxes["mean"]) + " |", "",
             f"P2 gallery photos without a face: {gallery['without_a_face']} of {gallery['gallery_photos']}; "
             "best candidate near the centre at face threshold 0.05:", "",
             "| photo | best central score |", "|---|---|"]
    lines += [f"| {name} | {score} |" for name, score in gallery["best_central_score_at_0.05"].items()]
    lines += ["", f"knn_examples, the girl beside Obama (dlib box {knn['dlib_box']}), face threshold 0.15:", "",
              "| input px | candidates in the photo | scores of candidates near her face |", "|---|---|---|"]
    lines += [f"| {size} | {row['candidates']} | {row['near_the_girl'] or 'none'} |"
              for size, row in knn["by_input_size"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    import torch

    from jointface.engines.joint_engine import JointEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default="runs/labels/lfw.jsonl")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    engine = JointEngine()
    results = {"weights": engine.version, "boxes": box_agreement(args.labels, engine),
               "gallery_without_face": gallery_without_face(engine, JointEngine(conf_threshold=0.05)),
               "knn_missed": knn_missed(JointEngine)}
    write(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
