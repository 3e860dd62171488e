"""Is bf16 autocast worth it for training on this CPU? (issue 15)

The brief measured bf16 autocast slower than fp32 on the AMD EPYC this project
ran on first; the Intel Xeon it runs on since the ninth session has AMX tiles.
This times one identity-crops training step (the shipped network, the tensors
an identity run trains, a batch of 48 crops of 128 px: forward, backward,
AdamW) in fp32 and under bf16 autocast, interleaved.

    python benchmarks/pipeline_speed/bf16_training.py [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jointface.net.v2 import JointNetV2, ModelRecordV2
from jointface.weights_file import default_weights_path, load_weights

TRAINED = ("identity_backbone.", "lateral.", "smooth.", "identity_map.", "identity.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    torch.set_num_threads(2)
    payload, version = load_weights(default_weights_path())
    model = JointNetV2(ModelRecordV2.from_dict(payload["record"]))
    model.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    model = model.to(memory_format=torch.channels_last).train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINED))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    images = torch.randn(48, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    boxes = torch.tensor([[32.0, 32.0, 96.0, 96.0]]).repeat(48, 1)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            embeddings = model.embed(model.identity_maps(images), boxes, torch.arange(48))
        loss = embeddings.float().sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    times = {"fp32": [], "bf16": []}
    for _ in range(2):
        for name in times:
            step(name == "bf16")  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                step(name == "bf16")
            times[name].append(1000 * (time.perf_counter() - start) / args.repeats)
    result = {"weights": version, "batch": 48, "crop_px": 128, "threads": 2, "torch": torch.__version__,
              "ms_per_step": {k: min(v) for k, v in times.items()},
              "bf16_over_fp32": min(times["bf16"]) / min(times["fp32"]), "all_ms": times}
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_training.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
