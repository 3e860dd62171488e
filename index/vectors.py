"""FAISS vector index mirroring one engine's faces, saved atomically.

Vectors are L2-normalised float32 embeddings; ids are ``faces.id`` row ids;
similarity is the inner product (cosine).

Kinds (``KINDS``), with how each one deletes:

* ``flat`` (default): exact search (``IndexIDMap2`` over ``IndexFlatIP``).
  Removal is exact (``remove_ids``). One query reads every vector: about
  0.2 ms at 10k vectors, 2 ms at 100k and 20 ms at 1M (one thread, P5).
* ``ivf``: approximate search (``IndexIVFFlat``, inner product). A k-means
  coarse quantizer with ``nlist = 4 * sqrt(N)`` lists (at most N / 39, so
  each list has enough training points) is trained on the vectors present
  when the index is built (the gallery builds it at every rebuild; the
  first :meth:`VectorIndex.add` to an empty index trains on what it adds);
  a query scans the ``nprobe = max(32, nlist / 16)`` nearest lists (full
  vectors, exact inner products inside them). Removal is native
  (``remove_ids`` scans the lists, O(N)). Vectors added later go to the
  nearest existing list; a rebuild retrains on everything. Measured on one
  thread at 1M (4,000 lists, nprobe 250): build about 45 s (HNSW: over 10
  minutes); on P5's data (real dlib embeddings + random padding) p50 1.8 ms,
  recall@1 and @10 1.0; on a pessimistic gallery of 1M vectors drawn from a
  Gaussian fitted to real dlib embeddings, p50 2.3 ms, recall@1 0.997,
  recall@10 0.92 (nprobe 128 there: recall@1 0.985).
* ``hnsw``: approximate graph search (``IndexHNSWFlat``, inner product;
  M 32, efConstruction 80, efSearch 128: at 100k recall@1 1.0, p50 0.15 ms,
  but a 50 s build on one thread). FAISS's HNSW cannot remove ids, so
  removal marks ids as deleted in a tombstone set that
  :meth:`VectorIndex.search` filters out (over-fetching to compensate); the
  next rebuild drops them for good.
* ``auto`` (``INDEX_KINDS``; resolved by :func:`resolve_kind` when an index
  is built from the database): ``flat`` below ``AUTO_APPROXIMATE_FROM``
  vectors, ``ivf`` from there on. An index keeps its kind as faces are
  added; the next rebuild decides again.

File format (``*.jfidx``): the magic line ``JFIDX1``, a 4-byte little-endian
header length, a JSON header (engine, engine version, dim, kind, the
database generation the index mirrors, vector count, tombstones, sha256 of
the payload) and the payload, what ``faiss.write_index`` writes (the bytes
of ``faiss.serialize_index``). It is written to a temporary file, flushed to
disk and renamed over the old one, so a reader or a crash sees either the
old index or the new one, never half of one. The payload is streamed to and
from the file (hashed on the way) without extra in-memory copies: at 1M
vectors a save takes about 1.3 s and a verified load about 1 s.
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
from .space import EmbeddingSpace

MAGIC = b"JFIDX1\n"
KINDS = ("flat", "ivf", "hnsw")
INDEX_KINDS = KINDS + ("auto",)
# "auto": exact search below this many vectors. Measured (P5, one thread): a
# flat query costs 0.2 ms at 10k, 2.1-2.4 ms at 100k, 19-23 ms at 1M; IVF
# answers in 0.2 ms at 100k with recall@1 1.0 against exact search.
AUTO_APPROXIMATE_FROM = 100_000
AUTO_APPROXIMATE_KIND = "ivf"
IVF_LISTS_PER_SQRT_N = 4
IVF_MIN_TRAIN_PER_LIST = 39  # FAISS's own minimum for k-means
IVF_MAX_TRAIN_PER_LIST = 40  # training sample: at most this many vectors per list (1M: 160k)
IVF_PROBE_FRACTION = 16  # nprobe = nlist / 16 ...
IVF_MIN_NPROBE = 32  # ... but at least 32 lists
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
#: a search of at most this many query x stored-vector products runs on one FAISS thread: as fast as two on
#: a quiet machine, three times faster when the cores are busy (OpenMP waits for descheduled threads); above
#: it two threads win on a quiet machine (benchmarks/pipeline_speed/faiss_threads.json)
ONE_THREAD_WORK = 100_000


@contextlib.contextmanager
def _faiss_threads(count: int):
    """FAISS's OpenMP threads for this thread's searches inside the block."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def resolve_kind(kind: str, count: int, *, approximate_from: int = AUTO_APPROXIMATE_FROM) -> str:
    """The concrete kind for an index of ``count`` vectors (``auto`` -> ``flat`` or ``ivf``)."""
    if kind == "auto":
        return "flat" if count < approximate_from else AUTO_APPROXIMATE_KIND
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    return kind


def ivf_lists(count: int) -> int:
    """``nlist`` for an IVF index trained on ``count`` vectors."""
    wanted = int(round(IVF_LISTS_PER_SQRT_N * np.sqrt(max(count, 1))))
    return max(1, min(wanted, count // IVF_MIN_TRAIN_PER_LIST))


def ivf_probes(nlist: int) -> int:
    return min(nlist, max(IVF_MIN_NPROBE, -(-nlist // IVF_PROBE_FRACTION)))


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


def _new_faiss_index(kind: str, dim: int, nlist: int = 1):
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "ivf":
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = ivf_probes(nlist)
        return ivf
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        return faiss.IndexIDMap2(hnsw)
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


class VectorIndex:
    """One engine's vectors, with the generation of the database it mirrors."""

    def __init__(self, space: EmbeddingSpace, kind: str = "flat", generation: int = 0):
        self.header = IndexHeader(space.name, space.version, space.dim, kind, generation)
        self.index = _new_faiss_index(kind, space.dim)
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

    def _stored_ids(self) -> np.ndarray:
        """Every id held by FAISS (tombstoned ones included), in storage order."""
        if self.kind == "ivf":
            invlists = self.index.invlists
            parts = [faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy()
                     for list_no in range(self.index.nlist) if (size := invlists.list_size(list_no))]
            return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def _live_ids(self) -> np.ndarray:
        all_ids = self._stored_ids()
        if self._tombstones:
            all_ids = all_ids[~np.isin(all_ids, np.fromiter(self._tombstones, dtype=np.int64))]
        return all_ids

    def ids(self) -> np.ndarray:
        """Live ids, sorted."""
        return np.sort(self._live_ids())

    def id_summary(self) -> tuple[int, int, int, int]:
        """``(count, min, max, sum)`` of the live ids (0s when empty): a cheap fingerprint of the id set."""
        live = self._live_ids()
        if not len(live):
            return (0, 0, 0, 0)
        return (int(len(live)), int(live.min()), int(live.max()), int(live.sum()))

    @property
    def nlist(self) -> int | None:
        return int(self.index.nlist) if self.kind == "ivf" else None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; an empty ``ivf`` index is first trained on them (``nlist`` from their count)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), -1)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, the index holds {self.dim}")
        if self.kind == "ivf" and not self.index.is_trained:
            self._train_ivf(vectors)
        self.index.add_with_ids(vectors, ids)

    def _train_ivf(self, vectors: np.ndarray) -> None:
        nlist = ivf_lists(len(vectors))
        self.index = _new_faiss_index("ivf", self.dim, nlist)
        sample_size = min(len(vectors), nlist * IVF_MAX_TRAIN_PER_LIST)
        if sample_size < len(vectors):  # seeded, so a rebuild of the same faces gives the same index
            chosen = np.sort(np.random.default_rng(0).choice(len(vectors), sample_size, replace=False))
            vectors = vectors[chosen]
        self.index.train(vectors)

    def remove(self, ids) -> None:
        ids = np.ascontiguousarray(list(ids), dtype=np.int64)
        if not len(ids):
            return
        if self.kind in ("flat", "ivf"):
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
        small = len(queries) * int(self.index.ntotal) <= ONE_THREAD_WORK
        with _faiss_threads(1) if small else contextlib.nullcontext():
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

    def memory_bytes(self) -> int:
        """Size of the serialised FAISS index (what it holds in memory, give or take)."""
        return int(faiss.serialize_index(self.index).nbytes)

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Path, generation: int) -> None:
        """Write atomically (temporary file, fsync, rename).

        The payload is streamed from FAISS into the file and hashed on the
        way (no in-memory copy of a big index); the header, whose length does
        not depend on the checksum's value, is written in front afterwards.
        """
        path = Path(path)
        self.header.generation = int(generation)
        self.header.ntotal = int(self.index.ntotal)
        self.header.tombstones = sorted(self._tombstones)
        self.header.payload_sha256 = "0" * 64
        header_len = len(json.dumps(self.header.__dict__).encode())
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(MAGIC)
                handle.write(struct.pack("<I", header_len))
                handle.write(b" " * header_len)
                self.header.payload_sha256 = _write_payload(self.index, handle)
                header = json.dumps(self.header.__dict__).encode()
                assert len(header) == header_len
                handle.seek(len(MAGIC) + 4)
                handle.write(header)
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
            with open(path, "rb") as handle:
                head = handle.read(len(MAGIC) + 4)
                if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 4:
                    raise IndexCorruptError(f"index {path} is not a JointFace index file (bad magic)")
                (header_len,) = struct.unpack_from("<I", head, len(MAGIC))
                header_bytes = handle.read(header_len)
                try:
                    header = IndexHeader(**json.loads(header_bytes))
                except (ValueError, TypeError) as exc:
                    raise IndexCorruptError(f"index {path} has a damaged header") from exc
                # The payload goes straight into one buffer (no copies of a big file).
                payload = np.empty(max(0, os.fstat(handle.fileno()).st_size - handle.tell()), dtype=np.uint8)
                if handle.readinto(memoryview(payload)) != payload.size:
                    raise IndexCorruptError(f"index {path} changed while it was read")
        except OSError as exc:
            raise IndexCorruptError(f"cannot read index {path}: {exc.strerror}") from exc
        if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
            raise IndexCorruptError(f"index {path} is damaged (checksum mismatch: truncated or overwritten)")
        try:
            index = _decode(payload)
        except RuntimeError as exc:
            raise IndexCorruptError(f"index {path} cannot be decoded by FAISS") from exc
        expected = {"flat": faiss.IndexIDMap2, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexIDMap2}
        if index.ntotal != header.ntotal or index.d != header.dim or \
                not isinstance(index, expected.get(header.kind, ())):
            raise IndexCorruptError(f"index {path}: header and contents disagree")
        self = cls.__new__(cls)
        self.header = header
        self.index = index
        self._tombstones = set(header.tombstones)
        return self


def _write_payload(index, handle) -> str:
    """``faiss.write_index`` into an open file, chunk by chunk; returns the payload's sha256."""
    digest = hashlib.sha256()
    failure: list[OSError] = []

    def write(chunk: bytes) -> int:
        try:
            handle.write(chunk)
        except OSError as exc:  # FAISS would turn it into a RuntimeError: keep the original (disk full...)
            failure.append(exc)
            return 0
        digest.update(chunk)
        return len(chunk)

    try:
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    except RuntimeError:
        if failure:
            raise failure[0] from None
        raise
    if failure:
        raise failure[0]
    return digest.hexdigest()


def _decode(payload: np.ndarray):
    """``faiss.deserialize_index`` without its extra copy of the payload (twice as fast on a 1M index)."""
    view = memoryview(payload)
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = view[position:position + size]
        position += len(chunk)
        return chunk.tobytes()

    return faiss.read_index(faiss.PyCallbackIOReader(read))


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
