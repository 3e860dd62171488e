"""Readers for face photo collections: one home for every layout the project reads.

A reader turns a collection folder into a stable, sorted list of
:class:`SourceImage` (absolute path, identity or None, optional given box).

Layouts:

* ``lfw``: ``root/Person_Name/Person_Name_NNNN.jpg`` (only P1 people unless asked);
* ``folder``: ``root/<person>/<image>``, the folder name is the identity;
* ``fei``, ``caltech``, ``gt``: the study's three collections (users download them);
* ``aaf``: All-Age-Faces (``original images/NNNNNAxx.jpg``, 13,322 photos of
  13,322 different people; ``xx`` is the age). Every photo is its own person:
  identity ``aaf_NNNNN``;
* ``utkface``: UTKFace aligned crops (``age_gender_race_date.jpg.chip.jpg``),
  no identity labels (distillation and detection only);
* ``celeba``: a CelebA subset: ``Celeb/<file>.jpg`` with ``identity_CelebA.txt``
  (``file identity`` per line, an optional ``image identity`` header) in the
  collection root or its parent; identity ``celeba_<number>``.

Which face of a photo carries the identity (the *subject*) is
:data:`SUBJECT_RULE`: the face nearest the centre for centred crops (LFW, AAF),
the largest face for in-the-wild photos (CelebA).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jointface.imageio import IMAGE_SUFFIXES

LAYOUTS = ("lfw", "folder", "fei", "caltech", "gt", "aaf", "utkface", "celeba")
#: How the identity-bearing face of a photo is chosen, per layout (default ``centre``).
SUBJECT_RULE = {"celeba": "largest", "utkface": "largest"}
from .protocols import P1_IMAGES_PER_PERSON, P1_MIN_IMAGES  # noqa: E402,F401


class CollectionError(FileNotFoundError):
    """A collection folder is missing, empty or not in the layout asked for."""


@dataclass(frozen=True)
class SourceImage:
    """One image of a collection: ``path`` (absolute), ``identity`` (None = unknown), optional box."""

    path: Path
    identity: str | None
    given_box: tuple[float, float, float, float] | None = None


def images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder_per_person(root: Path) -> list[SourceImage]:
    """``root/<person>/<image>``: the folder name is the identity."""
    return [SourceImage(path, person.name)
            for person in sorted(p for p in root.iterdir() if p.is_dir())
            for path in images_in(person)]


def lfw_p1_split(lfw_root: str | os.PathLike) -> dict[str, str]:
    """PROTOCOLS.md P1 over an LFW tree: relative path -> ``train`` / ``test`` / ``extra``.

    ``extra``: images of P1 people beyond their first 30 (allowed for training).
    Images of anyone else are absent from the mapping. The split itself is
    :func:`jointface.datasets.protocols.p1_split` (one definition of P1).
    """
    from .protocols import p1_extra_train, p1_split

    root = Path(lfw_root)
    split = p1_split(root)
    mapping = {image.path.relative_to(root).as_posix(): "train" for image in split.train}
    mapping.update({image.path.relative_to(root).as_posix(): "test" for image in split.test})
    mapping.update({image.path.relative_to(root).as_posix(): "extra" for image in p1_extra_train(root)})
    return mapping


def read_lfw(root: Path, p1_people_only: bool = True) -> list[SourceImage]:
    """LFW ``root/Person_Name/Person_Name_NNNN.jpg``; by default only the P1 people (>= 6 images),
    the only LFW people training may use."""
    images = read_folder_per_person(root)
    if not p1_people_only:
        return images
    allowed = lfw_p1_split(root)
    return [image for image in images if image.path.relative_to(root).as_posix() in allowed]


def read_lfw_all(root: Path) -> list[SourceImage]:
    """Every LFW image (for teacher labels and the leak guard; training still uses P1 people only)."""
    return read_lfw(root, p1_people_only=False)


FEI_NAME = re.compile(r"^(\d+)-(\d+)\.jpe?g$", re.IGNORECASE)


def read_fei(root: Path) -> list[SourceImage]:
    """FEI Face Database: ``<person>-<pose>.jpg`` anywhere under root (``originalimages_partN/``)."""
    found = []
    for path in sorted(root.rglob("*")):
        match = FEI_NAME.match(path.name)
        if match and path.is_file():
            found.append(SourceImage(path, f"fei_{int(match.group(1)):03d}"))
    return found


GT_PERSON = re.compile(r"^s(\d+)$")


def read_georgia_tech(root: Path) -> list[SourceImage]:
    """Georgia Tech face database: ``[gt_db/]sNN/NN.jpg``."""
    base = root / "gt_db" if (root / "gt_db").is_dir() else root
    return [SourceImage(path, f"gt_{person.name}")
            for person in sorted(p for p in base.iterdir() if p.is_dir() and GT_PERSON.match(p.name))
            for path in images_in(person)]


def _caltech_boxes(mat_path: Path, names: list[str]) -> dict[str, tuple[float, float, float, float]]:
    """Face boxes from Caltech's ``ImageData.mat`` (``SubDir_Data``: 8 x N corner coordinates)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        print(f"note: scipy is not installed; ignoring the boxes in {mat_path} (dlib's boxes are used)")
        return {}
    corners = np.asarray(loadmat(str(mat_path))["SubDir_Data"], dtype=np.float64)  # (8, N): x1 y1 x2 y2 ... x4 y4
    boxes = {}
    for index, name in enumerate(names[: corners.shape[1]]):
        xs, ys = corners[0::2, index], corners[1::2, index]
        boxes[name] = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    return boxes


UNLABELLED_NAMES = frozenset({"", "unlabeled", "unlabelled", "unknown"})


def read_caltech(root: Path) -> list[SourceImage]:
    """Caltech Faces 1999: ``image_NNNN.jpg`` + ``identities.csv`` (file,identity) [+ ``ImageData.mat``].

    The original set has no identity list; a ``file,identity`` CSV is required.
    Images missing from it, or listed as ``UNLABELED``, are returned with
    ``identity=None`` (status ``unlabelled``, never trained on).
    """
    names = sorted(p.name for p in images_in(root))
    csv_path = root / "identities.csv"
    if not csv_path.exists():
        raise CollectionError(f"{csv_path}: the Caltech layout needs a file,identity CSV naming each photo's person")
    with csv_path.open(newline="") as handle:
        identities = {row["file"]: row["identity"] for row in csv.DictReader(handle)
                      if row["identity"].strip().lower() not in UNLABELLED_NAMES}
    mat_path = root / "ImageData.mat"
    boxes = _caltech_boxes(mat_path, names) if mat_path.exists() else {}
    return [SourceImage(root / name, identities.get(name), boxes.get(name)) for name in names]


AAF_NAME = re.compile(r"^(\d{5})A(\d{1,3})\.(jpe?g|png)$", re.IGNORECASE)


def read_all_age_faces(root: Path) -> list[SourceImage]:
    """All-Age-Faces: ``[All-Age-Faces Dataset/]original images/NNNNNAxx.jpg``, one person per photo."""
    for base in (root / "original images", root / "All-Age-Faces Dataset" / "original images"):
        if base.is_dir():
            break
    else:
        raise CollectionError(f"{root}: no 'original images' folder (the All-Age-Faces layout)")
    found = [SourceImage(path, f"aaf_{AAF_NAME.match(path.name).group(1)}")
             for path in images_in(base) if AAF_NAME.match(path.name)]
    if not found:
        raise CollectionError(f"{base}: no NNNNNAxx.jpg photos (the All-Age-Faces naming)")
    return found


UTK_NAME = re.compile(r"^(\d+)_(\d)_(\d)_(\d+)\.jpg\.chip\.jpg$", re.IGNORECASE)


def read_utkface(root: Path) -> list[SourceImage]:
    """UTKFace aligned crops ``age_gender_race_date.jpg.chip.jpg`` (no identities).

    ``root`` may be the folder of crops or a parent holding ``unlabeled/``.
    """
    base = root / "unlabeled" if (root / "unlabeled").is_dir() else root
    found = [SourceImage(path, None) for path in images_in(base) if UTK_NAME.match(path.name)]
    if not found:
        raise CollectionError(f"{base}: no age_gender_race_date.jpg.chip.jpg files (the UTKFace naming)")
    return found


def _celeba_identity_file(root: Path) -> Path:
    for candidate in (root / "identity_CelebA.txt", root.parent / "identity_CelebA.txt"):
        if candidate.is_file():
            return candidate
    raise CollectionError(f"{root}: identity_CelebA.txt not found in the folder or its parent (the CelebA layout)")


def read_celeba(root: Path) -> list[SourceImage]:
    """A CelebA subset: photos in ``root`` or ``root/Celeb``, identities from ``identity_CelebA.txt``.

    Photos not named in the identity file are refused (a different collection).
    """
    base = root / "Celeb" if (root / "Celeb").is_dir() else root
    identities: dict[str, str] = {}
    with _celeba_identity_file(root).open() as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                identities[parts[0]] = f"celeba_{int(parts[1])}"
    photos = images_in(base)
    unknown = [p.name for p in photos if p.name not in identities]
    if unknown:
        raise CollectionError(f"{base}: {len(unknown)} photos are not in identity_CelebA.txt "
                              f"(first: {unknown[0]})")
    if not photos:
        raise CollectionError(f"{base}: no photos")
    return [SourceImage(path, identities[path.name]) for path in photos]


READERS = {"lfw": read_lfw_all, "folder": read_folder_per_person, "fei": read_fei, "caltech": read_caltech,
           "gt": read_georgia_tech, "aaf": read_all_age_faces, "utkface": read_utkface, "celeba": read_celeba}


def read_layout(root: str | os.PathLike, layout: str, *, lfw_p1_only: bool = False) -> list[SourceImage]:
    """The images of a collection in one of :data:`LAYOUTS`, in a stable order.

    ``lfw_p1_only``: for ``lfw``, only the P1 people (the old labelling rule).
    """
    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"{root}: no such folder")
    if layout not in READERS:
        raise ValueError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if layout == "lfw" and lfw_p1_only:
        return read_lfw(root)
    return READERS[layout](root)
