"""Open-set calibration arithmetic: FPIR and TPIR at a threshold, the threshold for a target FPIR.

Core code (``service.calibrate``) and the benchmarks share these; the
benchmarks build their reports on top of them (``jointface.bench.metrics``).
"""

from __future__ import annotations

import warnings

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


#: gallery sizes (people) at which P2 calibrates the joint engine's default threshold
GALLERY_SIZES = (2, 5, 10, 20, 50, 100, 200, 500, 1000)


def thresholds_by_gallery_size(nonmated_scores, target_fpir: float, sizes=GALLERY_SIZES, *, mated_scores=None,
                               mated_people=None, repeats: int = 20, seed: int = 0) -> list[dict]:
    """The threshold that keeps FPIR at ``target_fpir`` in galleries of each size, by subsampling one gallery.

    A stranger's best score grows with the number of people it is compared
    with, so one threshold cannot hold one FPIR for a gallery of 5 and of
    1,000 people. ``nonmated_scores`` is ``(strangers, people)``: each
    stranger's score against every person of a gallery (a row of NaN: no
    face, never a false positive). For each size ``n`` (and the full gallery),
    ``repeats`` random sets of ``n`` people; the threshold comes from the
    even-indexed strangers' best scores over all sets, and ``fpir_held_out``
    is measured on the odd-indexed ones (the calibration of P2 itself).

    With ``mated_scores`` (``(probes, people)``) and ``mated_people`` (each
    probe's person, a column index), ``tpir`` is the share of mated probes
    whose own person, in a set with ``n - 1`` others, ranks first at or above
    the threshold.

    Returns rows ``{"people", "threshold", "fpir_held_out", "tpir"}``.
    """
    nonmated = np.asarray(nonmated_scores, dtype=np.float64)
    if nonmated.ndim != 2 or nonmated.shape[1] < 1:
        raise ValueError(f"nonmated_scores must be (strangers, people), got shape {nonmated.shape}")
    people = nonmated.shape[1]
    rng = np.random.default_rng(seed)
    rows = []
    for size in sorted({int(s) for s in sizes if 0 < s < people} | {people}):
        draws = 1 if size == people else repeats
        subsets = [rng.choice(people, size=size, replace=False) for _ in range(draws)]
        with warnings.catch_warnings():  # a stranger without a face: an all-NaN row, best score NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            best = np.stack([np.nanmax(nonmated[:, subset], axis=1) for subset in subsets])
        threshold = threshold_for_fpir(best[:, 0::2].ravel(), target_fpir)
        row = {"people": size, "threshold": float(threshold),
               "fpir_held_out": fpir_at_threshold(best[:, 1::2].ravel(), threshold)}
        if mated_scores is not None:
            row["tpir"] = _tpir_in_subsets(np.asarray(mated_scores, dtype=np.float64),
                                           np.asarray(mated_people, dtype=np.int64), size, threshold, draws, rng)
        rows.append(row)
    return rows


def _tpir_in_subsets(mated: np.ndarray, own: np.ndarray, size: int, threshold: float, draws: int,
                     rng: np.random.Generator) -> float:
    """Share of mated probes ranked first at or above ``threshold`` among their person and ``size - 1`` others.

    Each draw takes ``size`` random people; a probe whose person is among them competes with the others, any
    other probe with the first ``size - 1`` of them.
    """
    people = mated.shape[1]
    own_score = mated[np.arange(len(own)), own]
    accepted = ~np.isnan(own_score) & (own_score >= threshold)
    hits = 0
    for _ in range(draws):
        subset = rng.choice(people, size=size, replace=False)
        rivals = mated[:, subset].copy()
        is_own = subset[None, :] == own[:, None]
        rivals[is_own] = -np.inf
        rivals[~is_own.any(axis=1), size - 1] = -np.inf  # the first size - 1 people are its rivals
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            best_rival = np.nanmax(rivals, axis=1) if size > 1 else np.full(len(own), -np.inf)
        hits += int(np.count_nonzero(accepted & ~(best_rival > own_score)))
    return hits / (draws * len(own)) if len(own) else float("nan")


def threshold_for_gallery(table: dict, people: int) -> float:
    """The threshold of a ``thresholds_by_gallery_size`` table (``{"people": [...], "threshold": [...]}``) for a
    gallery of ``people``, linear in log(people) between calibrated sizes; outside them, the nearest one's."""
    sizes = np.asarray(table["people"], dtype=np.float64)
    values = np.asarray(table["threshold"], dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0 or sizes.shape != values.shape or (np.diff(sizes) <= 0).any():
        raise ValueError("a gallery-size table needs increasing sizes, each with its threshold")
    return float(np.interp(np.log(max(int(people), 1)), np.log(sizes), values))
