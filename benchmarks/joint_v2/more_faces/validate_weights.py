"""A v2 weights file measured by a training config's own validation (held-out All-Age-Faces cosine, P2 proxy
rank-1 and TPIR).

    python benchmarks/joint_v2/more_faces/validate_weights.py CONFIG WEIGHTS...

The training set is built from CONFIG's labels as its run builds it (same leak guard, same held-out people,
same teacher mean), so the figures sit beside that run's ``validation.csv``: the step-0 row of a run that
starts from WEIGHTS, with the run's own held-out people.
"""

from __future__ import annotations

import argparse
import json

import torch

from jointface.datasets.build import PhotoLoader, build_training_set
from jointface.train.v2 import TrainConfigV2, p2_proxy_set, v2_network, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("weights", nargs="+")
    args = parser.parse_args()
    config = TrainConfigV2.load(args.config)
    torch.set_num_threads(config.num_threads or 2)
    data = build_training_set(config.labels, limits=config.limits, singleton_layouts=config.singleton_classes)
    proxy = p2_proxy_set(config.labels["lfw"], config.p2proxy_people)
    strangers = [(path, box) for _, path, box in p2_proxy_set(config.labels["lfw"], config.p2proxy_strangers,
                                                                photos=(1, 1))]
    loader = PhotoLoader(cache_items=0)
    teacher_mean = data.teacher_mean()
    for path in args.weights:
        metrics = validate(v2_network(path), data.holdout[:200], teacher_mean, proxy, loader, config.input_size,
                           strangers)
        print(json.dumps({"weights": path, **metrics}), flush=True)


if __name__ == "__main__":
    main()
