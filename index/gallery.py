"""The gallery: identity store + one vector index per engine, kept in step.

Consistency rules (what survives a crash at any moment):

1. The database is the source of truth. Every change to an engine's faces
   bumps that engine's generation number *in the same transaction*.
2. Index files record the generation they mirror and are replaced atomically.
   Writes (database commit, then index save) happen under an inter-process
   file lock (``gallery.lock`` in the home folder).
3. On open, and whenever the database generation moves, an index whose
   generation, engine version, dimension or contents disagree with the
   database (or that is missing or damaged) is rebuilt from the database,
   with a notice. So a crash between commit and index save costs a rebuild,
   never a face, and a face is either fully enrolled or absent.

Index kinds (see :mod:`index.vectors`): ``index_kind="auto"`` (the default)
lets each rebuild from the database choose exact search (``flat``) for
fewer than ``approximate_from`` faces and ``ivf`` above; adding faces keeps
the kind of the index on disk, and the next rebuild (``rebuild_index``, or
a repair) decides again. An explicit kind is always used, and an index file
of another kind is rebuilt.

Vector backends (:mod:`index.backends`): the rules above are the FAISS
backend's (the default). With ``pgvector`` the vectors are written in the
database transaction itself, so rules 2-3 have nothing to repair; with
``milvus`` they hold with the generation stored in Milvus. The gallery
calls its backend at the same points (before and inside the transaction,
after the commit) whichever it is.

Opening is cheap for a big gallery: the first use of an index compares the
database's generation and a fingerprint of its face ids (count, min, max and
sum, one SQL aggregate) with the index file, whose checksum is verified as
it is read; :meth:`Gallery.check_index` compares the full id lists.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from filelock import FileLock, Timeout
from sqlalchemy import Integer, any_, bindparam, delete, func, select
from sqlalchemy.dialects.postgresql import ARRAY

from .backends import BackendSpec, VectorBackend, make_backend, parse_backend
from .backends.base import IndexReport
from .errors import GalleryError, IndexCorruptError, PersonExistsError, PersonNotFoundError, StoreError
from .library import PhotoLibrary
from .space import EmbeddingSpace
from .models import FaceRow, GallerySetting, GalleryState, Person
from .store import IdentityStore, sqlite_path
from .vectors import AUTO_APPROXIMATE_FROM, INDEX_KINDS, VectorIndex, resolve_kind

LOCK_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SearchHit:
    """A candidate identity for a query face: the person's best-matching enrolled face."""

    name: str
    similarity: float
    face_id: int


@dataclass(frozen=True)
class NewFace:
    """A face to enrol: who, the engine's output, and where it came from."""

    person: str
    embedding: np.ndarray
    box: tuple[float, float, float, float]
    score: float
    source_path: str
    source_sha256: str


def default_db_url(home: Path) -> str:
    return f"sqlite:///{Path(home) / 'jointface.db'}"


def _best_people(row_sims, row_ids, names: dict[int, str], top_k: int) -> list[SearchHit]:
    """One query's best ``top_k`` people, best first, from its candidates in order (one hit per person; a
    candidate without a name, an empty slot or a face deleted since the index was read, is passed over)."""
    best: dict[str, SearchHit] = {}
    for sim, face_id in zip(row_sims, row_ids):
        name = names.get(int(face_id))
        if name is None or name in best:
            continue
        best[name] = SearchHit(name, float(sim), int(face_id))
        if len(best) == top_k:
            break
    return list(best.values())


class Gallery:
    """Open with :meth:`Gallery.open`; close (or use as a context manager) when done."""

    def __init__(self, home: Path, store: IdentityStore, *, notify: Callable[[str], None] | None = None,
                 index_kind: str = "auto", approximate_from: int = AUTO_APPROXIMATE_FROM):
        if index_kind not in INDEX_KINDS:
            raise GalleryError(f"unknown index kind {index_kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        self.home = Path(home)
        self.store = store
        self.index_kind = index_kind
        self.approximate_from = int(approximate_from)
        self._notify = notify or (lambda message: None)
        self._lock = FileLock(str(self.home / "gallery.lock"), timeout=LOCK_TIMEOUT_S)
        self._indexes: dict[str, VectorIndex] = {}
        self._people_counts: dict[tuple[str, str, int], int] = {}  # see people_count
        self.backend: VectorBackend = make_backend(self, BackendSpec("faiss"))

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, home: str | os.PathLike, db_url: str | None = None, *, notify=None, index_kind: str = "auto",
             approximate_from: int = AUTO_APPROXIMATE_FROM, upgrade: bool = True,
             vectors: str | None = None) -> "Gallery":
        """Open (creating if needed) the gallery in ``home``.

        ``index_kind``: ``auto`` (exact below ``approximate_from`` faces,
        approximate above, decided at each rebuild), or ``flat``, ``ivf``,
        ``hnsw`` (see :mod:`index.vectors`).

        ``vectors``: the vector backend (:mod:`index.backends`): ``faiss``,
        ``pgvector``, ``milvus`` or ``milvus:URI``; ``None`` keeps the one
        recorded in the database (FAISS when none is).
        """
        requested = parse_backend(vectors) if vectors else None
        home = Path(home).expanduser()
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GalleryError(f"cannot create the JointFace home folder {home}: {exc.strerror}") from exc
        if not os.access(home, os.W_OK):
            raise GalleryError(f"the JointFace home folder {home} is not writable (check its permissions)")
        url = db_url or default_db_url(home)
        lock = FileLock(str(home / "gallery.lock"), timeout=LOCK_TIMEOUT_S)
        try:
            with lock:  # one process migrates at a time
                store = IdentityStore.open(url, upgrade=upgrade)
        except Timeout as exc:
            raise GalleryError(f"timed out waiting for the gallery lock in {home}") from exc
        try:
            gallery = cls(home, store, notify=notify, index_kind=index_kind, approximate_from=approximate_from)
        except GalleryError:
            store.close()
            raise
        try:
            gallery._choose_backend(requested)
        except BaseException:
            gallery.close()
            raise
        gallery._remove_stale_temporaries()
        return gallery

    def _choose_backend(self, requested: BackendSpec | None) -> None:
        """Use the requested backend (recording it) or the recorded one (FAISS when none is)."""
        recorded = BackendSpec.from_setting(self.setting("vector_backend"))
        spec = requested or recorded
        if spec.name != "faiss":
            self.backend = make_backend(self, spec)
        if requested is not None and requested != recorded:
            with self.locked():
                self.set_setting("vector_backend", requested.as_setting())
            if self.engines_in_store():
                self._notify(f"vectors of this gallery move from {recorded} to {requested}: rebuilt from the "
                             "database on first use")

    def setting(self, key: str):
        """A gallery-wide setting (``gallery_settings``), ``None`` when unset or the schema predates it."""
        try:
            with self.store.session() as session:
                row = session.get(GallerySetting, key)
                return None if row is None else row.value
        except Exception:  # an old schema opened without upgrade: no settings table
            return None

    def set_setting(self, key: str, value) -> None:
        with self.store.session() as session:
            row = session.get(GallerySetting, key)
            if row is None:
                session.add(GallerySetting(key=key, value=value))
            else:
                row.value = value

    def close(self) -> None:
        self._indexes.clear()
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
        self.store.close()

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            with self._lock:
                yield
        except Timeout as exc:
            raise GalleryError(f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for the gallery lock "
                               f"({self._lock.lock_file}); is another jointface process stuck?") from exc

    def _remove_stale_temporaries(self) -> None:
        with contextlib.suppress(OSError, Timeout, GalleryError):
            with self._lock.acquire(timeout=0):
                for leftover in self.home.glob("index-*.jfidx.*.tmp"):
                    leftover.unlink()

    # -- vector indexes ---------------------------------------------------------------------

    def index_path(self, engine_name: str) -> Path:
        return self.home / f"index-{engine_name}.jfidx"

    def _db_state(self, engine_name: str, engine_version: str) -> tuple[int, np.ndarray]:
        with self.store.session() as session:
            generation = self.store.generation(session, engine_name)
            ids = np.fromiter(
                session.scalars(select(FaceRow.id).where(FaceRow.engine == engine_name,
                                                         FaceRow.engine_version == engine_version)),
                dtype=np.int64,
            )
        return generation, np.sort(ids)

    def _db_summary(self, engine_name: str, engine_version: str | None) -> tuple[int, tuple[int, int, int, int]]:
        """Generation and ``(count, min, max, sum)`` of the face ids of an engine (and version): one aggregate.

        Without ``engine_version`` the query reads only the ``engine`` index
        (0.26 s at 1M faces, against 0.64 s when the version is compared too).
        """
        condition = FaceRow.engine == engine_name
        if engine_version is not None:
            condition = condition & (FaceRow.engine_version == engine_version)
        with self.store.session() as session:
            generation = self.store.generation(session, engine_name)
            count, low, high, total = session.execute(
                select(func.count(FaceRow.id), func.min(FaceRow.id), func.max(FaceRow.id), func.sum(FaceRow.id))
                .where(condition)
            ).one()
        if not count:
            return generation, (0, 0, 0, 0)
        return generation, (int(count), int(low), int(high), int(total))

    def _read_vectors(self, space: EmbeddingSpace) -> tuple[int, np.ndarray, np.ndarray]:
        """Generation, ids and vectors of an engine's faces, streamed in chunks (no per-row objects kept)."""
        id_parts: list[np.ndarray] = []
        vector_parts: list[np.ndarray] = []
        with self.store.session() as session:
            generation = self.store.generation(session, space.name)
            result = session.execute(
                select(FaceRow.id, FaceRow.embedding).where(FaceRow.engine == space.name,
                                                            FaceRow.engine_version == space.version)
                .order_by(FaceRow.id).execution_options(yield_per=20_000)
            )
            for chunk in result.partitions():
                blob = b"".join(row[1] for row in chunk)
                if len(blob) != len(chunk) * space.dim * 4:
                    raise ValueError(f"the database holds embeddings of engine {space.name} {space.version} "
                                     f"whose dimension is not {space.dim}")
                id_parts.append(np.fromiter((row[0] for row in chunk), dtype=np.int64, count=len(chunk)))
                vector_parts.append(np.frombuffer(blob, dtype=np.float32).reshape(len(chunk), space.dim))
        if not id_parts:
            return generation, np.zeros(0, np.int64), np.zeros((0, space.dim), np.float32)
        return generation, np.concatenate(id_parts), np.concatenate(vector_parts)

    def _rebuild(self, space: EmbeddingSpace, reason: str | None) -> VectorIndex:
        """Build the index from the database and save it (caller holds the lock); ``auto`` chooses its kind."""
        generation, ids, vectors = self._read_vectors(space)
        kind = resolve_kind(self.index_kind, len(ids), approximate_from=self.approximate_from)
        index = VectorIndex(space, kind=kind, generation=generation)
        index.add(ids, vectors)
        del vectors
        self._save_index(index, generation)
        if reason:
            self._notify(f"index for engine {space.name} {reason}: rebuilt from the database "
                         f"({len(ids)} faces, {kind} index)")
        return index

    def _save_index(self, index: VectorIndex, generation: int) -> None:
        try:
            index.save(self.index_path(index.header.engine), generation)
        except OSError as exc:
            raise GalleryError(
                f"could not write the index {self.index_path(index.header.engine)} ({exc.strerror}); the database "
                "is intact and the index will be rebuilt on next use (free some disk space first)"
            ) from exc

    def _verify_or_rebuild(self, space: EmbeddingSpace, *, deep: bool) -> VectorIndex:
        """Load the index file, compare with the database, rebuild if they disagree (lock held).

        ``deep`` (first use in this process) also compares the ids' fingerprint
        (count, min, max, sum); :meth:`check_index` compares the full lists.
        """
        path = self.index_path(space.name)
        # Usually every face of an engine has the current version: the cheaper query then says it all.
        generation, db_ids = self._db_summary(space.name, None) if deep else (None, None)
        if generation is None:
            with self.store.session() as session:
                generation = self.store.generation(session, space.name)
        if not path.exists():
            return self._rebuild(space, "was missing" if generation else None)
        try:
            index = VectorIndex.load(path)
        except IndexCorruptError as exc:
            return self._rebuild(space, f"was unreadable ({exc})")
        if index.header.engine_version != space.version or index.dim != space.dim:
            return self._rebuild(space,
                                 f"belonged to engine version {index.header.engine_version}")
        if index.generation != generation:
            return self._rebuild(space,
                                 f"was out of date (generation {index.generation}, database {generation})")
        if self.index_kind != "auto" and index.kind != self.index_kind:
            return self._rebuild(space,
                                 f"was of kind {index.kind}, this gallery uses {self.index_kind}")
        if deep:
            index_ids = index.id_summary()
            if index_ids != db_ids:
                generation, db_ids = self._db_summary(space.name, space.version)
            if index_ids != db_ids or index.generation != generation:
                return self._rebuild(space, "disagreed with the database")
        return index

    def vectors(self, space: EmbeddingSpace) -> VectorIndex:
        """The up-to-date index of an engine (loaded once, reloaded when the database moves on)."""
        cached = self._indexes.get(space.name)
        with self.store.session() as session:
            generation = self.store.generation(session, space.name)
        if cached is not None and cached.generation == generation and cached.header.engine_version == space.version:
            return cached
        # Fast path without the lock: a newer index file written by another process.
        path = self.index_path(space.name)
        if cached is not None and path.exists():
            with contextlib.suppress(IndexCorruptError):
                fresh = VectorIndex.load(path)
                if fresh.generation == generation and fresh.header.engine_version == space.version:
                    self._indexes[space.name] = fresh
                    return fresh
        with self.locked():
            index = self._verify_or_rebuild(space, deep=cached is None)
        self._indexes[space.name] = index
        return index

    def check_index(self, engine_name: str, engine_version: str) -> IndexReport:
        return self.backend.check(engine_name, engine_version)

    def _check_faiss_index(self, engine_name: str, engine_version: str) -> IndexReport:
        generation, db_ids = self._db_state(engine_name, engine_version)
        problems: list[str] = []
        index_faces = index_generation = None
        path = self.index_path(engine_name)
        if not path.exists():
            if len(db_ids):
                problems.append(f"index file {path} is missing")
        else:
            try:
                index = VectorIndex.load(path)
            except IndexCorruptError as exc:
                problems.append(str(exc))
            else:
                index_faces, index_generation = len(index), index.generation
                if index.header.engine_version != engine_version:
                    problems.append(f"index holds engine version {index.header.engine_version}, "
                                    f"current is {engine_version}")
                elif index_generation != generation:
                    problems.append(f"index generation {index_generation} != database generation {generation}")
                ids = index.ids()
                if index.header.engine_version == engine_version and not np.array_equal(ids, db_ids):
                    missing = np.setdiff1d(db_ids, ids).size
                    extra = np.setdiff1d(ids, db_ids).size
                    problems.append(f"index and database differ: {missing} faces missing, {extra} extra")
        return IndexReport(engine_name, engine_version, int(len(db_ids)), index_faces, generation, index_generation,
                           tuple(problems))

    def rebuild_index(self, space: EmbeddingSpace) -> int:
        return self.backend.rebuild(space)

    def engines_in_store(self) -> list[str]:
        with self.store.session() as session:
            return sorted(session.scalars(select(FaceRow.engine).distinct()))

    def engine_versions(self, engine_name: str) -> set[str]:
        """The engine versions of this engine's enrolled faces."""
        with self.store.session() as session:
            return set(session.scalars(select(FaceRow.engine_version).where(FaceRow.engine == engine_name)
                                       .distinct()))

    def face_ids(self) -> set[int]:
        """The ids of every enrolled face (all engines)."""
        with self.store.session() as session:
            return set(session.scalars(select(FaceRow.id)))

    def people_count(self, engine_name: str, engine_version: str) -> int:
        """How many people have faces of this engine and version (kept per generation of the engine's faces:
        a search asks once per command, a service once per request)."""
        with self.store.session() as session:
            generation = self.store.generation(session, engine_name)
            key = (engine_name, engine_version, generation)
            cached = self._people_counts.get(key)
            if cached is None:
                cached = int(session.execute(
                    select(func.count(func.distinct(FaceRow.person_id)))
                    .where(FaceRow.engine == engine_name, FaceRow.engine_version == engine_version)).scalar_one())
                self._people_counts = {key: cached}
        return cached

    def embeddings_by_person(self) -> list[tuple[str, bytes]]:
        """``(person name, embedding bytes)`` of every enrolled face (all engines)."""
        with self.store.session() as session:
            return session.execute(select(Person.name, FaceRow.embedding).join(FaceRow)).all()

    @property
    def library(self) -> PhotoLibrary:
        """The photo library of ``jointface cluster`` (:mod:`index.library`)."""
        return PhotoLibrary(self.store, self.locked)

    def enrolled_hashes(self, engine_name: str) -> set[tuple[str, str]]:
        """``(person name, photo file SHA-256)`` of every face enrolled with this engine."""
        with self.store.session() as session:
            return set(session.execute(select(Person.name, FaceRow.source_sha256).join(FaceRow)
                                       .where(FaceRow.engine == engine_name)).all())

    # -- writing ----------------------------------------------------------------------------

    def add_faces(self, space: EmbeddingSpace, faces: Sequence[NewFace]) -> list[int | None]:
        """Enrol faces in one transaction; returns each face's row id, ``None`` for a duplicate.

        A duplicate is the same image (sha256) already enrolled for the same
        person with the same engine. People are created as needed.
        """
        if not faces:
            return []
        with self.locked():
            token = self.backend.begin_add(space)
            results: list[int | None] = []
            added_ids: list[int] = []
            added_vectors: list[np.ndarray] = []
            with self.store.session() as session:
                # A few set-wise queries per batch, not several per face (1M galleries enrol in big batches).
                names = list(dict.fromkeys(face.person for face in faces))
                people: dict[str, Person] = {}
                for chunk in iter_chunks(names, 500):
                    people.update((person.name, person)
                                  for person in session.scalars(select(Person).where(Person.name.in_(chunk))))
                enrolled: set[tuple[int, str]] = set()  # (person id, image sha256) already held for this engine
                for chunk in iter_chunks([person.id for person in people.values()], 500):
                    enrolled.update(session.execute(
                        select(FaceRow.person_id, FaceRow.source_sha256)
                        .where(FaceRow.person_id.in_(chunk), FaceRow.engine == space.name)).all())
                newcomers = [Person(name=name, meta={}) for name in names if name not in people]
                if newcomers:
                    session.add_all(newcomers)
                    session.flush()
                    people.update((person.name, person) for person in newcomers)
                rows: list[FaceRow] = []
                slots: list[int] = []
                for position, face in enumerate(faces):
                    person = people[face.person]
                    key = (person.id, face.source_sha256)
                    results.append(None)
                    if key in enrolled:
                        continue
                    enrolled.add(key)
                    vector = np.ascontiguousarray(face.embedding, dtype=np.float32).reshape(-1)
                    if vector.shape[0] != space.dim:
                        raise ValueError(f"embedding has dimension {vector.shape[0]}, engine {space.name} has "
                                         f"{space.dim}")
                    rows.append(FaceRow(person_id=person.id, engine=space.name, engine_version=space.version,
                                        dim=space.dim, embedding=vector.tobytes(), box_x1=face.box[0],
                                        box_y1=face.box[1], box_x2=face.box[2], box_y2=face.box[3],
                                        det_score=float(face.score), source_path=str(face.source_path),
                                        source_sha256=face.source_sha256))
                    slots.append(position)
                    added_vectors.append(vector)
                if rows:
                    session.add_all(rows)
                    session.flush()
                    for position, row in zip(slots, rows):
                        results[position] = row.id
                    added_ids = [row.id for row in rows]
                    self.backend.add_in_transaction(session, space, np.array(added_ids, dtype=np.int64),
                                                    np.stack(added_vectors))
                generation = self.store.bump_generation(session, space.name) if added_ids else None
            # Committed. Now the index; a crash from here on is repaired on next open.
            self.backend.add_after_commit(token, space, np.array(added_ids, dtype=np.int64),
                                          np.stack(added_vectors) if added_vectors
                                          else np.zeros((0, space.dim), np.float32), generation)
        return results

    def _index_to_change(self, space: EmbeddingSpace) -> VectorIndex:
        """The index that a write extends (lock held).

        The one in memory when it mirrors the database's current generation
        (saving it is what moved the generation last, and nobody can write
        while the lock is held), so a big index is not read back from disk
        before every batch; otherwise the file, verified.
        """
        cached = self._indexes.get(space.name)
        if cached is not None:
            with self.store.session() as session:
                generation = self.store.generation(session, space.name)
            if (cached.generation == generation and cached.header.engine_version == space.version
                    and cached.dim == space.dim and self.index_kind in ("auto", cached.kind)):
                return cached
        return self._verify_or_rebuild(space, deep=cached is None)

    def _after_delete(self, face_ids_by_engine: dict[str, list[int]], generations: dict[str, int]) -> None:
        """Remove deleted faces' vectors from the index files (lock held, database committed)."""
        for engine_name, face_ids in face_ids_by_engine.items():
            self._indexes.pop(engine_name, None)
            path = self.index_path(engine_name)
            if not path.exists():
                continue
            try:
                index = VectorIndex.load(path)
            except IndexCorruptError:
                path.unlink()  # rebuilt on next use
                continue
            if index.generation != generations[engine_name] - 1:
                path.unlink()  # it was stale already: rebuilt on next use
                continue
            index.remove(face_ids)
            self._save_index(index, generations[engine_name])

    def remove_person(self, name: str) -> int:
        """Delete a person with all their faces and vectors; returns the number of faces removed."""
        with self.locked():
            with self.store.session() as session:
                person = self._person(session, name)
                by_engine = self._face_ids_by_engine(session, person.id)
                session.execute(delete(FaceRow).where(FaceRow.person_id == person.id))
                session.delete(person)
                generations = {engine: self.store.bump_generation(session, engine) for engine in by_engine}
            self.backend.delete_after_commit(by_engine, generations)
        return sum(len(ids) for ids in by_engine.values())

    def rename_person(self, old: str, new: str) -> None:
        new = validate_person_name(new)
        with self.locked(), self.store.session() as session:
            person = self._person(session, old)
            if session.scalar(select(Person).where(Person.name == new)) is not None:
                raise PersonExistsError(new)
            person.name = new

    def merge_people(self, source: str, target: str) -> int:
        """Move every face of ``source`` to ``target`` and delete ``source``.

        Faces of an image that ``target`` already has (same engine) are
        dropped as duplicates. Returns the number of faces moved.
        """
        if source == target:
            raise GalleryError("cannot merge a person into themselves")
        with self.locked():
            with self.store.session() as session:
                src = self._person(session, source)
                dst = self._person(session, target)
                dst_keys = set(session.execute(select(FaceRow.engine, FaceRow.source_sha256)
                                               .where(FaceRow.person_id == dst.id)).all())
                dropped: dict[str, list[int]] = {}
                moved = 0
                for face in session.scalars(select(FaceRow).where(FaceRow.person_id == src.id)):
                    if (face.engine, face.source_sha256) in dst_keys:
                        dropped.setdefault(face.engine, []).append(face.id)
                        session.delete(face)
                    else:
                        face.person_id = dst.id
                        moved += 1
                session.flush()
                dst.meta = {**(src.meta or {}), **(dst.meta or {})}
                session.delete(src)
                engines = set(self._face_ids_by_engine(session, dst.id)) | set(dropped)
                generations = {engine: self.store.bump_generation(session, engine) for engine in engines}
            # Vectors of moved faces keep their ids: only dropped duplicates leave the index.
            self.backend.delete_after_commit({engine: dropped.get(engine, []) for engine in engines}, generations)
        return moved

    def set_threshold(self, engine_name: str, threshold: float, info: dict) -> None:
        with self.locked(), self.store.session() as session:
            state = session.get(GalleryState, engine_name)
            if state is None:
                state = GalleryState(engine=engine_name, generation=0, threshold_info={})
                session.add(state)
            state.threshold = float(threshold)
            state.threshold_info = dict(info)

    def threshold(self, engine_name: str) -> tuple[float | None, dict]:
        with self.store.session() as session:
            state = session.get(GalleryState, engine_name)
            if state is None or state.threshold is None:
                return None, {}
            return state.threshold, dict(state.threshold_info or {})

    # -- reading ----------------------------------------------------------------------------

    def _person(self, session, name: str) -> Person:
        person = session.scalar(select(Person).where(Person.name == name))
        if person is None:
            raise PersonNotFoundError(name)
        return person

    @staticmethod
    def _face_ids_by_engine(session, person_id: int) -> dict[str, list[int]]:
        by_engine: dict[str, list[int]] = {}
        for face_id, engine in session.execute(select(FaceRow.id, FaceRow.engine)
                                               .where(FaceRow.person_id == person_id)):
            by_engine.setdefault(engine, []).append(face_id)
        return by_engine

    def person(self, name: str) -> tuple[Person, list[FaceRow]]:
        with self.store.session() as session:
            person = self._person(session, name)
            faces = list(session.scalars(select(FaceRow).where(FaceRow.person_id == person.id)
                                         .order_by(FaceRow.id)))
            session.expunge_all()
            return person, faces

    def people(self):
        return self.store.people()

    def search(self, space: EmbeddingSpace, queries: np.ndarray, top_k: int = 5) -> list[list[SearchHit]]:
        """Best ``top_k`` people per query embedding, best first (one hit per person)."""
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, space.dim)
        if len(queries) == 0:
            return []
        sims, ids = self.backend.search(space, queries, max(top_k * 8, 32))
        # Names of the first top_k candidates of every query first; the others only for a query that has not
        # found top_k people among them (a person with several faces near the top, a face deleted since the
        # index was read). The answer is the same as naming every candidate; one face per query is what a
        # search with top_k 1 usually needs, not 32 (P4's step profile: gallery_search per mosaic).
        first = min(top_k, ids.shape[1])
        names = self._face_names(sorted({int(i) for i in ids[:, :first].ravel() if i >= 0}))
        results = [_best_people(row_sims, row_ids, names, top_k) for row_sims, row_ids in zip(sims[:, :first],
                                                                                            ids[:, :first])]
        short = [row for row, hits in enumerate(results) if len(hits) < top_k]
        rest = sorted({int(i) for i in ids[short, first:].ravel() if i >= 0}) if short else []
        if rest:
            names.update(self._face_names(rest))
        for row in short:
            results[row] = _best_people(sims[row], ids[row], names, top_k)
        return results

    def _face_names(self, face_ids: list[int]) -> dict[int, str]:
        """The person's name of each face id (a face deleted meanwhile is absent): one statement per 900 ids.

        A primary-key lookup of ``people`` per face (a correlated subquery),
        whatever the planner's statistics: as a join, PostgreSQL hashed the
        whole ``people`` table for every search when its statistics were
        stale (just after a bulk import: 6.7 ms instead of 0.2 ms at 10k
        people, growing with the gallery). On PostgreSQL the ids travel as
        one array (``= ANY``), so the statement text, and its prepared plan,
        is the same for every search.
        """
        if not face_ids:
            return {}
        name = select(Person.name).where(Person.id == FaceRow.person_id).scalar_subquery()
        names: dict[int, str] = {}
        with self.store.engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                statement = select(FaceRow.id, name).where(FaceRow.id == any_(bindparam("ids", type_=ARRAY(Integer))))
                names.update(connection.execute(statement, {"ids": face_ids}).all())
            else:
                for start in range(0, len(face_ids), 900):  # SQLite's parameter limit
                    chunk = face_ids[start:start + 900]
                    names.update(connection.execute(select(FaceRow.id, name).where(FaceRow.id.in_(chunk))).all())
        return names

    # -- backup -----------------------------------------------------------------------------

    def backup(self, destination: Path) -> None:
        """Online backup of a SQLite database (consistent while others write)."""
        source = sqlite_path(self.store.url)
        if source is None and self.store.engine.dialect.name == "postgresql":
            from . import pg_tools

            pg_tools.backup(self.store.url, destination)
            return
        if source is None:
            raise GalleryError("backup works on SQLite and PostgreSQL databases only; use your database's own tools")
        destination = Path(destination)
        if destination.exists():
            raise GalleryError(f"{destination} already exists; choose a new file name")
        tmp = destination.with_name(destination.name + ".partial")
        try:
            with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(tmp)) as dst:
                src.backup(dst)
            os.replace(tmp, destination)
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise GalleryError(f"backup to {destination} failed: {exc}") from exc

    def restore(self, backup_file: Path) -> None:
        """Replace the database with a backup (checked first); indexes are rebuilt after."""
        target = sqlite_path(self.store.url)
        if target is None and self.store.engine.dialect.name == "postgresql":
            from . import pg_tools

            pg_tools.check_backup(backup_file)
            with self.locked():
                self.store.close()
                try:
                    pg_tools.restore(self.store.url, backup_file)
                finally:
                    self.backend.forget()
                    self.store = IdentityStore.open(self.store.url)
            return
        if target is None:
            raise GalleryError("restore works on SQLite and PostgreSQL databases only")
        backup_file = Path(backup_file)
        if not backup_file.is_file():
            raise GalleryError(f"{backup_file}: no such backup file")
        try:
            probe = IdentityStore.open(f"sqlite:///{backup_file}", upgrade=False)
        except StoreError as exc:
            raise GalleryError(f"{backup_file} is not a usable JointFace database: {exc}") from exc
        try:
            problems = probe.integrity_check()
        finally:
            probe.close()
        if problems:
            raise GalleryError(f"{backup_file} is damaged: {'; '.join(problems)}")
        with self.locked():
            self.store.close()
            safety = target.with_name(target.name + ".before-restore")
            with contextlib.closing(sqlite3.connect(target)) as current, \
                    contextlib.closing(sqlite3.connect(safety)) as keep:
                current.backup(keep)
            with contextlib.closing(sqlite3.connect(backup_file)) as src, \
                    contextlib.closing(sqlite3.connect(target)) as dst:
                src.backup(dst)
            self.backend.forget()
            self.store = IdentityStore.open(self.store.url)


def validate_person_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned:
        raise GalleryError("a person's name cannot be empty")
    if len(cleaned) > 255:
        raise GalleryError("a person's name is limited to 255 characters")
    if any(ord(ch) < 32 for ch in cleaned):
        raise GalleryError("a person's name cannot contain control characters")
    return cleaned


def iter_chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
