"""From teacher labels to training photos: splits, the leak guard and the identity classes.

Inputs are ``faces.jsonl`` files of :mod:`jointface.datasets.teacher`, one per
collection (their manifests name the collection root). What training may use:

* LFW: only the P1 people's TRAIN and ``extra`` images (PROTOCOLS.md); P1 TEST
  images and every other LFW person (the P2/P3 evaluation people) never;
* every other collection: all photos, except
  - the **leak guard**: a photo with a face that looks like an LFW person
    outside P1 (a P2/P3 evaluation person) is dropped whole (a face dropped but
    left in the photo would teach the detector that a face is background). A
    face looks like an evaluation person when its teacher descriptor is within
    dlib distance ``sure_distance`` (0.4) of one of that person's faces, or
    within ``distance`` (0.5) of them and nearer to that person than ``ratio``
    (0.9) times the distance to the next evaluation person: it resembles one
    person, not a crowd of them (:class:`LeakRule`);
  - the **held-out people**: every 33rd All-Age-Faces person (3%, sorted by
    id) is kept for validation (people never trained on).

Identity classes (for the margin head) are the people with at least two
usable photos: LFW P1 people and CelebA people. All-Age-Faces people have one
photo each and UTKFace none, so their faces teach detection and distillation
only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .collections import lfw_p1_split
from .samples import Face, Photo
from .teacher import manifest_path, read_face_labels

LEAK_DISTANCE = 0.5
HOLDOUT_EVERY = 33


@dataclass(frozen=True)
class LeakRule:
    """When a training face counts as an evaluation person's (see the module docstring).

    Why the ratio (measured in ``benchmarks/leak_guard/``): with "within 0.5 of any evaluation face" alone, 85%
    of the All-Age-Faces photos and 36% of the UTKFace photos were dropped, by demographics rather than identity:
    a dropped All-Age-Faces face was within 0.5 of a median of 9 different LFW people, and one LFW child was the
    nearest person of 323 of them. dlib packs faces of the groups it saw least in training close together.
    On real leaks (one photo of each LFW evaluation person with two or more, against the others) this rule
    catches 78% where the plain threshold caught 89%, and it keeps 78% of All-Age-Faces instead of 15%.
    """

    distance: float = LEAK_DISTANCE   # further than this from every evaluation face: safe
    sure_distance: float = 0.4        # nearer than this to an evaluation face: leaks
    ratio: float = 0.9                # in between: leaks when nearest person < ratio x second nearest person


#: the guard before the ratio test (every face within ``distance`` of any evaluation face leaks)
PLAIN_LEAK_RULE = LeakRule(sure_distance=LEAK_DISTANCE, ratio=0.0)


@dataclass
class TrainingSet:
    """Photos to train on, validation photos, class names, and what was left out (counts)."""

    train: list[Photo]
    holdout: list[Photo]
    class_names: list[str]
    counts: dict = field(default_factory=dict)

    def teacher_mean(self) -> np.ndarray:
        teachers = [f.teacher for p in self.train for f in p.faces if f.teacher is not None]
        return np.mean(np.stack(teachers), axis=0).astype(np.float32)


def _manifest_of(labels_path: Path) -> dict:
    manifest = manifest_path(labels_path)
    if not manifest.exists():
        raise FileNotFoundError(f"{labels_path}: no manifest beside it ({manifest.name}); label the collection "
                                f"with `jointface preprocess --all-faces` first")
    return json.loads(manifest.read_text())


MAX_SIDE = 400


def _held_people(items: list[dict], layout: str, holdout_every: int) -> set[str]:
    """The validation people of a collection: every ``holdout_every``-th All-Age-Faces person (sorted)."""
    if layout != "aaf":
        return set()
    return set(sorted({r["identity"] for r in items if r.get("identity")})[::holdout_every])


def _photo(record: dict, root: Path, identity_index: dict[str, int] | None, max_side: int = MAX_SIDE) -> Photo:
    """A :class:`Photo` in the pixels of the photo shrunk to ``max_side`` (what :class:`PhotoLoader` gives)."""
    scale = min(1.0, max_side / max(record["width"], record["height"]))
    faces = []
    for face in record["faces"]:
        identity = -1
        if face.get("subject") and identity_index is not None and record.get("identity") in identity_index:
            identity = identity_index[record["identity"]]
        box = face.get("landmark_box") or face["box"]  # PROTOCOLS.md's reference box convention
        faces.append(Face(tuple(v * scale for v in box), np.asarray(face["teacher"], dtype=np.float32), identity,
                          bool(face.get("subject"))))
    return Photo(str(root / record["path"]), max(1, round(record["width"] * scale)),
                 max(1, round(record["height"] * scale)), faces, record.get("collection", ""))


class PhotoLoader:
    """Decodes a :class:`Photo` at its recorded size (shrunk as :func:`_photo` says), keeping up to
    ``cache_items`` decoded photos in memory (about 0.4 MB each)."""

    def __init__(self, cache_items: int = 6000):
        self.cache_items = int(cache_items)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, photo: Photo) -> np.ndarray:
        image = self._cache.get(photo.path)
        if image is None:
            from PIL import Image

            from jointface.imageio import load_image

            image = load_image(photo.path)
            if image.shape[:2] != (photo.height, photo.width):
                image = np.asarray(Image.fromarray(image).resize((photo.width, photo.height),
                                                                 Image.Resampling.BILINEAR))
            if len(self._cache) < self.cache_items:
                self._cache[photo.path] = image
        return image


def lfw_evaluation_descriptors(lfw_records: list[dict], lfw_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every subject-face descriptor of the LFW photos of people outside P1 (the P2/P3 people), ``(N, 128)``,
    and each one's person, ``(N,)``."""
    p1 = lfw_p1_split(lfw_root)
    faces = [(face["teacher"], record["path"].split("/")[0]) for record in lfw_records
             if record["status"] == "ok" and record["path"] not in p1 for face in record["faces"]
             if face.get("subject")]
    descriptors = np.asarray([teacher for teacher, _ in faces], dtype=np.float32).reshape(-1, 128)
    return descriptors, np.asarray([person for _, person in faces], dtype=object)


def leaking(descriptors: np.ndarray, evaluation: np.ndarray, people: np.ndarray | None = None,
            rule: LeakRule = LeakRule(), chunk: int = 4096) -> np.ndarray:
    """``(N,)`` bool: which of ``(N, 128)`` descriptors look like an evaluation person under ``rule``.

    ``people`` names each evaluation descriptor's person; without it every evaluation descriptor is a person
    of its own."""
    if len(descriptors) == 0 or len(evaluation) == 0:
        return np.zeros(len(descriptors), dtype=bool)
    if people is None:
        people = np.arange(len(evaluation))
    order = np.argsort(np.asarray(people, dtype=str), kind="stable")
    evaluation, people = evaluation[order].astype(np.float32), np.asarray(people)[order]
    starts = np.flatnonzero(np.r_[True, people[1:] != people[:-1]])  # each person's first column
    evaluation_sq = (evaluation ** 2).sum(1)
    out = np.zeros(len(descriptors), dtype=bool)
    for start in range(0, len(descriptors), chunk):
        block = descriptors[start:start + chunk].astype(np.float32)
        squared = (block ** 2).sum(1)[:, None] + evaluation_sq[None, :] - 2 * block @ evaluation.T
        per_person = np.sqrt(np.maximum(np.minimum.reduceat(squared, starts, axis=1), 0))
        if per_person.shape[1] > 1:
            nearest, second = np.partition(per_person, 1, axis=1)[:, :2].T
        else:
            nearest, second = per_person[:, 0], np.full(len(block), 1e9, dtype=np.float32)
        out[start:start + chunk] = (nearest < rule.sure_distance) | (
            (nearest < rule.distance) & (nearest < rule.ratio * second))
    return out


def _celeba_classes(roots: dict[str, Path], layouts: dict[str, str]) -> set[str]:
    """CelebA people with at least two distinct photos in the CelebA collections (all of them, labelled or not;
    a photo in two of them, by file name, counts once)."""
    from .collections import CollectionError, read_layout

    photos: dict[str, set[str]] = {}
    for key, root in roots.items():
        if layouts[key] != "celeba":
            continue
        try:
            sources = read_layout(root, "celeba")
        except CollectionError:  # the folder moved since labelling: the labelled photos decide alone
            continue
        for source in sources:
            photos.setdefault(source.identity, set()).add(Path(source.path).name)
    return {name for name, names in photos.items() if len(names) >= 2}


def build_training_set(labels: dict[str, str | os.PathLike], *, leak_rule: LeakRule = LeakRule(),
                       holdout_every: int = HOLDOUT_EVERY, limits: dict[str, int] | None = None,
                       class_names: list[str] | None = None, singleton_layouts: Sequence[str] = ()) -> TrainingSet:
    """The training photos of labelled collections (see the module docstring).

    ``labels``: collection name -> ``faces.jsonl`` path; the collection's layout
    is its manifest's (the name when the manifest says none), so two folders of
    one layout can be used together (``celeba`` and ``celeba_lowres``: a photo
    whose path is already in an earlier collection of the same layout is left
    out, so a person's photo is not counted twice). ``lfw`` is required
    (its non-P1 people are what the leak guard protects), and must be complete
    before any other collection is used. ``limits``: at most this many photos
    (first, in file order) of a collection. ``class_names``: the identity
    classes to use (a resumed run keeps its own); by default every person with
    two usable photos, and with ``singleton_layouts`` (``["aaf"]``) also every
    person of those layouts' collections with one (each a class of its own:
    a face the margin term keeps apart from every other; validation people
    excepted). A photo of such a collection without an identity (UTKFace's)
    is taken as a person of its own, named ``layout:path``.
    """
    if "lfw" not in labels:
        raise ValueError("the LFW labels are required: the leak guard compares every face with LFW's evaluation people")
    limits = limits or {}
    records: dict[str, list[dict]] = {}
    roots: dict[str, Path] = {}
    layouts: dict[str, str] = {}
    seen: dict[str, set[str]] = {}
    duplicates: dict[str, int] = {}
    for key, path in labels.items():
        path = Path(path)
        manifest = _manifest_of(path)
        roots[key], layouts[key] = Path(manifest["root"]), manifest.get("layout") or key
        if key == "lfw" and layouts[key] != "lfw":
            raise ValueError(f"{path}: labels under 'lfw' must be of the lfw layout, not {layouts[key]!r}")
        items = read_face_labels(path)[:limits.get(key)]
        known = seen.setdefault(layouts[key], set())
        records[key] = [r for r in items if r["path"] not in known]
        if layouts[key] in singleton_layouts:  # a collection without identities (UTKFace): each photo its own
            records[key] = [r if r.get("identity") else {**r, "identity": f"{layouts[key]}:{r['path']}"}
                            for r in records[key]]
        duplicates[key] = len(items) - len(records[key])
        known.update(r["path"] for r in items)
    unknown = sorted(set(singleton_layouts) - set(layouts.values()))
    if unknown:
        raise ValueError(f"singleton classes of {unknown}: no labelled collection of that layout is in this run "
                         f"(its layouts: {sorted(set(layouts.values()))})")
    if any(records[key] for key in records if key != "lfw"):
        lfw_manifest = manifest_path(Path(labels["lfw"]))
        complete = lfw_manifest.exists() and json.loads(lfw_manifest.read_text()).get("complete")
        if not complete:
            raise ValueError(f"{labels['lfw']}: the LFW labels are not complete; the leak guard needs every LFW "
                             f"evaluation face before other collections can be used (finish the labelling run)")
    lfw_root = roots["lfw"]
    split = lfw_p1_split(lfw_root)
    evaluation, evaluation_people = lfw_evaluation_descriptors(records["lfw"], lfw_root)
    counts: dict = {"lfw_evaluation_faces": int(len(evaluation))}

    # identities with >= 2 usable photos: LFW P1 (train + extra) and CelebA
    usable: dict[str, list[dict]] = {}
    for key, items in records.items():
        for record in items:
            if record["status"] != "ok" or not record.get("identity"):
                continue
            if key == "lfw" and split.get(record["path"]) not in ("train", "extra"):
                continue
            usable.setdefault(key, []).append(record)
    by_identity: dict[str, int] = {}
    for key in usable:
        if layouts[key] in ("lfw", "celeba", "folder", "fei", "caltech", "gt"):
            for record in usable[key]:
                by_identity[record["identity"]] = by_identity.get(record["identity"], 0) + 1
    if class_names is None:
        class_names = sorted(name for name, count in by_identity.items() if count >= 2)
        # LFW P1 people and CelebA people come from the collections themselves, not from what is labelled
        # so far: a run started while a collection is still being labelled has the classes it will end with
        class_names = sorted(set(class_names) | {path.split("/")[0] for path, part in split.items()
                                                 if part in ("train", "extra")} | _celeba_classes(roots, layouts))
        for key in usable:
            if layouts[key] in singleton_layouts:
                held = _held_people(records[key], layouts[key], holdout_every)
                class_names = sorted(set(class_names) | {r["identity"] for r in usable[key]} - held)
    identity_index = {name: i for i, name in enumerate(class_names)}

    train, holdout = [], []
    for key, items in records.items():
        root, layout = roots[key], layouts[key]
        kept = dropped_leak = unusable = held = 0
        held_people = _held_people(items, layout, holdout_every)
        candidates = [r for r in items if r["status"] == "ok"]
        unusable += len(items) - len(candidates)
        if layout == "lfw":
            before = len(candidates)
            candidates = [r for r in candidates if split.get(r["path"]) in ("train", "extra")]
            counts["lfw_not_trainable"] = before - len(candidates)
        else:
            descriptors = np.asarray([f["teacher"] for r in candidates for f in r["faces"]], dtype=np.float32)
            flags = leaking(descriptors.reshape(-1, 128), evaluation, evaluation_people, leak_rule)
            position, safe = 0, []
            for record in candidates:
                count = len(record["faces"])
                if flags[position:position + count].any():
                    dropped_leak += 1
                else:
                    safe.append(record)
                position += count
            candidates = safe
        train_faces = 0
        for record in candidates:
            photo = _photo(record, root, identity_index)
            if record.get("identity") in held_people:
                holdout.append(photo)
                held += 1
            else:
                train.append(photo)
                kept += 1
                train_faces += len(photo.faces)
        counts[key] = {"photos_labelled": len(items) + duplicates[key], "without_face_or_unreadable": unusable,
                       "dropped_by_leak_guard": dropped_leak, "held_out": held, "train_photos": kept,
                       "train_faces": train_faces,
                       "people": len({r.get("identity") for r in candidates if r.get("identity")})}
        if duplicates[key]:
            counts[key]["already_in_an_earlier_collection"] = duplicates[key]
    counts["classes"] = len(class_names)
    return TrainingSet(train, holdout, class_names, counts)
