"""P5 (``PROTOCOLS.md``): gallery search at 10k, 100k and 1M faces.

Vectors are the real dlib embeddings found in the benchmark's detection
caches (``detections-dlib-*.sqlite``, written by the P1-P3 runs), padded with
seeded random unit vectors up to each gallery size. The 1,000 queries are
real embeddings moved slightly (a random step of length ``QUERY_STEP``, then
renormalised), so each has a true near neighbour, as a probe of an enrolled
person does. Without cached embeddings everything is random (the queries are
then moved database vectors) and the result says so.

For each size and index kind (``flat`` exact, ``ivf``, ``hnsw``), on the bare
:class:`index.vectors.VectorIndex`: build time, single-query latency (p50,
p99, one query at a time), batch throughput (all queries in one call),
recall@1 and @10 against exact search, and index memory. Then, on a real
gallery on disk (SQLite + index, ``index_kind="auto"``): enrol throughput
through :meth:`index.Gallery.add_faces` into a gallery already holding N
faces (a sample of batches; the N faces themselves are bulk-inserted with
SQL, which is reported separately), search latency through
:meth:`index.Gallery.search`, and the time to reopen it (``Gallery.open``
plus the first search, page cache warm).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import insert

from index import Gallery
from index.gallery import NewFace
from index.space import EmbeddingSpace
from index.models import FaceRow, Person
from index.vectors import (AUTO_APPROXIMATE_FROM, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, VectorIndex,
                           ivf_lists, ivf_probes, resolve_kind)

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000,)  # with ctx.limit (CI)
DIM = 128  # dlib
QUERIES = 1_000
QUICK_QUERIES = 200
TOP_K = 10
QUERY_STEP = 0.3  # Euclidean length of the random step from a real embedding (dlib same-person: ~0.3-0.5)
KINDS = ("flat", "ivf", "hnsw")
HNSW_MAX_SIZE = 100_000  # HNSW's build is skipped above this: over 10 minutes on one thread at 1M
ENROL_BATCH = 1_000
ENROL_BATCHES = 5
QUICK_ENROL = (200, 2)  # batch size, batches with ctx.limit
GALLERY_SEARCH_QUERIES = 100
ENGINE_NAME, ENGINE_VERSION = "p5", "p5-v1"
SPACE = EmbeddingSpace(ENGINE_NAME, ENGINE_VERSION, DIM)


def real_embeddings(cache_dir: Path) -> tuple[np.ndarray, list[str]]:
    """Every cached dlib embedding (``(n, 128)`` float32, unit length) and the cache files read."""
    parts, sources = [], []
    for path in sorted(Path(cache_dir).glob("detections-dlib-*.sqlite")):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
                rows = db.execute("SELECT meta, data FROM results WHERE data IS NOT NULL ORDER BY key").fetchall()
        except sqlite3.Error:
            continue
        for meta, data in rows:
            vectors = np.frombuffer(data, dtype=np.float32)
            if len(json.loads(meta)) * DIM == vectors.size:
                parts.append(vectors.reshape(-1, DIM))
        sources.append(path.name)
    if not parts:
        return np.zeros((0, DIM), np.float32), sources
    embeddings = np.concatenate(parts)
    return _normalise(embeddings), sources


def _normalise(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)


def random_unit_vectors(count: int, seed: int) -> np.ndarray:
    return _normalise(np.random.default_rng(seed).standard_normal((count, DIM), dtype=np.float32))


def gallery_vectors(real: np.ndarray, size: int) -> np.ndarray:
    """The first ``size`` real embeddings, padded with random unit vectors (the same ones for every size)."""
    used = real[:size]
    return np.ascontiguousarray(np.concatenate([used, random_unit_vectors(size - len(used), seed=5)]))


def make_queries(real: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` queries near real embeddings (or near the random vectors when there are none), and their bases."""
    rng = np.random.default_rng(7)
    base = real if len(real) else random_unit_vectors(QUICK_SIZES[0], seed=5)  # = gallery_vectors' padding
    chosen = rng.choice(len(base), size=count, replace=len(base) < count)
    step = rng.standard_normal((count, DIM)).astype(np.float32)
    step *= QUERY_STEP / np.linalg.norm(step, axis=1, keepdims=True)
    return _normalise(base[chosen] + step), chosen


def build_index(kind: str, vectors: np.ndarray, ids: np.ndarray) -> VectorIndex:
    index = VectorIndex(SPACE, kind=kind)
    index.add(ids, vectors)
    return index


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of the exact top-``k`` ids that the approximate top-``k`` holds (k = 1: top hit equal)."""
    if k == 1:
        return float(np.mean(found[:, 0] == truth[:, 0]))
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth)]))


def single_query_latency_ms(search, queries: np.ndarray) -> np.ndarray:
    search(queries[:1])  # warm-up
    times = np.empty(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        search(queries[i:i + 1])
        times[i] = time.perf_counter() - start
    return times * 1e3


def measure_kind(index: VectorIndex, queries: np.ndarray, truth: np.ndarray | None) -> dict:
    latency = single_query_latency_ms(lambda q: index.search(q, TOP_K), queries)
    start = time.perf_counter()
    _, found = index.search(queries, TOP_K)
    batch_s = time.perf_counter() - start
    row = {"latency_p50_ms": float(np.percentile(latency, 50)), "latency_p99_ms": float(np.percentile(latency, 99)),
           "batch_queries_per_s": len(queries) / batch_s, "memory_bytes": index.memory_bytes()}
    if truth is not None:
        row["recall@1"] = recall_at(found, truth, 1)
        row["recall@10"] = recall_at(found, truth, TOP_K)
    return row, found


# -- a real gallery on disk ---------------------------------------------------------------


def bulk_load(gallery: Gallery, vectors: np.ndarray, chunk: int = 50_000) -> None:
    """Insert one person and one face per vector with plain SQL (fast), bumping the generation once.

    Ids 1..N. On PostgreSQL with COPY (then the id sequences moved past N
    and the tables analysed, as after any bulk import); elsewhere with
    multi-row INSERTs, ``chunk`` rows per statement batch.
    """
    if gallery.store.engine.dialect.name == "postgresql":
        _bulk_load_postgresql(gallery, vectors)
        return
    with gallery.locked(), gallery.store.session() as session:
        for start in range(0, len(vectors), chunk):
            part = vectors[start:start + chunk]
            names = [f"p5-{start + i:07d}" for i in range(len(part))]
            session.execute(insert(Person), [{"id": start + i + 1, "name": name, "meta": {}}
                                             for i, name in enumerate(names)])
            session.execute(insert(FaceRow), [
                {"id": start + i + 1, "person_id": start + i + 1, "engine": ENGINE_NAME,
                 "engine_version": ENGINE_VERSION, "dim": DIM, "embedding": vector.tobytes(),
                 "box_x1": 0.0, "box_y1": 0.0, "box_x2": 1.0, "box_y2": 1.0, "det_score": 1.0,
                 "source_path": f"/p5/{start + i}.jpg", "source_sha256": f"{start + i:064x}"}
                for i, vector in enumerate(part)])
        gallery.store.bump_generation(session, ENGINE_NAME)


def _bulk_load_postgresql(gallery: Gallery, vectors: np.ndarray) -> None:
    from datetime import datetime, timezone

    from psycopg.types.json import Jsonb

    now = datetime.now(timezone.utc)
    with gallery.locked(), gallery.store.session() as session:
        raw = session.connection().connection.driver_connection
        with raw.cursor() as cursor:
            with cursor.copy("COPY people (id, name, created_at, meta) FROM STDIN") as copy:
                for i in range(len(vectors)):
                    copy.write_row((i + 1, f"p5-{i:07d}", now, Jsonb({})))
            with cursor.copy("COPY faces (id, person_id, engine, engine_version, dim, embedding, box_x1, box_y1, "
                             "box_x2, box_y2, det_score, source_path, source_sha256, created_at) FROM STDIN") as copy:
                for i, vector in enumerate(vectors):
                    copy.write_row((i + 1, i + 1, ENGINE_NAME, ENGINE_VERSION, DIM, vector.tobytes(), 0.0, 0.0, 1.0,
                                    1.0, 1.0, f"/p5/{i}.jpg", f"{i:064x}", now))
            for table in ("people", "faces"):
                cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
        gallery.store.bump_generation(session, ENGINE_NAME)
    with gallery.store.engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE people")
        connection.exec_driver_sql("ANALYZE faces")
        connection.commit()


def measure_gallery(size: int, vectors: np.ndarray, queries: np.ndarray, work_dir: Path,
                    approximate_from: int, progress, enrol_batch: int = ENROL_BATCH,
                    enrol_batches: int = ENROL_BATCHES) -> dict:
    """Bulk load, rebuild, enrol a sample through ``add_faces``, search, reopen: one gallery of ``size``."""
    row: dict = {}
    with tempfile.TemporaryDirectory(prefix="jointface-p5-", dir=work_dir) as home:
        with Gallery.open(home, approximate_from=approximate_from) as gallery:
            start = time.perf_counter()
            bulk_load(gallery, vectors)
            row["bulk_sql_load_s"] = time.perf_counter() - start
            start = time.perf_counter()
            gallery.rebuild_index(SPACE)
            row["rebuild_s"] = time.perf_counter() - start
            index = gallery.vectors(SPACE)
            row["index_kind"] = index.kind
            if index.nlist is not None:
                row["ivf_nlist"], row["ivf_nprobe"] = index.nlist, int(index.index.nprobe)
            extra = random_unit_vectors(enrol_batch * enrol_batches, seed=11)
            batch_seconds = []
            for batch in range(enrol_batches):
                faces = [NewFace(person=f"p5-new-{batch}-{i}", embedding=vector, box=(0, 0, 1, 1), score=1.0,
                                 source_path=f"/p5/new-{batch}-{i}.jpg", source_sha256=f"new-{batch}-{i}")
                         for i, vector in enumerate(extra[batch * enrol_batch:(batch + 1) * enrol_batch])]
                start = time.perf_counter()
                gallery.add_faces(SPACE, faces)
                batch_seconds.append(time.perf_counter() - start)
                progress(f"P5 {size:,} enrol", batch + 1, enrol_batches)
            row["enrol_faces_per_s"] = enrol_batch * enrol_batches / sum(batch_seconds)
            row["enrol_batch_s_median"] = float(np.median(batch_seconds))
            row["kind_after_enrol"] = gallery.vectors(SPACE).kind
            latency = single_query_latency_ms(
                lambda q: gallery.search(SPACE, q, top_k=TOP_K),
                queries[:GALLERY_SEARCH_QUERIES])
            row["gallery_search_p50_ms"] = float(np.percentile(latency, 50))
            row["gallery_search_p99_ms"] = float(np.percentile(latency, 99))
            row["index_file_bytes"] = gallery.index_path(ENGINE_NAME).stat().st_size
        start = time.perf_counter()
        with Gallery.open(home, approximate_from=approximate_from) as gallery:
            opened = time.perf_counter()
            gallery.search(SPACE, queries[:1], top_k=TOP_K)
            row["reopen_s"] = time.perf_counter() - start
            row["reopen_first_search_s"] = time.perf_counter() - opened
    return row


# -- the protocol --------------------------------------------------------------------------


def run_p5(ctx, out_dir: Path | None = None, *, sizes=None, kinds=KINDS,
           approximate_from: int = AUTO_APPROXIMATE_FROM) -> dict:
    """P5 over ``sizes`` (default 10k, 100k, 1M; 10k only with ``ctx.limit``); see the module docstring."""
    sizes = tuple(sizes or (QUICK_SIZES if ctx.limit else SIZES))
    query_count = QUICK_QUERIES if ctx.limit else QUERIES
    enrol_batch, enrol_batches = QUICK_ENROL if ctx.limit else (ENROL_BATCH, ENROL_BATCHES)
    real, sources = real_embeddings(ctx.cache_dir)
    queries, _ = make_queries(real, query_count)
    notes = []
    if not len(real):
        notes.append("no cached dlib embeddings found: every vector is random, queries are moved database vectors")
    work_dir = Path(ctx.cache_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict] = {}
    skipped: list[str] = []
    for size in sizes:
        vectors = gallery_vectors(real, size)
        ids = np.arange(1, size + 1, dtype=np.int64)
        truth = None
        for kind in kinds:
            if kind == "hnsw" and size > HNSW_MAX_SIZE:
                skipped.append(f"hnsw at {size:,}")
                continue
            ctx.progress(f"P5 {size:,} {kind}", 0, 1)
            start = time.perf_counter()
            index = build_index(kind, vectors, ids)
            build_s = time.perf_counter() - start
            row, found = measure_kind(index, queries, truth)
            if kind == "flat":
                truth = found
                row["recall@1"] = row["recall@10"] = 1.0
            row = {"size": size, "kind": kind, "build_s": build_s, **row}
            if kind == "ivf":
                row["ivf_nlist"], row["ivf_nprobe"] = index.nlist, int(index.index.nprobe)
            if kind == "hnsw":
                row["hnsw"] = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
            figures[f"{size:,} {kind}"] = row
            del index
            ctx.progress(f"P5 {size:,} {kind}", 1, 1)
        auto_kind = resolve_kind("auto", size, approximate_from=approximate_from)
        gallery_row = measure_gallery(size, vectors, queries, work_dir, approximate_from, ctx.progress,
                                      enrol_batch, enrol_batches)
        figures[f"{size:,} gallery ({auto_kind}, auto)"] = {"size": size, "kind": gallery_row["index_kind"],
                                                           **gallery_row}
        del vectors
    return {
        "protocol": "P5",
        "figures": figures,
        "config": {
            "sizes": list(sizes), "queries": query_count, "top_k": TOP_K, "dim": DIM,
            "real_embeddings": int(len(real)), "real_embedding_sources": sources,
            "padding": "seeded random unit vectors (numpy default_rng(5), standard normal, normalised)",
            "query_construction": f"real embedding + random step of length {QUERY_STEP}, renormalised",
            "faiss_threads": faiss.omp_get_max_threads(), "faiss_version": faiss.__version__,
            "auto_approximate_from": approximate_from,
            "ivf_rule": {"nlist": "4*sqrt(N), at most N/39", "nprobe": "max(32, nlist/16)",
                         "nlist_at": {f"{s:,}": ivf_lists(s) for s in sizes},
                         "nprobe_at": {f"{s:,}": ivf_probes(ivf_lists(s)) for s in sizes}},
            "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH},
            "skipped": skipped, "hnsw_max_size": HNSW_MAX_SIZE,
            "enrol": f"Gallery.add_faces, {enrol_batches} batches of {enrol_batch} new faces into a gallery already "
                     "holding N (the N are bulk-inserted with SQL); each batch includes saving the index",
            "reopen": "Gallery.open + first Gallery.search, same process, page cache warm",
            "latency": "one query per call, after one warm-up query; gallery_search_* through Gallery.search "
                       f"(top {TOP_K} people, names from SQLite) on {GALLERY_SEARCH_QUERIES} queries",
            "notes": notes, "subset": ctx.limit,
        },
    }


# -- report --------------------------------------------------------------------------------


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def markdown_p5(result: dict) -> str:
    """Two tables: search per size and kind, then the real gallery on disk."""
    from .plots import markdown_table

    figures = result["figures"]
    config = result.get("config", {})
    search = {name: row for name, row in figures.items() if "gallery" not in name}
    gallery = {name: row for name, row in figures.items() if "gallery" in name}
    search_table = markdown_table(
        search, columns=["build_s", "latency_p50_ms", "latency_p99_ms", "batch_queries_per_s", "recall@1",
                         "recall@10", "memory_bytes"],
        formats={"build_s": "{:.1f}", "latency_p50_ms": "{:.3f}", "latency_p99_ms": "{:.3f}",
                 "batch_queries_per_s": "{:,.0f}", "recall@1": "{:.4f}", "recall@10": "{:.4f}", "memory_bytes": _mb},
        headers={"build_s": "build s", "latency_p50_ms": "p50 ms", "latency_p99_ms": "p99 ms",
                 "batch_queries_per_s": "batch q/s", "memory_bytes": "index MiB"},
        row_header="size, kind")
    gallery_table = markdown_table(
        gallery, columns=["bulk_sql_load_s", "rebuild_s", "enrol_faces_per_s", "gallery_search_p50_ms",
                          "gallery_search_p99_ms", "reopen_s", "index_file_bytes"],
        formats={"bulk_sql_load_s": "{:.1f}", "rebuild_s": "{:.1f}", "enrol_faces_per_s": "{:,.0f}",
                 "gallery_search_p50_ms": "{:.2f}", "gallery_search_p99_ms": "{:.2f}", "reopen_s": "{:.2f}",
                 "index_file_bytes": _mb},
        headers={"bulk_sql_load_s": "SQL bulk load s", "rebuild_s": "rebuild s", "enrol_faces_per_s": "enrol faces/s",
                 "gallery_search_p50_ms": "search p50 ms", "gallery_search_p99_ms": "search p99 ms",
                 "reopen_s": "reopen s", "index_file_bytes": "index file MiB"},
        row_header="gallery")
    lines = [
        "## P5", "",
        f"{config.get('queries')} queries, top {config.get('top_k')}, {config.get('real_embeddings')} real dlib "
        f"embeddings padded with random unit vectors; {config.get('faiss_threads')} FAISS thread(s). Recall is "
        "against exact (flat) search.", "",
        search_table,
        f"Gallery on disk (`index_kind=\"auto\"`: exact below {config.get('auto_approximate_from', 0):,} faces). "
        f"Enrol: {config.get('enrol', '')}. Reopen: {config.get('reopen', '')}.", "",
        gallery_table,
    ]
    for note in config.get("notes", []) + [f"skipped: {item}" for item in config.get("skipped", [])]:
        lines.append(f"- {note}")
    if config.get("subset"):
        lines.append(f"\nSubset run: {config['subset']} (not the full protocol).")
    return "\n".join(lines) + "\n"
