"""The identity branch of JointNet v2 trained on face crops: issue 15's ceiling check, and a warm start.

``mode: identity-crops`` in a v2 training config. The network is the very
:class:`~jointface.net.v2.JointNetV2` of the joint run and its embedding is read
the same way (RoIAlign of the face box, enlarged by ``roi_margin``, from the
stride-8 or stride-16 identity map), but each training image is one face crop
instead of a whole photo:

* a **crop bank** is cut once per run (``bank.npy`` in the run folder, reused on
  resume): every training face with a teacher descriptor, scaled so its box is
  ``bank_face`` px wide, centred in a square of ``bank_context`` times that;
* per step one face width ``S`` is drawn (log-uniform in ``face_low`` ..
  ``face_high`` px, the range the joint network's identity read-out sees) and
  every crop of the batch is the bank face zoomed to about ``S`` px on a
  canvas of ``context * S`` px (rounded up to 16), shifted by up to
  ``shift * S``, flipped half the time, colour-jittered;
* losses: the identity terms of the joint run (``distill``, ``relational``,
  ``identity_margin``), same weights; no detection loss, so the detection heads
  are left as they were.

Why: a crop of about ``2 S`` px costs the backbone several times less than the
joint run's whole canvas and carries one face the identity head learns from
(the joint run's canvases hold one face in most samples). The ceiling check
(the identity branch alone, same data, same losses, about one CPU-hour) says
how much of the joint network's identity gap is its training budget and how
much its design; its weights can start a joint run (``init_state``).

Validation and export are the joint run's (held-out All-Age-Faces cosine and
the P2 proxy, read from whole letterboxed photos through the joint read-out).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from jointface.datasets.build import PhotoLoader, build_training_set
from jointface.datasets.samples import PAD_COLOUR, colour_jitter, paste
from jointface.net.v2 import identity_losses
from jointface.train.v2 import Run, TrainConfigV2, jitter_boxes, normalise, p2_proxy_set

ROUND = 16  # canvas sides are multiples of this (stride-8 and stride-16 maps tile them exactly)


@dataclass
class CropSettings:
    face_low: float = 40.0      # face width range of the crops, px (log-uniform per batch)
    face_high: float = 128.0
    context: float = 1.75       # canvas side / face width (the RoI is 1.25 times the face)
    shift: float = 0.1          # face centre moved by up to this share of its width
    scale_jitter: float = 0.1   # per crop, face width times 1 +- this
    bank_face: int = 100        # face width in the bank, px
    bank_context: float = 2.6   # bank crop side / face width
    bank_min_face: float = 20.0 # faces narrower than this (photo px, photos shrunk to 400 px) are left out
    colour_jitter: float = 0.25
    flip_probability: float = 0.5

    @classmethod
    def from_dict(cls, values: dict) -> "CropSettings":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown crops settings: {sorted(unknown)}")
        return cls(**values)


@dataclass
class CropBank:
    """``images`` ``(N, side, side, 3)`` uint8 (a memory map), ``boxes`` ``(N, 4)`` in bank pixels,
    ``teachers`` ``(N, 128)``, ``identities`` ``(N,)``."""

    images: np.ndarray
    boxes: np.ndarray
    teachers: np.ndarray
    identities: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


def build_bank(photos, loader: PhotoLoader, settings: CropSettings, folder: Path, progress: bool = True) -> CropBank:
    """Cut (or reopen) the crop bank of ``photos`` in ``folder`` (``bank.npy`` + ``bank.npz``)."""
    faces = [(photo, face) for photo in photos for face in photo.faces
             if face.teacher is not None and min(face.box[2] - face.box[0], face.box[3] - face.box[1])
             >= settings.bank_min_face]
    side = int(round(settings.bank_face * settings.bank_context))
    images_path, meta_path = folder / "bank.npy", folder / "bank.npz"
    if images_path.exists() and meta_path.exists():
        meta = np.load(meta_path)
        if len(meta["boxes"]) == len(faces) and int(meta["side"]) == side:
            return CropBank(np.load(images_path, mmap_mode="r"), meta["boxes"], meta["teachers"], meta["identities"])
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / "bank.tmp.npy"
    images = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(len(faces), side, side, 3))
    boxes = np.zeros((len(faces), 4), dtype=np.float32)
    teachers = np.zeros((len(faces), 128), dtype=np.float32)
    identities = np.full(len(faces), -1, dtype=np.int64)
    last_path, image = None, None
    for index, (photo, face) in enumerate(faces):
        if photo.path != last_path:
            image, last_path = loader(photo), photo.path
        width = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
        scale = settings.bank_face / width
        centre_x, centre_y = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        offset_x, offset_y = side / 2 - centre_x * scale, side / 2 - centre_y * scale
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = PAD_COLOUR
        paste(canvas, image, scale, offset_x, offset_y)
        images[index] = canvas
        boxes[index] = [face.box[0] * scale + offset_x, face.box[1] * scale + offset_y,
                        face.box[2] * scale + offset_x, face.box[3] * scale + offset_y]
        teachers[index] = face.teacher
        identities[index] = face.identity
        if progress and (index + 1) % 2000 == 0:
            print(f"crop bank: {index + 1}/{len(faces)} faces", flush=True)
    images.flush()
    del images
    temporary.replace(images_path)
    np.savez(meta_path, boxes=boxes, teachers=teachers, identities=identities, side=side)
    return CropBank(np.load(images_path, mmap_mode="r"), boxes, teachers, identities)


def crop_batch(bank: CropBank, settings: CropSettings, batch_size: int, seed: int, step: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch number ``step`` (deterministic): canvases ``(B, C, C, 3)`` uint8, face boxes ``(B, 4)`` in canvas
    pixels and bank indices ``(B,)``."""
    rng = np.random.default_rng([seed, step])
    width = math.exp(rng.uniform(math.log(settings.face_low), math.log(settings.face_high)))
    size = max(4 * ROUND, int(math.ceil(settings.context * width / ROUND)) * ROUND)
    canvases = np.empty((batch_size, size, size, 3), dtype=np.uint8)
    boxes = np.zeros((batch_size, 4), dtype=np.float32)
    chosen = rng.integers(len(bank), size=batch_size)
    for row, index in enumerate(chosen):
        box = bank.boxes[index]
        scale = width * (1 + rng.uniform(-settings.scale_jitter, settings.scale_jitter)) / settings.bank_face
        centre = (box[:2] + box[2:]) / 2
        target = size / 2 + rng.uniform(-settings.shift, settings.shift, size=2) * width
        offset = target - centre * scale
        canvas = canvases[row]
        canvas[:] = PAD_COLOUR
        paste(canvas, np.asarray(bank.images[index]), scale, float(offset[0]), float(offset[1]))
        placed = np.concatenate([box[:2] * scale + offset, box[2:] * scale + offset])
        if rng.uniform() < settings.flip_probability:
            canvas[:] = canvas[:, ::-1]
            placed = np.array([size - placed[2], placed[1], size - placed[0], placed[3]])
        if settings.colour_jitter > 0:
            canvas[:] = colour_jitter(canvas, rng, settings.colour_jitter)
        boxes[row] = placed
    return canvases, boxes, chosen


class CropRun(Run):
    """A :class:`~jointface.train.v2.Run` whose steps train the identity branch on face crops."""

    def __init__(self, config: TrainConfigV2):
        if not config.out_dir:
            raise ValueError("the config names no out_dir")
        if not config.anchors_from:
            raise ValueError("an identity-crops run needs anchors_from (its detection part is not trained)")
        self.config = config
        self.settings = CropSettings.from_dict(config.crops)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / "checkpoints" / "last.pt"
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        resume_classes = None
        if self.checkpoint_path.exists():
            resume_classes = torch.load(self.checkpoint_path, map_location="cpu",
                                        weights_only=True)["record"]["class_names"]
        self.data = build_training_set(config.labels, limits=config.limits, class_names=resume_classes)
        self.loader = PhotoLoader(cache_items=0)
        self.bank = build_bank(self.data.train, self.loader, self.settings, self.out_dir, config.progress)
        self.data.counts["crop_bank_faces"] = len(self.bank)
        self.teacher_mean = self.data.teacher_mean()
        self.proxy = p2_proxy_set(config.labels["lfw"], config.p2proxy_people) if config.validate_every else []
        self.step = 0
        self._build()
        self.model.record.training_command = " ".join(sys.argv)
        (self.out_dir / "crops.json").write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    def train_step(self) -> dict[str, float]:
        config = self.config
        canvases, boxes, chosen = crop_batch(self.bank, self.settings, config.batch_size, config.seed, self.step)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
        rois = jitter_boxes(torch.from_numpy(boxes), config.box_jitter, generator)
        images = normalise(torch.from_numpy(canvases), self.model.record)
        self.hold_frozen_norms()
        maps = self.model.forward_maps(images)
        embeddings = self.model.embed(maps[3:], rois, torch.arange(len(rois)))
        if self.margin_head is not None:
            self.margin_head.ramp = min(1.0, self.step / max(1, config.margin_warmup_steps))
        teachers = torch.from_numpy(self.bank.teachers[chosen])
        losses = identity_losses(embeddings, teachers, torch.ones(len(chosen), dtype=torch.bool),
                                 torch.from_numpy(self.bank.identities[chosen]), self.model.teacher_mean,
                                 self.margin_head, self.model.teacher_projection)
        return {**self.optimise(losses), "face_px": round(float((boxes[:, 2] - boxes[:, 0]).mean()), 1)}
