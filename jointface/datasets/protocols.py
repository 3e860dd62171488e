"""Deterministic LFW splits for the benchmark protocols P1, P2 and P3.

The rules come from ``shared/PROTOCOLS.md``; nothing here is random. "Sorted"
always means Python's :func:`sorted` on folder names (people) and file names
(images), so any implementation builds the same splits.

An LFW root is a folder ``<root>/<Person_Name>/<Person_Name>_NNNN.jpg``.
Images are returned as :class:`LabelledImage` (absolute path, person, position
of the image among that person's sorted images).

Known counts on the full LFW (13,233 images, 5,749 people):

* P1: 311 people (>= 6 images), first 30 images each = 4,075 images,
  3,372 train / 703 test; 1,350 further images of P1 people (beyond the 30).
* P2: 1,369 enrolled people (2 to 5 images), 1,369 gallery images,
  2,370 mated probes, 4,069 non-mated probes (people with exactly 1 image).
  With ``gallery_size=3``: 299 people (4 or 5 images), 897 gallery images,
  411 mated probes, the same 4,069 non-mated probes.
* P3: 6,000 pairs in 10 folds of 600 (300 same + 300 different).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jointface.config import library_settings

#: P1 people have at least this many images.
P1_MIN_IMAGES = 6
#: P1 uses the first this-many sorted images of each person.
P1_IMAGES_PER_PERSON = 30
#: Within a person, the image at sorted position i is TEST when i % 5 == 4.
P1_TEST_EVERY = 5
#: P2 enrolled people have at most this many images (more would make them P1).
P2_MAX_IMAGES = P1_MIN_IMAGES - 1

_IMAGE_SUFFIX = ".jpg"


# --------------------------------------------------------------------------
# Locating the shared data
# --------------------------------------------------------------------------


def default_shared_data() -> Path:
    """The shared data folder: ``$JOINTFACE_SHARED_DATA``, else ``<repo>/../shared/data``.

    The path is returned whether or not it exists; use :func:`require_shared_data`
    to get a clear error when it is missing.
    """
    return library_settings().shared_data


def require_shared_data(*parts: str) -> Path:
    """``default_shared_data() / parts``, or :class:`FileNotFoundError` saying where it looked."""
    path = default_shared_data().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"benchmark data not found at {path}; set JOINTFACE_SHARED_DATA to the folder "
            "that holds lfw/ and lfw_protocol/ (see shared/data/README.md)"
        )
    return path


# --------------------------------------------------------------------------
# Reading an LFW folder
# --------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class LabelledImage:
    """One LFW image: who it shows and where it sits in that person's sorted list."""

    person: str
    #: 0-based position among the person's sorted images (not the NNNN number).
    position: int
    path: Path

    @property
    def key(self) -> str:
        """``"<Person>/<file name>"``: a stable, root-independent identifier."""
        return f"{self.person}/{self.path.name}"


def list_lfw(lfw_root: str | os.PathLike) -> dict[str, list[str]]:
    """Person name -> sorted image file names, people in sorted order.

    Only ``*.jpg`` files (case-insensitive) inside person folders count; stray
    files at the root are ignored.
    """
    root = Path(lfw_root)
    if not root.is_dir():
        raise FileNotFoundError(f"LFW root folder not found: {root}")
    people: dict[str, list[str]] = {}
    for person in sorted(os.listdir(root)):
        folder = root / person
        if not folder.is_dir():
            continue
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_SUFFIX))
        if names:
            people[person] = names
    if not people:
        raise FileNotFoundError(f"no LFW person folders with .jpg images under {root}")
    return people


def _images(root: Path, person: str, names: list[str], positions: range) -> list[LabelledImage]:
    return [LabelledImage(person=person, position=i, path=root / person / names[i]) for i in positions]


def p1_people(lfw_root: str | os.PathLike, *, listing: dict[str, list[str]] | None = None) -> list[str]:
    """Sorted names of the P1 people (at least :data:`P1_MIN_IMAGES` images): 311 on LFW."""
    listing = list_lfw(lfw_root) if listing is None else listing
    return [p for p, names in listing.items() if len(names) >= P1_MIN_IMAGES]


# --------------------------------------------------------------------------
# P1: closed-set identification
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class P1Split:
    """P1: closed-set joint detection + identification.

    ``people`` is sorted; ``label_of[person]`` is its class index in that order
    (the classifier's class ids). ``train`` and ``test`` are ordered by person,
    then position.
    """

    people: tuple[str, ...]
    train: tuple[LabelledImage, ...]
    test: tuple[LabelledImage, ...]

    @property
    def label_of(self) -> dict[str, int]:
        return {person: index for index, person in enumerate(self.people)}


def p1_split(lfw_root: str | os.PathLike) -> P1Split:
    """P1 split: first 30 sorted images of every person with >= 6; test when i % 5 == 4."""
    root = Path(lfw_root)
    listing = list_lfw(root)
    people = p1_people(root, listing=listing)
    train: list[LabelledImage] = []
    test: list[LabelledImage] = []
    for person in people:
        names = listing[person]
        for image in _images(root, person, names, range(min(len(names), P1_IMAGES_PER_PERSON))):
            (test if image.position % P1_TEST_EVERY == P1_TEST_EVERY - 1 else train).append(image)
    return P1Split(people=tuple(people), train=tuple(train), test=tuple(test))


def p1_extra_train(lfw_root: str | os.PathLike) -> tuple[LabelledImage, ...]:
    """Images of P1 people beyond their first 30 (1,350 on LFW): extra training data.

    They are never P1 test images, and no P2 person appears in them.
    """
    root = Path(lfw_root)
    listing = list_lfw(root)
    extra: list[LabelledImage] = []
    for person in p1_people(root, listing=listing):
        names = listing[person]
        extra.extend(_images(root, person, names, range(P1_IMAGES_PER_PERSON, len(names))))
    return tuple(extra)


# --------------------------------------------------------------------------
# P2: open-set identification of people never trained on
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class P2Split:
    """P2: open-set identification.

    * ``people``: the enrolled (known) people, sorted;
    * ``gallery``: their first ``gallery_size`` sorted images (enrolled);
    * ``mated``: their remaining images (probes whose person is enrolled);
    * ``nonmated``: the only image of every person with exactly one image
      (probes whose person is not enrolled).
    """

    gallery_size: int
    people: tuple[str, ...]
    gallery: tuple[LabelledImage, ...]
    mated: tuple[LabelledImage, ...]
    nonmated: tuple[LabelledImage, ...]


def p2_split(lfw_root: str | os.PathLike, *, gallery_size: int = 1) -> P2Split:
    """P2 split.

    ``gallery_size=1`` (the protocol): people with 2 to 5 images (1,369 on LFW),
    gallery = their first image, mated probes = the other 2,370.
    ``gallery_size=g`` (the optional extension uses 3): only people with
    ``g + 1`` to 5 images are enrolled, with their first ``g`` images, so each
    still has at least one mated probe and nobody from P1 takes part (with 3:
    299 people, 897 gallery images, 411 mated probes). The non-mated probes are
    the same for every gallery size.
    """
    if not 1 <= gallery_size < P2_MAX_IMAGES:
        raise ValueError(f"gallery_size must be between 1 and {P2_MAX_IMAGES - 1}, got {gallery_size}")
    root = Path(lfw_root)
    listing = list_lfw(root)
    people = [p for p, names in listing.items() if gallery_size + 1 <= len(names) <= P2_MAX_IMAGES]
    gallery: list[LabelledImage] = []
    mated: list[LabelledImage] = []
    for person in people:
        names = listing[person]
        gallery.extend(_images(root, person, names, range(gallery_size)))
        mated.extend(_images(root, person, names, range(gallery_size, len(names))))
    nonmated = [
        LabelledImage(person=p, position=0, path=root / p / names[0])
        for p, names in listing.items()
        if len(names) == 1
    ]
    return P2Split(
        gallery_size=gallery_size,
        people=tuple(people),
        gallery=tuple(gallery),
        mated=tuple(mated),
        nonmated=tuple(nonmated),
    )


# --------------------------------------------------------------------------
# P3: verification pairs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One verification pair of LFW View 2 (``same`` = both images show one person).

    ``left_number`` / ``right_number`` are the NNNN image numbers of pairs.txt
    (1-based), not sorted positions. ``has_p1_person`` is true when either
    person is a P1 person (a network trained on P1 has seen them).
    """

    fold: int
    same: bool
    left_person: str
    left_number: int
    right_person: str
    right_number: int
    left_path: Path
    right_path: Path
    has_p1_person: bool


def lfw_image_path(lfw_root: str | os.PathLike, person: str, number: int) -> Path:
    """``<root>/<person>/<person>_NNNN.jpg`` (the LFW naming, 1-based number)."""
    return Path(lfw_root) / person / f"{person}_{number:04d}.jpg"


def p3_pairs(
    pairs_txt: str | os.PathLike,
    lfw_root: str | os.PathLike,
    *,
    check_files: bool = True,
) -> list[list[Pair]]:
    """Read an LFW pairs file into folds of :class:`Pair` (View 2: 10 folds x 600).

    Format: a header ``"<folds> <pairs per class>"`` (tab or space separated),
    then per fold ``n`` same lines ``name n1 n2`` followed by ``n`` different
    lines ``name1 n1 name2 n2``. A file without the header (View 1's
    ``pairsDevTrain.txt`` / ``pairsDevTest.txt``) is read as one fold, each
    line's kind given by its number of fields.

    ``has_p1_person`` is computed from the P1 people of ``lfw_root``. With
    ``check_files`` every image path must exist (:class:`FileNotFoundError`).
    """
    pairs_path = Path(pairs_txt)
    lines = [line.split() for line in pairs_path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{pairs_path}: empty pairs file")
    p1 = frozenset(p1_people(lfw_root))

    header = lines[0]
    has_header = len(header) == 2 and all(field.isdigit() for field in header)
    if has_header:
        n_folds, per_class = int(header[0]), int(header[1])
        body = lines[1:]
        if len(body) != n_folds * 2 * per_class:
            raise ValueError(
                f"{pairs_path}: header says {n_folds} folds x {2 * per_class} pairs, "
                f"found {len(body)} pair lines"
            )
    else:
        n_folds, per_class, body = 1, None, lines

    folds: list[list[Pair]] = [[] for _ in range(n_folds)]
    for line_index, fields in enumerate(body):
        line_number = line_index + 1 + int(has_header)
        if per_class is None:
            fold, expect_same = 0, None
        else:
            fold, within = divmod(line_index, 2 * per_class)
            expect_same = within < per_class
        try:
            if len(fields) == 3:
                left_person, right_person = fields[0], fields[0]
                left_number, right_number = int(fields[1]), int(fields[2])
                same = True
            elif len(fields) == 4:
                left_person, right_person = fields[0], fields[2]
                left_number, right_number = int(fields[1]), int(fields[3])
                same = False
            else:
                raise ValueError(f"expected 3 or 4 fields, got {len(fields)}")
        except ValueError as exc:
            raise ValueError(f"{pairs_path}:{line_number}: bad pair line {' '.join(fields)!r}: {exc}") from None
        if expect_same is not None and same != expect_same:
            kind = "same-person" if expect_same else "different-person"
            raise ValueError(f"{pairs_path}:{line_number}: expected a {kind} pair line, got {' '.join(fields)!r}")
        pair = Pair(
            fold=fold,
            same=same,
            left_person=left_person,
            left_number=left_number,
            right_person=right_person,
            right_number=right_number,
            left_path=lfw_image_path(lfw_root, left_person, left_number),
            right_path=lfw_image_path(lfw_root, right_person, right_number),
            has_p1_person=left_person in p1 or right_person in p1,
        )
        if check_files:
            for path in (pair.left_path, pair.right_path):
                if not path.is_file():
                    raise FileNotFoundError(f"{pairs_path}:{line_number}: image not found: {path}")
        folds[fold].append(pair)
    return folds


def pairs_without_p1(folds: list[list[Pair]]) -> list[list[Pair]]:
    """The same folds keeping only pairs in which neither person is a P1 person."""
    return [[pair for pair in fold if not pair.has_p1_person] for fold in folds]
