"""The training run a v2 config's ``mode`` asks for: ``joint`` (:class:`~jointface.train.v2.Run`, whole photos,
every loss), ``identity-crops`` (:class:`~jointface.train.crops.CropRun`, the identity branch on face crops) or
``joint+crops`` (:class:`~jointface.train.crops.MixedRun`, both in every step)."""

from __future__ import annotations

from jointface.train.crops import CropRun, MixedRun
from jointface.train.v2 import Run, TrainConfigV2

RUNS = {"joint": Run, "identity-crops": CropRun, "joint+crops": MixedRun}


def run_for(config: TrainConfigV2) -> Run:
    """The run ``config.mode`` names, built (resumed when its folder holds a checkpoint)."""
    if config.mode not in RUNS:
        raise ValueError(f"unknown mode {config.mode!r} ({' or '.join(RUNS)})")
    return RUNS[config.mode](config)
