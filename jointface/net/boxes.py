"""Box arithmetic: IoU, YOLO-style box coding, non-maximum suppression.

Box formats (all in pixels of the network input unless said otherwise):

* ``xyxy``: ``(x1, y1, x2, y2)``, x2/y2 exclusive, as in :class:`jointface.engines.base.Face`;
* ``cxcywh``: ``(centre x, centre y, width, height)``.

Box coding (:class:`BoxCoder`) follows YOLOv2/v3. An anchor is a grid cell of
side ``stride`` with a prior size ``(aw, ah)``; its centre is the cell centre.
The network predicts raw numbers ``(tx, ty, tw, th)`` and

    centre x = anchor cx + (sigmoid(tx) - 0.5) * stride      (stays inside the cell)
    width    = aw * exp(tw)

:meth:`BoxCoder.encode` gives the regression *targets* in the same space the
loss compares against: ``(sigmoid-space x, sigmoid-space y, log w ratio, log h ratio)``,
where the x/y targets lie in ``[0, 1)`` for a face whose centre is in the
anchor's cell. :meth:`BoxCoder.to_target_space` maps raw predictions into that
space, so the loss never needs to know about sigmoids.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` xyxy -> ``(...)`` areas (0 for empty boxes)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: ``(N, 4)`` xyxy and ``(M, 4)`` xyxy -> ``(N, M)``."""
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - intersection
    return intersection / union.clamp(min=1e-9)


def wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes sharing one centre, from sizes only: ``(N, 2)``, ``(M, 2)`` -> ``(N, M)``."""
    intersection = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(wh1[:, None, 1], wh2[None, :, 1])
    union = (wh1[:, 0] * wh1[:, 1])[:, None] + (wh2[:, 0] * wh2[:, 1])[None, :] - intersection
    return intersection / union.clamp(min=1e-9)


class BoxCoder:
    """YOLO-style coding of xyxy boxes relative to anchors given as ``(N, 4)`` cxcywh."""

    #: Cap on ``tw``/``th`` when decoding, so ``exp`` cannot overflow (e^4 = 55x the prior).
    max_log_ratio = 4.0

    def __init__(self, stride: int):
        self.stride = float(stride)

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Targets ``(N, 4)`` for xyxy boxes ``(N, 4)`` matched to anchors ``(N, 4)`` cxcywh."""
        centre_size = xyxy_to_cxcywh(boxes)
        xy = (centre_size[:, :2] - anchors[:, :2]) / self.stride + 0.5
        wh = torch.log(centre_size[:, 2:].clamp(min=1e-6) / anchors[:, 2:])
        return torch.cat((xy, wh), dim=-1)

    @staticmethod
    def to_target_space(raw: torch.Tensor) -> torch.Tensor:
        """Raw network numbers ``(..., 4)`` -> the space of :meth:`encode` (sigmoid on x/y)."""
        return torch.cat((raw[..., :2].sigmoid(), raw[..., 2:]), dim=-1)

    def decode(self, raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Raw predictions ``(..., N, 4)`` + anchors ``(N, 4)`` cxcywh -> xyxy boxes ``(..., N, 4)``."""
        return self.decode_targets(self.to_target_space(raw), anchors)

    def decode_targets(self, targets: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`."""
        xy = anchors[..., :2] + (targets[..., :2] - 0.5) * self.stride
        wh = anchors[..., 2:] * torch.exp(targets[..., 2:].clamp(max=self.max_log_ratio))
        return cxcywh_to_xyxy(torch.cat((xy, wh), dim=-1))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        groups: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression in plain torch.

    ``boxes`` ``(N, 4)`` xyxy, ``scores`` ``(N,)``. Returns the indices of the
    kept boxes, highest score first; a box is dropped when its IoU with an
    already kept, higher-scoring box is > ``iou_threshold``. Ties in score keep
    the lower index first (stable sort), like torchvision. With ``groups``
    ``(N,)`` (e.g. each box's image in a batch) only boxes of one group
    suppress each other.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    overlaps = box_iou(boxes[order], boxes[order]) > iou_threshold
    if groups is not None:
        ordered = groups[order]
        overlaps &= ordered[:, None] == ordered[None, :]
    overlaps = overlaps.cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for position in range(len(order)):  # N is small after the confidence threshold; numpy, not torch, per step
        if suppressed[position]:
            continue
        keep.append(position)
        suppressed |= overlaps[position]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, group_ids: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """NMS independently within each group (e.g. image index of a flattened batch): :func:`nms` with
    ``groups``. Returns kept indices, highest score first."""
    return nms(boxes, scores, iou_threshold, groups=group_ids)


def logit(probability: float) -> float:
    return math.log(probability / (1 - probability))
