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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jointface.datasets.build import PhotoLoader
from jointface.datasets.samples import PAD_COLOUR, colour_jitter, paste
from jointface.net.v2 import identity_losses
from jointface.train.v2 import Run, TrainConfigV2, jitter_boxes, normalise

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
    batch_size: int = 0         # crops per step (0: the run's batch_size)
    labelled_share: float = 0.0 # share of each batch drawn from faces of a known person (0: uniform over the bank)
    bank_limit: int = 0         # train on this many bank faces only (a seeded choice; 0: all): a fit test
    bank_contrast: bool = False # add the ``bank_contrast`` term against every bank face's teacher vector
    #: mixup views of the bank with dlib's descriptor of each view (:mod:`jointface.train.views`): how many
    #: to cut, and the share of each batch drawn from them
    mixup_views: int = 0
    view_share: float = 0.0
    #: start the margin head's row of every class with one bank face (``singleton_classes``) at the student's
    #: own embedding of that face (a random row would leave CosFace's logit for it at chance)
    singleton_rows_from_student: bool = False
    #: above 0, the rows of one-face classes are not learned: after each step a row whose face was in the batch
    #: moves to ``m * row + (1 - m) * embedding`` (unit length; OIM's lookup table), so the loss cannot be
    #: lowered by fitting a row to its one face (learned rows were memorised: TPIR fell from 800 to 2,400 steps)
    singleton_momentum: float = 0.0
    bank_student_temperature: float = 0.05  # equal temperatures: the loss is least where the student is the teacher
    bank_teacher_temperature: float = 0.05

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
    """Cut (or reopen) the crop bank of ``photos`` in ``folder`` (``bank.npy`` + ``bank.npz``). Boxes, teachers
    and identities always come from ``photos`` (a run with other identity classes reuses a bank's images and
    takes its own identities); the images are cut again when the stored bank is not of these faces."""
    faces = [(photo, face) for photo in photos for face in photo.faces
             if face.teacher is not None and min(face.box[2] - face.box[0], face.box[3] - face.box[1])
             >= settings.bank_min_face]
    side = int(round(settings.bank_face * settings.bank_context))
    boxes = np.zeros((len(faces), 4), dtype=np.float32)
    placements = []
    for index, (_, face) in enumerate(faces):
        width = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
        scale = settings.bank_face / width
        centre_x, centre_y = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        offset_x, offset_y = side / 2 - centre_x * scale, side / 2 - centre_y * scale
        placements.append((scale, offset_x, offset_y))
        boxes[index] = [face.box[0] * scale + offset_x, face.box[1] * scale + offset_y,
                        face.box[2] * scale + offset_x, face.box[3] * scale + offset_y]
    teachers = np.array([face.teacher for _, face in faces], dtype=np.float32).reshape(-1, 128)
    identities = np.array([face.identity for _, face in faces], dtype=np.int64)
    images_path, meta_path = folder / "bank.npy", folder / "bank.npz"
    if images_path.exists() and meta_path.exists():
        try:  # a bank cut for these faces is reused; a truncated or foreign one is cut again
            meta = np.load(meta_path)
            images = np.load(images_path, mmap_mode="r")
            if len(meta["boxes"]) == len(faces) and int(meta["side"]) == side \
                    and images.shape == (len(faces), side, side, 3) and np.allclose(meta["boxes"], boxes, atol=1e-3):
                if not np.array_equal(meta["identities"], identities):  # a new file: other runs' links keep theirs
                    temporary = folder / "bank.tmp.npz"
                    np.savez(temporary, boxes=boxes, teachers=teachers, identities=identities, side=side)
                    temporary.replace(meta_path)
                return CropBank(images, boxes, teachers, identities)
        except (OSError, ValueError, KeyError, EOFError) as error:
            print(f"crop bank in {folder} is unreadable ({error}): cutting it again", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / "bank.tmp.npy"
    images = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=(len(faces), side, side, 3))
    last_path, image = None, None
    for index, ((photo, _), (scale, offset_x, offset_y)) in enumerate(zip(faces, placements)):
        if photo.path != last_path:
            image, last_path = loader(photo), photo.path
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = PAD_COLOUR
        paste(canvas, image, scale, offset_x, offset_y)
        images[index] = canvas
        if progress and (index + 1) % 2000 == 0:
            print(f"crop bank: {index + 1}/{len(faces)} faces", flush=True)
    images.flush()
    del images
    temporary.replace(images_path)
    np.savez(meta_path, boxes=boxes, teachers=teachers, identities=identities, side=side)
    return CropBank(np.load(images_path, mmap_mode="r"), boxes, teachers, identities)


def with_views(bank: CropBank, views) -> CropBank:
    """The bank followed by its mixup views (:func:`jointface.train.views.build_views`; indices from
    ``len(bank)`` on are views, of no known person)."""
    from jointface.train.views import StackedImages

    return CropBank(StackedImages(bank.images, views.images), np.concatenate([bank.boxes, views.boxes]),
                    np.concatenate([bank.teachers, views.teachers]),
                    np.concatenate([bank.identities, np.full(len(views.boxes), -1, dtype=bank.identities.dtype)]))


def limit_bank(bank: CropBank, count: int, seed: int) -> CropBank:
    """``count`` faces of ``bank`` chosen at random (seeded), in bank order, held in memory; the whole bank
    when it has no more. A small bank is a fit test: can the network learn its teacher on faces it sees often?"""
    if count <= 0 or count >= len(bank):
        return bank
    chosen = np.sort(np.random.default_rng(seed).choice(len(bank), size=count, replace=False))
    return CropBank(np.ascontiguousarray(bank.images[chosen]), bank.boxes[chosen], bank.teachers[chosen],
                    bank.identities[chosen])


def crop_batch(bank: CropBank, settings: CropSettings, batch_size: int, seed: int, step: int,
               view_start: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch number ``step`` (deterministic): canvases ``(B, C, C, 3)`` uint8, face boxes ``(B, 4)`` in canvas
    pixels and bank indices ``(B,)``."""
    rng = np.random.default_rng([seed, step])
    width = math.exp(rng.uniform(math.log(settings.face_low), math.log(settings.face_high)))
    size = max(4 * ROUND, int(math.ceil(settings.context * width / ROUND)) * ROUND)
    canvases = np.empty((batch_size, size, size, 3), dtype=np.uint8)
    boxes = np.zeros((batch_size, 4), dtype=np.float32)
    chosen = choose_faces(bank, settings.labelled_share, batch_size, rng, settings.view_share, view_start)
    for row, index in enumerate(chosen):
        scale = width * (1 + rng.uniform(-settings.scale_jitter, settings.scale_jitter)) / settings.bank_face
        target = size / 2 + rng.uniform(-settings.shift, settings.shift, size=2) * width
        canvas = canvases[row]
        placed = place_face(canvas, bank, index, scale, target)
        if rng.uniform() < settings.flip_probability:
            canvas[:] = canvas[:, ::-1]
            placed = np.array([size - placed[2], placed[1], size - placed[0], placed[3]])
        if settings.colour_jitter > 0:
            canvas[:] = colour_jitter(canvas, rng, settings.colour_jitter)
        boxes[row] = placed
    return canvases, boxes, chosen


def place_face(canvas: np.ndarray, bank: CropBank, index: int, scale: float, target: np.ndarray) -> np.ndarray:
    """Paste bank face ``index`` scaled by ``scale`` on ``canvas`` (filled with the pad colour first) with the
    face's centre at ``target`` (x, y); returns its box on the canvas."""
    box = bank.boxes[index]
    offset = target - (box[:2] + box[2:]) / 2 * scale
    canvas[:] = PAD_COLOUR
    paste(canvas, np.asarray(bank.images[index]), scale, float(offset[0]), float(offset[1]))
    return np.concatenate([box[:2] * scale + offset, box[2:] * scale + offset])


def choose_faces(bank: CropBank, labelled_share: float, batch_size: int, rng: np.random.Generator,
                 view_share: float = 0.0, view_start: int | None = None) -> np.ndarray:
    """Bank indices of one batch: uniform over the bank, or ``round(labelled_share * batch_size)`` of them
    uniform over the faces of a known person (the margin loss's only faces) and the rest over the bank.
    With views (bank indices from ``view_start`` on), ``round(view_share * batch_size)`` of the rest are
    views and the others bank faces."""
    photos = len(bank) if view_start is None else view_start
    views = 0 if view_start is None else min(batch_size, int(round(view_share * batch_size)))
    drawn = [view_start + rng.integers(len(bank) - view_start, size=views)] if views else []
    if labelled_share <= 0:
        return np.concatenate([rng.integers(photos, size=batch_size - views), *drawn])
    labelled = np.flatnonzero(bank.identities >= 0)
    if len(labelled) == 0:
        raise ValueError("crops.labelled_share needs faces of known people in the crop bank; it has none")
    count = min(batch_size - views, int(round(labelled_share * batch_size)))
    return np.concatenate([labelled[rng.integers(len(labelled), size=count)],
                           rng.integers(photos, size=batch_size - count - views), *drawn])


class CropSource:
    """Face-crop batches from a run's crop bank and the identity loss terms on them: the steps of a
    :class:`CropRun`, the crop half of a :class:`MixedRun`'s steps."""

    def __init__(self, run: Run):
        self.run = run
        self.settings = CropSettings.from_dict(run.config.crops)
        self.batch_size = self.settings.batch_size or run.config.batch_size
        self.bank = build_bank(run.data.train, PhotoLoader(cache_items=0), self.settings, run.out_dir,
                               run.config.progress)
        if self.settings.bank_limit:
            run.data.counts["crop_bank_faces_cut"] = len(self.bank)
            self.bank = limit_bank(self.bank, self.settings.bank_limit, run.config.seed)
        self.view_start = None
        if self.settings.mixup_views:
            from jointface.train.views import build_views

            if self.settings.bank_limit:
                raise ValueError("crops.mixup_views and crops.bank_limit do not go together (views blend the "
                                 "whole bank)")
            views = build_views(self.bank, run.out_dir / "bank.npy", self.settings.mixup_views, run.config.seed,
                                run.out_dir, progress=run.config.progress)
            self.view_start = len(self.bank)
            self.bank = with_views(self.bank, views)
            run.data.counts["mixup_views"] = len(views)
        elif self.settings.view_share:
            raise ValueError("crops.view_share needs crops.mixup_views")
        run.data.counts["crop_bank_faces"] = len(self.bank) if self.view_start is None else self.view_start
        if self.settings.singleton_rows_from_student and run.step == 0:
            run.data.counts["singleton_rows_from_student"] = self.start_singleton_rows()
        self.fixed_rows = None  # one-face classes whose rows follow their face (singleton_momentum), as a mask
        self.pending_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.settings.singleton_momentum:
            self.fixed_rows = self.hold_singleton_rows()
            run.data.counts["singleton_rows_by_momentum"] = int(self.fixed_rows.sum())
        self.teacher_bank = None  # unit centred teacher vectors of the bank, made at the first step
        (run.out_dir / "crops.json").write_text(json.dumps(asdict(self.settings), indent=2) + "\n")
        (run.out_dir / "data.json").write_text(json.dumps(run.data.counts, indent=2) + "\n")

    def start_singleton_rows(self, width: float = 80.0, batch: int = 64) -> int:
        """Set the margin head's row of each class that has exactly one bank face to the student's embedding of
        that face (centred, ``width`` px wide, no jitter), scaled to the median norm of the other rows; returns
        how many rows were set."""
        run, head = self.run, self.run.margin_head
        if head is None:
            raise ValueError("crops.singleton_rows_from_student needs a margin head (margin_kind and known people)")
        rows, faces = self.singleton_rows()
        if len(rows) == 0:
            return 0
        side = max(4 * ROUND, int(math.ceil(self.settings.context * width / ROUND)) * ROUND)
        was_training = run.model.training
        run.model.eval()
        embedded = []
        with torch.inference_mode():
            for start in range(0, len(faces), batch):
                chunk = faces[start:start + batch]
                canvases = np.empty((len(chunk), side, side, 3), dtype=np.uint8)
                boxes = [place_face(canvas, self.bank, index, width / self.settings.bank_face,
                                    np.array([side / 2, side / 2])) for canvas, index in zip(canvases, chunk)]
                images = normalise(torch.from_numpy(canvases), run.model.record)
                with run.autocast():
                    maps = run.model.identity_maps(images)
                    embedded.append(run.model.embed(maps, torch.from_numpy(np.stack(boxes)).float(),
                                                    torch.arange(len(boxes))).float())
        run.model.train(was_training)
        with torch.no_grad():
            others = np.setdiff1d(np.arange(len(head.weight)), rows)
            norm = head.weight[torch.from_numpy(others)].norm(dim=1).median() if len(others) else torch.tensor(1.0)
            head.weight[torch.from_numpy(rows)] = torch.cat(embedded) * norm
        return int(len(rows))

    def singleton_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The classes with exactly one bank face (views aside) and that face's bank index."""
        photos = len(self.bank) if self.view_start is None else self.view_start
        classes, first, counts = np.unique(np.asarray(self.bank.identities[:photos]), return_index=True,
                                           return_counts=True)
        single = (classes >= 0) & (counts == 1)
        return classes[single], first[single]

    def hold_singleton_rows(self) -> torch.Tensor:
        """Mask of the margin head's one-face rows, whose gradient is zeroed from now on (they are moved by
        :meth:`update_rows` instead)."""
        head = self.run.margin_head
        if head is None:
            raise ValueError("crops.singleton_momentum needs a margin head (margin_kind and known people)")
        if not 0 < self.settings.singleton_momentum < 1:
            raise ValueError(f"crops.singleton_momentum must lie in (0, 1), got {self.settings.singleton_momentum}")
        mask = torch.zeros(len(head.weight), dtype=torch.bool)
        mask[torch.from_numpy(self.singleton_rows()[0])] = True
        keep = (~mask).float()[:, None]
        head.weight.register_hook(lambda grad: grad * keep)
        return mask

    def update_rows(self) -> None:
        """After the optimiser step: each one-face row of the last batch moves towards its face's embedding."""
        if self.pending_rows is None:
            return
        rows, embeddings = self.pending_rows
        self.pending_rows = None
        weight, momentum = self.run.margin_head.weight, self.settings.singleton_momentum
        with torch.no_grad():
            norms = weight[rows].norm(dim=1, keepdim=True)
            moved = momentum * F.normalize(weight[rows], dim=1) + (1 - momentum) * F.normalize(embeddings, dim=1)
            weight[rows] = F.normalize(moved, dim=1) * norms

    def losses(self, step: int) -> tuple[dict[str, torch.Tensor], float]:
        """The identity terms of crop batch ``step`` and its mean face width (canvas px)."""
        run, config = self.run, self.run.config
        canvases, boxes, chosen = crop_batch(self.bank, self.settings, self.batch_size, config.seed, step,
                                             self.view_start)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        rois = jitter_boxes(torch.from_numpy(boxes), config.box_jitter, generator)
        images = normalise(torch.from_numpy(canvases), run.model.record)
        with run.autocast():
            embeddings = run.model.embed(run.model.identity_maps(images), rois, torch.arange(len(rois)))
        embeddings = embeddings.float()
        teachers = torch.from_numpy(self.bank.teachers[chosen])
        if self.settings.bank_contrast and self.teacher_bank is None:
            self.teacher_bank = torch.nn.functional.normalize(
                torch.from_numpy(self.bank.teachers).float() - run.model.teacher_mean, dim=1)
        losses = identity_losses(embeddings, teachers, torch.ones(len(chosen), dtype=torch.bool),
                                 torch.from_numpy(self.bank.identities[chosen]), run.model.teacher_mean,
                                 run.margin_head, run.model.teacher_projection, self.teacher_bank,
                                 (self.settings.bank_student_temperature, self.settings.bank_teacher_temperature))
        if self.fixed_rows is not None:  # a face drawn twice in one batch: its last embedding counts
            identities = torch.from_numpy(self.bank.identities[chosen]).long()
            fixed = (identities >= 0) & self.fixed_rows[identities.clamp(min=0)]
            self.pending_rows = (identities[fixed], embeddings.detach()[fixed])
        return losses, round(float((boxes[:, 2] - boxes[:, 0]).mean()), 1)


class CropRun(Run):
    """A :class:`~jointface.train.v2.Run` whose steps train the identity branch on face crops."""

    def __init__(self, config: TrainConfigV2):
        if not config.anchors_from:
            raise ValueError("an identity-crops run needs anchors_from (its detection part is not trained)")
        super().__init__(config, canvases=False)
        self.crops = CropSource(self)

    def train_step(self) -> dict[str, float]:
        self.hold_frozen_norms()
        self.ramp_margin()
        losses, face_px = self.crops.losses(self.step)
        terms = self.optimise(losses)
        self.crops.update_rows()
        return {**terms, "face_px": face_px}


class MixedRun(Run):
    """A joint run whose every step also learns identity on a batch of face crops (``mode: joint+crops``).

    Why (issue 15, ``benchmarks/joint_v2/crops/``): a joint run started from the crops run lost identity with
    every validation while detection came back, and a run of the two one after the other leaves one of them
    behind. Here each optimiser step sums the canvas batch's terms (detection and identity) and the crop
    batch's identity terms (``crop_distill``, ``crop_relational``, ``crop_identity_margin``), so the identity
    the crops teach is held while detection learns. ``crops.batch_size`` sets the crop batch (default: the
    run's ``batch_size``).
    """

    def __init__(self, config: TrainConfigV2):
        super().__init__(config)
        self.crops = CropSource(self)

    def train_step(self) -> dict[str, float]:
        losses = self.joint_losses()
        crop_losses, face_px = self.crops.losses(self.step)
        terms = self.optimise({**losses, **{f"crop_{k}": v for k, v in crop_losses.items()}})
        self.crops.update_rows()
        return {**terms, "face_px": face_px}
