"""FAISS vector index mirroring one engine's faces, saved atomically.

Vectors are L2-normalised float32 embeddings; ids are ``faces.id`` row ids;
similarity is the inner product (cosine).

Kinds:

* ``flat`` (default): exact search (``IndexIDMap2`` over ``IndexFlatIP``).
  Removal is exact (``remove_ids``).
* ``hnsw``: approximate graph search (``IndexHNSWFlat``, inner product) for
  large galleries. FAISS's HNSW cannot remove ids, so removal marks ids as
  deleted in a tombstone set that :meth:`VectorIndex.search` filters out
  (over-fetching to compensate); the next rebuild drops them for good.

File format (``*.jfidx``): the magic line ``JFIDX1``, a 4-byte little-endian
header length, a JSON header (engine, engine version, dim, kind, the
database generation the index mirrors, vector count, tombstones, sha256 of
the payload) and the payload, ``faiss.serialize_index``. It is written to a
temporary file, flushed to disk and renamed over the old one, so a reader or
a crash sees either the old index or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .errors import IndexCorruptError

MAGIC = b"JFIDX1\n"
KINDS = ("flat", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


@dataclass
class IndexHeader:
    engine: str
    engine_version: str
    dim: int
    kind: str
    generation: int
    ntotal: int = 0
    tombstones: list[int] = field(default_factory=list)
    payload_sha256: str = ""


def _new_faiss_index(kind: str, dim: int):
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        return faiss.IndexIDMap2(hnsw)
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


class VectorIndex:
    """One engine's vectors, with the generation of the database it mirrors."""

    def __init__(self, engine: str, engine_version: str, dim: int, kind: str = "flat", generation: int = 0):
        self.header = IndexHeader(engine, engine_version, dim, kind, generation)
        self.index = _new_faiss_index(kind, dim)
        self._tombstones: set[int] = set()

    # -- contents ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.header.dim

    @property
    def kind(self) -> str:
        return self.header.kind

    @property
    def generation(self) -> int:
        return self.header.generation

    def __len__(self) -> int:
        return int(self.index.ntotal) - len(self._tombstones)

    def ids(self) -> np.ndarray:
        """Live ids, sorted."""
        all_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if self._tombstones:
            all_ids = all_ids[~np.isin(all_ids, np.fromiter(self._tombstones, dtype=np.int64))]
        return np.sort(all_ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index holds {self.dim}")
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids) -> None:
        ids = np.ascontiguousarray(list(ids), dtype=np.int64)
        if not len(ids):
            return
        if self.kind == "flat":
            self.index.remove_ids(ids)
        else:
            self._tombstones.update(int(i) for i in ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(similarities, ids)`` per query; missing slots have id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        live = len(self)
        if live == 0 or len(queries) == 0:
            return (np.full((len(queries), k), -np.inf, dtype=np.float32), np.full((len(queries), k), -1, np.int64))
        fetch = min(int(self.index.ntotal), k + len(self._tombstones))
        sims, ids = self.index.search(queries, fetch)
        if self._tombstones:
            dead = np.isin(ids, np.fromiter(self._tombstones, dtype=np.int64))
            sims = np.where(dead, -np.inf, sims)
            ids = np.where(dead, -1, ids)
            order = np.argsort(-sims, axis=1, kind="stable")
            sims = np.take_along_axis(sims, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        if fetch < k:
            pad = k - fetch
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return sims[:, :k], ids[:, :k]

    def set_ef_search(self, ef: int) -> None:
        if self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = int(ef)

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Path, generation: int) -> None:
        """Write atomically (temporary file, fsync, rename)."""
        path = Path(path)
        payload = faiss.serialize_index(self.index).tobytes()
        self.header.generation = int(generation)
        self.header.ntotal = int(self.index.ntotal)
        self.header.tombstones = sorted(self._tombstones)
        self.header.payload_sha256 = hashlib.sha256(payload).hexdigest()
        header = json.dumps(self.header.__dict__).encode()
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(MAGIC)
                handle.write(struct.pack("<I", len(header)))
                handle.write(header)
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        """Read and verify an index file; :class:`IndexCorruptError` if it is damaged."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IndexCorruptError(f"cannot read index {path}: {exc.strerror}") from exc
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
            raise IndexCorruptError(f"index {path} is not a JointFace index file (bad magic)")
        (header_len,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        try:
            header = IndexHeader(**json.loads(data[start:start + header_len]))
        except (ValueError, TypeError) as exc:
            raise IndexCorruptError(f"index {path} has a damaged header") from exc
        payload = data[start + header_len:]
        if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
            raise IndexCorruptError(f"index {path} is damaged (checksum mismatch: truncated or overwritten)")
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexCorruptError(f"index {path} cannot be decoded by FAISS") from exc
        if index.ntotal != header.ntotal or index.d != header.dim:
            raise IndexCorruptError(f"index {path}: header and contents disagree")
        self = cls.__new__(cls)
        self.header = header
        self.index = index
        self._tombstones = set(header.tombstones)
        return self


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
