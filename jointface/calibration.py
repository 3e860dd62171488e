"""Open-set calibration arithmetic: FPIR and TPIR at a threshold, the threshold for a target FPIR.

Core code (``service.calibrate``) and the benchmarks share these; the
benchmarks build their reports on top of them (``jointface.bench.metrics``).
"""

from __future__ import annotations

import numpy as np


def _score_array(scores, name: str) -> np.ndarray:
    """1-D float64 array; NaN allowed (no score), +-inf refused."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if np.isinf(array).any():
        raise ValueError(f"{name} contains infinite values; use NaN for 'no score'")
    return array


def _denominator(scores: np.ndarray, n_total: int | None, name: str) -> int:
    if n_total is None:
        return len(scores)
    if n_total < len(scores):
        raise ValueError(f"n_total ({n_total}) is smaller than the number of {name} ({len(scores)})")
    return int(n_total)


def _check_rate(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {value}")
    return value


def fpir_at_threshold(nonmated_best_scores, t: float, n_total: int | None = None) -> float:
    """False positive identification rate: share of non-mated probes whose best score is >= t.

    A non-mated probe without a face (``NaN`` or not in the array but counted
    in ``n_total``) has no score and is never a false positive.
    """
    scores = _score_array(nonmated_best_scores, "nonmated_best_scores")
    n = _denominator(scores, n_total, "non-mated scores")
    if n == 0:
        return float("nan")
    return int(np.count_nonzero(scores >= t)) / n


def tpir_at_threshold(mated_rank1_correct, mated_rank1_scores, t: float, n_total: int | None = None) -> float:
    """True positive identification rate: share of mated probes whose rank-1 is the true person with score >= t.

    A mated probe without a face (``correct=False``, score ``NaN``, or left out
    of the arrays but counted in ``n_total``) is a miss.
    """
    correct = np.asarray(mated_rank1_correct, dtype=bool)
    scores = _score_array(mated_rank1_scores, "mated_rank1_scores")
    if correct.shape != scores.shape:
        raise ValueError(f"mated_rank1_correct {correct.shape} and mated_rank1_scores {scores.shape} differ")
    n = _denominator(scores, n_total, "mated scores")
    if n == 0:
        return float("nan")
    return int(np.count_nonzero(correct & (scores >= t))) / n


def threshold_for_fpir(nonmated_best_scores, target_fpir: float, n_total: int | None = None) -> float:
    """The smallest threshold whose FPIR is <= ``target_fpir``.

    Candidates are the sorted non-mated best scores themselves: a threshold
    equal to a score accepts that score and every score tied with it, so a run
    of ties is either all accepted or all rejected. The answer is

    * ``-inf`` when accepting every scored non-mated probe is already within
      the target (e.g. ``target_fpir=1``, or no probe has a score);
    * the smallest score ``s`` with ``FPIR(s) <= target`` otherwise;
    * the next float above the highest score (FPIR 0) when even the highest
      score's FPIR exceeds the target (target below ``1 / n``, or ties at the top).

    ``fpir_at_threshold(scores, threshold_for_fpir(scores, f), n) <= f`` always holds.
    """
    target_fpir = _check_rate(target_fpir, "target_fpir")
    scores = _score_array(nonmated_best_scores, "nonmated_best_scores")
    n = _denominator(scores, n_total, "non-mated scores")
    finite = np.sort(scores[~np.isnan(scores)])
    if n == 0 or len(finite) / n <= target_fpir:
        return float("-inf")
    # FPIR at threshold finite[i] is (number of scores >= finite[i]) / n.
    accepted = len(finite) - np.searchsorted(finite, finite, side="left")
    ok = accepted / n <= target_fpir
    if ok.any():
        return float(finite[np.argmax(ok)])
    return float(np.nextafter(finite[-1], np.inf))
