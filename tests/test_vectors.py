"""Vector index: exact search, atomic save/load, damage detection, HNSW deletion."""

from __future__ import annotations

import numpy as np
import pytest

from index import EmbeddingSpace
from index.errors import IndexCorruptError
from index.vectors import VectorIndex


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_exact_search_finds_itself_and_remove_works():
    vectors = unit_vectors(200, 16, seed=0)
    index = VectorIndex(EmbeddingSpace("dlib", "v1", 16))
    ids = np.arange(1000, 1200)
    index.add(ids, vectors)
    sims, found = index.search(vectors[:5], k=3)
    assert (found[:, 0] == ids[:5]).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    index.remove([1000, 1001])
    _, found = index.search(vectors[:2], k=1)
    assert 1000 not in found and 1001 not in found
    assert len(index) == 198


def test_small_searches_run_on_one_faiss_thread_and_give_the_same_answers(monkeypatch):
    import faiss

    import index.vectors as vectors_module

    vectors = unit_vectors(500, 16, seed=4)
    index = VectorIndex(EmbeddingSpace("dlib", "v1", 16))
    index.add(np.arange(500), vectors)
    seen = []
    search = index.index.search
    monkeypatch.setattr(index.index, "search", lambda *a, **k: (seen.append(faiss.omp_get_max_threads()),
                                                               search(*a, **k))[1])
    threads = faiss.omp_get_max_threads()
    small = index.search(vectors[:9], k=5)  # 9 x 500 products: one thread
    monkeypatch.setattr(vectors_module, "ONE_THREAD_WORK", 0)  # every search as FAISS sets it
    as_set = index.search(vectors[:9], k=5)
    assert seen == [1, threads] and faiss.omp_get_max_threads() == threads  # restored after the search
    np.testing.assert_array_equal(small[1], as_set[1])
    np.testing.assert_allclose(small[0], as_set[0], atol=1e-6)


def test_search_pads_small_indexes():
    index = VectorIndex(EmbeddingSpace("dlib", "v1", 4))
    sims, ids = index.search(unit_vectors(2, 4, 1), k=3)
    assert ids.shape == (2, 3) and (ids == -1).all()
    index.add(np.array([7]), unit_vectors(1, 4, 2))
    sims, ids = index.search(unit_vectors(1, 4, 3), k=3)
    assert ids.tolist() == [[7, -1, -1]]


def test_save_load_roundtrip(tmp_path):
    index = VectorIndex(EmbeddingSpace("dlib", "v1", 8))
    index.add(np.arange(10), unit_vectors(10, 8, 0))
    index.save(tmp_path / "i.jfidx", generation=4)
    loaded = VectorIndex.load(tmp_path / "i.jfidx")
    assert loaded.generation == 4 and loaded.header.engine_version == "v1"
    assert loaded.ids().tolist() == list(range(10))
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty"])
def test_damaged_files_are_detected(tmp_path, damage):
    path = tmp_path / "i.jfidx"
    index = VectorIndex(EmbeddingSpace("dlib", "v1", 8))
    index.add(np.arange(50), unit_vectors(50, 8, 0))
    index.save(path, generation=1)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x00garbage" * 100)
    elif damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError):
        VectorIndex.load(path)


def test_hnsw_recall_against_exact_and_deletion(tmp_path):
    vectors = unit_vectors(5000, 32, seed=1)
    queries = unit_vectors(200, 32, seed=2)
    exact = VectorIndex(EmbeddingSpace("e", "v", 32), kind="flat")
    approx = VectorIndex(EmbeddingSpace("e", "v", 32), kind="hnsw")
    ids = np.arange(5000)
    exact.add(ids, vectors)
    approx.add(ids, vectors)
    _, exact_ids = exact.search(queries, 10)
    _, approx_ids = approx.search(queries, 10)
    recall_at_1 = np.mean(exact_ids[:, 0] == approx_ids[:, 0])
    recall_at_10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, approx_ids)])
    assert recall_at_1 >= 0.95 and recall_at_10 >= 0.9, (recall_at_1, recall_at_10)
    # Deleting (tombstones) removes ids from results, survives save/load.
    doomed = exact_ids[:, 0]
    approx.remove(doomed)
    approx.save(tmp_path / "h.jfidx", generation=2)
    reloaded = VectorIndex.load(tmp_path / "h.jfidx")
    _, after = reloaded.search(queries, 10)
    assert not np.isin(after, doomed).any()
    assert len(reloaded) == 5000 - len(set(doomed.tolist()))
