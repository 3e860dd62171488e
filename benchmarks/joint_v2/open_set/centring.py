"""Issue 15: does centring the embeddings lift the joint network's open-set figure (P2 TPIR at FPIR 0.01)?

    python benchmarks/joint_v2/open_set/centring.py WEIGHTS [--engine ENGINE] [--cache DIR] [--out DIR]

P2 exactly as `jointface bench p2` reads it (PROTOCOLS.md: 1,369 people enrolled with their first LFW image,
2,370 mated and 4,069 non-mated probes, each image's highest-confidence face), but the embeddings are kept,
so the scores can be recomputed with every embedding centred before the cosine:

* ``raw``: the cosine of the engine's unit embeddings (what the gallery does);
* ``centred, gallery mean``: minus the mean embedding of the enrolled faces (known at enrolment);
* ``centred, training mean``: minus the mean embedding of LFW P1 training photos (people P2 never uses:
  a mean a weights file could carry);
* ``whitened, ...``: centred, then PCA-whitened with the covariance of those photos (eigenvalues shrunk
  towards their mean by ``SHRINK`` times it, since 1,000 or 1,369 faces estimate a 128-d covariance
  poorly): every direction of the embedding counts alike, as retrieval systems often do.

It also prints how many dimensions the embeddings use (participation ratio of the covariance's eigenvalues,
``(sum l)^2 / sum l^2``: 128 if all count alike, 1 if one does).

Why: the network learns to match the teacher minus its mean; when its embeddings of never-seen people share a
common direction, every impostor scores high and the threshold at FPIR 0.01 sits above most genuine scores.
Embeddings are cached (``--cache``, one ``.npz`` per engine and weights) so the arms cost one pass.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from jointface.bench import metrics
from jointface.bench.common import best_face
from jointface.datasets.protocols import default_shared_data, p1_split, p2_split
from jointface.engines import get_engine
from jointface.imageio import load_image

TRAINING_MEAN_PHOTOS = 1000
SHRINK = 0.5


def embed(engine, paths: list[Path], label: str) -> np.ndarray:
    """``(N, D)`` unit embeddings of each photo's best face (a row of NaN: no face)."""
    rows = []
    for count, path in enumerate(paths, 1):
        face = best_face(engine.detect(load_image(path)))
        rows.append(np.asarray(face.embedding, dtype=np.float32) if face is not None else None)
        if count % 500 == 0 or count == len(paths):
            print(f"{label}: {count}/{len(paths)}", file=sys.stderr, flush=True)
    dim = next(len(r) for r in rows if r is not None)
    return np.stack([r if r is not None else np.full(dim, np.nan, dtype=np.float32) for r in rows])


def candidates(probes: np.ndarray, gallery: np.ndarray, people: list[str], top_k: int = 5) -> list:
    """Per probe the top ``top_k`` ``(person, cosine)`` (``None`` for a probe without a face)."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    found = ~np.isnan(gallery).any(1)
    sims = unit(np.nan_to_num(probes)) @ unit(gallery[found]).T
    return top_candidates(sims, probes, [p for p, ok in zip(people, found) if ok], top_k)


def top_candidates(scores: np.ndarray, probes: np.ndarray, names: list[str], top_k: int = 5) -> list:
    """Per probe (a row of ``scores`` against the gallery's ``names``) its top ``top_k`` ``(person, score)``;
    ``None`` for a probe without a face (a NaN row of ``probes``)."""
    out = []
    for row, probe in zip(scores, probes):
        if np.isnan(probe).any():
            out.append(None)
            continue
        best = np.argsort(-row)[:top_k]
        out.append([(names[i], float(row[i])) for i in best])
    return out


def whitening(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, W)``: ``(x - mean) @ W`` whitens ``embeddings`` (eigenvalues shrunk, see ``SHRINK``)."""
    mean = embeddings.mean(0)
    values, vectors = np.linalg.eigh(np.cov((embeddings - mean).T))
    values = np.maximum(values, 0) + SHRINK * values.mean()
    return mean, (vectors / np.sqrt(values)) @ vectors.T


def participation(embeddings: np.ndarray) -> float:
    values = np.maximum(np.linalg.eigvalsh(np.cov((embeddings - embeddings.mean(0)).T)), 0)
    return float(values.sum() ** 2 / (values ** 2).sum())


def p2_embeddings(engine_name: str, weights: Path, cache_dir: Path) -> dict:
    """P2's embeddings as ``jointface bench p2`` reads them (``gallery``, ``mated``, ``nonmated``, plus
    ``train``: the first ``TRAINING_MEAN_PHOTOS`` LFW P1 training photos), each image's best face (NaN rows:
    no face), with ``people`` (the gallery's names), ``labels`` (the mated probes' people) and ``digest``
    (the weights' sha256, 12 digits). Cached in ``cache_dir``, one ``.npz`` per engine and weights."""
    lfw = default_shared_data() / "lfw"
    split = p2_split(lfw)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    cache = cache_dir / f"{engine_name}-{digest}.npz"
    if cache.exists():
        stored = np.load(cache)
        arrays = {k: stored[k] for k in ("gallery", "mated", "nonmated", "train")}
    else:
        engine = get_engine(f"{engine_name}@{weights}")
        training = list(p1_split(lfw).train)[:TRAINING_MEAN_PHOTOS]
        arrays = {"gallery": embed(engine, [i.path for i in split.gallery], "gallery"),
                  "mated": embed(engine, [i.path for i in split.mated], "mated"),
                  "nonmated": embed(engine, [i.path for i in split.nonmated], "non-mated"),
                  "train": embed(engine, [i.path for i in training], "P1 training")}
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **arrays)
    return {**arrays, "people": [i.person for i in split.gallery], "labels": [i.person for i in split.mated],
            "digest": digest}


def p2_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of a script that rescores P2's cached embeddings: weights, ``--engine``, ``--cache``,
    ``--out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("weights")
    parser.add_argument("--engine", default="jointface", help="engine family (the weights are given with @)")
    parser.add_argument("--cache", default="runs/open_set")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = p2_arguments(__doc__.splitlines()[0]).parse_args(argv)
    weights = Path(args.weights)
    p2 = p2_embeddings(args.engine, weights, Path(args.cache))
    gallery, mated, nonmated, train = (p2[k] for k in ("gallery", "mated", "nonmated", "train"))
    people, labels, digest = p2["people"], p2["labels"], p2["digest"]
    found = lambda x: x[~np.isnan(x).any(1)]  # noqa: E731
    identity = np.eye(gallery.shape[1], dtype=np.float32)
    arms = {"raw": (np.zeros(gallery.shape[1], dtype=np.float32), identity),
            "centred, gallery mean": (np.nanmean(gallery, axis=0), identity),
            "centred, training mean": (np.nanmean(train, axis=0), identity),
            "whitened, gallery": whitening(found(gallery)),
            "whitened, training": whitening(found(train))}
    rows = {}
    for name, (mean, transform) in arms.items():
        move = lambda x: (x - mean) @ transform  # noqa: E731
        report = metrics.identification_report(candidates(move(mated), move(gallery), people), labels,
                                               candidates(move(nonmated), move(gallery), people))
        rows[name] = {k: report[k] for k in ("rank1", "rank5", "tpir@fpir=0.01", "tpir@fpir=0.1",
                                             "threshold@fpir=0.01")}
        rows[name]["mean_norm"] = float(np.linalg.norm(mean))
    dimensions = {name: participation(found(x)) for name, x in (("gallery", gallery), ("training", train))}
    result = {"weights": str(weights), "sha256_12": digest, "engine": args.engine, "arms": rows,
              "participation_ratio": dimensions, "shrink": SHRINK}
    lines = [f"## P2 with centred embeddings: {args.engine}@{weights.name} ({digest})", "",
             "| scores | rank-1 | rank-5 | TPIR @ FPIR 0.01 | TPIR @ FPIR 0.1 | threshold @ 0.01 | norm of the mean |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['rank1']:.2%} | {row['rank5']:.2%} | {row['tpir@fpir=0.01']:.2%} | "
                     f"{row['tpir@fpir=0.1']:.2%} | {row['threshold@fpir=0.01']:.3f} | {row['mean_norm']:.3f} |")
    lines += ["", f"Dimensions used (participation ratio of {gallery.shape[1]}): gallery {dimensions['gallery']:.1f}, "
                  f"training photos {dimensions['training']:.1f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    tag = f"{args.engine}-{digest}"
    (out / f"centring-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"centring-{tag}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
