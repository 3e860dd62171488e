"""Identity's own stage 3 made narrower, as the start of a training run (issue 15, eighth session).

Identity's own ResNet18 stage 3 (256 planes) bought P2 and P1 points but
costs about 1.2 ms per photo, which puts P4's single-photo 5x out of reach.
This keeps ``--width`` of its planes and writes a v2 checkpoint-like file a
run's ``init_state`` can start from (``identity_stage_width`` set in its
record):

* the stage's output channels (its residual stream, which identity's FPN
  reads through ``lateral.1``): the ``--width`` channels with the largest
  ``||lateral.1 column|| * (|gamma| of the BatchNorms that write the stream)``;
* each block's inner channels: the largest ``|gamma of bn1| * ||conv2 column||``
  (the conv2 columns restricted to the kept stream);
* ``lateral.1`` keeps the columns of the kept stream; everything else as it was.

The slimmed network is not the source network minus nothing: dropping
channels moves identity's features; the run that starts here learns them back.

    python benchmarks/joint_v2/slim_stage3/slim.py SOURCE.pt OUT.pt --width 128

``--from-shared``: a source whose identity reads the shared backbone (no
stage of its own, as the shipped weights) gives identity a copy of the
backbone's stage 3 first (what a run with ``identity_stages: [3]`` starts
from), then cuts that.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def _keep(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, count).indices).values


def slim_state(state: dict[str, torch.Tensor], width: int, prefix: str = "identity_backbone.layer3.",
               lateral: str = "lateral.1.") -> dict[str, torch.Tensor]:
    """``state`` with identity's own stage 3 cut to ``width`` planes (see the module docstring)."""
    state = dict(state)
    blocks = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    planes = state[f"{prefix}0.bn2.weight"].numel()
    if not 0 < width < planes:
        raise SystemExit(f"--width must be between 1 and {planes - 1} (the stage has {planes} planes)")
    writers = [state[f"{prefix}{b}.bn2.weight"].abs() for b in blocks]
    if f"{prefix}0.downsample.1.weight" in state:
        writers.append(state[f"{prefix}0.downsample.1.weight"].abs())
    stream = _keep(state[f"{lateral}weight"].flatten(1).norm(dim=0) * torch.stack(writers).sum(0), width)

    def rows(name: str, index: torch.Tensor) -> None:
        state[name] = state[name].index_select(0, index)

    def columns(name: str, index: torch.Tensor) -> None:
        state[name] = state[name].index_select(1, index)

    for b in blocks:
        block = f"{prefix}{b}."
        conv2 = state[f"{block}conv2.weight"].index_select(0, stream)
        inner = _keep(state[f"{block}bn1.weight"].abs() * conv2.flatten(2).norm(dim=(0, 2)), width)
        rows(f"{block}conv1.weight", inner)
        if b > 0:
            columns(f"{block}conv1.weight", stream)
        for part in ("weight", "bias", "running_mean", "running_var"):
            rows(f"{block}bn1.{part}", inner)
            rows(f"{block}bn2.{part}", stream)
        state[f"{block}conv2.weight"] = conv2.index_select(1, inner)
        if f"{block}downsample.0.weight" in state:
            rows(f"{block}downsample.0.weight", stream)
            for part in ("weight", "bias", "running_mean", "running_var"):
                rows(f"{block}downsample.1.{part}", stream)
    columns(f"{lateral}weight", stream)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a v2 checkpoint or weights file with identity_stages [3]")
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--from-shared", action="store_true",
                        help="identity reads the shared backbone in SOURCE: start from a copy of its stage 3")
    args = parser.parse_args()
    payload = torch.load(args.source, map_location="cpu", weights_only=True)
    record = dict(payload["record"])
    key = "model" if "model" in payload else "state_dict"
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload[key].items()}
    if args.from_shared and not record.get("identity_stages"):
        state.update({"identity_backbone.layer3." + k[len("backbone.layer3."):]: v.clone()
                      for k, v in state.items() if k.startswith("backbone.layer3.")})
        # identity reads P3 and P4 only: networks with stages of their own have no unused smooth[2]
        state = {k: v for k, v in state.items() if not k.startswith("smooth.2.")}
        record["identity_stages"] = [3]
    if record.get("identity_stages") != [3] or record.get("identity_stage_width"):
        raise SystemExit(f"{args.source}: identity needs a full-width stage 3 of its own (identity_stages [3]; "
                         f"--from-shared when identity reads the shared backbone)")
    record["identity_stage_width"] = args.width
    out = {"format": payload.get("format"), "record": record, key: slim_state(state, args.width)}
    for extra in ("margin_head", "identity_heads"):
        if extra in payload:
            out[extra] = payload[extra]
    from jointface.net.v2 import JointNetV2, ModelRecordV2

    JointNetV2(ModelRecordV2.from_dict(record)).load_state_dict(out[key])  # the shapes fit the narrower network
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    print(f"{args.out}: identity's stage 3 cut to {args.width} planes")


if __name__ == "__main__":
    main()
