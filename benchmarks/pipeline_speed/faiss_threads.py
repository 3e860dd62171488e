"""Gallery search with one FAISS thread or two, by query batch size and gallery size (issue 15, ninth session).

P4's step profile charges the gallery search 0.5 ms per photo (about 4 ms per
batch of 8 photos, nine faces): far more than nine inner products against a
few thousand vectors. This times `Gallery.search` on flat galleries of random
unit vectors with FAISS's OpenMP pool at 1 and 2 threads, with the machine
quiet and with two busy processes beside it (what a server or a batch job
shares the cores with).

    python benchmarks/pipeline_speed/faiss_threads.py [--out faiss_threads.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np


def _busy(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def _time_searches(gallery, space, queries: np.ndarray, repeats: int) -> float:
    gallery.search(space, queries, top_k=1)
    start = time.perf_counter()
    for _ in range(repeats):
        gallery.search(space, queries, top_k=1)
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("faiss_threads.json"))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    import index.vectors
    from index.gallery import Gallery, NewFace
    from index.space import EmbeddingSpace

    index.vectors.ONE_THREAD_WORK = 0  # FAISS's threads as this script sets them, whatever the work

    space = EmbeddingSpace("bench", "v1", 128)
    rng = np.random.default_rng(0)
    rows = []
    for people in (1_400, 50_000):
        home = tempfile.mkdtemp(prefix="jointface-faiss-threads-")
        gallery = Gallery.open(home, index_kind="flat")
        vectors = rng.standard_normal((people, 128)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        gallery.add_faces(space, [NewFace(f"p{i}", vectors[i], (0, 0, 1, 1), 1.0, f"/x/{i}.jpg", f"{i:064x}")
                                  for i in range(people)])
        for load in ("quiet", "two busy processes"):
            stop = mp.Event()
            workers = [mp.Process(target=_busy, args=(stop,)) for _ in range(2 if load != "quiet" else 0)]
            for worker in workers:
                worker.start()
            try:
                for queries in (9, 36, 256):
                    batch = vectors[:queries] + 0.1 * rng.standard_normal((queries, 128)).astype(np.float32)
                    row = {"people": people, "load": load, "queries": queries}
                    for threads in (1, 2):
                        faiss.omp_set_num_threads(threads)
                        row[f"ms_{threads}_thread{'s' if threads > 1 else ''}"] = round(
                            _time_searches(gallery, space, batch, args.repeats), 3)
                    rows.append(row)
                    print(row)
            finally:
                stop.set()
                for worker in workers:
                    worker.join()
        gallery.close()
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
