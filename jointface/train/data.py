"""Training data: organised records -> augmented ``input_size`` squares with face targets.

Input: the ``train.jsonl`` / ``test.jsonl`` written by
:func:`jointface.train.labels.organize` (one labelled subject face per photo).

Augmentation (training only), every random number drawn from a generator
seeded by the sample's own seed, so a sample is the same whatever worker or
order produces it (resuming reproduces the same batches):

* **scale jitter + random crop**: the photo is scaled to fit the output square
  times ``U(scale_jitter)`` and placed at a random offset; when it is larger
  than the square this is a random crop, when smaller it is padded. The offset
  is drawn among those that keep the subject's box inside when possible, so
  faces land anywhere in the frame, not only in the centre;
* **mosaic** (probability ``mosaic_probability``): the square is cut at a random
  point into 2x2 tiles, each filled by a scaled / cropped photo (the sample's
  own photo + three others drawn at random), so an image holds several faces of
  several sizes, off-centre;
* horizontal **flip**; **colour jitter** (brightness, contrast, saturation).

Faces less than half visible after cropping are dropped from the targets.
Only the labelled subject of each photo is a target: other people in the
background of an LFW photo count as background (a known limit of labels
made one face per photo).
Without augmentation (validation), a photo is letterboxed exactly like the
engine does (:func:`jointface.net.model.letterbox`).

Batches: :class:`PKBatchSampler` draws P people x K images each (batch-hard
triplet mining needs several images per person), and yields
``(record_index, sample_seed)`` pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from jointface.imageio import load_image
from jointface.net.matching import TEACHER_DIM, FaceTargets
from jointface.net.model import images_to_tensor, letterbox

PAD_COLOUR = (124, 116, 104)


@dataclass(frozen=True)
class FaceRecord:
    """One organised photo: ``box`` xyxy in the photo's pixels (None: no face labelled)."""

    image_path: Path
    identity: str | None
    identity_idx: int            # -1: not a training class
    box: tuple[float, float, float, float] | None
    reference_box: tuple[float, float, float, float] | None  # PROTOCOLS.md landmark box
    teacher: tuple[float, ...] | None
    extra: bool = False


def load_records(data_dir: str | os.PathLike, split: str, class_names: Sequence[str],
                 box_source: str = "landmark") -> list[FaceRecord]:
    """Records of ``data_dir/<split>.jsonl``; ``box_source`` picks the training box (landmark / detector)."""
    if box_source not in ("landmark", "detector"):
        raise ValueError(f"box_source must be 'landmark' or 'detector', not {box_source!r}")
    data_dir = Path(data_dir)
    class_index = {name: i for i, name in enumerate(class_names)}
    records = []
    for line in (data_dir / f"{split}.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        box = entry["landmark_box"] if box_source == "landmark" else entry["box"]
        records.append(FaceRecord(
            image_path=data_dir / entry["image"], identity=entry["identity"],
            identity_idx=class_index.get(entry["identity"], -1),
            box=tuple(box) if box else None,
            reference_box=tuple(entry["landmark_box"]) if entry.get("landmark_box") else None,
            teacher=tuple(entry["teacher"]) if entry.get("teacher") else None,
            extra=bool(entry.get("extra", False))))
    return records


def load_class_names(data_dir: str | os.PathLike) -> list[str]:
    return json.loads((Path(data_dir) / "classes.json").read_text())


@dataclass(frozen=True)
class Augmentation:
    mosaic_probability: float = 0.5
    scale_jitter: tuple[float, float] = (0.6, 1.3)
    colour_jitter: float = 0.3
    flip_probability: float = 0.5


def sample_seed(*keys: int) -> int:
    """A 32-bit seed derived from integers (run seed, epoch, batch, position)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def _place(image: np.ndarray, box, out_w: int, out_h: int, scale_range, rng: np.random.Generator):
    """Scale ``image`` to fit ``out_w x out_h`` times a jitter, at a random offset keeping ``box`` inside.

    Returns the ``(out_h, out_w, 3)`` view and ``(scale, offset_x, offset_y)``
    (view = photo * scale + offset).
    """
    height, width = image.shape[:2]
    scale = min(out_w / width, out_h / height) * rng.uniform(*scale_range)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))

    def offset_range(size_new, size_out, low, high):
        lo, hi = min(0, size_out - size_new), max(0, size_out - size_new)
        if box is not None:  # keep [low, high] * scale + offset inside [0, size_out] when possible
            keep_lo, keep_hi = max(lo, -low * scale), min(hi, size_out - high * scale)
            if keep_lo <= keep_hi:
                return keep_lo, keep_hi
        return lo, hi

    x_lo, x_hi = offset_range(new_w, out_w, *(box[0::2] if box is not None else (0, 0)))
    y_lo, y_hi = offset_range(new_h, out_h, *(box[1::2] if box is not None else (0, 0)))
    offset_x, offset_y = round(rng.uniform(x_lo, x_hi)), round(rng.uniform(y_lo, y_hi))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    view = np.empty((out_h, out_w, 3), dtype=np.uint8)
    view[:] = PAD_COLOUR
    # paste the overlap of resized (at offset) with the view
    src_x1, src_y1 = max(0, -offset_x), max(0, -offset_y)
    dst_x1, dst_y1 = max(0, offset_x), max(0, offset_y)
    paste_w, paste_h = min(new_w - src_x1, out_w - dst_x1), min(new_h - src_y1, out_h - dst_y1)
    if paste_w > 0 and paste_h > 0:
        view[dst_y1:dst_y1 + paste_h, dst_x1:dst_x1 + paste_w] = \
            resized[src_y1:src_y1 + paste_h, src_x1:src_x1 + paste_w]
    return view, (new_w / width, offset_x, offset_y)


def _visible_box(box, transform, out_w, out_h, min_visible: float = 0.5):
    """Box after ``view = photo * scale + offset``, clipped; None when less than ``min_visible`` shows."""
    scale, offset_x, offset_y = transform
    x1, x2 = box[0] * scale + offset_x, box[2] * scale + offset_x
    y1, y2 = box[1] * scale + offset_y, box[3] * scale + offset_y
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(out_w), x2), min(float(out_h), y2)
    visible = max(0.0, cx2 - cx1) * max(0.0, cy2 - cy1)
    if area <= 0 or visible / area < min_visible:
        return None
    return cx1, cy1, cx2, cy2


def _colour_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    pixels = image.astype(np.float32)
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    pixels *= brightness
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
    grey = pixels.mean(axis=2, keepdims=True)
    pixels = (pixels - grey) * saturation + grey
    return np.clip(pixels, 0, 255).astype(np.uint8)


class FaceDataset(Dataset):
    """Items: ``(image (3, S, S) float normalised, FaceTargets)``; index = ``(record_index, sample_seed)``.

    ``augment=None`` gives the letterboxed photo (validation); records without
    a face give empty targets.
    """

    def __init__(self, records: Sequence[FaceRecord], input_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: Augmentation | None = None, cache_images: bool = False):
        self.records = list(records)
        self._cache: dict[Path, np.ndarray] | None = {} if cache_images else None
        self.input_size = input_size
        self.mean, self.std = list(mean), list(std)
        self.augment = augment
        self.with_face = [i for i, r in enumerate(self.records) if r.box is not None]  # mosaic tile sources

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, path: Path) -> np.ndarray:
        """The decoded photo, from the in-memory cache when ``cache_images`` (each worker keeps its own)."""
        if self._cache is None:
            return load_image(path)
        image = self._cache.get(path)
        if image is None:
            image = self._cache[path] = load_image(path)
        return image

    def _faces(self, record: FaceRecord, box) -> list[tuple]:
        return [] if box is None else [(box, record.identity_idx, record.teacher)]

    def render(self, record_index: int, seed: int = 0) -> tuple[np.ndarray, list[tuple]]:
        """The uint8 ``(S, S, 3)`` image and its faces ``[(box, identity_idx, teacher)]``."""
        size, record = self.input_size, self.records[record_index]
        if self.augment is None:
            canvas, placement = letterbox(self._load(record.image_path), size)
            if record.box is None:
                return canvas, []
            transform = (placement.scale, placement.pad_x, placement.pad_y)
            return canvas, self._faces(record, _visible_box(record.box, transform, size, size, 0.0))
        rng = np.random.default_rng(seed)
        augment = self.augment
        if rng.uniform() < augment.mosaic_probability:
            split_x, split_y = (round(rng.uniform(0.3, 0.7) * size) for _ in range(2))
            tiles = [(0, 0, split_x, split_y), (split_x, 0, size - split_x, split_y),
                     (0, split_y, split_x, size - split_y), (split_x, split_y, size - split_x, size - split_y)]
            others = rng.integers(0, len(self.with_face), size=3) if self.with_face else []
            sources = [record_index] + [self.with_face[int(i)] for i in others]
        else:
            tiles, sources = [(0, 0, size, size)], [record_index]
        canvas = np.empty((size, size, 3), dtype=np.uint8)
        faces = []
        for (left, top, tile_w, tile_h), source in zip(tiles, sources):
            tile_record = self.records[source]
            view, transform = _place(self._load(tile_record.image_path), tile_record.box, tile_w, tile_h,
                                     augment.scale_jitter, rng)
            canvas[top:top + tile_h, left:left + tile_w] = view
            if tile_record.box is not None:
                visible = _visible_box(tile_record.box, transform, tile_w, tile_h)
                if visible is not None:
                    box = (visible[0] + left, visible[1] + top, visible[2] + left, visible[3] + top)
                    faces.extend(self._faces(tile_record, box))
        if rng.uniform() < augment.flip_probability:
            canvas = np.ascontiguousarray(canvas[:, ::-1])
            faces = [((size - b[2], b[1], size - b[0], b[3]), identity, teacher) for b, identity, teacher in faces]
        if augment.colour_jitter > 0:
            canvas = _colour_jitter(canvas, augment.colour_jitter, rng)
        return canvas, faces

    def __getitem__(self, index) -> tuple[torch.Tensor, FaceTargets]:
        record_index, seed = index if isinstance(index, tuple) else (index, 0)
        canvas, faces = self.render(record_index, seed)
        image = images_to_tensor([canvas], self.mean, self.std)[0]
        if not faces:
            return image, FaceTargets.empty()
        teachers = [teacher if teacher is not None else (0.0,) * TEACHER_DIM for _, _, teacher in faces]
        return image, FaceTargets(
            boxes=torch.tensor([box for box, _, _ in faces], dtype=torch.float32),
            identities=torch.tensor([identity for _, identity, _ in faces], dtype=torch.long),
            teachers=torch.tensor(teachers, dtype=torch.float32),
            teacher_valid=torch.tensor([teacher is not None for _, _, teacher in faces], dtype=torch.bool))


def collate(items) -> tuple[torch.Tensor, list[FaceTargets]]:
    images, targets = zip(*items)
    return torch.stack(images), list(targets)


class PKBatchSampler:
    """Batches of ``people x images_per_person`` ``(record_index, sample_seed)`` pairs.

    Only records with a face and a class take part. People are visited in a
    shuffled cycle; each contributes ``images_per_person`` images (without
    replacement when it has enough). ``batches(epoch)`` is a pure function of
    ``(seed, epoch)``; an epoch has ``len(records) // batch_size`` batches.
    """

    def __init__(self, records: Sequence[FaceRecord], people: int, images_per_person: int, seed: int = 0):
        self.by_person: dict[int, list[int]] = {}
        for index, record in enumerate(records):
            if record.box is not None and record.identity_idx >= 0:
                self.by_person.setdefault(record.identity_idx, []).append(index)
        if not self.by_person:
            raise ValueError("no training record has both a face box and a class")
        self.people = min(people, len(self.by_person))
        self.images_per_person = images_per_person
        self.seed = seed
        usable = sum(len(v) for v in self.by_person.values())
        self.batches_per_epoch = max(1, usable // (self.people * images_per_person))
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        rng = np.random.default_rng(sample_seed(self.seed, epoch, 0xB47C))
        person_ids = sorted(self.by_person)
        cycle: list[int] = []
        result = []
        for batch_index in range(self.batches_per_epoch):
            chosen = []
            while len(chosen) < self.people:
                if not cycle:
                    cycle = [person_ids[i] for i in rng.permutation(len(person_ids))]
                person = cycle.pop()
                if person not in chosen:
                    chosen.append(person)
            batch = []
            for person in chosen:
                pool = self.by_person[person]
                replace = len(pool) < self.images_per_person
                picks = rng.choice(len(pool), size=self.images_per_person, replace=replace)
                batch.extend(pool[int(p)] for p in picks)
            result.append([(index, sample_seed(self.seed, epoch, batch_index, position))
                           for position, index in enumerate(batch)])
        return result

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return self.batches_per_epoch


def sample_box_sizes(dataset: FaceDataset, count: int, seed: int = 0) -> torch.Tensor:
    """``(F, 2)`` face sizes (w, h) over ``count`` augmented samples: the k-means input for anchors."""
    with_face = [i for i, r in enumerate(dataset.records) if r.box is not None]
    rng = np.random.default_rng(sample_seed(seed, 0xA7C))
    sizes = []
    for position, record_index in enumerate(rng.choice(with_face, size=min(count, len(with_face)), replace=False)):
        _, faces = dataset.render(int(record_index), sample_seed(seed, 0xA7C, position))
        sizes.extend((box[2] - box[0], box[3] - box[1]) for box, _, _ in faces)
    return torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2)
