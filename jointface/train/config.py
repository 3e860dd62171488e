"""Training configuration: one dataclass, JSON in and out, a ``tiny`` preset for tests.

Every run saves its resolved configuration (``config.json``) beside its outputs,
and checkpoints carry it, so a resumed run continues with the same settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


@dataclass
class TrainConfig:
    # --- data (the output of `organize`)
    data_dir: str = ""
    out_dir: str = ""
    use_extra_train_images: bool = True      # LFW: P1 people's images beyond their first 30
    box_source: str = "landmark"             # "landmark" (PROTOCOLS reference box) or "detector" (dlib HOG box)
    limit_train_images: int | None = None    # for smoke tests
    limit_test_images: int | None = None
    # --- model
    backbone: str = "resnet34"               # resnet18 / resnet34 / resnet50 (resnet_tiny: tests only)
    input_size: int = 320                    # 320 -> 10x10 grid, 160 -> 5x5 grid (stride 32)
    num_anchors: int = 3
    anchor_sample_images: int = 400          # augmented samples whose boxes feed the anchor k-means
    embedding_dim: int = 512
    neck_channels: int = 256
    init: str | None = None                  # torchvision ResNet state dict to start from (--init PATH)
    init_weights: str | None = None          # a JointFace weights file or checkpoint to continue from (anchors,
                                             # network and identity heads; same classes) with a fresh schedule
    # --- identity heads, any of: classifier, arcface | cosface, triplet, distill
    identity_heads: list[str] = field(default_factory=lambda: ["classifier", "arcface", "triplet"])
    margin_scale: float = 30.0
    classifier_scale: float = 30.0           # the linear classifier scores scale * e (unit-norm e); 1 = unscaled
    margin: float | None = None              # default 0.5 (ArcFace) / 0.35 (CosFace)
    triplet_margin: float = 0.2
    margin_warmup_steps: int = 0             # the ArcFace/CosFace margin grows from 0 to `margin` over these steps
    identity_min_face: float = 0.0           # faces smaller than this (shorter side, input px) train detection only
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "box": 5.0, "confidence": 1.0, "identity_ce": 1.0, "identity_margin": 0.5, "triplet": 1.0, "distill": 10.0})
    ignore_iou: float = 0.5
    # --- batches: P people x K images (triplet mining needs K >= 2)
    people_per_batch: int = 8
    images_per_person: int = 4
    epochs: int = 30
    max_steps: int | None = None             # stop early (smoke tests)
    # --- augmentation
    mosaic_probability: float = 0.5
    scale_jitter: tuple[float, float] = (0.6, 1.3)
    colour_jitter: float = 0.3
    flip_probability: float = 0.5
    # --- optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_factor: float = 0.1          # backbone lr = lr * factor when starting from --init
    weight_decay: float = 5e-4
    schedule: str = "cosine"                 # "cosine" (with linear warm-up) or "onecycle"
    warmup_steps: int = 200
    grad_clip: float = 10.0
    # --- runtime
    device: str = "auto"                     # auto / cpu / cuda
    bf16: bool = False                       # bf16 autocast (CPU or CUDA)
    num_workers: int = 0
    num_threads: int | None = None           # torch intra-op threads (None: torch's default)
    channels_last: bool = False              # channels-last memory format (faster convolutions on CPU)
    cache_images: bool = False               # keep decoded training photos in memory (about 0.3 MB each)
    seed: int = 0
    checkpoint_every: int = 200              # steps; also at the end of every epoch
    log_every: int = 10
    validate: bool = True
    validate_every: int = 1                  # epochs between validations (the last epoch is always validated)
    conf_threshold: float = 0.3              # validation: a best face below this counts as "no face"
    progress: bool = True
    training_command: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        values = dict(values)
        if "scale_jitter" in values:
            values["scale_jitter"] = tuple(values["scale_jitter"])
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    @property
    def batch_size(self) -> int:
        return self.people_per_batch * self.images_per_person


def tiny_config(**changes) -> TrainConfig:
    """A config that trains in seconds on a CPU: for tests and smoke runs only."""
    base = TrainConfig(backbone="resnet_tiny", input_size=64, num_anchors=2, anchor_sample_images=16,
                       embedding_dim=16, neck_channels=16, people_per_batch=2, images_per_person=2, epochs=1,
                       warmup_steps=2, checkpoint_every=1000, log_every=1, progress=False, lr=3e-3,
                       identity_heads=["classifier", "arcface", "triplet", "distill"], mosaic_probability=0.5)
    return base.replace(**changes)

