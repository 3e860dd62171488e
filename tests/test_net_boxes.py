"""Anchors, box coding, matching and NMS against hand-computed values and a brute-force reference."""

import math

import pytest
import torch

from jointface.net.anchors import AnchorGrid, kmeans_anchors
from jointface.net.boxes import BoxCoder, batched_nms, box_iou, nms, wh_iou
from jointface.net.matching import FaceTargets, match_faces


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]])
    # overlap 5x5=25, union 100+100-25=175; identical; disjoint; half
    expected = torch.tensor([[25 / 175, 1.0, 0.0, 0.5]])
    assert torch.allclose(box_iou(a, b), expected)


def test_wh_iou_hand_computed():
    # 30x35 against 20x20 (inside: 400 / 1050) and 40x40 (contains: 1050 / 1600)
    iou = wh_iou(torch.tensor([[30.0, 35.0]]), torch.tensor([[20.0, 20.0], [40.0, 40.0]]))
    assert torch.allclose(iou, torch.tensor([[400 / 1050, 1050 / 1600]]))


def test_anchor_grid_hand_computed():
    grid = AnchorGrid(torch.tensor([[10.0, 20.0], [30.0, 40.0]]), stride=32)
    anchors = grid(2, 2)
    # order: (row * grid_w + col) * A + a, cxcywh, centre = (index + 0.5) * stride
    expected = torch.tensor([
        [16, 16, 10, 20], [16, 16, 30, 40],   # row 0 col 0
        [48, 16, 10, 20], [48, 16, 30, 40],   # row 0 col 1
        [16, 48, 10, 20], [16, 48, 30, 40],   # row 1 col 0
        [48, 48, 10, 20], [48, 48, 30, 40],   # row 1 col 1
    ], dtype=torch.float32)
    assert torch.equal(anchors, expected)


def test_kmeans_anchors_hand_computed_and_deterministic():
    sizes = torch.tensor([[10, 10], [12, 12], [14, 14], [100, 100], [110, 110], [120, 120]], dtype=torch.float32)
    anchors = kmeans_anchors(sizes, 2)
    assert torch.equal(anchors, torch.tensor([[12.0, 12.0], [110.0, 110.0]]))  # cluster medians, small first
    shuffled = sizes[torch.tensor([5, 0, 3, 1, 4, 2])]
    assert torch.equal(kmeans_anchors(shuffled, 2), anchors)
    with pytest.raises(ValueError):
        kmeans_anchors(sizes[:1], 2)


def test_box_coder_hand_computed_round_trip():
    coder = BoxCoder(stride=32)
    anchor = torch.tensor([[48.0, 16.0, 40.0, 40.0]])  # cell (row 0, col 1), 40x40 prior
    box = torch.tensor([[40.0, 4.0, 80.0, 54.0]])      # centre (60, 29) inside the cell, size 40x50
    target = coder.encode(box, anchor)
    expected = torch.tensor([[(60 - 48) / 32 + 0.5, (29 - 16) / 32 + 0.5, 0.0, math.log(50 / 40)]])
    assert torch.allclose(expected[:, :2], torch.tensor([[0.875, 0.90625]]))
    assert torch.allclose(target, expected)
    assert torch.allclose(coder.decode_targets(target, anchor), box)
    raw = torch.cat((torch.logit(target[:, :2]), target[:, 2:]), dim=1)  # undo the sigmoid
    assert torch.allclose(coder.decode(raw, anchor), box, atol=1e-4)
    assert torch.allclose(coder.to_target_space(raw), target, atol=1e-6)


def test_match_faces_hand_computed():
    grid = AnchorGrid(torch.tensor([[20.0, 20.0], [40.0, 40.0]]), stride=32)
    face = FaceTargets(torch.tensor([[10.0, 10, 40, 45]]), torch.tensor([3]), torch.ones(1, 128), torch.tensor([True]))
    targets = match_faces([FaceTargets.empty(), face], grid, 2, 2)
    # centre (25, 27.5) -> cell (0, 0); shape 30x35 fits 40x40 best (IoU 0.656 vs 0.381) -> anchor 1
    assert targets.matched_image_idx.tolist() == [1]
    assert targets.matched_anchor_idx.tolist() == [1]
    expected = torch.tensor([[0.78125, 0.859375, math.log(30 / 40), math.log(35 / 40)]])
    assert torch.allclose(targets.box_targets, expected)
    assert targets.objectness.sum() == 1 and targets.objectness[1, 1] == 1
    assert targets.identities.tolist() == [3]
    assert targets.confidence_weight[0].eq(1).all()  # the empty image ignores nothing


def _reference_nms(boxes, scores, threshold):
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = []
    for i in order:
        if all(float(box_iou(boxes[i:i + 1], boxes[j:j + 1])) <= threshold for j in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7])
def test_nms_matches_brute_force(seed, threshold):
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(40, 2, generator=generator) * 100
    boxes = torch.cat((top_left, top_left + 10 + torch.rand(40, 2, generator=generator) * 40), dim=1)
    scores = torch.rand(40, generator=generator)
    assert nms(boxes, scores, threshold).tolist() == _reference_nms(boxes, scores, threshold)


def test_nms_empty_and_batched():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0]
    # same boxes in different images never suppress each other
    assert sorted(batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5).tolist()) == [0, 2]


def test_match_faces_small_faces_train_detection_only():
    grid = AnchorGrid(torch.tensor([[20.0, 20.0], [40.0, 40.0]]), stride=32)
    faces = FaceTargets(torch.tensor([[10.0, 10, 40, 45], [40.0, 40, 58, 62]]), torch.tensor([3, 4]),
                        torch.ones(2, 128), torch.tensor([True, True]))
    targets = match_faces([faces], grid, 2, 2, identity_min_size=20.0)
    # the 30x35 face keeps its identity; the 18x22 face (shorter side 18 < 20) stays a detection target only
    assert targets.num_faces == 2 and targets.objectness.sum() == 2
    assert targets.identities.tolist() == [3, -1]
    assert targets.teacher_valid.tolist() == [True, False]
    assert match_faces([faces], grid, 2, 2).identities.tolist() == [3, 4]
