"""Benchmark metrics, pure numpy.

Conventions (shared by every function here):

* **Scores are similarities: higher = more alike.** Callers with distances
  pass ``-distance`` (and negate thresholds back when reporting them).
* A score is *accepted* by a threshold ``t`` when ``score >= t``.
* **Identification candidates.** For each probe, its gallery candidates are a
  sequence of ``(label, score)`` pairs sorted best-first (non-increasing
  score), or ``None`` when no face was found in the probe. An empty sequence
  (a face, but no candidate returned) is treated like ``None``.
* **No face.** A probe without a face keeps its place in every denominator:

  - a mated probe without a face is a miss at every rank and never a true
    positive (it counts in CMC and TPIR denominators);
  - a non-mated probe without a face has no score (``NaN``) and is never a
    false positive (it counts in the FPIR denominator).

* **Per-probe score arrays** hold one entry per probe with ``NaN`` where the
  probe has no score. Functions that take them also accept ``n_total``: the
  number of probes when the array holds only the probes that have a score
  (the missing ones count as ``NaN``). ``n_total`` defaults to the array length.
* Ranks are 1-based; a mated probe whose true person is not among its
  candidates (or that has no face) has rank ``inf``.
* Boxes are ``(x1, y1, x2, y2)`` pixels with x2/y2 exclusive (as in
  :class:`jointface.engines.base.Face`): area = ``(x2 - x1) * (y2 - y1)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple, Optional

import numpy as np

from jointface.calibration import (_denominator, _score_array, fpir_at_threshold,  # noqa: F401  (re-exported)
                                   threshold_for_fpir, tpir_at_threshold)

#: One probe's candidates: ``[(label, score), ...]`` best-first, or ``None`` (no face).
Candidates = Optional[Sequence[tuple[Hashable, float]]]


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_candidates(candidates: Candidates, probe_index: int) -> Sequence[tuple[Hashable, float]]:
    if candidates is None:
        return ()
    previous = np.inf
    for label, score in candidates:
        score = float(score)
        if np.isnan(score) or score > previous:
            raise ValueError(
                f"probe {probe_index}: candidates must be (label, score) sorted best-first "
                f"(non-increasing, finite scores); got {list(candidates)!r}"
            )
        previous = score
    return candidates


# --------------------------------------------------------------------------
# Closed-set figures: top-1 accuracy, ranks, CMC
# --------------------------------------------------------------------------


def top1_accuracy(predicted_labels: Sequence[Hashable | None], true_labels: Sequence[Hashable]) -> float:
    """Share of probes whose predicted label equals the true one (``None`` = no face = wrong)."""
    if len(predicted_labels) != len(true_labels):
        raise ValueError(f"{len(predicted_labels)} predictions for {len(true_labels)} labels")
    if not true_labels:
        return float("nan")
    hits = sum(1 for p, t in zip(predicted_labels, true_labels) if p is not None and p == t)
    return hits / len(true_labels)


def mated_ranks(candidate_lists: Sequence[Candidates], true_labels: Sequence[Hashable]) -> np.ndarray:
    """1-based rank of the true person in each mated probe's candidates (``inf`` = not found / no face).

    With several candidates of the same person (several gallery images), the
    first one counts.
    """
    if len(candidate_lists) != len(true_labels):
        raise ValueError(f"{len(candidate_lists)} candidate lists for {len(true_labels)} labels")
    ranks = np.full(len(true_labels), np.inf)
    for index, (candidates, truth) in enumerate(zip(candidate_lists, true_labels)):
        for position, (label, _score) in enumerate(_check_candidates(candidates, index)):
            if label == truth:
                ranks[index] = position + 1
                break
    return ranks


def cmc_curve(
    candidate_lists: Sequence[Candidates],
    true_labels: Sequence[Hashable],
    max_rank: int | None = None,
) -> np.ndarray:
    """Cumulative match characteristic: ``curve[k - 1]`` = share of mated probes found at rank <= k.

    ``max_rank`` defaults to the longest candidate list (at least 1). The
    denominator is every mated probe, including those without a face.
    """
    ranks = mated_ranks(candidate_lists, true_labels)
    if max_rank is None:
        max_rank = max([len(c) for c in candidate_lists if c is not None] + [1])
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if len(ranks) == 0:
        return np.full(max_rank, np.nan)
    k = np.arange(1, max_rank + 1)
    return (ranks[None, :] <= k[:, None]).mean(axis=1)


def cmc(
    candidate_lists: Sequence[Candidates],
    true_labels: Sequence[Hashable],
    ranks: Sequence[int] = (1, 5),
) -> dict[int, float]:
    """CMC at chosen ranks: ``{rank: identification rate}`` (e.g. rank-1 and rank-5)."""
    curve = cmc_curve(candidate_lists, true_labels, max_rank=max(ranks))
    return {int(r): float(curve[r - 1]) for r in ranks}


# --------------------------------------------------------------------------
# Open-set figures: FPIR, TPIR, DET
# --------------------------------------------------------------------------


def best_scores(candidate_lists: Sequence[Candidates]) -> np.ndarray:
    """Each probe's best (first) candidate score; ``NaN`` for a probe without a face or candidates.

    Applied to non-mated probes this gives the ``nonmated_best_scores`` below.
    """
    out = np.full(len(candidate_lists), np.nan)
    for index, candidates in enumerate(candidate_lists):
        candidates = _check_candidates(candidates, index)
        if len(candidates):
            out[index] = float(candidates[0][1])
    return out


def mated_rank1(
    candidate_lists: Sequence[Candidates], true_labels: Sequence[Hashable]
) -> tuple[np.ndarray, np.ndarray]:
    """For mated probes: ``(rank1_correct bool array, rank1_scores float array)``.

    ``rank1_correct[i]`` is true when probe i's first candidate is its true
    person; ``rank1_scores[i]`` is that candidate's score (``NaN`` without a face).
    """
    if len(candidate_lists) != len(true_labels):
        raise ValueError(f"{len(candidate_lists)} candidate lists for {len(true_labels)} labels")
    scores = best_scores(candidate_lists)
    correct = np.array(
        [bool(c) and c[0][0] == truth for c, truth in zip(candidate_lists, true_labels)], dtype=bool
    )
    return correct, scores


class OperatingPoint(NamedTuple):
    """An open-set operating point: rates at one threshold."""

    tpir: float
    fpir: float
    threshold: float


def tpir_at_fpir(
    mated_rank1_correct,
    mated_rank1_scores,
    nonmated_best_scores,
    target_fpir: float,
    *,
    n_mated: int | None = None,
    n_nonmated: int | None = None,
) -> OperatingPoint:
    """TPIR at the threshold :func:`threshold_for_fpir` picks for ``target_fpir``.

    Returns ``(tpir, fpir actually reached, threshold)``; the reached FPIR is
    <= the target (smaller when ties or few probes make the target unreachable exactly).
    """
    t = threshold_for_fpir(nonmated_best_scores, target_fpir, n_nonmated)
    return OperatingPoint(
        tpir=tpir_at_threshold(mated_rank1_correct, mated_rank1_scores, t, n_mated),
        fpir=fpir_at_threshold(nonmated_best_scores, t, n_nonmated),
        threshold=t,
    )


class DetCurve(NamedTuple):
    fpir: np.ndarray
    fnir: np.ndarray
    thresholds: np.ndarray


def det_curve(
    mated_rank1_correct,
    mated_rank1_scores,
    nonmated_best_scores,
    *,
    n_mated: int | None = None,
    n_nonmated: int | None = None,
    return_thresholds: bool = False,
):
    """DET curve of an open-set search: ``(fpir, fnir)`` arrays (FNIR = 1 - TPIR).

    One point per distinct finite score of the non-mated probes and of the
    correct mated rank-1 candidates (the only places the rates change), in
    increasing threshold order, plus a last point just above the highest score
    (FPIR 0). Along the arrays FPIR never increases and FNIR never decreases.
    With ``return_thresholds`` a :class:`DetCurve` ``(fpir, fnir, thresholds)``
    is returned instead.
    """
    correct = np.asarray(mated_rank1_correct, dtype=bool)
    mated = _score_array(mated_rank1_scores, "mated_rank1_scores")
    nonmated = _score_array(nonmated_best_scores, "nonmated_best_scores")
    if correct.shape != mated.shape:
        raise ValueError(f"mated_rank1_correct {correct.shape} and mated_rank1_scores {mated.shape} differ")
    n_m = _denominator(mated, n_mated, "mated scores")
    n_n = _denominator(nonmated, n_nonmated, "non-mated scores")
    if n_m == 0 or n_n == 0:
        raise ValueError("a DET curve needs at least one mated and one non-mated probe")

    true_hits = np.sort(mated[correct & ~np.isnan(mated)])
    false_hits = np.sort(nonmated[~np.isnan(nonmated)])
    thresholds = np.unique(np.concatenate([true_hits, false_hits]))
    top = thresholds[-1] if len(thresholds) else 0.0
    thresholds = np.append(thresholds, np.nextafter(top, np.inf))

    fpir = (len(false_hits) - np.searchsorted(false_hits, thresholds, side="left")) / n_n
    tpir = (len(true_hits) - np.searchsorted(true_hits, thresholds, side="left")) / n_m
    fnir = 1.0 - tpir
    if return_thresholds:
        return DetCurve(fpir=fpir, fnir=fnir, thresholds=thresholds)
    return fpir, fnir


def identification_report(
    mated_candidates: Sequence[Candidates],
    mated_labels: Sequence[Hashable],
    nonmated_candidates: Sequence[Candidates],
    *,
    ranks: Sequence[int] = (1, 5),
    fpir_targets: Sequence[float] = (0.01, 0.1),
) -> dict[str, float]:
    """The P2 figures in one flat dict (for :func:`jointface.bench.plots.markdown_table`).

    Keys: ``rank1``, ``rank5``..., ``tpir@fpir=0.01``, ``threshold@fpir=0.01``,
    ``fpir@fpir=0.01`` (the FPIR actually reached)..., ``mated``, ``nonmated``,
    ``mated_no_face``, ``nonmated_no_face``.
    """
    report: dict[str, float] = {f"rank{r}": v for r, v in cmc(mated_candidates, mated_labels, ranks).items()}
    correct, scores = mated_rank1(mated_candidates, mated_labels)
    nonmated = best_scores(nonmated_candidates)
    for target in fpir_targets:
        point = tpir_at_fpir(correct, scores, nonmated, target)
        report[f"tpir@fpir={target:g}"] = point.tpir
        report[f"fpir@fpir={target:g}"] = point.fpir
        report[f"threshold@fpir={target:g}"] = point.threshold
    report["mated"] = len(mated_candidates)
    report["nonmated"] = len(nonmated_candidates)
    report["mated_no_face"] = sum(1 for c in mated_candidates if not c)
    report["nonmated_no_face"] = sum(1 for c in nonmated_candidates if not c)
    return report


# --------------------------------------------------------------------------
# Verification: 10-fold accuracy
# --------------------------------------------------------------------------


def best_verification_threshold(scores, same_flags) -> tuple[float, float]:
    """The threshold maximising accuracy of "same when score >= t": ``(threshold, accuracy)``.

    Candidates are the midpoints between consecutive distinct scores, plus
    ``-inf`` (everything "same") and ``+inf`` (everything "different"). On a
    tie in accuracy the smallest threshold wins.
    """
    scores = _score_array(scores, "scores")
    same = np.asarray(same_flags, dtype=bool)
    if same.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and same_flags {same.shape} differ")
    if np.isnan(scores).any():
        raise ValueError("verification scores must all be finite (score a pair without a face explicitly)")
    if len(scores) == 0:
        raise ValueError("no pairs to choose a threshold on")
    values, inverse = np.unique(scores, return_inverse=True)
    same_at = np.bincount(inverse, weights=same, minlength=len(values))
    diff_at = np.bincount(inverse, weights=~same, minlength=len(values))
    # Threshold j (0..len(values)) rejects values[:j]: those predicted "different".
    rejected_diff = np.concatenate([[0.0], np.cumsum(diff_at)])
    rejected_same = np.concatenate([[0.0], np.cumsum(same_at)])
    correct = rejected_diff + (same_at.sum() - rejected_same)
    j = int(np.argmax(correct))
    if j == 0:
        threshold = float("-inf")
    elif j == len(values):
        threshold = float("inf")
    else:
        threshold = float((values[j - 1] + values[j]) / 2.0)
    return threshold, float(correct[j] / len(scores))


def verification_accuracy_10fold(scores, same_flags, fold_ids) -> tuple[float, float, np.ndarray]:
    """Cross-validated verification accuracy (LFW View 2 style).

    For each fold f (in sorted order of ``fold_ids``; 10 for LFW) the
    threshold is chosen on the other folds with
    :func:`best_verification_threshold` and applied to fold f ("same" when
    ``score >= t``). Returns ``(mean accuracy, std of the fold accuracies
    (population std, ddof=0), thresholds per fold)``.
    """
    scores = _score_array(scores, "scores")
    same = np.asarray(same_flags, dtype=bool)
    folds = np.asarray(fold_ids)
    if not (scores.shape == same.shape == folds.shape):
        raise ValueError(f"scores {scores.shape}, same_flags {same.shape}, fold_ids {folds.shape} differ")
    fold_values = np.unique(folds)
    if len(fold_values) < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    accuracies, thresholds = [], []
    for fold in fold_values:
        test = folds == fold
        threshold, _ = best_verification_threshold(scores[~test], same[~test])
        predicted_same = scores[test] >= threshold
        accuracies.append(float(np.mean(predicted_same == same[test])))
        thresholds.append(threshold)
    accuracies_array = np.asarray(accuracies)
    return float(accuracies_array.mean()), float(accuracies_array.std()), np.asarray(thresholds)


# --------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------


def box_iou_np(boxes_a, boxes_b) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` boxes ``(x1, y1, x2, y2)`` -> ``(N, M)``.

    Boxes with non-positive width or height have area 0; two boxes whose
    union is 0 have IoU 0.
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    left_top = np.maximum(a[:, None, :2], b[None, :, :2])
    right_bottom = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(right_bottom - left_top, 0, None)
    intersection = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)
    return iou


class MeanIoU(NamedTuple):
    mean: float
    n_used: int
    n_no_detection: int
    n_no_reference: int


def mean_iou(predicted_boxes: Sequence, reference_boxes: Sequence) -> MeanIoU:
    """Mean IoU of paired boxes, over the images that have both a detection and a reference box.

    Each list holds one box ``(x1, y1, x2, y2)`` or ``None`` per image. Images
    with a ``None`` are left out of the mean and counted: ``n_no_reference``
    (no reference box, whether or not detected), ``n_no_detection`` (a
    reference box but no detection). The mean of no images is ``NaN``.
    """
    if len(predicted_boxes) != len(reference_boxes):
        raise ValueError(f"{len(predicted_boxes)} predicted boxes for {len(reference_boxes)} reference boxes")
    used_pred, used_ref = [], []
    no_detection = no_reference = 0
    for predicted, reference in zip(predicted_boxes, reference_boxes):
        if reference is None:
            no_reference += 1
        elif predicted is None:
            no_detection += 1
        else:
            used_pred.append(predicted)
            used_ref.append(reference)
    if not used_pred:
        return MeanIoU(float("nan"), 0, no_detection, no_reference)
    a = np.asarray(used_pred, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(used_ref, dtype=np.float64).reshape(-1, 4)
    ious = np.array([box_iou_np(a[i], b[i])[0, 0] for i in range(len(a))])
    return MeanIoU(float(ious.mean()), len(ious), no_detection, no_reference)
