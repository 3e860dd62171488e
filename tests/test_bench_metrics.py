"""Benchmark metrics against small hand-built score tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jointface.bench import metrics
from jointface.bench.plots import markdown_table, plot_cmc, plot_det

NAN = float("nan")

# --------------------------------------------------------------------------
# The hand-built open-set table
# --------------------------------------------------------------------------
# Mated probes (true person, candidates best-first):
#   p0  A  [A 0.9, B 0.5]          rank 1, rank-1 correct, score 0.9
#   p1  B  [C 0.8, B 0.7]          rank 2, rank-1 wrong,   score 0.8
#   p2  C  [A 0.6, B 0.4, C 0.3]   rank 3, rank-1 wrong,   score 0.6
#   p3  D  None (no face)          miss at every rank
#   p4  A  [A 0.5, C 0.2]          rank 1, rank-1 correct, score 0.5
MATED_CANDIDATES = [
    [("A", 0.9), ("B", 0.5)],
    [("C", 0.8), ("B", 0.7)],
    [("A", 0.6), ("B", 0.4), ("C", 0.3)],
    None,
    [("A", 0.5), ("C", 0.2)],
]
MATED_LABELS = ["A", "B", "C", "D", "A"]

# Non-mated probes: best scores 0.7, 0.6, 0.6 (a tie), 0.2, and one without a face.
NONMATED_CANDIDATES = [
    [("A", 0.7), ("B", 0.1)],
    [("B", 0.6)],
    [("C", 0.6), ("A", 0.6)],
    [("D", 0.2)],
    None,
]
NONMATED_BEST = np.array([0.7, 0.6, 0.6, 0.2, NAN])


def test_ranks_and_cmc_count_no_face_as_miss():
    ranks = metrics.mated_ranks(MATED_CANDIDATES, MATED_LABELS)
    np.testing.assert_array_equal(ranks, [1, 2, 3, np.inf, 1])
    # rank<=1: p0, p4 -> 2/5; rank<=2: +p1 -> 3/5; rank<=3: +p2 -> 4/5; p3 never.
    np.testing.assert_allclose(metrics.cmc_curve(MATED_CANDIDATES, MATED_LABELS), [0.4, 0.6, 0.8])
    np.testing.assert_allclose(
        metrics.cmc_curve(MATED_CANDIDATES, MATED_LABELS, max_rank=5), [0.4, 0.6, 0.8, 0.8, 0.8]
    )
    assert metrics.cmc(MATED_CANDIDATES, MATED_LABELS, ranks=(1, 5)) == pytest.approx({1: 0.4, 5: 0.8})


def test_cmc_first_candidate_of_a_person_counts():
    # Gallery with several images per person: B appears at ranks 2 and 3; rank 2 counts.
    candidates = [[("A", 0.9), ("B", 0.8), ("B", 0.7)]]
    np.testing.assert_array_equal(metrics.mated_ranks(candidates, ["B"]), [2])


def test_candidates_must_be_sorted_best_first():
    with pytest.raises(ValueError, match="best-first"):
        metrics.mated_ranks([[("A", 0.1), ("B", 0.9)]], ["A"])
    # Equal scores are fine (a tie keeps the given order).
    np.testing.assert_array_equal(metrics.mated_ranks([[("A", 0.5), ("B", 0.5)]], ["B"]), [2])


def test_top1_accuracy_no_face_is_wrong():
    # A right, None (no face) wrong, B != C wrong -> 1/3.
    assert metrics.top1_accuracy(["A", None, "B"], ["A", "A", "C"]) == pytest.approx(1 / 3)


def test_best_scores_and_mated_rank1():
    np.testing.assert_array_equal(metrics.best_scores(NONMATED_CANDIDATES), NONMATED_BEST)
    correct, scores = metrics.mated_rank1(MATED_CANDIDATES, MATED_LABELS)
    np.testing.assert_array_equal(correct, [True, False, False, False, True])
    np.testing.assert_array_equal(scores, [0.9, 0.8, 0.6, NAN, 0.5])


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.6, 3 / 5),  # 0.7, 0.6, 0.6: a threshold equal to a tied score accepts both
        (0.65, 1 / 5),  # 0.7
        (0.8, 0.0),
        (0.2, 4 / 5),  # every scored probe; the no-face probe never counts
        (-1e9, 4 / 5),
    ],
)
def test_fpir_at_threshold(t, expected):
    assert metrics.fpir_at_threshold(NONMATED_BEST, t) == pytest.approx(expected)


def test_fpir_n_total_counts_probes_left_out():
    # Only the 4 scores passed, but 10 non-mated probes in all: FPIR(0.6) = 3/10.
    assert metrics.fpir_at_threshold([0.7, 0.6, 0.6, 0.2], 0.6, n_total=10) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="n_total"):
        metrics.fpir_at_threshold([0.7, 0.6], 0.6, n_total=1)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.7, 1 / 5),  # p0 (0.9)
        (0.5, 2 / 5),  # p0, p4 (0.5 >= 0.5); p1 scores 0.8 but its rank-1 is wrong
        (-1e9, 2 / 5),  # p3 without a face stays a miss in the denominator
        (0.95, 0.0),
    ],
)
def test_tpir_at_threshold(t, expected):
    correct, scores = metrics.mated_rank1(MATED_CANDIDATES, MATED_LABELS)
    assert metrics.tpir_at_threshold(correct, scores, t) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # Sorted scores 0.2, 0.6, 0.6, 0.7 have FPIR 4/5, 3/5, 3/5, 1/5 (n = 5).
        (0.5, 0.7),  # 0.6 would accept both tied 0.6 -> 3/5 > 0.5; 0.7 -> 1/5
        (0.6, 0.6),  # FPIR(0.6) = 3/5 <= 0.6 exactly
        (0.2, 0.7),  # FPIR(0.7) = 1/5 <= 0.2
        (0.8, -math.inf),  # accepting every scored probe is 4/5 <= 0.8
        (1.0, -math.inf),
    ],
)
def test_threshold_for_fpir(target, expected):
    t = metrics.threshold_for_fpir(NONMATED_BEST, target)
    assert t == expected
    assert metrics.fpir_at_threshold(NONMATED_BEST, t) <= target


@pytest.mark.parametrize("target", [0.0, 0.1])
def test_threshold_for_fpir_unreachable_goes_just_above_the_top(target):
    # Even 0.7 gives FPIR 1/5 > target: the threshold is the next float above 0.7 (FPIR 0).
    t = metrics.threshold_for_fpir(NONMATED_BEST, target)
    assert t == np.nextafter(0.7, np.inf)
    assert metrics.fpir_at_threshold(NONMATED_BEST, t) == 0.0


def test_threshold_for_fpir_ties_at_the_top():
    # Two probes tied at the top out of 4: FPIR(0.9) = 2/4. Target 0.25 cannot split the tie.
    scores = [0.9, 0.9, 0.1, 0.0]
    assert metrics.threshold_for_fpir(scores, 0.5) == 0.9
    assert metrics.threshold_for_fpir(scores, 0.25) == np.nextafter(0.9, np.inf)


def test_tpir_at_fpir():
    correct, scores = metrics.mated_rank1(MATED_CANDIDATES, MATED_LABELS)
    # target 0.5 -> t = 0.7 (above); TPIR(0.7) = 1/5, FPIR(0.7) = 1/5.
    point = metrics.tpir_at_fpir(correct, scores, NONMATED_BEST, 0.5)
    assert point == pytest.approx(metrics.OperatingPoint(tpir=0.2, fpir=0.2, threshold=0.7))
    # target 0.6 -> t = 0.6; TPIR(0.6): p0 only (p4 is 0.5) -> 1/5; FPIR 3/5.
    assert metrics.tpir_at_fpir(correct, scores, NONMATED_BEST, 0.6) == pytest.approx((0.2, 0.6, 0.6))


def test_distances_are_negated_by_the_caller():
    # Distances 0.3 (mated, correct) and 0.5, 0.4 (non-mated): similarity = -distance.
    # FPIR <= 0.5 over 2 non-mated: t = -0.4 accepts distance <= 0.4 -> FPIR 1/2, TPIR 1/1.
    point = metrics.tpir_at_fpir([True], [-0.3], [-0.5, -0.4], 0.5)
    assert point == pytest.approx((1.0, 0.5, -0.4))


def test_det_curve_by_hand():
    correct, scores = metrics.mated_rank1(MATED_CANDIDATES, MATED_LABELS)
    # Rates change at the correct rank-1 scores {0.5, 0.9} and non-mated {0.2, 0.6, 0.7}:
    #   t      0.2  0.5  0.6  0.7  0.9  >0.9
    #   FPIR   4/5  3/5  3/5  1/5  0    0
    #   TPIR   2/5  2/5  1/5  1/5  1/5  0      FNIR = 1 - TPIR
    curve = metrics.det_curve(correct, scores, NONMATED_BEST, return_thresholds=True)
    np.testing.assert_allclose(curve.fpir, [0.8, 0.6, 0.6, 0.2, 0.0, 0.0])
    np.testing.assert_allclose(curve.fnir, [0.6, 0.6, 0.8, 0.8, 0.8, 1.0])
    np.testing.assert_allclose(curve.thresholds[:-1], [0.2, 0.5, 0.6, 0.7, 0.9])
    assert curve.thresholds[-1] > 0.9
    fpir, fnir = metrics.det_curve(correct, scores, NONMATED_BEST)
    np.testing.assert_array_equal(fpir, curve.fpir)


def test_det_curve_is_monotone_and_agrees_with_point_rates():
    rng = np.random.default_rng(0)
    n_mated, n_nonmated = 300, 400
    correct = rng.random(n_mated) < 0.8
    mated_scores = np.round(rng.normal(0.7, 0.15, n_mated), 2)  # rounding makes ties
    mated_scores[rng.random(n_mated) < 0.02] = np.nan  # no face
    correct[np.isnan(mated_scores)] = False
    nonmated = np.round(rng.normal(0.3, 0.15, n_nonmated), 2)
    nonmated[rng.random(n_nonmated) < 0.02] = np.nan
    curve = metrics.det_curve(correct, mated_scores, nonmated, return_thresholds=True)
    assert np.all(np.diff(curve.fpir) <= 0)
    assert np.all(np.diff(curve.fnir) >= 0)
    assert curve.fpir[-1] == 0.0 and curve.fnir[-1] == 1.0
    for i in range(0, len(curve.thresholds), 7):
        t = curve.thresholds[i]
        assert curve.fpir[i] == pytest.approx(metrics.fpir_at_threshold(nonmated, t))
        assert curve.fnir[i] == pytest.approx(1 - metrics.tpir_at_threshold(correct, mated_scores, t))
    for target in (0.01, 0.1):
        t = metrics.threshold_for_fpir(nonmated, target)
        assert metrics.fpir_at_threshold(nonmated, t) <= target
        # The next smaller distinct score would break the target: t is the smallest.
        smaller = np.unique(nonmated[~np.isnan(nonmated) & (nonmated < t)])
        if len(smaller):
            assert metrics.fpir_at_threshold(nonmated, smaller[-1]) > target


def test_identification_report():
    report = metrics.identification_report(
        MATED_CANDIDATES, MATED_LABELS, NONMATED_CANDIDATES, fpir_targets=(0.5,)
    )
    assert report["rank1"] == pytest.approx(0.4)
    assert report["rank5"] == pytest.approx(0.8)
    assert report["tpir@fpir=0.5"] == pytest.approx(0.2)
    assert report["threshold@fpir=0.5"] == pytest.approx(0.7)
    assert report["fpir@fpir=0.5"] == pytest.approx(0.2)
    assert (report["mated"], report["nonmated"]) == (5, 5)
    assert (report["mated_no_face"], report["nonmated_no_face"]) == (1, 1)


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def test_best_verification_threshold_by_hand():
    # Sorted: 0.1 diff, 0.35 same, 0.4 diff, 0.8 same (4 pairs).
    #   t=-inf: all "same" -> 2 right; t=0.225 -> 3; t=0.375 -> 2; t=0.6 -> 3; t=+inf -> 2.
    # 0.225 and 0.6 tie at 3/4: the smaller wins.
    t, accuracy = metrics.best_verification_threshold([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    assert t == pytest.approx(0.225)
    assert accuracy == pytest.approx(0.75)


def _ten_fold_table():
    # Folds 0-8: same 0.9, 0.8; different 0.2, 0.1 (separable).
    # Fold 9:    same 0.9, 0.3; different 0.2, 0.6.
    scores, same, folds = [], [], []
    for fold in range(10):
        rows = [(0.9, True), (0.8, True), (0.2, False), (0.1, False)]
        if fold == 9:
            rows = [(0.9, True), (0.3, True), (0.2, False), (0.6, False)]
        for score, flag in rows:
            scores.append(score)
            same.append(flag)
            folds.append(fold)
    return np.array(scores), np.array(same), np.array(folds)


def test_verification_accuracy_10fold_by_hand():
    # Test fold f in 0..8: train = 8 clean folds + fold 9 (36 pairs):
    #   0.1 x8 diff, 0.2 x9 diff, 0.3 x1 same, 0.6 x1 diff, 0.8 x8 same, 0.9 x9 same.
    #   Rejecting {0.1, 0.2} (t=0.25): 17 + 18 = 35 right; rejecting up to 0.6 (t=0.7):
    #   18 + 17 = 35 (tie, the smaller 0.25 wins); others fewer. Fold f: 4/4.
    # Test fold 9: train = 9 clean folds, best t = (0.2 + 0.8) / 2 = 0.5.
    #   Fold 9 at 0.5: same 0.9 right, same 0.3 wrong, diff 0.2 right, diff 0.6 wrong -> 2/4.
    # Accuracies 1 x9, 0.5: mean 0.95; population std sqrt((9 * 0.05^2 + 0.45^2) / 10) = 0.15.
    scores, same, folds = _ten_fold_table()
    mean, std, thresholds = metrics.verification_accuracy_10fold(scores, same, folds)
    assert mean == pytest.approx(0.95)
    assert std == pytest.approx(0.15)
    np.testing.assert_allclose(thresholds, [0.25] * 9 + [0.5])


def test_verification_accuracy_does_not_depend_on_row_order():
    scores, same, folds = _ten_fold_table()
    order = np.random.default_rng(1).permutation(len(scores))
    assert metrics.verification_accuracy_10fold(scores[order], same[order], folds[order])[:2] == pytest.approx(
        (0.95, 0.15)
    )


def test_verification_rejects_missing_scores():
    with pytest.raises(ValueError, match="finite"):
        metrics.verification_accuracy_10fold([0.1, NAN], [True, False], [0, 1])


# --------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------


def test_box_iou_by_hand():
    a = [0, 0, 10, 10]
    boxes = [
        [5, 5, 15, 15],  # intersection 5x5 = 25, union 100 + 100 - 25 = 175 -> 1/7
        [0, 0, 10, 10],  # identical -> 1
        [20, 20, 30, 30],  # disjoint -> 0
        [10, 0, 20, 10],  # touching edge (x2 exclusive) -> 0
        [0, 0, 5, 10],  # inside, half the area -> 50/100
    ]
    np.testing.assert_allclose(metrics.box_iou_np([a], boxes), [[1 / 7, 1, 0, 0, 0.5]])
    assert metrics.box_iou_np([a, a], boxes).shape == (2, 5)
    # Degenerate boxes: union 0 -> IoU 0, not NaN.
    assert metrics.box_iou_np([[3, 3, 3, 3]], [[3, 3, 3, 3]])[0, 0] == 0.0


def test_mean_iou_skips_and_counts_missing_boxes():
    a, b = (0, 0, 10, 10), (5, 5, 15, 15)
    # Pairs used: (a, b) = 1/7 and (b, b) = 1 -> mean 4/7; one without detection, one without reference.
    result = metrics.mean_iou([a, None, a, b], [b, a, None, b])
    assert result.mean == pytest.approx(4 / 7)
    assert (result.n_used, result.n_no_detection, result.n_no_reference) == (2, 1, 1)
    assert math.isnan(metrics.mean_iou([None], [a]).mean)


# --------------------------------------------------------------------------
# Plots and tables
# --------------------------------------------------------------------------


def test_plots_write_png(tmp_path):
    correct, scores = metrics.mated_rank1(MATED_CANDIDATES, MATED_LABELS)
    det = metrics.det_curve(correct, scores, NONMATED_BEST)
    systems = {"system A": det, "system B": (det[0] * 0.5, det[1])}
    path = plot_det(systems, tmp_path / "out" / "det.png", operating_points={"system A": [(0.2, 0.8)]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = metrics.cmc_curve(MATED_CANDIDATES, MATED_LABELS, max_rank=5)
    path = plot_cmc({"system A": curve}, tmp_path / "cmc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table():
    results = {
        "dlib": {"rank1": 0.9165, "mated": 2370, "note": "HOG | resnet"},
        "joint": {"rank1": 0.95, "tpir": None},
    }
    expected = (
        "| system | rank-1 | mated | note | tpir |\n"
        "|---|---|---|---|---|\n"
        "| dlib | 91.65% | 2,370 | HOG \\| resnet | - |\n"
        "| joint | 95.00% | - | - | - |\n"
    )
    text = markdown_table(results, formats={"rank1": "{:.2%}"}, headers={"rank1": "rank-1"})
    assert text == expected


def test_subject_face_is_the_one_nearest_the_centre():
    import numpy as np

    from jointface.bench.common import best_face, subject_face
    from jointface.engines.base import Face

    def face(box, score):
        return Face(box=box, score=score, embedding=np.ones(2, dtype=np.float32), engine="t", engine_version="1")

    bystander = face((0.0, 0.0, 60.0, 60.0), 0.99)        # confident, in the corner
    subject = face((90.0, 95.0, 160.0, 165.0), 0.80)       # centred on a 250x250 photo
    assert subject_face([bystander, subject], 250, 250) is subject
    assert best_face([bystander, subject]) is bystander
    assert subject_face([], 250, 250) is None


def test_thresholds_by_gallery_size_hold_the_fpir_and_grow_with_the_gallery():
    from jointface.calibration import thresholds_by_gallery_size, threshold_for_gallery

    rng = np.random.default_rng(3)
    people = 400
    strangers = rng.normal(0.3, 0.1, size=(800, people))
    strangers[::7] = np.nan  # strangers without a face: never a false positive
    mated = rng.normal(0.3, 0.1, size=(600, people))
    own = rng.integers(0, people, size=600)
    mated[np.arange(600), own] += 0.4
    rows = thresholds_by_gallery_size(strangers, 0.1, (1, 5, 50), mated_scores=mated, mated_people=own)
    assert [row["people"] for row in rows] == [1, 5, 50, people]  # and the whole gallery
    thresholds = [row["threshold"] for row in rows]
    assert thresholds == sorted(thresholds) and thresholds[0] < thresholds[-1] - 0.2
    for row in rows:  # held-out strangers' FPIR near the target; mated probes fare worse in larger galleries
        assert abs(row["fpir_held_out"] - 0.1) < 0.03
    tpir = [row["tpir"] for row in rows]
    assert tpir == sorted(tpir, reverse=True) and tpir[0] > 0.95
    table = {"people": [row["people"] for row in rows], "threshold": thresholds}
    assert threshold_for_gallery(table, 5) == pytest.approx(thresholds[1])
    assert thresholds[1] < threshold_for_gallery(table, 20) < thresholds[2]
    assert threshold_for_gallery(table, 10_000) == pytest.approx(thresholds[-1])  # beyond: the largest's
    with pytest.raises(ValueError, match="increasing sizes"):
        threshold_for_gallery({"people": [10, 5], "threshold": [0.5, 0.4]}, 7)
    with pytest.raises(ValueError, match="strangers, people"):
        thresholds_by_gallery_size(np.zeros(5), 0.1)
