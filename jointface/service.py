"""The operations behind the CLI: enroll and search, as a library.

Both take a :class:`index.Gallery` and an :class:`jointface.engines.Engine`
and report per image, so one bad file never stops a batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from index import Gallery
from index.gallery import NewFace, validate_person_name

from .engines import Engine, Face
from .imageio import ImageLoadError, list_images, load_image, load_image_reduced

ENROLLED, SKIPPED, FAILED = "enrolled", "skipped", "failed"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class EnrollOutcome:
    person: str
    path: Path
    status: str
    message: str = ""
    face_id: int | None = None


@dataclass
class EnrollReport:
    outcomes: list[EnrollOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def ok(self) -> bool:
        return self.count(FAILED) == 0


def folder_items(root: Path) -> list[tuple[str, Path]]:
    """``(person, image)`` pairs of a folder-per-person tree (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    items = []
    for person_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        items.extend((person_dir.name, path) for path in list_images([person_dir]))
    return items


Loader = Callable[[Path], np.ndarray]

#: How enrolment picks the face of a photo: ``single`` refuses photos with
#: several faces, ``largest`` takes the biggest, ``best`` the most confident.
CHOICES = ("single", "largest", "best")


def choose_face(faces: Sequence[Face], choice: str = "single") -> tuple[Face | None, str]:
    if choice not in CHOICES:
        raise ValueError(f"unknown face choice {choice!r}; use one of {CHOICES}")
    if not faces:
        return None, "no face found"
    if len(faces) > 1 and choice == "single":
        return None, f"{len(faces)} faces found; use --largest to enrol the biggest one, or crop the photo"
    if choice == "best":
        return max(faces, key=lambda face: face.score), ""
    return max(faces, key=lambda face: face.area), ""


#: ``enroll`` detects faces in groups of this many photos (:func:`detect_grouped`).
DETECT_BATCH = 8


def enroll(gallery: Gallery, engine: Engine, items: Iterable[tuple[str, Path]], *, largest: bool = False,
           choice: str | None = None, batch_size: int = 16, loader: Loader = load_image,
           on_progress: Callable[[EnrollOutcome], None] | None = None,
           detect_batch: int = DETECT_BATCH) -> EnrollReport:
    """Enrol ``(person name, image path)`` pairs; one transaction per batch of images.

    Images are checked in this order: the person's name, the file (missing,
    unreadable, not an image, too large), the duplicate check (the same file
    content already enrolled for this person with this engine: skipped
    without running the detector), then the faces (none, or several without
    ``largest``). ``choice`` (see :data:`CHOICES`) overrides ``largest``;
    ``loader`` turns a path into pixels (benchmarks resize there). Photos
    that pass the checks are detected ``detect_batch`` at a time
    (same-size photos share one network pass; the answers are those of
    one photo at a time). ``on_progress`` hears of each photo as it is
    settled; the report lists them in input order.
    """
    enrolment = _Enrolment(gallery, engine, choice or ("largest" if largest else "single"), batch_size,
                           on_progress)
    for person, path in items:
        photo = enrolment.check(person, Path(path), loader)
        if photo is None or enrolment.skip_known(photo):
            continue
        if len(enrolment.queued) >= max(1, detect_batch):
            enrolment.detect()
    enrolment.detect()
    enrolment.commit()
    return EnrollReport(outcomes=enrolment.outcomes)  # every one of them has been settled (and reported)


@dataclass
class _Photo:
    """A photo that passed the checks, on its way to the detector."""

    outcome: EnrollOutcome
    path: Path
    image: np.ndarray
    sha: str
    #: later inputs of the same file for the same person: settled with this one (same pixels, same answer)
    copies: list[EnrollOutcome] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.outcome.person, self.sha


class _Enrolment:
    """One :func:`enroll` call, in stages: check -> skip known photos -> detect -> commit.

    Each stage settles the outcomes it decides (:meth:`settle` tells ``on_progress``) and hands the rest on
    through the attributes below.
    """

    def __init__(self, gallery: Gallery, engine: Engine, choice: str, batch_size: int,
                 on_progress: Callable[[EnrollOutcome], None] | None):
        self.gallery, self.engine, self.choice, self.batch_size = gallery, engine, choice, batch_size
        self.on_progress = on_progress
        self.outcomes: list[EnrollOutcome] = []  # one per input, in input order
        self.known = gallery.enrolled_hashes(engine.name)  # (person, sha): enrolled, or on its way
        self.queued: dict[tuple[str, str], _Photo] = {}  # waiting for the detector, in input order
        self.to_commit: list[tuple[EnrollOutcome, NewFace]] = []  # faces found, waiting for a transaction

    def settle(self, outcome: EnrollOutcome, status: str, message: str = "") -> None:
        outcome.status, outcome.message = status, message
        if self.on_progress:
            self.on_progress(outcome)

    def check(self, person: str, path: Path, loader: Loader) -> _Photo | None:
        """The name and the file; ``None`` (the outcome settled as failed) when either is wrong."""
        outcome = EnrollOutcome(person=person, path=path, status=FAILED)
        self.outcomes.append(outcome)
        try:
            outcome.person = validate_person_name(person)
            image = loader(path)
            sha = file_sha256(path)
        except (ImageLoadError, OSError, ValueError) as exc:
            self.settle(outcome, FAILED, str(exc))
            return None
        return _Photo(outcome, path, image, sha)

    def skip_known(self, photo: _Photo) -> bool:
        """True when the photo needs no detection: enrolled already (settled as skipped) or queued already
        (it waits with that copy); else it joins the queue."""
        if photo.key in self.queued:
            self.queued[photo.key].copies.append(photo.outcome)
            return True
        if photo.key in self.known:
            self.settle(photo.outcome, SKIPPED, "already enrolled for this person")
            return True
        self.known.add(photo.key)
        self.queued[photo.key] = photo
        return False

    def detect(self) -> None:
        """Detect the queued photos together and choose each one's face; photos without a usable face are
        settled as failed, the faces wait for :meth:`commit` (run whenever a transaction's worth is ready)."""
        photos = list(self.queued.values())
        self.queued.clear()
        found = detect_grouped(self.engine, [photo.image for photo in photos])
        for photo, faces in zip(photos, found):
            face, problem = choose_face(faces, self.choice)
            if face is None:
                self.known.discard(photo.key)  # not enrolled: a later copy is tried again
                for failed in [photo.outcome, *photo.copies]:
                    self.settle(failed, FAILED, problem)
                continue
            for copy in photo.copies:
                self.settle(copy, SKIPPED, "already enrolled for this person")
            self.to_commit.append((photo.outcome, NewFace(
                person=photo.outcome.person, embedding=face.embedding, box=face.box, score=face.score,
                source_path=str(photo.path.resolve()), source_sha256=photo.sha)))
            if len(self.to_commit) >= self.batch_size:
                self.commit()

    def commit(self) -> None:
        """One transaction for the faces waiting; a face the gallery holds already is settled as skipped."""
        if not self.to_commit:
            return
        face_ids = self.gallery.add_faces(self.engine.space,
                                          [new for _, new in self.to_commit])
        for (outcome, _), face_id in zip(self.to_commit, face_ids):
            if face_id is None:
                self.settle(outcome, SKIPPED, "already enrolled for this person")
            else:
                outcome.face_id = face_id
                self.settle(outcome, ENROLLED)
        self.to_commit.clear()


@dataclass
class FaceResult:
    box: tuple[float, float, float, float]
    score: float
    identity: str | None
    similarity: float | None
    candidates: list[tuple[str, float]]

    def to_json(self) -> dict:
        return {
            "box": [round(float(v), 1) for v in self.box],
            "score": round(float(self.score), 4),
            "identity": self.identity,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "candidates": [{"name": name, "similarity": round(sim, 4)} for name, sim in self.candidates],
        }


@dataclass
class ImageResult:
    image: Path
    faces: list[FaceResult]
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height)

    def to_json(self) -> dict:
        return {"image": str(self.image), "faces": [face.to_json() for face in self.faces], "error": self.error}


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # "option", "calibrated", "engine default[: where it comes from]"


def resolve_threshold(gallery: Gallery, engine: Engine, explicit: float | None) -> Threshold:
    if explicit is not None:
        return Threshold(float(explicit), "option")
    calibrated, info = gallery.threshold(engine.name)
    if calibrated is not None and info.get("engine_version") in (None, engine.version):
        return Threshold(calibrated, "calibrated")
    # the default may follow the number of people this engine's faces name (counted only then)
    people = gallery.people_count(engine.name, engine.version) if engine.sized_thresholds else 0
    value, detail = engine.default_threshold_for(people)
    return Threshold(float(value), "engine default" + (f": {detail}" if detail else ""))


def identify(gallery: Gallery, engine: Engine, faces: Sequence[Face], *, top_k: int,
             threshold: float) -> list[FaceResult]:
    if not faces:
        return []
    queries = np.stack([face.embedding for face in faces])
    hits = gallery.search(engine.space, queries, top_k=top_k)
    results = []
    for face, face_hits in zip(faces, hits):
        best = face_hits[0] if face_hits else None
        identity = best.name if best is not None and best.similarity >= threshold else None
        results.append(FaceResult(box=face.box, score=face.score, identity=identity,
                                  similarity=best.similarity if best else None,
                                  candidates=[(hit.name, hit.similarity) for hit in face_hits]))
    return results


def detect_grouped(engine: Engine, images: Sequence[np.ndarray]) -> list[list[Face]]:
    """``engine.detect`` of every image, batched: images of the same size go through one ``detect_batch``.

    Only same-size images share a batch, so every image is prepared exactly as
    ``detect`` alone would prepare it (the joint engine picks its input size
    from the photo's size) and the answers are the same; the batch just runs
    the network once for several photos.
    """
    results: list[list[Face] | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    for positions in groups.values():
        for position, faces in zip(positions, engine.detect_batch([images[i] for i in positions])):
            results[position] = faces
    return results  # type: ignore[return-value]


#: ``search`` decodes at most this many pixels ahead for one batch (a few full-size photos).
BATCH_PIXEL_BUDGET = 60_000_000


def _scaled(face: Face, scale: float) -> Face:
    return Face(box=tuple(v * scale for v in face.box), score=face.score, embedding=face.embedding,
                engine=face.engine, engine_version=face.engine_version)


def search(gallery: Gallery, engine: Engine, paths: Iterable[Path], *, top_k: int = 3,
           threshold: float, loader: Loader = load_image, batch_size: int = 8,
           reduced_decoding: bool = False) -> Iterator[tuple[ImageResult, np.ndarray | None]]:
    """Every face of every image, identified; yields ``(result, image array or None)`` in input order.

    Faces come highest detection score first. Up to ``batch_size`` photos (and
    at most :data:`BATCH_PIXEL_BUDGET` decoded pixels) are read ahead and
    detected together (:func:`detect_grouped`); ``batch_size=1`` detects one
    photo at a time.

    ``reduced_decoding``: photos larger than the engine's
    ``max_useful_side`` are decoded at that size (JPEG draft mode: several
    times faster for camera photos) and the boxes are scaled back to the
    full photo, so results keep full-size coordinates; the yielded image is
    then the reduced one (draw on it only after dividing boxes by
    ``result.size[0] / image.shape[1]``). Ignored for engines that use every
    pixel, or with a custom ``loader``.
    """
    max_side = engine.max_useful_side if reduced_decoding and loader is load_image else None

    def answer(chunk: list[tuple[Path, np.ndarray | None, str | None, float, tuple[int, int] | None]]):
        loaded = [(image, scale) for _, image, _, scale, _ in chunk if image is not None]
        per_image = [[_scaled(face, scale) if scale != 1.0 else face for face in faces]
                     for faces, (_, scale) in zip(detect_grouped(engine, [image for image, _ in loaded]), loaded)]
        # one gallery search for every face of the chunk
        identified = iter(identify(gallery, engine, [face for faces in per_image for face in faces],
                                   top_k=top_k, threshold=threshold))
        found = iter(per_image)
        for path, image, error, scale, size in chunk:
            if image is None:
                yield ImageResult(image=path, faces=[], error=error), None
                continue
            faces = [next(identified) for _ in next(found)]
            yield ImageResult(image=path, faces=faces, size=size), image

    chunk: list[tuple[Path, np.ndarray | None, str | None, float, tuple[int, int] | None]] = []
    pixels = 0
    for path in paths:
        path = Path(path)
        try:
            if max_side:
                image, size = load_image_reduced(path, max_side)
            else:
                image = loader(path)
                size = (image.shape[1], image.shape[0])
        except ImageLoadError as exc:
            chunk.append((path, None, str(exc), 1.0, None))
        else:
            chunk.append((path, image, None, size[0] / image.shape[1], size))
            pixels += image.shape[0] * image.shape[1]
        if len(chunk) >= max(1, batch_size) or pixels >= BATCH_PIXEL_BUDGET:
            yield from answer(chunk)
            chunk, pixels = [], 0
    if chunk:
        yield from answer(chunk)


@dataclass
class Calibration:
    threshold: float
    target_fpir: float
    reached_fpir: float
    faces: int
    images: int
    failed_images: list[str]


def calibrate(gallery: Gallery, engine: Engine, paths: Sequence[Path], *, fpir: float, loader: Loader = load_image,
              on_progress: Callable[[Path], None] | None = None, store: bool = True) -> Calibration:
    """Set the rejection threshold so that strangers are accepted at rate ``fpir``.

    ``paths`` are photos of people who are NOT in the gallery; every face in
    them is a non-mated probe. The threshold is the smallest similarity at
    which the share of those faces whose best gallery match reaches it is at
    most ``fpir`` (see :func:`jointface.calibration.threshold_for_fpir`).
    """
    from datetime import datetime, timezone

    from jointface.calibration import fpir_at_threshold, threshold_for_fpir

    if not 0 < fpir < 1:
        raise ValueError(f"--fpir must be between 0 and 1, got {fpir}")
    if not gallery.people():
        raise ValueError("the gallery is empty: enrol people before calibrating")
    best: list[float] = []
    failed: list[str] = []
    for path in paths:
        try:
            image = loader(Path(path))
        except ImageLoadError as exc:
            failed.append(str(exc))
        else:
            results = identify(gallery, engine, engine.detect(image), top_k=1, threshold=np.inf)
            best.extend(result.similarity for result in results if result.similarity is not None)
        if on_progress:
            on_progress(Path(path))
    if not best:
        raise ValueError("no faces found in the unknown photos: nothing to calibrate on")
    scores = np.array(best, dtype=np.float64)
    threshold = float(threshold_for_fpir(scores, fpir))
    reached = float(fpir_at_threshold(scores, threshold))
    if store:
        gallery.set_threshold(engine.name, threshold, {
            "target_fpir": fpir, "reached_fpir": reached, "faces": len(best), "images": len(paths) - len(failed),
            "engine_version": engine.version, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return Calibration(threshold, fpir, reached, len(best), len(paths) - len(failed), failed)
