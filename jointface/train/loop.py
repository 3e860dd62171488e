"""The training loop: ``train(config)`` and ``export_weights(checkpoint, out_path)``.

One run lives in ``config.out_dir`` (keep it outside the repository):

* ``config.json``: the resolved configuration; ``model_record.json``: the
  network's record (anchors included);
* ``checkpoints/last.pt``: model, identity heads, optimizer, scheduler, epoch,
  step, config, torch RNG states — written every ``checkpoint_every`` steps,
  at every epoch end and when stopping. ``train`` on an out_dir that holds one
  resumes from it (runtime fields such as ``epochs``, ``max_steps``,
  ``device``, ``progress`` come from the new config, everything else from the
  checkpoint). Batches are a pure function of ``(seed, epoch)``, so a resumed
  run continues with the very batches an uninterrupted run would have used;
* ``steps.csv`` (loss terms every ``log_every`` steps), ``epochs.csv``
  (validation), ``curves.png``;
* ``jointface.pt``: the exported fp16 weights at the end.

Validation each epoch (PROTOCOLS.md P1 on the test split): the best-scoring
face of each test image (no face above ``conf_threshold`` = wrong) is
identified (a) by the classifier head and (b) by the nearest embedding of the
P1 TRAIN images (the baseline's 1-NN), and its box is compared with the
landmark reference box (mean IoU).

A non-finite loss term stops training with :class:`NonFiniteLossError` naming
the term (the last good checkpoint stays on disk).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from jointface.net.anchors import kmeans_anchors, mean_best_iou
from jointface.net.boxes import box_iou
from jointface.net.loss import check_finite, joint_losses, total_loss
from jointface.net.matching import match_faces
from jointface.net.model import JointNet, ModelRecord, build_identity_heads, classify, postprocess
from jointface.net.resnet import load_torchvision_weights
from jointface.weights_file import WEIGHTS_FORMAT, half_precision, read_torch_file, write_weights

from . import distributed
from .config import TrainConfig
from .data import (Augmentation, FaceDataset, PKBatchSampler, collate, load_class_names, load_records,
                   sample_box_sizes)

CHECKPOINT_FORMAT = "jointface-checkpoint"
#: Runtime settings a resumed run takes from the new config rather than the checkpoint.
RUNTIME_FIELDS = ("epochs", "max_steps", "device", "bf16", "num_workers", "num_threads", "progress",
                  "checkpoint_every", "log_every", "validate", "validate_every", "out_dir", "data_dir",
                  "channels_last", "cache_images")


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    weights: Path | None
    step: int
    epoch: int
    last_losses: dict[str, float]
    metrics: dict[str, float]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- building blocks
def build_model(config: TrainConfig, class_names: list[str], anchor_sizes: list[list[float]],
                teacher_mean: torch.Tensor | None = None) -> tuple[JointNet, nn.ModuleDict]:
    """A fresh JointNet (its record filled from the config) and its identity heads.

    ``teacher_mean``: the mean dlib descriptor of the training faces (the distillation head's centre).
    """
    record = ModelRecord(backbone=config.backbone, input_size=config.input_size, anchor_sizes=anchor_sizes,
                         embedding_dim=config.embedding_dim, neck_channels=config.neck_channels,
                         class_names=list(class_names), training_command=config.training_command,
                         training_data=config.data_dir)
    model = JointNet(record)
    heads = build_identity_heads(config.identity_heads, config.embedding_dim, len(class_names),
                                 config.margin_scale, config.margin, teacher_mean, config.classifier_scale)
    return model, heads


def load_start_weights(path: str | Path, class_names: list[str]) -> dict:
    """Network and identity-head tensors (float32) of a weights file or checkpoint to continue training from.

    The classes must be the training data's, in the same order (the heads are per class).
    """
    payload = read_torch_file(path, (WEIGHTS_FORMAT, CHECKPOINT_FORMAT))
    record = payload.get("record") or payload.get("model_record")
    if list(record.get("class_names", [])) != list(class_names):
        raise ValueError(f"{path} was trained on other classes than {len(class_names)} of this data; "
                         f"start from it with the same organised data")
    as_float = lambda state: {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # noqa: E731
    model = payload.get("state_dict", payload.get("model"))
    heads = payload.get("identity_heads", payload.get("heads")) or {}
    return {"record": record, "model": as_float(model), "heads": as_float(heads)}


def teacher_mean_of(records) -> torch.Tensor | None:
    """Mean teacher descriptor over the records that have one (None when none has)."""
    teachers = [r.teacher for r in records if r.teacher is not None and r.identity_idx >= 0]
    return torch.tensor(teachers, dtype=torch.float32).mean(dim=0) if teachers else None


def margin_ramp(config: TrainConfig, step: int) -> float:
    """Share of the margin in use at ``step`` (linear from 0 over ``margin_warmup_steps``)."""
    if config.margin_warmup_steps <= 0:
        return 1.0
    return min(1.0, step / config.margin_warmup_steps)


def build_optimizer(config: TrainConfig, model: JointNet, heads: nn.ModuleDict) -> torch.optim.Optimizer:
    backbone_lr = config.lr * (config.backbone_lr_factor if config.init else 1.0)
    head_parameters = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": list(model.backbone.parameters()), "lr": backbone_lr},
              {"params": head_parameters + list(heads.parameters()), "lr": config.lr}]
    if config.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {config.optimizer!r} (only 'adamw')")
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine to 1% at ``total`` (picklable, stateless)."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = max(0, warmup), max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(config: TrainConfig, optimizer, total_steps: int):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(config.warmup_steps, total_steps))
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=max(total_steps, 2))
    raise ValueError(f"unknown schedule {config.schedule!r}: use 'cosine' or 'onecycle'")


def compute_losses(model: JointNet, heads: nn.ModuleDict, images: torch.Tensor, faces, config: TrainConfig,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Forward one batch and return the named (unweighted) loss terms."""
    images = images.to(device, non_blocking=True)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        output = model(images)
    targets = match_faces(faces, model.anchor_grid, *output.grid_size, ignore_iou=config.ignore_iou, device=device,
                          identity_min_size=config.identity_min_face)
    return joint_losses(output, targets, heads, use_triplet="triplet" in config.identity_heads,
                        triplet_margin=config.triplet_margin)


# ----------------------------------------------------------------------------- validation
@torch.inference_mode()
def best_faces(model: JointNet, dataset: FaceDataset, device: torch.device, bf16: bool = False,
               batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Highest-scoring face of every (letterboxed) image of an unaugmented dataset.

    Returns scores ``(I,)``, boxes ``(I, 4)`` xyxy input pixels, embeddings ``(I, D)``
    and each image's labelled box (input pixels) or None.
    """
    model.eval()
    scores, boxes, embeddings, labelled = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, faces in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            output = model(images.to(device))
        for detections in postprocess(output, model.anchor_grid, conf_threshold=0.0, max_faces=1):
            scores.append(detections.scores[0].float().cpu())
            boxes.append(detections.boxes[0].float().cpu())
            embeddings.append(detections.embeddings[0].float().cpu())
        labelled.extend(f.boxes[0] if len(f) else None for f in faces)
    return torch.stack(scores), torch.stack(boxes), torch.stack(embeddings), labelled


@torch.inference_mode()
def evaluate(model: JointNet, heads: nn.ModuleDict, gallery: FaceDataset, test: FaceDataset, device: torch.device,
             conf_threshold: float = 0.3, bf16: bool = False) -> dict[str, float]:
    """P1-style metrics on ``test`` (records whose ``box`` is the landmark reference box).

    ``top1_classifier`` (classifier head, else margin head), ``top1_nearest``
    (cosine 1-NN over ``gallery``'s best faces), ``mean_iou`` over images with a
    reference box and a face found, ``iou_images``, ``no_face``, ``test_images``.
    """
    heads.eval()
    test_scores, test_boxes, test_embeddings, reference_boxes = best_faces(model, test, device, bf16)
    found = test_scores >= conf_threshold
    truth = torch.tensor([r.identity_idx for r in test.records])
    metrics = {"test_images": float(len(test.records)), "no_face": float((~found).sum())}
    class_scores = classify(heads, test_embeddings.to(device))
    if class_scores is not None:
        predicted = class_scores.argmax(dim=1).cpu()
        metrics["top1_classifier"] = float(((predicted == truth) & found).float().mean())
    if len(gallery.records):
        _, _, gallery_embeddings, _ = best_faces(model, gallery, device, bf16)
        gallery_labels = torch.tensor([r.identity_idx for r in gallery.records])
        nearest = (test_embeddings @ gallery_embeddings.T).argmax(dim=1)
        metrics["top1_nearest"] = float(((gallery_labels[nearest] == truth) & found).float().mean())
    ious = [float(box_iou(test_boxes[i:i + 1], reference[None])[0, 0])
            for i, reference in enumerate(reference_boxes) if reference is not None and found[i]]
    metrics["mean_iou"] = float(sum(ious) / len(ious)) if ious else 0.0
    metrics["iou_images"] = float(len(ious))
    return metrics


# ----------------------------------------------------------------------------- checkpoints and logs
def save_checkpoint(path: Path, *, model, heads, optimizer, scheduler, step, epoch, step_in_epoch, config,
                    metrics) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(), "heads": heads.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
        "config": config.to_dict(), "model_record": model.record.to_dict(), "metrics": dict(metrics),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(path: str | Path) -> dict:
    return read_torch_file(path, (CHECKPOINT_FORMAT,))


class CsvLog:
    """Append-only CSV with a fixed header; on resume, rows past ``keep_until_step`` are dropped."""

    def __init__(self, path: Path, columns: list[str], keep_until_step: int | None = None):
        self.path, self.columns = path, columns
        rows = []
        if path.exists() and keep_until_step is not None:
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) <= keep_until_step]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(row)

    def rows(self) -> list[dict]:
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))


def plot_curves(steps_csv: CsvLog, epochs_csv: CsvLog, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_rows, epoch_rows = steps_csv.rows(), epochs_csv.rows()
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for column in steps_csv.columns[3:]:
        values = [(int(r["step"]), float(r[column])) for r in step_rows if r.get(column) not in (None, "")]
        if values:
            loss_axes.plot(*zip(*values), label=column)
    loss_axes.set(xlabel="step", ylabel="loss", yscale="symlog", title="training loss terms")
    if loss_axes.get_legend_handles_labels()[0]:
        loss_axes.legend(fontsize=8)
    for column in ("top1_classifier", "top1_nearest", "mean_iou"):
        values = [(float(r["epoch"]), float(r[column])) for r in epoch_rows if r.get(column) not in (None, "")]
        if values:
            metric_axes.plot(*zip(*values), marker="o", label=column)
    metric_axes.set(xlabel="epoch", ylim=(0, 1), title="validation (P1 test split)")
    if metric_axes.get_legend_handles_labels()[0]:
        metric_axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- train
def _resolve_config(config: TrainConfig, checkpoint: dict | None) -> TrainConfig:
    if checkpoint is None:
        if not config.training_command:
            config = config.replace(training_command=" ".join(sys.argv))
        return config
    saved = TrainConfig.from_dict(checkpoint["config"])
    return saved.replace(**{name: getattr(config, name) for name in RUNTIME_FIELDS})


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) a JointNet as configured; see the module docstring. Returns where things are.

    Build (data, anchors, network, optimiser) -> resume (from ``out_dir``'s checkpoint) -> run epochs
    (validating at their ends) -> export the weights.
    """
    if not config.data_dir or not config.out_dir:
        raise ValueError("config.data_dir (output of `organize`) and config.out_dir are required")
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    config = _resolve_config(config, checkpoint)
    context, device_name = distributed.setup(config.device)  # one process, or one rank of a torchrun job
    out_dir.mkdir(parents=True, exist_ok=True)
    if context.is_main:
        config.save(out_dir / "config.json")
    if config.num_threads or distributed.default_threads(context):
        torch.set_num_threads(config.num_threads or distributed.default_threads(context))
    torch.manual_seed(config.seed)

    run = TrainingRun.build(config, context, resolve_device(device_name), out_dir, checkpoint)
    if checkpoint is not None:
        run.resume(checkpoint)
    run.open_logs()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, disable=not config.progress or not context.is_main) as progress:
        task = progress.add_task("training", total=run.total_steps, completed=run.step, status="")
        for run.epoch in range(run.epoch, config.epochs):
            if run.stopped:
                break
            run.run_epoch(lambda status: progress.update(task, completed=run.step, status=status))
            run.end_epoch(progress.console.print)
    return run.finish()


@dataclass
class TrainingData:
    """The organised data a run trains and validates on."""

    class_names: list[str]
    train_records: list
    train_set: FaceDataset  # augmented, batched by ``sampler``
    gallery_set: FaceDataset  # validation: the P1 train images, the nearest-embedding gallery
    test_set: FaceDataset  # validation: the P1 test images
    sampler: PKBatchSampler


def load_training_data(config: TrainConfig) -> TrainingData:
    class_names = load_class_names(config.data_dir)
    train_records = load_records(config.data_dir, "train", class_names, config.box_source)
    if not config.use_extra_train_images:
        train_records = [r for r in train_records if not r.extra]
    train_records = train_records[:config.limit_train_images]
    # validation boxes are always the PROTOCOLS.md landmark reference boxes
    test_records = load_records(config.data_dir, "test", class_names, "landmark")[:config.limit_test_images]
    augmentation = Augmentation(config.mosaic_probability, tuple(config.scale_jitter), config.colour_jitter,
                                config.flip_probability)
    record_stub = ModelRecord()
    train_set = FaceDataset(train_records, config.input_size, record_stub.mean, record_stub.std, augmentation,
                            cache_images=config.cache_images)
    gallery_set = FaceDataset([r for r in train_records if not r.extra and r.identity_idx >= 0], config.input_size,
                              record_stub.mean, record_stub.std)
    test_set = FaceDataset(test_records, config.input_size, record_stub.mean, record_stub.std)
    sampler = PKBatchSampler(train_records, config.people_per_batch, config.images_per_person, config.seed)
    return TrainingData(class_names, train_records, train_set, gallery_set, test_set, sampler)


def choose_anchor_sizes(config: TrainConfig, data: TrainingData, checkpoint: dict | None,
                        start_from: dict | None) -> list[list[float]]:
    """The checkpoint's anchors, else those of the weights training continues from, else k-means ones."""
    if checkpoint is not None:
        return checkpoint["model_record"]["anchor_sizes"]
    if start_from is not None:
        print(f"continuing from {config.init_weights} (its anchors, network and identity heads)")
        return start_from["record"]["anchor_sizes"]
    box_sizes = sample_box_sizes(data.train_set, config.anchor_sample_images, config.seed)
    anchor_sizes = kmeans_anchors(box_sizes, config.num_anchors).tolist()
    rounded = [[round(w), round(h)] for w, h in anchor_sizes]
    print(f"anchors (k-means over {len(box_sizes)} augmented faces): {rounded}, "
          f"mean best IoU {mean_best_iou(box_sizes, anchor_sizes):.3f}")
    return anchor_sizes


class TrainingRun:
    """One run's network, optimiser, position (epoch, step) and logs; :func:`train` moves it on."""

    def __init__(self, config: TrainConfig, context: distributed.DistContext, device: torch.device, out_dir: Path,
                 data: TrainingData, model: JointNet, heads: nn.ModuleDict):
        self.config, self.context, self.device, self.out_dir, self.data = config, context, device, out_dir, data
        self.model, self.heads = model, heads
        self.checkpoint_path = out_dir / "checkpoints" / "last.pt"
        self.total_steps = config.epochs * len(data.sampler)
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.optimizer = build_optimizer(config, model, heads)
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        self.parameters = list(model.parameters()) + list(heads.parameters())
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.metrics: dict[str, float] = {}
        self.last_losses: dict[str, float] = {}
        self.epoch_losses: list[float] = []
        self.epoch_started = time.time()

    @classmethod
    def build(cls, config: TrainConfig, context: distributed.DistContext, device: torch.device, out_dir: Path,
              checkpoint: dict | None) -> "TrainingRun":
        """Data, anchors, the network and its identity heads (from torchvision or JointFace weights when asked),
        on the device and the same in every process."""
        data = load_training_data(config)
        start_from = load_start_weights(config.init_weights, data.class_names) if checkpoint is None and \
            config.init_weights else None
        anchor_sizes = choose_anchor_sizes(config, data, checkpoint, start_from)
        model, heads = build_model(config, data.class_names, anchor_sizes, teacher_mean_of(data.train_records))
        if checkpoint is None and config.init:
            load_torchvision_weights(config.init, model.backbone)
        if start_from is not None:
            model.load_state_dict(start_from["model"])
            heads.load_state_dict(start_from["heads"])
        model.to(device)
        heads.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        distributed.broadcast_parameters([model, heads], context)
        if context.is_main:
            (out_dir / "model_record.json").write_text(json.dumps(model.record.to_dict(), indent=2) + "\n")
        return cls(config, context, device, out_dir, data, model, heads)

    def resume(self, checkpoint: dict) -> None:
        """Network, heads, optimiser, schedule, position, metrics and RNG states of the checkpoint."""
        self.model.load_state_dict(checkpoint["model"])
        self.heads.load_state_dict(checkpoint["heads"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step, self.epoch, self.step_in_epoch = checkpoint["step"], checkpoint["epoch"], \
            checkpoint["step_in_epoch"]
        self.metrics = checkpoint["metrics"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        print(f"resuming {self.checkpoint_path} at epoch {self.epoch}, step {self.step}")

    def open_logs(self) -> None:
        """The loss terms in use and their weights; the step and epoch logs, cut back to the current step."""
        config, heads = self.config, self.heads
        self.loss_names = ["box", "confidence"] + [
            n for n in ("identity_ce", "identity_margin", "triplet", "distill")
            if (n == "identity_ce" and "classifier" in heads) or (n == "identity_margin" and "margin" in heads) or
            (n == "triplet" and "triplet" in config.identity_heads) or (n == "distill" and "distill" in heads)]
        main = self.context.is_main
        self.steps_log = CsvLog(self.out_dir / "steps.csv", ["step", "epoch", "lr", "total"] + self.loss_names,
                                keep_until_step=self.step) if main else distributed.NullLog()
        self.epochs_log = CsvLog(self.out_dir / "epochs.csv",
                                 ["epoch", "step", "seconds", "train_loss", "top1_classifier", "top1_nearest",
                                  "mean_iou", "iou_images", "no_face", "test_images"],
                                 keep_until_step=self.step) if main else distributed.NullLog()
        self.loss_weights = {name: config.loss_weights.get(name, 1.0) for name in self.loss_names}
        self.stopped = self.step >= self.total_steps

    def checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        if self.context.is_main:
            save_checkpoint(self.checkpoint_path, model=self.model, heads=self.heads, optimizer=self.optimizer,
                            scheduler=self.scheduler, step=self.step, epoch=epoch, step_in_epoch=step_in_epoch,
                            config=self.config, metrics=self.metrics)

    def run_epoch(self, report: Callable[[str], None]) -> None:
        """Train on the rest of epoch :attr:`epoch`'s batches (all of them unless resumed mid-epoch), until the
        epoch ends or the last step; checkpoints every ``checkpoint_every`` steps."""
        config, model, heads = self.config, self.model, self.heads
        self.epoch_started, self.epoch_losses = time.time(), []
        batches = distributed.shard(self.data.sampler.batches(self.epoch)[self.step_in_epoch:], self.context)
        loader = DataLoader(self.data.train_set, batch_sampler=batches, collate_fn=collate,
                            num_workers=config.num_workers, persistent_workers=False)
        model.train()
        heads.train()
        for images, faces in loader:
            if "margin" in heads:
                heads["margin"].ramp = margin_ramp(config, self.step)
            distributed.broadcast_buffers(model, self.context)
            losses = compute_losses(model, heads, images, faces, config, self.device)
            check_finite(losses, self.step)
            loss = total_loss(losses, self.loss_weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(self.parameters, self.context)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.step_in_epoch += 1
            last_losses = {name: value.item() for name, value in losses.items()}
            last_losses["total"] = loss.item()
            self.last_losses = distributed.mean_losses(last_losses, self.context)
            self.epoch_losses.append(self.last_losses["total"])
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                self.steps_log.write({"step": self.step, "epoch": self.epoch,
                                      "lr": self.optimizer.param_groups[-1]["lr"], **self.last_losses})
            report(f"epoch {self.epoch} loss {self.last_losses['total']:.3f}")
            if self.step >= self.total_steps:
                self.stopped = True
                break
            if self.step % config.checkpoint_every == 0:
                self.checkpoint(self.epoch, self.step_in_epoch)

    def end_epoch(self, say: Callable[[str], None]) -> None:
        """After :meth:`run_epoch`: at an epoch's end, validate when due and checkpoint at the next epoch's
        start; stopped within it, checkpoint where it stopped."""
        if self.step_in_epoch < len(self.data.sampler):
            self.checkpoint(self.epoch, self.step_in_epoch)
            return
        config = self.config
        due = (self.epoch + 1) % max(1, config.validate_every) == 0 or self.epoch + 1 == config.epochs
        if config.validate and due and self.context.is_main:
            self.metrics = self.validate()
            self.epochs_log.write({"epoch": self.epoch + 1, "step": self.step,
                                   "seconds": round(time.time() - self.epoch_started, 1),
                                   "train_loss": sum(self.epoch_losses) / max(1, len(self.epoch_losses)),
                                   **self.metrics})
            say(f"epoch {self.epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items()))
        self.step_in_epoch = 0
        self.checkpoint(self.epoch + 1, 0)

    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.heads, self.data.gallery_set, self.data.test_set, self.device,
                        self.config.conf_threshold, self.config.bf16)

    def finish(self) -> TrainResult:
        """Validate a run stopped mid-epoch that has no figures yet, draw the curves, export the weights."""
        if self.step_in_epoch != 0 and self.config.validate and not self.metrics and self.context.is_main:
            self.metrics = self.validate()
            self.epochs_log.write({"epoch": round(self.epoch + self.step_in_epoch / len(self.data.sampler), 3),
                                   "step": self.step, **self.metrics})
        if self.epochs_log.rows() or self.steps_log.rows():
            plot_curves(self.steps_log, self.epochs_log, self.out_dir / "curves.png")
        weights_path = self.out_dir / "jointface.pt"
        if self.context.is_main:
            export_weights(self.checkpoint_path, weights_path)
        distributed.check_in_sync([self.model, self.heads], self.context)
        distributed.cleanup(self.context)
        return TrainResult(out_dir=self.out_dir, checkpoint=self.checkpoint_path, weights=weights_path,
                           step=self.step, epoch=self.epoch, last_losses=self.last_losses, metrics=self.metrics)


# ----------------------------------------------------------------------------- export
def export_weights(checkpoint: str | Path, out_path: str | Path, include_heads: bool = True) -> dict:
    """Write the shipped weights file of a training checkpoint: fp16 tensors + plain Python metadata only
    (the layout: :mod:`jointface.weights_file`). Returns ``{"path", "bytes", "sha256"}``."""
    payload = load_checkpoint(checkpoint)
    return write_weights(out_path, record=payload["model_record"], state_dict=half_precision(payload["model"]),
                         identity_heads=half_precision(payload["heads"]) if include_heads else {},
                         training={"step": payload["step"], "epoch": payload["epoch"], "metrics": payload["metrics"],
                                   "config": payload["config"]})
