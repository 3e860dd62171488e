"""The interface every vector backend implements (see :mod:`index.backends`).

The gallery calls, for an enrolment (gallery lock held):

1. ``begin_add`` before its transaction (bring the backend in step with the
   database; returns a token handed back in step 3);
2. ``add_in_transaction`` inside it, after the ``faces`` rows are flushed
   (only a transactional backend writes here);
3. ``add_after_commit`` once the transaction is committed, with the
   engine's new generation (``None`` when nothing was added).

For removals and merges, ``delete_after_commit`` after the commit. A
backend that is not transactional must survive a crash between the commit
and its own write: it records the generation it mirrors and rebuilds from
the database when it is behind.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..space import EmbeddingSpace


@dataclass(frozen=True)
class IndexReport:
    """What ``check_index`` found: an engine's faces in the database against its vectors."""

    engine: str
    engine_version: str
    db_faces: int
    index_faces: int | None
    db_generation: int
    index_generation: int | None
    problems: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        return not self.problems


class VectorBackend:
    name = "base"
    #: vectors are written in the same transaction as the identity rows (no repair ever needed)
    transactional = False

    def __init__(self, gallery):
        self.gallery = gallery

    # -- writing ----------------------------------------------------------------------------

    def begin_add(self, space: EmbeddingSpace):
        return None

    def add_in_transaction(self, session, space: EmbeddingSpace, ids: np.ndarray,
                           vectors: np.ndarray) -> None:
        pass

    def add_after_commit(self, token, space: EmbeddingSpace, ids: np.ndarray, vectors: np.ndarray,
                         generation: int | None) -> None:
        raise NotImplementedError

    def delete_after_commit(self, ids_by_engine: dict[str, list[int]], generations: dict[str, int]) -> None:
        raise NotImplementedError

    # -- reading ----------------------------------------------------------------------------

    def search(self, space: EmbeddingSpace, queries: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(similarities, face ids)`` per query (inner product); missing slots are ``(-inf, -1)``."""
        raise NotImplementedError

    # -- maintenance ------------------------------------------------------------------------

    def rebuild(self, space: EmbeddingSpace) -> int:
        """Write the engine version's vectors afresh from the database (gallery lock held); returns how many."""
        with self.gallery.locked():
            return self._rebuild(space)

    def _rebuild(self, space: EmbeddingSpace) -> int:
        raise NotImplementedError

    def check(self, engine: str, version: str):
        """An :class:`IndexReport` comparing the backend with the database."""
        raise NotImplementedError

    def forget(self) -> None:
        """The database was replaced (restore): everything must be rebuilt before use."""

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return self.name


def vector_key(space: EmbeddingSpace) -> str:
    """A short, stable name fragment for one engine version's vectors (SQL table / collection names)."""
    return hashlib.sha1(f"{space.name}\0{space.version}\0{space.dim}".encode()).hexdigest()[:16]


def pad_results(rows: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = np.full((len(rows), k), -np.inf, dtype=np.float32)
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        for c, (face_id, sim) in enumerate(row[:k]):
            ids[r, c] = face_id
            sims[r, c] = sim
    return sims, ids


def id_difference(db_ids: np.ndarray, ids: np.ndarray) -> tuple[int, int]:
    """``(missing, extra)``: face ids of the database the backend lacks, and ids the backend has that the
    database does not."""
    return int(np.setdiff1d(db_ids, ids).size), int(np.setdiff1d(ids, db_ids).size)
