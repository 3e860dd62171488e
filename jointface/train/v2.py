"""Training JointNet v2 on teacher-labelled collections: ``jointface train-v2 CONFIG``.

One run lives in ``config.out_dir`` (keep it outside the repository):

* ``config.json`` (resolved), ``model_record.json`` (anchors included), ``data.json``
  (photos, faces and people per collection after the leak guard);
* ``checkpoints/last.pt``: network, margin head, optimizer, schedule, step and
  config, written every ``checkpoint_every`` steps and when stopped (Ctrl-C
  included). Running again on the same out_dir resumes from it: samples are a
  pure function of ``(seed, sample index)``, so the run continues with the very
  samples it would have used;
* ``steps.csv`` (loss terms), ``validation.csv``, ``curves.png``;
* ``jointface.pt`` (fp16 weights, exported at each validation and at the end).

Validation (every ``validate_every`` steps) on people never trained on:

* ``holdout_cos``: mean cosine between the student embedding and the centred
  teacher descriptor on the held-out All-Age-Faces people (3%);
* ``p2proxy_rank1``: 1:N rank-1 among the first ``p2proxy_people`` LFW P2
  people (2-5 photos; first photo enrolled, the others probes), with the
  dlib reference boxes as the faces (identity alone, detection aside);
* ``p2proxy_tpir01`` / ``p2proxy_tpir10``: P2's open-set figure on the same
  gallery, TPIR at FPIR 0.01 / 0.1 with the first ``p2proxy_strangers`` LFW
  people of one photo as the non-mated probes (rank-1 alone does not show it).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from jointface.datasets.build import PhotoLoader, build_training_set
from jointface.datasets.samples import ComposerSettings, SampleComposer
from jointface.net.loss import check_finite
from jointface.net.model import MarginClassifier, images_to_tensor, letterbox
from jointface.net.v2 import (JointNetV2, ModelRecordV2, kmeans_level_anchors, losses_v2, match_multilevel)
from jointface.weights_file import half_precision, write_weights

CHECKPOINT_FORMAT = "jointface-v2-checkpoint"


@dataclass
class TrainConfigV2:
    labels: dict[str, str] = field(default_factory=dict)   # layout -> faces.jsonl (lfw required)
    limits: dict[str, int] = field(default_factory=dict)   # at most this many photos of a collection
    out_dir: str = ""
    init_weights: str | None = None       # a JointFace weights file whose backbone starts this network
    #: then, in order, ``[path, [prefixes]]``: tensors of a v2 weights file (or checkpoint) whose names start with
    #: one of the prefixes (``margin.`` for the margin head's class weights) replace the network's, when shapes match;
    #: ``[path, [prefixes], {"old.": "new."}]`` takes a tensor under a new name (``{"backbone.": "identity_backbone."}``
    #: starts identity's own stages from another network's backbone). The margin head's rows are taken by class
    #: name when the class lists differ
    init_state: list = field(default_factory=list)
    #: names' prefixes (``["identity."]``) under which ``init_state`` also takes tensors *smaller* than the
    #: network's (a wider layer than the source's): the source fills the leading corner and the layer reads its
    #: new input channels with weight zero (:func:`grow_tensor`), so the grown network starts as the source
    #: network's function and its new channels learn from there
    grow: list = field(default_factory=list)
    #: layouts whose every person is an identity class even with one photo (``["aaf"]``: each All-Age-Faces
    #: face a class of its own, kept apart from all others by the margin term; see build_training_set)
    singleton_classes: list = field(default_factory=list)
    anchors_from: str | None = None       # a v2 weights file whose anchors this network takes (no k-means)
    #: only the parameters whose names start with one of these prefixes learn (``margin.``: the margin head);
    #: empty: all. Frozen BatchNorm layers keep their statistics (eval mode)
    trainable: list = field(default_factory=list)
    backbone: str = "resnet18"
    input_size: int = 224
    #: multi-scale training: the canvas side of step ``s`` is ``canvas_sizes[s % len]`` (default: input_size
    #: only); larger canvases teach larger faces in pixels (close-ups once a photo is scaled to the input)
    canvas_sizes: list = field(default_factory=list)
    fpn_channels: int = 128
    identity_channels: int = 128
    embedding_dim: int = 128
    roi_size: int = 8
    identity_head_widths: list[int] = field(default_factory=lambda: [192, 256])
    roi_margin: float = 1.25
    #: ``shared`` or ``own`` (see :class:`jointface.net.v2.ModelRecordV2`); with ``split_detection_neck`` the
    #: own detection FPN starts as a copy of the shared FPN after ``init_state`` (a shared-neck network's weights)
    detection_neck: str = "shared"
    split_detection_neck: bool = False
    #: identity's own copies of backbone stages (``[3]``, ``[4]`` or ``[3, 4]``; a count 0-2 means the last
    #: N; needs detection_neck ``own``); with ``split_identity_stages`` they start as copies of the backbone's
    #: after ``init_state``
    identity_stages: list[int] | int = field(default_factory=list)
    #: planes of identity's own stage 3 (0: the backbone's; see :class:`jointface.net.v2.ModelRecordV2`)
    identity_stage_width: int = 0
    split_identity_stages: bool = False
    batch_size: int = 24
    max_steps: int = 4000
    lr: float = 1e-3
    backbone_lr_factor: float = 0.3
    frozen_stages: int = 0                # no gradient through the stem + this many stages (init_weights only)
    weight_decay: float = 5e-4
    warmup_steps: int = 150
    grad_clip: float = 10.0
    #: the forward pass under bf16 autocast (losses in fp32, weights and optimiser in fp32): on this Xeon's AMX
    #: tiles a crop step takes 0.45 of its fp32 time (benchmarks/pipeline_speed/bf16_training.json)
    bf16: bool = False
    margin_kind: str = "cosface"          # cosface / arcface / none
    margin_scale: float = 30.0
    margin: float = 0.35
    margin_warmup_steps: int = 1000
    loss_weights: dict[str, float] = field(default_factory=lambda: {
        "box": 5.0, "confidence": 1.0, "distill": 4.0, "relational": 4.0, "identity_margin": 0.5})
    box_jitter: float = 0.05              # RoIs in training: ground truth moved by up to this share of its size
    mosaic_probability: float = 0.3
    negative_probability: float = 0.1
    identity_min_face: float = 20.0
    face_range_low: float = 12.0          # smallest subject face, input px
    face_range_high: float = 0.95         # largest subject face, share of the canvas
    scene_background: float = 0.7         # share of canvases on a face-free scene rather than the pad colour
    anchor_sample_images: int = 400
    seed: int = 0
    num_threads: int | None = 2
    checkpoint_every: int = 100
    log_every: int = 10
    validate_every: int = 500
    p2proxy_people: int = 300
    p2proxy_strangers: int = 600          # LFW people of one photo searched as strangers at validation (0: none)
    keep_exports: bool = False            # also keep each validation's weights as jointface.step<N>.pt
    progress: bool = True
    notes: str = ""                       # free text kept with the run (what this stage changed, and why)
    #: ``joint``: whole photos, every loss (:class:`Run`); ``identity-crops``: the identity branch alone on face
    #: crops, detection untouched (:class:`jointface.train.crops.CropRun`, issue 15's ceiling check);
    #: ``joint+crops``: each step a batch of canvases (every loss) and a batch of face crops (identity terms,
    #: named ``crop_*`` in ``loss_weights``), one optimiser step (:class:`jointface.train.crops.MixedRun`)
    mode: str = "joint"
    crops: dict = field(default_factory=dict)   # CropRun settings (see jointface.train.crops.CropSettings)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfigV2":
        values = json.loads(Path(path).read_text())
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown config fields {sorted(unknown)}")
        return cls(**values)


def composer_settings(config: TrainConfigV2, size: int | None = None) -> ComposerSettings:
    return ComposerSettings(size=size or config.input_size, mosaic_probability=config.mosaic_probability,
                            negative_probability=config.negative_probability,
                            identity_min_face=config.identity_min_face,
                            face_range=(config.face_range_low, config.face_range_high),
                            scene_background=config.scene_background)


def collate(samples) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canvases ``(B, S, S, 3)`` uint8 as a tensor, boxes per image, and the faces' teachers / validity /
    identities concatenated in image order."""
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    boxes = [torch.from_numpy(s.boxes) for s in samples]
    teachers = torch.from_numpy(np.concatenate([s.teachers for s in samples]))
    valid = torch.from_numpy(np.concatenate([s.teacher_valid for s in samples]))
    identities = torch.from_numpy(np.concatenate([s.identities for s in samples]))
    return images, boxes, teachers, valid, identities


def normalise(images: torch.Tensor, record: ModelRecordV2) -> torch.Tensor:
    batch = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(record.mean).view(1, 3, 1, 1)
    std = torch.tensor(record.std).view(1, 3, 1, 1)
    return ((batch - mean) / std).contiguous(memory_format=torch.channels_last)


def jitter_boxes(boxes: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    if amount <= 0 or len(boxes) == 0:
        return boxes
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * amount
    return boxes + noise * size


def backbone_from_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a JointFace weights file (v1 or v2), float32."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get("state_dict") or payload.get("model") or {}
    backbone = {k[len("backbone."):]: v.float() for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ValueError(f"{path}: no backbone tensors in it")
    return backbone


def v2_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(record, network tensors, margin-head tensors)`` of a v2 weights file or training checkpoint, float32."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "record" not in payload or payload["record"].get("architecture") != "v2":
        raise ValueError(f"{path}: not a v2 weights file or checkpoint")
    state = payload.get("state_dict") or payload.get("model") or {}
    margin = payload.get("identity_heads") or {}
    if payload.get("margin_head"):
        margin = {f"margin.{k}": v for k, v in payload["margin_head"].items()}
    as_float = lambda tensors: {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}  # noqa: E731
    return payload["record"], as_float(state), as_float(margin)


def v2_network(path: str | Path) -> JointNetV2:
    """The network of a v2 weights file or training checkpoint, float32, in eval mode."""
    record, state, _ = v2_state(path)
    model = JointNetV2(ModelRecordV2.from_dict(record))
    model.load_state_dict(state)
    return model.eval()


def grow_tensor(fresh: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``source`` placed in the leading corner of ``fresh`` (the same layer, wider: more output and/or input
    channels). The new input channels are read with weight zero, so a network grown layer by layer computes
    what the source network computed (new output channels keep ``fresh``'s random start and learn; with
    channel-major flattening a linear layer after a wider conv grows the same way)."""
    if fresh.dim() != source.dim() or any(s > f for s, f in zip(source.shape, fresh.shape)):
        raise ValueError(f"cannot grow a tensor of shape {tuple(source.shape)} into {tuple(fresh.shape)}")
    grown = fresh.detach().clone()
    if grown.dim() >= 2:
        grown[:, source.shape[1]:] = 0
    grown[tuple(slice(0, side) for side in source.shape)] = source
    return grown


def load_parts(model: nn.Module, margin_head: nn.Module | None, parts: list, grow: Sequence[str] = ()
               ) -> list[str]:
    """Apply ``init_state`` (see :class:`TrainConfigV2`); returns a line per part saying what was taken.
    Tensors under a ``grow`` prefix may be smaller than the network's (:func:`grow_tensor`)."""
    said = []
    for part in parts:
        if len(part) not in (2, 3):
            raise ValueError(f"an init_state part is [path, [prefixes]] or [path, [prefixes], {{renames}}]: {part!r}")
        path, prefixes, renames = part[0], part[1], (part[2] if len(part) == 3 else {})
        record, state, margin = v2_state(path)
        own = model.state_dict()
        taken, grown = {}, 0
        for name, value in state.items():
            if not name.startswith(tuple(prefixes)):
                continue
            for old, new in renames.items():
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            if name in own and own[name].shape == value.shape:
                taken[name] = value
            elif name in own and name.startswith(tuple(grow)) and own[name].dim() == value.dim():
                taken[name] = grow_tensor(own[name], value)
                grown += 1
        model.load_state_dict(taken, strict=False)
        line = f"{path}: {len(taken)} network tensors ({', '.join(prefixes)}"
        line += f"; renamed {renames})" if renames else ")"
        line += f", {grown} of them grown into wider layers" if grown else ""
        weight = margin.get("margin.weight")
        if margin_head is not None and "margin." in prefixes and weight is not None:
            rows = margin_rows(record.get("class_names", []), model.record.class_names, weight, margin_head.weight)
            if rows:
                line += f" and the margin head ({rows} of {len(margin_head.weight)} classes)"
        said.append(line)
    return said


def margin_rows(source_names: list[str], names: list[str], source: torch.Tensor, target: torch.Tensor) -> int:
    """Copy the margin head's class rows of ``source`` into ``target`` by class name (all of them when the
    shapes match and no names are known); returns how many rows were copied."""
    with torch.no_grad():
        if source.shape == target.shape and (not source_names or list(source_names) == list(names)):
            target.copy_(source)
            return len(target)
        if source.shape[1:] != target.shape[1:] or len(source_names) != len(source):
            return 0
        index = {name: row for row, name in enumerate(source_names)}
        pairs = [(row, index[name]) for row, name in enumerate(names) if name in index]
        for row, source_row in pairs:
            target[row] = source[source_row]
        return len(pairs)


# ----------------------------------------------------------------------------- validation
def embed_boxes(model: JointNetV2, image: np.ndarray, boxes: list[list[float]], size: int) -> np.ndarray:
    """Embeddings of given face boxes (photo pixels) of one photo, letterboxed to ``size``."""
    canvas, place = letterbox(image, size)
    tensor = images_to_tensor([canvas], model.record.mean, model.record.std)
    placed = torch.tensor([[b[0] * place.scale + place.pad_x, b[1] * place.scale + place.pad_y,
                            b[2] * place.scale + place.pad_x, b[3] * place.scale + place.pad_y] for b in boxes])
    with torch.inference_mode():
        maps = model.forward_maps(tensor)
        return model.embed(maps[3:], placed, torch.zeros(len(placed), dtype=torch.long)).numpy()


def p2_proxy_set(lfw_labels: str | Path, people: int, photos: tuple[int, int] = (2, 5)
                 ) -> list[tuple[str, str, list[float]]]:
    """``(person, photo path, landmark box)`` of the first ``people`` LFW people (sorted) with ``photos[0]`` to
    ``photos[1]`` photos, each photo's subject found by the teacher: P2's enrolled people with the default,
    its strangers with ``(1, 1)``."""
    from jointface.datasets.teacher import manifest_path, read_face_labels

    if people <= 0:
        return []
    root = Path(json.loads(manifest_path(Path(lfw_labels)).read_text())["root"])
    by_person: dict[str, list[dict]] = {}
    for record in read_face_labels(lfw_labels):
        by_person.setdefault(record["path"].split("/")[0], []).append(record)
    chosen, persons = [], 0
    for person in sorted(by_person):
        records = sorted(by_person[person], key=lambda r: r["path"])
        if not photos[0] <= len(records) <= photos[1] or any(r["status"] != "ok" for r in records):
            continue
        for record in records:
            subject = next(f for f in record["faces"] if f["subject"])
            chosen.append((person, str(root / record["path"]), subject["landmark_box"]))
        persons += 1
        if persons >= people:
            break
    return chosen


def proxy_split(people: list[str], embeddings) -> tuple[list, list[str], list, list[str]]:
    """A P2-proxy set in its order as ``(gallery, gallery names, probes, probe names)``: each person's first
    embedding enrolled, the others probes."""
    gallery, gallery_names, probes, probe_names = [], [], [], []
    for person, embedding in zip(people, embeddings):
        if person not in gallery_names:
            gallery.append(embedding)
            gallery_names.append(person)
        else:
            probes.append(embedding)
            probe_names.append(person)
    return gallery, gallery_names, probes, probe_names


def proxy_rank1(people: list[str], embeddings) -> tuple[float, int]:
    """1:N rank-1 of a P2-proxy set (:func:`proxy_split`) and the number of probes; NaN without probes."""
    gallery, gallery_names, probes, probe_names = proxy_split(people, embeddings)
    if not probes:
        return float("nan"), 0
    best = np.argmax(np.stack(probes) @ np.stack(gallery).T, axis=1)
    return float(np.mean([gallery_names[b] == name for b, name in zip(best, probe_names)])), len(probes)


def proxy_open_set(people: list[str], embeddings, strangers) -> dict[str, float]:
    """P2's open-set figures on a P2-proxy set (:func:`proxy_split`) with ``strangers`` (embeddings of people
    not enrolled) as the non-mated probes: TPIR at FPIR 0.01 and 0.1 (thresholds from the strangers' best
    scores, as P2 sets them); NaN without both kinds of probe."""
    from jointface.calibration import threshold_for_fpir, tpir_at_threshold

    gallery, gallery_names, probes, probe_names = proxy_split(people, embeddings)
    if not probes or len(strangers) == 0:
        return {"p2proxy_tpir01": float("nan"), "p2proxy_tpir10": float("nan")}
    gallery = np.stack(gallery)
    scores = np.stack(probes) @ gallery.T
    correct = [gallery_names[b] == name for b, name in zip(np.argmax(scores, axis=1), probe_names)]
    nonmated = np.max(np.stack(strangers) @ gallery.T, axis=1)
    return {f"p2proxy_tpir{round(fpir * 100):02d}": tpir_at_threshold(correct, np.max(scores, axis=1),
                                                                       threshold_for_fpir(nonmated, fpir))
            for fpir in (0.01, 0.1)}


def validate(model: JointNetV2, holdout, teacher_mean: np.ndarray, proxy, loader: PhotoLoader,
             size: int, strangers=()) -> dict[str, float]:
    from jointface.imageio import load_image

    model.eval()
    cosines = []
    for photo in holdout:
        faces = [f for f in photo.faces if f.teacher is not None]
        if not faces:
            continue
        embeddings = embed_boxes(model, loader(photo), [list(f.box) for f in faces], size)
        if embeddings.shape[1] != len(teacher_mean):  # the teacher's space: through the distillation's map
            with torch.inference_mode():
                embeddings = torch.nn.functional.normalize(
                    model.teacher_projection(torch.from_numpy(embeddings)), dim=-1).numpy()
        for embedding, face in zip(embeddings, faces):
            target = face.teacher - teacher_mean
            cosines.append(float(embedding @ target / max(np.linalg.norm(target), 1e-9)))
    people = [person for person, _, _ in proxy]
    embeddings = [embed_boxes(model, load_image(path), [box], size)[0] for _, path, box in proxy]
    rank1, probes = proxy_rank1(people, embeddings)
    open_set = proxy_open_set(people, embeddings,
                              [embed_boxes(model, load_image(path), [box], size)[0] for path, box in strangers])
    model.train()
    return {"holdout_cos": float(np.mean(cosines)) if cosines else float("nan"), "p2proxy_rank1": rank1,
            "p2proxy_probes": probes, **open_set, "p2proxy_strangers": len(strangers),
            "holdout_faces": len(cosines)}


# ----------------------------------------------------------------------------- export
def export_weights(model: JointNetV2, margin_head: nn.Module | None, config: TrainConfigV2, step: int,
                   metrics: dict, path: Path, data_counts: dict) -> Path:
    """The run's weights file (:func:`jointface.weights_file.write_weights`; v2: no ``format_version``)."""
    write_weights(path, record=model.record.to_dict(), state_dict=half_precision(model.state_dict()),
                  identity_heads=(half_precision({"margin.weight": margin_head.weight.detach()})
                                  if margin_head is not None else {}),
                  training={"step": step, "config": {**asdict(config), "identity_heads": ["distill", "relational",
                                                                                       config.margin_kind]},
                            "metrics": metrics, "data": data_counts},
                  format_version=None)
    return path


def plot_curves(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(csv.DictReader((out_dir / "steps.csv").open())) if (out_dir / "steps.csv").exists() else []
    validation = list(csv.DictReader((out_dir / "validation.csv").open())) \
        if (out_dir / "validation.csv").exists() else []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = [int(r["step"]) for r in steps]
        for name in [k for k in steps[0] if k not in ("step", "seconds", "lr", "total", "face_px")]:
            values = [float(r[name]) for r in steps]
            window = 10
            smooth = [np.mean(values[max(0, i - window):i + 1]) for i in range(len(values))]
            axes[0].plot(x, smooth, label=name)
        axes[0].set_yscale("log")
        axes[0].set_xlabel("step")
        axes[0].set_title("loss terms (moving mean of 10 logs)")
        axes[0].legend(fontsize=8)
    if validation:
        x = [int(r["step"]) for r in validation]
        axes[1].plot(x, [float(r["holdout_cos"]) for r in validation], "o-", label="held-out AAF: cos to teacher")
        axes[1].plot(x, [float(r["p2proxy_rank1"]) for r in validation], "s-", label="P2 proxy rank-1")
        for name, label in (("p2proxy_tpir10", "P2 proxy TPIR at FPIR 0.1"),
                            ("p2proxy_tpir01", "P2 proxy TPIR at FPIR 0.01")):
            if name in validation[0]:  # runs validated before the proxy's strangers lack them
                axes[1].plot(x, [float(r[name]) for r in validation], "^-", label=label)
        axes[1].set_xlabel("step")
        axes[1].set_ylim(0, 1)
        axes[1].set_title("people never trained on")
        axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "curves.png", dpi=90)
    plt.close(figure)


# ----------------------------------------------------------------------------- the run
class Run:
    """One training run (build, resume, step, validate, export); see the module docstring."""

    def __init__(self, config: TrainConfigV2, canvases: bool = True):
        """``canvases=False``: a run with no whole-photo batches (no sample composers; photos not cached)."""
        if not config.out_dir:
            raise ValueError("the config names no out_dir")
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / "checkpoints" / "last.pt"
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        resume_classes = None
        if self.checkpoint_path.exists():  # a resumed run keeps its identity classes (its margin head's rows)
            resume_classes = torch.load(self.checkpoint_path, map_location="cpu",
                                        weights_only=True)["record"]["class_names"]
        from jointface.datasets.teacher import manifest_path

        labels = {layout: path for layout, path in config.labels.items() if manifest_path(Path(path)).exists()}
        for layout in sorted(set(config.labels) - set(labels)):
            print(f"note: {config.labels[layout]} is not being labelled yet: {layout} is left out of this stage",
                  flush=True)
        self.data = build_training_set(labels, limits=config.limits, class_names=resume_classes,
                                       singleton_layouts=config.singleton_classes)
        self.data.counts["left_out_unlabelled"] = sorted(set(config.labels) - set(labels))
        self.loader = PhotoLoader() if canvases else PhotoLoader(cache_items=0)
        self.composer = SampleComposer(self.data.train, self.loader, composer_settings(config), seed=config.seed) \
            if canvases else None
        self.composers = {size: SampleComposer(self.data.train, self.loader, composer_settings(config, size),
                                               seed=config.seed) for size in config.canvas_sizes} if canvases else {}
        self.teacher_mean = self.data.teacher_mean()
        self.proxy = p2_proxy_set(config.labels["lfw"], config.p2proxy_people) if config.validate_every else []
        self.strangers = [(path, box) for _, path, box in p2_proxy_set(config.labels["lfw"], config.p2proxy_strangers,
                                                                        photos=(1, 1))] if config.validate_every else []
        self.step = 0
        self._build()

    def _anchors(self) -> list[list[list[float]]]:
        if self.config.anchors_from:
            return v2_state(self.config.anchors_from)[0]["anchor_sizes"]
        sizes = []
        for index in range(self.config.anchor_sample_images):
            sample = self.composer.compose(10_000_000 + index)
            sizes.extend((b[2] - b[0], b[3] - b[1]) for b in sample.boxes
                         if min(b[2] - b[0], b[3] - b[1]) >= self.config.face_range_low)  # not edge slivers
        return kmeans_level_anchors(torch.tensor(sizes))

    def _build(self) -> None:
        config = self.config
        resume = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True) \
            if self.checkpoint_path.exists() else None
        if resume is not None:
            record = ModelRecordV2.from_dict(resume["record"])
        else:
            record = ModelRecordV2(backbone=config.backbone, input_size=config.input_size,
                                   anchor_sizes=self._anchors(), fpn_channels=config.fpn_channels,
                                   identity_channels=config.identity_channels, embedding_dim=config.embedding_dim,
                                   roi_size=config.roi_size, roi_margin=config.roi_margin,
                                   identity_head_widths=config.identity_head_widths,
                                   detection_neck=config.detection_neck, identity_stages=config.identity_stages,
                                   identity_stage_width=config.identity_stage_width,
                                   class_names=self.data.class_names, training_command=" ".join(sys.argv),
                                   training_data=json.dumps(sorted(config.labels)))
        self.model = JointNetV2(record).to(memory_format=torch.channels_last)
        self.model.teacher_mean.copy_(torch.from_numpy(self.teacher_mean))
        self.margin_head = (MarginClassifier(config.embedding_dim, len(self.data.class_names), config.margin_kind,
                                             config.margin_scale, config.margin)
                            if config.margin_kind != "none" and self.data.class_names else None)
        if resume is None and config.init_weights:
            self.model.backbone.load_state_dict(backbone_from_weights(config.init_weights))
        if resume is None and config.init_state:
            for line in load_parts(self.model, self.margin_head, config.init_state, config.grow):
                print(f"init: {line}", flush=True)
        if resume is None and config.split_detection_neck:
            self.model.split_detection_neck()
            print("init: the detection FPN is a copy of the shared FPN", flush=True)
        if resume is None and config.split_identity_stages:
            self.model.split_identity_stages()
            print("init: identity's own stages are copies of the backbone's", flush=True)
        if config.frozen_stages:
            if not (config.init_weights or config.init_state):
                raise ValueError("frozen_stages needs init_weights or init_state: a backbone trained from scratch "
                                 "must learn")
            self.model.frozen_stages = int(config.frozen_stages)
        frozen = {"conv1", "bn1", *(f"layer{i}" for i in range(1, config.frozen_stages + 1))} \
            if config.frozen_stages else set()
        self.frozen_norms = []
        if config.trainable:
            prefixes = tuple(config.trainable)
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith(prefixes))
            if self.margin_head is not None:
                self.margin_head.requires_grad_("margin." in prefixes)
            self.frozen_norms = [module for module in self.model.modules()
                                 if isinstance(module, nn.modules.batchnorm._BatchNorm)
                                 and not any(p.requires_grad for p in module.parameters())]
        backbone = [p for name, p in self.model.backbone.named_parameters()
                    if name.split(".")[0] not in frozen and p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.model.parameters() if id(p) not in backbone_ids and p.requires_grad]
        if self.margin_head is not None:
            rest += [p for p in self.margin_head.parameters() if p.requires_grad]
        factor = config.backbone_lr_factor if (config.init_weights or config.init_state) else 1.0
        self.optimizer = torch.optim.AdamW([{"params": backbone, "lr": config.lr * factor},
                                            {"params": rest, "lr": config.lr}], weight_decay=config.weight_decay)
        warmup, total = config.warmup_steps, max(1, config.max_steps)  # max_steps 0: build, validate, export
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                           * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            if self.margin_head is not None and resume.get("margin_head"):
                self.margin_head.load_state_dict(resume["margin_head"])
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            self.step = int(resume["step"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        (self.out_dir / "model_record.json").write_text(json.dumps(record.to_dict(), indent=2) + "\n")
        (self.out_dir / "data.json").write_text(json.dumps(self.data.counts, indent=2) + "\n")

    def save_checkpoint(self) -> None:
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"format": CHECKPOINT_FORMAT, "record": self.model.record.to_dict(),
                    "model": self.model.state_dict(),
                    "margin_head": self.margin_head.state_dict() if self.margin_head is not None else None,
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "config": asdict(self.config)}, temporary)
        temporary.replace(self.checkpoint_path)

    def batch(self, step: int):
        size = self.config.batch_size
        composer = self.composer
        if self.composers:
            composer = self.composers[self.config.canvas_sizes[step % len(self.config.canvas_sizes)]]
        return collate([composer.compose(step * size + i) for i in range(size)])

    def train_step(self) -> dict[str, float]:
        return self.optimise(self.joint_losses())

    def joint_losses(self) -> dict[str, torch.Tensor]:
        """The loss terms of this step's batch of whole-photo canvases (detection and identity)."""
        config = self.config
        images, boxes, teachers, valid, identities = self.batch(self.step)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
        image_idx = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)])
        all_boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4)
        rois = jitter_boxes(all_boxes, config.box_jitter, generator)
        self.hold_frozen_norms()
        with self.autocast():
            detections, embeddings = self.model.forward_train(normalise(images, self.model.record), rois, image_idx)
        embeddings = embeddings.float()
        matched = match_multilevel(boxes, self.model.anchor_grids(), detections.grid_sizes)
        self.ramp_margin()
        return losses_v2(detections, matched, embeddings, teachers, valid, identities,
                         self.model.teacher_mean, self.margin_head,
                         teacher_projection=self.model.teacher_projection)

    def autocast(self):
        """The context the training forward passes run in: bf16 autocast when the config asks for it."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(self.config.bf16))

    def optimise(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on the weighted sum of named loss terms; the terms and the total as floats."""
        check_finite(losses, self.step)
        total = sum(self.config.loss_weights.get(name, 1.0) * value for name, value in losses.items())
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {**{k: float(v.detach()) for k, v in losses.items()}, "total": float(total.detach())}

    def ramp_margin(self) -> None:
        """The margin of the margin head grows from 0 to its full value over ``margin_warmup_steps``."""
        if self.margin_head is not None:
            self.margin_head.ramp = min(1.0, self.step / max(1, self.config.margin_warmup_steps))

    def hold_frozen_norms(self) -> None:
        """Frozen BatchNorm layers keep their statistics (eval mode; validation puts the model back in train)."""
        for module in self.frozen_norms:
            module.eval()

    def _append(self, name: str, row: dict) -> None:
        path = self.out_dir / name
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def validate_and_export(self) -> dict:
        metrics = validate(self.model, self.data.holdout[:200], self.teacher_mean, self.proxy, self.loader,
                           self.config.input_size, self.strangers)
        self._append("validation.csv", {"step": self.step, **{k: round(v, 5) if isinstance(v, float) else v
                                                              for k, v in metrics.items()}})
        export_weights(self.model, self.margin_head, self.config, self.step, metrics,
                       self.out_dir / "jointface.pt", self.data.counts)
        if self.config.keep_exports:  # a run that peaks before its end keeps its peak
            shutil.copyfile(self.out_dir / "jointface.pt", self.out_dir / f"jointface.step{self.step}.pt")
        plot_curves(self.out_dir)
        return metrics

    def run(self) -> dict:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.out_dir / "run.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RuntimeError(f"{self.out_dir} is in use by another training run; stop it first") from None
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            # `kill` (SIGTERM) stops a background run as Ctrl-C does: checkpoint first. (A job started in the
            # background by a shell without job control ignores SIGINT.)
            def stop(signum, frame):
                raise KeyboardInterrupt

            signal.signal(signal.SIGTERM, stop)
        config = self.config
        started, last_log = time.monotonic(), time.monotonic()
        metrics: dict = {}
        validated_at = None
        try:
            while self.step < config.max_steps:
                losses = self.train_step()
                if self.step % config.log_every == 0:
                    now = time.monotonic()
                    row = {"step": self.step, "seconds": round(now - last_log, 2),
                           "lr": round(self.scheduler.get_last_lr()[-1], 7), **{k: round(v, 5) for k, v in losses.items()}}
                    last_log = now
                    self._append("steps.csv", row)
                    if config.progress:
                        rate = config.log_every * config.batch_size / max(row["seconds"], 1e-9)
                        print(f"step {self.step}/{config.max_steps} {rate:.1f} img/s "
                              + " ".join(f"{k}={v:.3f}" for k, v in losses.items()), flush=True)
                if self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if config.validate_every and self.step % config.validate_every == 0:
                    metrics, validated_at = self.validate_and_export(), self.step
                    print(f"validation at step {self.step}: {metrics}", flush=True)
        except KeyboardInterrupt:
            self.save_checkpoint()
            print(f"interrupted: checkpoint saved at step {self.step}; run again to resume", flush=True)
            raise
        self.save_checkpoint()
        if validated_at != self.step:  # not validated at this very step yet
            metrics = self.validate_and_export()
        return {"step": self.step, "seconds": round(time.monotonic() - started, 1), **metrics}
