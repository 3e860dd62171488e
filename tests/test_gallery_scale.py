"""Galleries that scale: approximate kinds against exact search, deletion for every kind, ``auto``, P5 on a toy."""

from __future__ import annotations

import re

import numpy as np
import pytest

from index import EmbeddingSpace, Gallery
from index.gallery import NewFace
from index.vectors import KINDS, VectorIndex, ivf_lists, ivf_probes, resolve_kind
from jointface.bench.cache import ResultCache
from jointface.bench.gallery_speed import real_embeddings, run_p5
from jointface.bench.run import BenchContext, markdown_for

APPROXIMATE_KINDS = [kind for kind in KINDS if kind != "flat"]
DIM = 32


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def people_like(people: int, faces_per_person: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded face-like data: ``people`` random identity centres, each with noisy faces around it."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((people, DIM)))
    noise = spread * rng.standard_normal((people * faces_per_person, DIM)) / np.sqrt(DIM)
    return centres, unit(np.repeat(centres, faces_per_person, axis=0) + noise)


@pytest.fixture(scope="module")
def gallery_data():
    """20k faces of 2,000 people; 300 queries: new faces of enrolled people."""
    centres, faces = people_like(2_000, 10, spread=0.5, seed=0)
    rng = np.random.default_rng(1)
    chosen = rng.choice(len(centres), 300, replace=False)
    queries = unit(centres[chosen] + 0.5 * rng.standard_normal((300, DIM)) / np.sqrt(DIM))
    ids = np.arange(1, len(faces) + 1, dtype=np.int64)
    exact = VectorIndex(EmbeddingSpace("e", "v", DIM), kind="flat")
    exact.add(ids, faces)
    _, truth = exact.search(queries, 10)
    return faces, ids, queries, truth


@pytest.mark.parametrize("kind", APPROXIMATE_KINDS)
def test_approximate_kind_recall_against_exact(gallery_data, kind):
    faces, ids, queries, truth = gallery_data
    index = VectorIndex(EmbeddingSpace("e", "v", DIM), kind=kind)
    index.add(ids, faces)
    _, found = index.search(queries, 10)
    recall_at_1 = np.mean(found[:, 0] == truth[:, 0])
    recall_at_10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall_at_1 >= 0.95 and recall_at_10 >= 0.9, (kind, recall_at_1, recall_at_10)
    if kind == "ivf":  # 4 * sqrt(20k) = 566 lists, capped at 20k / 39 = 512; a query scans 32 of them
        assert index.nlist == 512 and index.index.nprobe == 32


def test_ivf_parameters():
    assert ivf_lists(1) == 1 and ivf_lists(100) == 2  # few vectors: at least 39 per list
    assert ivf_lists(100_000) == 1265 and ivf_lists(1_000_000) == 4000
    assert ivf_probes(1) == 1 and ivf_probes(512) == 32 and ivf_probes(4000) == 250


@pytest.mark.parametrize("kind", KINDS)
def test_deletion_for_every_kind_survives_save_and_load(tmp_path, gallery_data, kind):
    faces, ids, queries, truth = gallery_data
    faces, ids = faces[:3000], ids[:3000]
    index = VectorIndex(EmbeddingSpace("e", "v", DIM), kind=kind)
    index.add(ids, faces)
    _, before = index.search(faces[:50], 5)
    doomed = before[:, 0]  # each query's own face
    assert (doomed == ids[:50]).all()
    index.remove(doomed)
    assert len(index) == 3000 - 50 and not np.isin(index.ids(), doomed).any()
    _, after = index.search(faces[:50], 5)
    assert not np.isin(after, doomed).any() and (after >= 0).all()
    index.save(tmp_path / "i.jfidx", generation=3)
    loaded = VectorIndex.load(tmp_path / "i.jfidx")
    assert loaded.kind == kind and len(loaded) == 3000 - 50
    _, reloaded = loaded.search(faces[:50], 5)
    assert not np.isin(reloaded, doomed).any()
    assert loaded.id_summary() == (2950, 51, 3000, int(ids[50:].sum()))


def enrol_people(gallery: Gallery, faces: np.ndarray, first: int = 0) -> None:
    gallery.add_faces(EmbeddingSpace("t", "v1", DIM), [
        NewFace(f"person-{first + i}", vector, (0, 0, 1, 1), 1.0, f"/{first + i}.jpg", f"sha-{first + i}")
        for i, vector in enumerate(faces)])


def top_names(gallery: Gallery, queries: np.ndarray) -> list[str]:
    return [hits[0].name if hits else None for hits in gallery.search(EmbeddingSpace("t", "v1", DIM), queries, top_k=3)]


@pytest.mark.parametrize("kind", KINDS)
def test_gallery_deletion_for_every_kind_after_reopen_and_rebuild(tmp_path, gallery_data, kind, db_url):
    faces = gallery_data[0][:1500]
    home = tmp_path / "home"
    with Gallery.open(home, db_url, index_kind=kind) as gallery:
        enrol_people(gallery, faces)
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == kind
        assert top_names(gallery, faces[:20]) == [f"person-{i}" for i in range(20)]
        for i in range(10):
            gallery.remove_person(f"person-{i}")
        gone = {f"person-{i}" for i in range(10)}
        assert not gone & set(top_names(gallery, faces[:20]))
    with Gallery.open(home, db_url, index_kind=kind) as gallery:  # the index file, loaded
        assert not gone & set(top_names(gallery, faces[:20]))
        assert gallery.check_index("t", "v1").healthy
        gallery.rebuild_index(EmbeddingSpace("t", "v1", DIM))
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == kind
        names = top_names(gallery, faces[:20])
        assert not gone & set(names) and names[10:] == [f"person-{i}" for i in range(10, 20)]


def test_auto_is_exact_below_the_threshold_and_approximate_above(tmp_path, gallery_data, db_url):
    assert resolve_kind("auto", 99_999) == "flat" and resolve_kind("auto", 100_000) == "ivf"
    assert resolve_kind("auto", 10, approximate_from=5) == "ivf" and resolve_kind("hnsw", 1) == "hnsw"
    with pytest.raises(ValueError):
        resolve_kind("lsh", 1)
    faces = gallery_data[0]
    home = tmp_path / "home"
    notices: list[str] = []
    with Gallery.open(home, db_url, approximate_from=1000, notify=notices.append) as gallery:
        assert gallery.index_kind == "auto"  # the default
        enrol_people(gallery, faces[:600])
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "flat"
        enrol_people(gallery, faces[600:1020], first=600)
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "flat"  # adding keeps the kind
        gallery.rebuild_index(EmbeddingSpace("t", "v1", DIM))  # a rebuild decides again: 1,020 faces >= 1,000
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "ivf"
        enrol_people(gallery, faces[1020:1030], first=1020)
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "ivf"
        assert top_names(gallery, faces[1025:1028]) == ["person-1025", "person-1026", "person-1027"]
    with Gallery.open(home, db_url, approximate_from=1000) as gallery:
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "ivf"
        for i in range(40):
            gallery.remove_person(f"person-{i}")
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "ivf"
    # A repair (here: a missing file) is a rebuild too: 990 faces are below the threshold again.
    (home / "index-t.jfidx").unlink()
    with Gallery.open(home, db_url, approximate_from=1000, notify=notices.append) as gallery:
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "flat"
    assert any("flat index" in notice for notice in notices)
    # An explicit kind wins over the file's.
    with Gallery.open(home, db_url, index_kind="ivf", notify=notices.append) as gallery:
        assert gallery.vectors(EmbeddingSpace("t", "v1", DIM)).kind == "ivf"
    assert "this gallery uses ivf" in notices[-1]


def test_fast_open_check_catches_an_index_with_other_ids(tmp_path, gallery_data, db_url):
    """Same generation, different faces: the id fingerprint on open sees it (full lists in check_index)."""
    home = tmp_path / "home"
    with Gallery.open(home, db_url) as gallery:
        enrol_people(gallery, gallery_data[0][:100])
    path = home / "index-t.jfidx"
    index = VectorIndex.load(path)
    index.remove([5])
    index.add(np.array([1_000]), gallery_data[0][5:6])
    index.save(path, generation=index.generation)
    notices: list[str] = []
    with Gallery.open(home, db_url, notify=notices.append) as gallery:
        assert not gallery.check_index("t", "v1").healthy
        assert top_names(gallery, gallery_data[0][5:6]) == ["person-5"]
        assert gallery.check_index("t", "v1").healthy
    assert any("disagreed with the database" in notice for notice in notices)


def test_search_names_its_candidates_by_primary_key(tmp_path, db_url):
    """``Gallery.search`` names its candidates with one ``people`` lookup by primary key per face (over 900 ids:
    in chunks on SQLite; a face deleted meanwhile: absent), never a scan of every person: as a join, PostgreSQL
    hashed the whole ``people`` table at every search while its statistics were stale (after a bulk import)."""
    from sqlalchemy import event

    vectors = unit(np.random.default_rng(3).standard_normal((1_000, DIM)))
    with Gallery.open(tmp_path / "home", db_url) as gallery:
        ids = gallery.add_faces(EmbeddingSpace("e", "v", DIM),
                                [NewFace(f"p{i}", vector, (0, 0, 1, 1), 1.0, f"/{i}.jpg", f"sha{i}")
                                 for i, vector in enumerate(vectors)])
        engine = gallery.store.engine
        statements: list[tuple[str, object]] = []

        def capture(_connection, _cursor, statement, parameters, _context, _executemany):
            statements.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            names = gallery._face_names(sorted(ids) + [10**6])
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        assert names == {face_id: f"p{i}" for i, face_id in enumerate(ids)}
        assert len(statements) == (1 if engine.dialect.name == "postgresql" else 2)
        explain = "EXPLAIN" if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN"
        with engine.connect() as connection:
            plan = "\n".join(" ".join(map(str, row)) for row in
                             connection.exec_driver_sql(f"{explain} {statements[0][0]}", statements[0][1]))
        assert "people" in plan and not re.search(r"(Seq Scan on|SCAN) people", plan), plan
        hits = gallery.search(EmbeddingSpace("e", "v", DIM), vectors[:3], top_k=2)
        assert [h[0].name for h in hits] == ["p0", "p1", "p2"]


def test_unknown_kind_is_refused(tmp_path, db_url):
    from index import GalleryError

    with pytest.raises(GalleryError, match="unknown index kind"):
        Gallery.open(tmp_path / "home", db_url, index_kind="lsh")


def test_run_p5_tiny(tmp_path):
    cache = ResultCache(tmp_path / "cache" / "detections-dlib-test.sqlite")
    vectors = unit(np.random.default_rng(3).standard_normal((40, 128)))
    for i in range(20):  # two faces per image, as the detection cache stores them
        cache.put(f"key-{i}", [{"box": [0, 0, 1, 1], "score": 1.0}] * 2, vectors[2 * i:2 * i + 2])
    cache.close()
    real, sources = real_embeddings(tmp_path / "cache")
    assert real.shape == (40, 128) and sources == ["detections-dlib-test.sqlite"]
    stages = []
    ctx = BenchContext(lfw_root=tmp_path, cache_dir=tmp_path / "cache", limit=1,
                       progress=lambda stage, done, total: stages.append(stage))
    result = run_p5(ctx, tmp_path / "out", sizes=(2_000,), approximate_from=1_000)
    assert result["protocol"] == "P5" and result["config"]["real_embeddings"] == 40
    assert result["config"]["faiss_threads"] >= 1 and result["config"]["notes"] == []
    figures = result["figures"]
    assert set(figures) == {"2,000 flat", "2,000 ivf", "2,000 hnsw", "2,000 gallery (ivf, auto)"}
    for kind in KINDS:
        row = figures[f"2,000 {kind}"]
        for key in ("latency_p50_ms", "latency_p99_ms", "batch_queries_per_s", "recall@1", "recall@10",
                    "memory_bytes", "build_s"):
            assert row[key] >= 0, (kind, key)
        assert row["recall@1"] >= 0.9
    gallery = figures["2,000 gallery (ivf, auto)"]
    assert gallery["index_kind"] == gallery["kind_after_enrol"] == "ivf"
    for key in ("enrol_faces_per_s", "reopen_s", "rebuild_s", "bulk_sql_load_s", "gallery_search_p50_ms"):
        assert gallery[key] > 0, key
    text = markdown_for(result)
    assert text.startswith("## P5") and "2,000 ivf" in text and "reopen s" in text and "Subset run" in text
    assert stages and not list((tmp_path / "cache").glob("jointface-p5-*"))  # temporary galleries removed


def test_p5_without_cached_embeddings_says_so(tmp_path):
    real, sources = real_embeddings(tmp_path)
    assert real.shape == (0, 128) and sources == []
