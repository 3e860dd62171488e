"""The pgvector backend: embeddings in the identity database itself (PostgreSQL with the ``vector`` extension).

One table per engine version, ``jf_vectors_<key>`` (``face_id`` referencing
``faces.id`` ON DELETE CASCADE, ``embedding vector(dim)``), with an HNSW
index for inner-product search (``vector_ip_ops``; m 16, ef_construction
64, pgvector's defaults; ``hnsw.ef_search`` is 100 on every connection of
the gallery, raised for the query when k is larger).

Speed (P5): vectors go in with a binary COPY built by numpy; a rebuild
loads every row first and then builds the HNSW index once, with
``maintenance_work_mem`` sized so the graph fits (else pgvector finishes
the build on disk, many times slower), then analyses the table.

Consistency: an enrolment inserts its vectors in the very transaction that
inserts the ``faces`` rows; removing a person or a duplicate face deletes
the vector rows by the foreign key's cascade in the same transaction. The
database and the index therefore cannot disagree, whatever is killed when.
The only check left is for a gallery that was switched to pgvector from
another backend (or whose table was dropped): on first use per process,
the count and id sum of the table are compared with the ``faces`` rows, and
a table that disagrees is rebuilt (in one transaction).
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from ..errors import GalleryError
from ..space import EmbeddingSpace
from .base import IndexReport, VectorBackend, id_difference, pad_results, vector_key

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 100
COPY_BLOCK = 50_000
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\0" + bytes(8)  # the binary COPY header: signature, flags 0, no extension
COPY_TRAILER = b"\xff\xff"
# maintenance_work_mem for the HNSW build: the graph must fit in it, or pgvector goes on building it on disk,
# many times slower ("hnsw graph no longer fits into maintenance_work_mem"). Per vector: the vector itself
# plus about HNSW_BYTES_PER_ELEMENT bytes of neighbour lists and headers (m 16), with room to spare.
HNSW_BYTES_PER_ELEMENT = 600
HNSW_BUILD_MEMORY_MIN_MB = 256
HNSW_BUILD_MEMORY_MAX_MB = 8192


def table_name(space: EmbeddingSpace) -> str:
    return f"jf_vectors_{vector_key(space)}"


def hnsw_build_memory_mb(count: int, dim: int) -> int:
    """``maintenance_work_mem`` (MB) in which the HNSW graph of ``count`` vectors of ``dim`` fits (1M x 128: 2 GB)."""
    wanted = 2 * count * (4 * dim + HNSW_BYTES_PER_ELEMENT) / 2**20
    return int(min(HNSW_BUILD_MEMORY_MAX_MB, max(HNSW_BUILD_MEMORY_MIN_MB, np.ceil(wanted))))


def copy_rows(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """Rows ``(face_id int4, embedding vector(dim))`` in PostgreSQL's binary COPY format (no header or trailer).

    Each row: field count (int16 2), then per field its byte length (int32)
    and value, big-endian: the id as int4; the vector as pgvector's binary
    form (uint16 dim, uint16 0, dim float32).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    row = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("vector_len", ">i4"),
                    ("dim", ">u2"), ("unused", ">u2"), ("vector", ">f4", (dim,))])
    rows = np.empty(count, dtype=row)
    rows["fields"] = 2
    rows["id_len"] = 4
    rows["id"] = np.asarray(ids, dtype=np.int64)
    rows["vector_len"] = 4 + 4 * dim
    rows["dim"] = dim
    rows["unused"] = 0
    rows["vector"] = vectors
    return rows.tobytes()


class PgVectorBackend(VectorBackend):
    name = "pgvector"
    transactional = True

    def __init__(self, gallery):
        super().__init__(gallery)
        engine = gallery.store.engine
        if engine.dialect.name != "postgresql":
            raise GalleryError("the pgvector backend keeps the vectors in the PostgreSQL database of the people: "
                               "give --db-url postgresql+psycopg://USER@HOST/DB (this gallery's database is "
                               f"{engine.dialect.name})")
        try:
            with engine.begin() as connection:
                connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('jointface-create-extension'))"))
                connection.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        except DBAPIError as exc:
            reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            raise GalleryError("the pgvector backend needs the PostgreSQL extension `vector` (pgvector) on the "
                               f"server, and the right to create it: {reason}") from exc
        engine.dispose()  # connections opened before the extension existed do not know its type
        from pgvector.psycopg import register_vector

        def register(dbapi_connection, _record):
            register_vector(dbapi_connection)
            # The search breadth for every query of this connection: a search then needs no SET LOCAL of its
            # own (one round trip less per query). Committed, or the pool's rollback would undo it.
            dbapi_connection.execute(f"SET hnsw.ef_search = {HNSW_EF_SEARCH}")
            dbapi_connection.commit()

        event.listen(engine, "connect", register)
        self._engine = engine
        self._register = register
        self._verified: set[str] = set()

    def close(self) -> None:
        if event.contains(self._engine, "connect", self._register):
            event.remove(self._engine, "connect", self._register)

    # -- tables -----------------------------------------------------------------------------

    @staticmethod
    def _create_table(connection, table: str, dim: int, *, with_index: bool = True) -> None:
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": table})
        connection.execute(text(
            f"CREATE TABLE IF NOT EXISTS {table} (face_id integer PRIMARY KEY REFERENCES faces (id) "
            f"ON DELETE CASCADE, embedding vector({int(dim)}) NOT NULL)"))
        if with_index:
            connection.execute(text(
                f"CREATE INDEX IF NOT EXISTS {table}_hnsw ON {table} USING hnsw (embedding vector_ip_ops) "
                f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"))

    @staticmethod
    def _exists(connection, table: str) -> bool:
        return connection.execute(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": table}).scalar_one()

    @staticmethod
    def _copy(connection, table: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """COPY the rows into the table, on the connection's current transaction.

        PostgreSQL's binary COPY format built with numpy (:func:`copy_rows`),
        in blocks of ``COPY_BLOCK`` rows: no Python object per row (psycopg's
        ``write_row`` costs about 15 us a row, 15 s at 1M faces).
        """
        raw = connection.connection.driver_connection
        with raw.cursor() as cursor:
            with cursor.copy(f"COPY {table} (face_id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.write(COPY_SIGNATURE)
                for start in range(0, len(ids), COPY_BLOCK):
                    copy.write(copy_rows(ids[start:start + COPY_BLOCK], vectors[start:start + COPY_BLOCK]))
                copy.write(COPY_TRAILER)

    def _table_summary(self, connection, table: str) -> tuple[int, int, int, int]:
        count, low, high, total = connection.execute(text(
            f"SELECT COUNT(*), MIN(face_id), MAX(face_id), SUM(face_id) FROM {table}")).one()
        return (0, 0, 0, 0) if not count else (int(count), int(low), int(high), int(total))

    def _ensure(self, space: EmbeddingSpace) -> str:
        """The table of this engine version, in step with ``faces`` (checked once per process)."""
        engine, version = space.name, space.version
        table = table_name(space)
        if table in self._verified:
            return table
        _, db_ids = self.gallery._db_summary(engine, version)
        with self._engine.connect() as connection:
            exists = self._exists(connection, table)
            summary = self._table_summary(connection, table) if exists else (0, 0, 0, 0)
        if not exists or summary != db_ids:
            with self.gallery.locked():
                count = self._rebuild(space)
            if exists or count:
                self.gallery._notify(f"pgvector table of engine {engine} "
                                     f"{'disagreed with' if exists else 'was missing from'} the database: rebuilt "
                                     f"from the database ({count} faces)")
        self._verified.add(table)
        return table

    def _rebuild(self, space: EmbeddingSpace) -> int:
        """Refill the table from ``faces`` in one transaction (TRUNCATE locks out writers until it commits)."""
        engine, version, dim = space.name, space.version, space.dim
        table = table_name(space)
        with self._engine.begin() as connection:
            self._create_table(connection, table, dim, with_index=False)
            connection.execute(text(f"DROP INDEX IF EXISTS {table}_hnsw"))
            connection.execute(text(f"TRUNCATE {table}"))
            count = 0
            result = connection.execute(text(
                "SELECT id, embedding FROM faces WHERE engine = :engine AND engine_version = :version ORDER BY id"
            ).execution_options(yield_per=20_000), {"engine": engine, "version": version})
            rows = []
            for chunk in result.partitions():
                ids = np.fromiter((row[0] for row in chunk), dtype=np.int64, count=len(chunk))
                blob = b"".join(bytes(row[1]) for row in chunk)
                if len(blob) != len(chunk) * dim * 4:
                    raise GalleryError(f"the database holds embeddings of engine {engine} {version} whose "
                                       f"dimension is not {dim}")
                rows.append((ids, np.frombuffer(blob, dtype=np.float32).reshape(len(chunk), dim)))
            result.close()
            for ids, vectors in rows:
                self._copy(connection, table, ids, vectors)
                count += len(ids)
            connection.execute(text(f"SET LOCAL maintenance_work_mem = '{hnsw_build_memory_mb(count, dim)}MB'"))
            self._create_table(connection, table, dim)  # the HNSW index, built once over everything
            connection.execute(text(f"ANALYZE {table}"))
        self._verified.add(table)
        return count

    # -- the interface ----------------------------------------------------------------------

    def begin_add(self, space):
        return self._ensure(space)

    def add_in_transaction(self, session, space, ids, vectors):
        connection = session.connection()
        table = table_name(space)
        self._create_table(connection, table, space.dim)
        self._copy(connection, table, ids, vectors)

    def add_after_commit(self, token, space, ids, vectors, generation):
        pass  # written and committed with the faces

    def delete_after_commit(self, ids_by_engine, generations):
        pass  # deleted by ON DELETE CASCADE, in the transaction that deleted the faces

    def search(self, space, queries, k):
        table = self._ensure(space)
        rows: list[list[tuple[int, float]]] = []
        with self._engine.begin() as connection:
            if k > HNSW_EF_SEARCH:  # the connection's own setting (HNSW_EF_SEARCH) would cap the results at it
                connection.execute(text(f"SET LOCAL hnsw.ef_search = {int(k)}"))
            statement = text(f"SELECT face_id, -(embedding <#> :q) FROM {table} ORDER BY embedding <#> :q LIMIT :k")
            for query in np.asarray(queries, dtype=np.float32):
                rows.append([(int(i), float(s)) for i, s in connection.execute(statement, {"q": query, "k": k})])
        return pad_results(rows, k)

    def check(self, engine, version):
        generation, db_ids = self.gallery._db_state(engine, version)
        problems: list[str] = []
        index_faces = None
        with self._engine.connect() as connection:
            dims = set(connection.execute(text("SELECT DISTINCT dim FROM faces WHERE engine = :e AND "
                                               "engine_version = :v"), {"e": engine, "v": version}).scalars())
        for dim in sorted(dims):
            table = table_name(EmbeddingSpace(engine, version, dim))
            with self._engine.connect() as connection:
                if not self._exists(connection, table):
                    problems.append(f"pgvector table {table} is missing")
                    continue
                ids = np.sort(np.fromiter(connection.execute(text(f"SELECT face_id FROM {table}")).scalars(),
                                          dtype=np.int64))
            index_faces = (index_faces or 0) + len(ids)
            if not np.array_equal(ids, db_ids):
                missing, extra = id_difference(db_ids, ids)
                problems.append(f"pgvector table and faces differ: {missing} faces missing, {extra} extra")
        return IndexReport(engine, version, int(len(db_ids)), index_faces if dims else 0, generation, generation,
                           tuple(problems))

    def forget(self):
        self._verified.clear()

    def describe(self) -> str:
        return "pgvector (HNSW, in the identity database)"
