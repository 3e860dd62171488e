"""What identity's own stage 2 costs at inference: the dense part (``forward_maps``) of the shipped network
against the same network with ``identity_stages [2, 3]``, fp32 torch, channels-last, 2 threads, batch 8,
alternating, median of the repeats. ``python benchmarks/joint_v2/identity_stage2/cost.py`` -> cost.json"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from jointface.net.v2 import JointNetV2, ModelRecordV2
from jointface.train.v2 import v2_state


def main() -> None:
    torch.set_num_threads(2)
    record = ModelRecordV2.from_dict(v2_state("jointface/weights/jointface.pt")[0])
    nets = {"shipped [3]": JointNetV2(record), "[2, 3]": JointNetV2(replace(record, identity_stages=[2, 3]))}
    nets = {name: net.eval().to(memory_format=torch.channels_last) for name, net in nets.items()}
    out = {}
    for size in (320, 640):
        images = torch.randn(8, 3, size, size).contiguous(memory_format=torch.channels_last)
        times = {name: [] for name in nets}
        with torch.inference_mode():
            for net in nets.values():
                net.forward_maps(images)
            for _ in range(7):
                for name, net in nets.items():
                    start = time.perf_counter()
                    net.forward_maps(images)
                    times[name].append((time.perf_counter() - start) / 8 * 1000)
        out[size] = {name: statistics.median(values) for name, values in times.items()}
        out[size]["ratio"] = out[size]["[2, 3]"] / out[size]["shipped [3]"]
        print(size, {k: round(v, 2) for k, v in out[size].items()}, flush=True)
    Path(__file__).with_name("cost.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
