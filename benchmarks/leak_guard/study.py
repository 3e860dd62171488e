"""How the leak guard's rule trades real leaks caught against training faces dropped (issue 15's data).

    python benchmarks/leak_guard/study.py [runs/labels] [--out benchmarks/leak_guard/results.json]

Real leaks: one photo of each LFW evaluation person (outside P1) with two or more photos, checked against that
person's other photos and every other evaluation person's, as if it had been planted in a training collection.
Training faces: every labelled face of the extra collections (All-Age-Faces, UTKFace, CelebA) against all the
evaluation faces. The guard's rules are :class:`jointface.datasets.build.LeakRule` values run through the very
``leaking`` function training uses.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from jointface.datasets.build import PLAIN_LEAK_RULE, LeakRule, leaking, lfw_evaluation_descriptors
from jointface.datasets.teacher import manifest_path, read_face_labels

RULES = {
    "plain: within 0.5 of any evaluation face (before)": PLAIN_LEAK_RULE,
    "within 0.4 only": LeakRule(sure_distance=0.4, ratio=0.0),
    "within 0.4, or within 0.5 at ratio 0.9 (now)": LeakRule(),
    "within 0.42, or within 0.5 at ratio 0.85": LeakRule(sure_distance=0.42, ratio=0.85),
    "within 0.45, or within 0.5 at ratio 0.9": LeakRule(sure_distance=0.45, ratio=0.9),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="?", default="runs/labels")
    parser.add_argument("--out", default="benchmarks/leak_guard/results.json")
    args = parser.parse_args()
    folder = Path(args.labels)
    lfw = folder / "lfw.jsonl"
    root = Path(json.loads(manifest_path(lfw).read_text())["root"])
    evaluation, people = lfw_evaluation_descriptors(read_face_labels(lfw), root)
    by_person = defaultdict(list)
    for index, person in enumerate(people):
        by_person[person].append(index)
    planted = [indices[0] for indices in by_person.values() if len(indices) >= 2]
    rest = np.setdiff1d(np.arange(len(people)), planted)
    results: dict = {"evaluation_faces": len(people), "evaluation_people": len(by_person),
                     "planted_leaks": len(planted), "rules": {}}
    collections = {}
    for name in ("aaf", "utkface", "celeba"):
        path = folder / f"{name}.jsonl"
        if path.exists():
            records = [r for r in read_face_labels(path) if r["status"] == "ok"]
            collections[name] = np.asarray([f["teacher"] for r in records for f in r["faces"]],
                                           dtype=np.float32).reshape(-1, 128)
    for label, rule in RULES.items():
        row = {"rule": rule.__dict__, "leaks_caught": float(leaking(evaluation[planted], evaluation[rest],
                                                                    people[rest], rule).mean())}
        for name, descriptors in collections.items():
            row[f"{name}_dropped"] = float(leaking(descriptors, evaluation, people, rule).mean())
        results["rules"][label] = row
        print(f"{label:52s} " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if k != "rule"), flush=True)
    # why: how many different evaluation people a face the plain rule drops is within 0.5 of
    for name, descriptors in collections.items():
        squared = (descriptors ** 2).sum(1)[:, None] + (evaluation ** 2).sum(1)[None] - 2 * descriptors @ evaluation.T
        distance = np.sqrt(np.maximum(squared, 0))
        dropped = distance.min(1) < PLAIN_LEAK_RULE.distance
        crowd = [len(set(people[row < PLAIN_LEAK_RULE.distance])) for row in distance[dropped]]
        nearest = Counter(people[distance[dropped].argmin(1)])
        results[f"{name}_plain_dropped"] = {
            "faces": int(len(descriptors)), "dropped": int(dropped.sum()),
            "median_people_within_0.5": float(np.median(crowd)) if crowd else 0.0,
            "nearest_person_of_most": nearest.most_common(3)}
        print(name, results[f"{name}_plain_dropped"], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
