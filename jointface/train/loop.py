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
    """Train (or resume) a JointNet as configured; see the module docstring. Returns where things are."""
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
    device = resolve_device(device_name)
    if config.num_threads or distributed.default_threads(context):
        torch.set_num_threads(config.num_threads or distributed.default_threads(context))
    torch.manual_seed(config.seed)

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

    start_from = load_start_weights(config.init_weights, class_names) if checkpoint is None and \
        config.init_weights else None
    if checkpoint is not None:
        anchor_sizes = checkpoint["model_record"]["anchor_sizes"]
    elif start_from is not None:
        anchor_sizes = start_from["record"]["anchor_sizes"]
        print(f"continuing from {config.init_weights} (its anchors, network and identity heads)")
    else:
        box_sizes = sample_box_sizes(train_set, config.anchor_sample_images, config.seed)
        anchor_sizes = kmeans_anchors(box_sizes, config.num_anchors).tolist()
        rounded = [[round(w), round(h)] for w, h in anchor_sizes]
        print(f"anchors (k-means over {len(box_sizes)} augmented faces): {rounded}, "
              f"mean best IoU {mean_best_iou(box_sizes, anchor_sizes):.3f}")
    model, heads = build_model(config, class_names, anchor_sizes, teacher_mean_of(train_records))
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

    total_steps = config.epochs * len(sampler)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = build_optimizer(config, model, heads)
    scheduler = build_scheduler(config, optimizer, total_steps)
    step, start_epoch, step_in_epoch, metrics = 0, 0, 0, {}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        heads.load_state_dict(checkpoint["heads"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step, start_epoch, step_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["step_in_epoch"]
        metrics = checkpoint["metrics"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        print(f"resuming {checkpoint_path} at epoch {start_epoch}, step {step}")

    loss_names = ["box", "confidence"] + [n for n in ("identity_ce", "identity_margin", "triplet", "distill")
                                          if (n == "identity_ce" and "classifier" in heads) or
                                          (n == "identity_margin" and "margin" in heads) or
                                          (n == "triplet" and "triplet" in config.identity_heads) or
                                          (n == "distill" and "distill" in heads)]
    steps_log = CsvLog(out_dir / "steps.csv", ["step", "epoch", "lr", "total"] + loss_names, keep_until_step=step) \
        if context.is_main else distributed.NullLog()
    epochs_log = CsvLog(out_dir / "epochs.csv", ["epoch", "step", "seconds", "train_loss", "top1_classifier",
                                                 "top1_nearest", "mean_iou", "iou_images", "no_face", "test_images"],
                        keep_until_step=step) if context.is_main else distributed.NullLog()
    weights = {name: config.loss_weights.get(name, 1.0) for name in loss_names}

    def checkpoint_now(epoch_value: int, in_epoch: int) -> None:
        if not context.is_main:
            return
        save_checkpoint(checkpoint_path, model=model, heads=heads, optimizer=optimizer, scheduler=scheduler,
                        step=step, epoch=epoch_value, step_in_epoch=in_epoch, config=config, metrics=metrics)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    last_losses: dict[str, float] = {}
    parameters = list(model.parameters()) + list(heads.parameters())
    stopped = step >= total_steps
    epoch = start_epoch
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, disable=not config.progress or not context.is_main) as progress:
        task = progress.add_task("training", total=total_steps, completed=step, status="")
        for epoch in range(start_epoch, config.epochs):
            if stopped:
                break
            started, epoch_losses = time.time(), []
            batches = distributed.shard(sampler.batches(epoch)[step_in_epoch:], context)
            loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate, num_workers=config.num_workers,
                                persistent_workers=False)
            model.train()
            heads.train()
            for images, faces in loader:
                if "margin" in heads:
                    heads["margin"].ramp = margin_ramp(config, step)
                distributed.broadcast_buffers(model, context)
                losses = compute_losses(model, heads, images, faces, config, device)
                check_finite(losses, step)
                loss = total_loss(losses, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(parameters, context)
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                step_in_epoch += 1
                last_losses = {name: value.item() for name, value in losses.items()}
                last_losses["total"] = loss.item()
                last_losses = distributed.mean_losses(last_losses, context)
                epoch_losses.append(last_losses["total"])
                if step % config.log_every == 0 or step == total_steps:
                    steps_log.write({"step": step, "epoch": epoch, "lr": optimizer.param_groups[-1]["lr"],
                                     **last_losses})
                progress.update(task, completed=step, status=f"epoch {epoch} loss {last_losses['total']:.3f}")
                if step >= total_steps:
                    stopped = True
                    break
                if step % config.checkpoint_every == 0:
                    checkpoint_now(epoch, step_in_epoch)
            epoch_done = step_in_epoch >= len(sampler)
            if epoch_done:
                due = (epoch + 1) % max(1, config.validate_every) == 0 or epoch + 1 == config.epochs
                if config.validate and due and context.is_main:
                    metrics = evaluate(model, heads, gallery_set, test_set, device, config.conf_threshold, config.bf16)
                    epochs_log.write({"epoch": epoch + 1, "step": step, "seconds": round(time.time() - started, 1),
                                      "train_loss": sum(epoch_losses) / max(1, len(epoch_losses)), **metrics})
                    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    progress.console.print(f"epoch {epoch + 1}: {summary}")
                step_in_epoch = 0
                checkpoint_now(epoch + 1, 0)
            else:
                checkpoint_now(epoch, step_in_epoch)
    # stopped mid-epoch (max_steps) before any validation
    if step_in_epoch != 0 and config.validate and not metrics and context.is_main:
        metrics = evaluate(model, heads, gallery_set, test_set, device, config.conf_threshold, config.bf16)
        epochs_log.write({"epoch": round(epoch + step_in_epoch / len(sampler), 3), "step": step, **metrics})
    if epochs_log.rows() or steps_log.rows():
        plot_curves(steps_log, epochs_log, out_dir / "curves.png")
    weights_path = out_dir / "jointface.pt"
    if context.is_main:
        export_weights(checkpoint_path, weights_path)
    distributed.check_in_sync([model, heads], context)
    distributed.cleanup(context)
    return TrainResult(out_dir=out_dir, checkpoint=checkpoint_path, weights=weights_path, step=step,
                       epoch=epoch, last_losses=last_losses, metrics=metrics)


# ----------------------------------------------------------------------------- export
def export_weights(checkpoint: str | Path, out_path: str | Path, include_heads: bool = True) -> dict:
    """Write the shipped weights file of a training checkpoint: fp16 tensors + plain Python metadata only
    (the layout: :mod:`jointface.weights_file`). Returns ``{"path", "bytes", "sha256"}``."""
    payload = load_checkpoint(checkpoint)
    return write_weights(out_path, record=payload["model_record"], state_dict=half_precision(payload["model"]),
                         identity_heads=half_precision(payload["heads"]) if include_heads else {},
                         training={"step": payload["step"], "epoch": payload["epoch"], "metrics": payload["metrics"],
                                   "config": payload["config"]})
