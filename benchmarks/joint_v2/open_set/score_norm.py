"""Issue 15: does cohort score normalisation lift the joint network's open-set figure (P2 TPIR at FPIR 0.01)?

    python benchmarks/joint_v2/open_set/score_norm.py WEIGHTS [--engine ENGINE] [--cache DIR] [--out DIR]
                                                      [--aaf DIR] [--cohort N]

P2 exactly as ``jointface bench p2`` reads it (the embeddings of ``centring.py``, same cache), scored again
with the similarities normalised against a cohort of faces nobody in P2 has (All-Age-Faces photos, each a
different person, or LFW P1 training photos), as speaker and face verification do:

* ``T-norm`` (probe side): ``(s - mean_p) / std_p`` with the probe's similarities to the cohort: a probe
  that resembles everybody (a "hub") is trusted less. It does not change any probe's ranking, only which
  probes pass a threshold.
* ``Z-norm`` (gallery side): the same with each enrolled face's similarities to the cohort (a statistic the
  gallery could keep per face).
* ``S-norm``: the mean of both. ``AS-norm K``: the same, the statistics over each side's ``K`` most similar
  cohort faces only.

The sixth session showed that centring and whitening do not move the open-set figure (``centring.py``);
this asks whether the per-probe scale of the impostor scores does. The cohort's embeddings are cached
beside the P2 ones.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from centring import embed, p2_arguments, p2_embeddings, top_candidates  # noqa: E402 - the P2 embeddings, cached

from jointface.bench import metrics  # noqa: E402
from jointface.datasets.collections import read_all_age_faces  # noqa: E402
from jointface.engines import get_engine  # noqa: E402

COHORT = 2000


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cohort_stats(vectors: np.ndarray, cohort: np.ndarray, top_k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: mean and standard deviation of its cosine to the cohort (to its ``top_k`` nearest only)."""
    sims = unit(np.nan_to_num(vectors)) @ cohort.T
    if top_k:
        sims = -np.sort(-sims, axis=1)[:, :top_k]
    return sims.mean(1), np.maximum(sims.std(1), 1e-6)


def scored_candidates(probes: np.ndarray, gallery: np.ndarray, people: list[str], cohort: np.ndarray,
                      mode: str, top_k: int | None, k: int = 5) -> list:
    """Per probe its top ``k`` ``(person, normalised score)`` (``None`` without a face)."""
    found = ~np.isnan(gallery).any(1)
    g = unit(gallery[found])
    names = [p for p, ok in zip(people, found) if ok]
    sims = unit(np.nan_to_num(probes)) @ g.T
    if mode != "raw":
        mp, sp = cohort_stats(probes, cohort, top_k)
        mg, sg = cohort_stats(g, cohort, top_k)
        t = (sims - mp[:, None]) / sp[:, None]
        z = (sims - mg[None, :]) / sg[None, :]
        sims = {"T": t, "Z": z, "S": 0.5 * (t + z)}[mode]
    return top_candidates(sims, probes, names, k)


def main(argv: list[str] | None = None) -> int:
    parser = p2_arguments(__doc__.splitlines()[0])
    parser.add_argument("--aaf", default="runs/data/All-Age-Faces Dataset", help="All-Age-Faces folder (cohort)")
    parser.add_argument("--cohort", type=int, default=COHORT, help="All-Age-Faces photos in the cohort")
    args = parser.parse_args(argv)
    weights = Path(args.weights)
    p2 = p2_embeddings(args.engine, weights, Path(args.cache))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    cohort_cache = Path(args.cache) / f"{args.engine}-{digest}-aaf{args.cohort}.npz"
    if cohort_cache.exists():
        aaf = np.load(cohort_cache)["aaf"]
    else:
        photos = sorted(read_all_age_faces(Path(args.aaf)), key=lambda s: str(s.path))
        step = max(1, len(photos) // args.cohort)
        aaf = embed(get_engine(f"{args.engine}@{weights}"), [s.path for s in photos[::step][:args.cohort]],
                    "All-Age-Faces cohort")
        np.savez(cohort_cache, aaf=aaf)
    cohorts = {"All-Age-Faces": unit(aaf[~np.isnan(aaf).any(1)]),
               "LFW P1 training": unit(p2["train"][~np.isnan(p2["train"]).any(1)])}
    arms = [("raw", None, None)]
    for cohort in cohorts:
        arms += [(f"{mode}-norm, {cohort}", mode, (cohort, None)) for mode in "TZS"]
        arms += [(f"AS-norm {k}, {cohort}", "S", (cohort, k)) for k in (50, 200)]
    rows = {}
    for name, mode, spec in arms:
        cohort, top_k = spec if spec else (next(iter(cohorts)), None)
        score = lambda probes: scored_candidates(probes, p2["gallery"], p2["people"], cohorts[cohort],  # noqa
                                                 mode or "raw", top_k)
        report = metrics.identification_report(score(p2["mated"]), p2["labels"], score(p2["nonmated"]))
        rows[name] = {k: report[k] for k in ("rank1", "rank5", "tpir@fpir=0.01", "tpir@fpir=0.1")}
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    result = {"weights": str(weights), "sha256_12": digest, "engine": args.engine, "arms": rows,
              "cohort_faces": {name: len(c) for name, c in cohorts.items()}}
    lines = [f"## P2 with cohort-normalised scores: {args.engine}@{weights.name} ({digest})", "",
             "| scores | rank-1 | rank-5 | TPIR @ FPIR 0.01 | TPIR @ FPIR 0.1 |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['rank1']:.2%} | {row['rank5']:.2%} | {row['tpir@fpir=0.01']:.2%} | "
                     f"{row['tpir@fpir=0.1']:.2%} |")
    lines += ["", "Cohort faces: " + ", ".join(f"{n} {c}" for n, c in result["cohort_faces"].items()) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    tag = f"{args.engine}-{digest}"
    (Path(args.out) / f"score_norm-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (Path(args.out) / f"score_norm-{tag}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
