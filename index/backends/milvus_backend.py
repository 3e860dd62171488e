"""The Milvus backend (pymilvus): Milvus Lite (a file, embedded) or a Milvus server/cluster, one API.

Names: a gallery gets a random id (``gallery_settings.gallery_id``) so
several galleries can share one Milvus; each engine's vectors live in the
collection ``jf_<gallery>_<key of engine, version, dim>`` (primary key =
``faces.id``, an INT64 that the database assigns: Milvus never makes ids),
HNSW over inner product (M 16, efConstruction 64; ef 100 at search).
Collections are created with ``Strong`` consistency, so a search sees every
write acknowledged before it, on a cluster too. Written rows are flushed
(sealed and indexed) after a rebuild and once ``FLUSH_AFTER_ROWS`` have
gone in: rows left in a growing segment are searched by brute force.

Consistency: Milvus is not transactional with the identity database.
Writes follow FAISS's rules: the database commits first (bumping the
engine's generation), then the vectors go to Milvus, then the generation
they mirror is written to the gallery's state collection
(``jf_<gallery>_state``: engine key -> generation, collection). On first
use in a process, and whenever the database generation moves, the state is
compared with the database (generation, and on first use the vector count);
a collection that is behind or disagrees is rebuilt from the database (with
a notice). A crash between the commit and the Milvus write therefore costs a
rebuild, never a face.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import numpy as np

from ..errors import GalleryError
from ..space import EmbeddingSpace
from .base import IndexReport, VectorBackend, id_difference, pad_results, vector_key

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 100
INSERT_CHUNK = 10_000
# Inserted rows stay in a "growing" segment, searched by brute force, until Milvus seals it (at about an eighth
# of its 1 GB segment size, some 200k vectors of 128 d, or after minutes idle); in Milvus Lite a query over
# 10k growing vectors took 200 ms, over the same rows sealed and indexed 10 ms. So the backend flushes (seals
# and indexes) after a rebuild, and after writes once FLUSH_AFTER_ROWS rows have gone in since its last flush.
FLUSH_AFTER_ROWS = 1_000
INDEX_WAIT_S = 3_600.0
TIMEOUT_S = 30.0


def _wrap(what: str):
    """Turn pymilvus's errors into a GalleryError that says what was being done."""

    @contextlib.contextmanager
    def guard():
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except MilvusException as exc:
            raise GalleryError(f"Milvus: {what} failed: {getattr(exc, 'message', exc)}") from exc

    return guard()


class MilvusBackend(VectorBackend):
    name = "milvus"

    def __init__(self, gallery, uri: str | None):
        super().__init__(gallery)
        try:
            from pymilvus import MilvusClient
            # pymilvus logs every failed call with a traceback on stderr; JointFace reports the error itself.
            logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        except ImportError as exc:
            raise GalleryError("the milvus backend needs pymilvus (and milvus-lite for a local file): "
                               'pip install -e ".[scale]"') from exc
        self.uri = uri or str(gallery.home / "milvus.db")
        try:
            self.client = MilvusClient(uri=self.uri, timeout=10)
        except Exception as exc:  # unreachable server, unusable file, milvus-lite missing
            raise GalleryError(f"cannot reach Milvus at {self.uri}: {getattr(exc, 'message', exc)}") from exc
        gallery_id = gallery.setting("gallery_id")
        if not gallery_id:
            with gallery.locked():
                gallery_id = gallery.setting("gallery_id")
                if not gallery_id:
                    gallery_id = {"id": uuid.uuid4().hex}
                    gallery.set_setting("gallery_id", gallery_id)
        self.prefix = f"jf_{gallery_id['id'][:12]}"
        self.state_collection = f"{self.prefix}_state"
        self._in_step: dict[str, tuple[int, str]] = {}  # engine -> (generation, collection) known to mirror the db
        self._loaded: set[str] = set()
        self._unflushed: dict[str, int] = {}  # collection -> rows this process inserted since it last flushed it
        self._ensure_state_collection()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def describe(self) -> str:
        return f"milvus ({self.uri})"

    # -- collections ------------------------------------------------------------------------

    def collection(self, space: EmbeddingSpace) -> str:
        return f"{self.prefix}_{vector_key(space)}"

    @staticmethod
    def _state_key(engine: str) -> str:
        return vector_key(EmbeddingSpace(engine, "", 0))

    def _ensure_state_collection(self) -> None:
        from pymilvus import DataType, MilvusClient

        with _wrap("opening the gallery's state collection"):
            if self.client.has_collection(self.state_collection):
                self._load(self.state_collection)
                return
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("engine", DataType.VARCHAR, max_length=512)
            schema.add_field("generation", DataType.INT64)
            schema.add_field("collection", DataType.VARCHAR, max_length=128)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)  # Milvus needs a vector field; unused
            index = self.client.prepare_index_params()
            index.add_index(field_name="v", index_type="FLAT", metric_type="L2")
            self.client.create_collection(self.state_collection, schema=schema, index_params=index,
                                          consistency_level="Strong")

    def _create_collection(self, name: str, dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=int(dim))
        index = self.client.prepare_index_params()
        index.add_index(field_name="v", index_type="HNSW", metric_type="IP",
                        params={"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION})
        self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")

    def _load(self, name: str) -> None:
        """Collections come back released in a new process (Milvus Lite) or after a release: load once."""
        if name in self._loaded:
            return
        state = self.client.get_load_state(name).get("state")
        if "Loaded" not in str(state):
            self.client.load_collection(name)
        self._loaded.add(name)

    def _state(self, engine: str) -> tuple[int, str] | None:
        with _wrap("reading the gallery's state"):
            rows = self.client.query(self.state_collection, filter=f'key == "{self._state_key(engine)}"',
                                     output_fields=["generation", "collection"])
        if not rows:
            return None
        return int(rows[0]["generation"]), str(rows[0]["collection"])

    def _set_state(self, engine: str, generation: int, collection: str) -> None:
        self.client.upsert(self.state_collection, [{"key": self._state_key(engine), "engine": engine[:512],
                                                    "generation": int(generation), "collection": collection,
                                                    "v": [0.0, 0.0]}])
        self._in_step[engine] = (int(generation), collection)

    def _count(self, collection: str) -> int:
        rows = self.client.query(collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _insert(self, collection: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        for start in range(0, len(ids), INSERT_CHUNK):
            chunk_ids = ids[start:start + INSERT_CHUNK].tolist()
            chunk = vectors[start:start + INSERT_CHUNK]
            self.client.insert(collection, [{"id": i, "v": v} for i, v in zip(chunk_ids, chunk)])
        self._unflushed[collection] = self._unflushed.get(collection, 0) + len(ids)

    def _flush(self, collection: str, *, wait: bool = False) -> None:
        """Seal the collection's growing rows so they are indexed; ``wait``: until the index covers every row."""
        self.client.flush(collection)
        self._unflushed[collection] = 0
        if not wait:
            return
        deadline = time.monotonic() + INDEX_WAIT_S
        while time.monotonic() < deadline:
            info = self.client.describe_index(collection, "v") or {}
            if not info.get("pending_index_rows") and info.get("indexed_rows", 0) >= info.get("total_rows", 0):
                return
            time.sleep(0.2)

    # -- in step with the database ----------------------------------------------------------

    def _db_generation(self, engine: str) -> int:
        with self.gallery.store.session() as session:
            return self.gallery.store.generation(session, engine)

    def _ensure(self, space: EmbeddingSpace) -> str:
        """The collection of this engine version, rebuilt from the database when it is behind or disagrees."""
        engine, version = space.name, space.version
        name = self.collection(space)
        generation = self._db_generation(engine)
        if self._in_step.get(engine) == (generation, name):
            return name
        first_use = engine not in self._in_step
        reason = self._disagreement(engine, version, name, generation, deep=first_use)
        if reason:
            with self.gallery.locked():  # re-check: another process may have caught up meanwhile
                generation = self._db_generation(engine)
                reason = self._disagreement(engine, version, name, generation, deep=True)
                if reason:
                    count = self._rebuild(space)
                    if reason != "new":
                        self.gallery._notify(f"Milvus collection of engine {engine} {reason}: rebuilt from the "
                                             f"database ({count} faces)")
        else:
            self._in_step[engine] = (generation, name)
        return name

    def _disagreement(self, engine: str, version: str, name: str, generation: int, *, deep: bool) -> str | None:
        state = self._state(engine)
        with _wrap("reading a collection"):
            exists = self.client.has_collection(name)
        if state is None or not exists:
            _, (db_count, *_rest) = self.gallery._db_summary(engine, version)
            return "was missing" if db_count or state is not None else "new"
        if state[1] != name:
            return "belonged to another engine version"
        if state[0] != generation:
            return f"was out of date (generation {state[0]}, database {generation})"
        with _wrap("loading a collection"):
            self._load(name)
        if deep:
            _, (db_count, *_rest) = self.gallery._db_summary(engine, version)
            with _wrap("counting vectors"):
                count = self._count(name)
            if count != db_count:
                return f"disagreed with the database ({count} vectors, {db_count} faces)"
        return None

    def _rebuild(self, space: EmbeddingSpace) -> int:
        """Drop and refill the engine's collection from the database (gallery lock held)."""
        engine, dim = space.name, space.dim
        name = self.collection(space)
        generation, ids, vectors = self.gallery._read_vectors(space)
        with _wrap(f"rebuilding collection {name}"):
            previous = self._state(engine)
            if previous is not None and previous[1] != name and self.client.has_collection(previous[1]):
                self.client.drop_collection(previous[1])
            if self.client.has_collection(name):
                self.client.drop_collection(name)
            self._loaded.discard(name)
            self._create_collection(name, dim)
            self._loaded.add(name)
            self._insert(name, ids, vectors)
            self._flush(name, wait=True)
            self._set_state(engine, generation, name)
        return len(ids)

    # -- the interface ----------------------------------------------------------------------

    def begin_add(self, space):
        return self._ensure(space)

    def add_after_commit(self, token, space, ids, vectors, generation):
        engine = space.name
        if generation is None or not len(ids):
            return
        self._in_step.pop(engine, None)  # until the write below is done
        try:
            with _wrap("writing the new vectors (the faces are in the database; the collection is rebuilt on "
                       "next use)"):
                self._insert(token, ids, vectors)
                if self._unflushed.get(token, 0) >= FLUSH_AFTER_ROWS:
                    self._flush(token)
                self._set_state(engine, generation, token)
        except BaseException:
            self._in_step.pop(engine, None)
            raise

    def delete_after_commit(self, ids_by_engine, generations):
        for engine, face_ids in ids_by_engine.items():
            in_step = self._in_step.pop(engine, None)
            state = self._state(engine)
            if state is None:
                continue
            if state[0] != generations[engine] - 1:
                continue  # behind already: rebuilt on next use
            with _wrap("deleting vectors (the faces are gone from the database; the collection is rebuilt on "
                       "next use)"):
                if face_ids:
                    self.client.delete(state[1], ids=[int(i) for i in face_ids])
                self._set_state(engine, generations[engine], state[1])
            del in_step

    def search(self, space, queries, k):
        name = self._ensure(space)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with _wrap("searching"):
            results = self.client.search(name, data=list(queries), limit=int(k), output_fields=["id"],
                                         search_params={"metric_type": "IP", "params": {"ef": max(HNSW_EF_SEARCH, k)}})
        rows = [[(int(hit["id"]), float(hit["distance"])) for hit in hits] for hits in results]
        return pad_results(rows, k)

    def check(self, engine, version):
        generation, db_ids = self.gallery._db_state(engine, version)
        problems: list[str] = []
        state = self._state(engine)
        index_faces = index_generation = None
        if state is None:
            if len(db_ids):
                problems.append("no Milvus collection for this engine yet")
        else:
            index_generation = state[0]
            with _wrap("reading ids"):
                if not self.client.has_collection(state[1]):
                    problems.append(f"Milvus collection {state[1]} is missing")
                else:
                    self._load(state[1])
                    ids = []
                    iterator = self.client.query_iterator(state[1], batch_size=10_000, filter="",
                                                          output_fields=["id"])
                    while batch := iterator.next():
                        ids.extend(row["id"] for row in batch)
                    iterator.close()
                    ids = np.sort(np.array(ids, dtype=np.int64))
                    index_faces = len(ids)
                    if index_generation != generation:
                        problems.append(f"Milvus generation {index_generation} != database generation {generation}")
                    if not np.array_equal(ids, db_ids):
                        missing, extra = id_difference(db_ids, ids)
                        problems.append(f"Milvus collection and database differ: {missing} faces missing, "
                                        f"{extra} extra")
        return IndexReport(engine, version, int(len(db_ids)), index_faces, generation, index_generation,
                           tuple(problems))

    def forget(self):
        """After a restore: drop the recorded states, so every collection is rebuilt on next use."""
        self._in_step.clear()
        with _wrap("resetting the gallery's state"):
            self.client.delete(self.state_collection, filter='key != ""')
