"""Anchor sizes from k-means, and the anchor grid over a feature map.

Anchor sizes (YOLOv2): k-means over the ``(width, height)`` of the training
boxes *as the network sees them* (after letterbox / augmentation), with the
distance ``1 - IoU`` of two boxes sharing a centre, so large and small boxes
count alike. It is deterministic: the k centres start at evenly spaced area
quantiles of the sorted boxes (no random seed), and clusters are updated with
the median, which outliers (a huge mosaic tile face) do not drag.

The grid: anchor ``a`` of cell ``(row, col)`` has centre
``((col + 0.5) * stride, (row + 0.5) * stride)`` and size ``anchor_sizes[a]``.
Flattened index = ``(row * grid_w + col) * num_anchors + a`` — the same order
as :meth:`jointface.net.model.JointNet.forward` flattens its predictions.
"""

from __future__ import annotations

import torch

from .boxes import wh_iou


def kmeans_anchors(box_sizes: torch.Tensor, num_anchors: int, max_iterations: int = 300) -> torch.Tensor:
    """Cluster ``(N, 2)`` box sizes (w, h) into ``(num_anchors, 2)`` anchors, smallest area first."""
    box_sizes = torch.as_tensor(box_sizes, dtype=torch.float64).reshape(-1, 2)
    box_sizes = box_sizes[(box_sizes > 0).all(dim=1)]
    if len(box_sizes) < num_anchors:
        raise ValueError(f"need at least {num_anchors} boxes for {num_anchors} anchors, got {len(box_sizes)}")
    by_area = box_sizes[torch.argsort(box_sizes.prod(dim=1), stable=True)]
    # centre i starts at quantile (i + 0.5) / k of the boxes sorted by area
    start = ((torch.arange(num_anchors, dtype=torch.float64) + 0.5) / num_anchors * len(by_area)).long()
    centres = by_area[start].clone()
    assignment = None
    for _ in range(max_iterations):
        new_assignment = torch.argmax(wh_iou(box_sizes, centres), dim=1)  # max IoU = min (1 - IoU)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for cluster in range(num_anchors):
            members = box_sizes[assignment == cluster]
            if len(members):
                centres[cluster] = members.median(dim=0).values
    centres = centres[torch.argsort(centres.prod(dim=1), stable=True)]
    return centres.float()


def mean_best_iou(box_sizes: torch.Tensor, anchor_sizes: torch.Tensor) -> float:
    """Average over boxes of the best anchor IoU (how well the anchors fit the data)."""
    iou = wh_iou(torch.as_tensor(box_sizes, dtype=torch.float32), torch.as_tensor(anchor_sizes, dtype=torch.float32))
    return float(iou.max(dim=1).values.mean())


class AnchorGrid:
    """Anchors for a ``grid_h x grid_w`` feature map of the given stride.

    ``anchor_sizes``: ``(A, 2)`` (w, h) in input pixels.
    """

    def __init__(self, anchor_sizes: torch.Tensor, stride: int):
        self.anchor_sizes = torch.as_tensor(anchor_sizes, dtype=torch.float32).reshape(-1, 2)
        self.stride = int(stride)

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes)

    def __call__(self, grid_h: int, grid_w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(grid_h * grid_w * A, 4)`` anchors, cxcywh in input pixels."""
        rows = (torch.arange(grid_h, dtype=torch.float32, device=device) + 0.5) * self.stride
        cols = (torch.arange(grid_w, dtype=torch.float32, device=device) + 0.5) * self.stride
        centre_y, centre_x = torch.meshgrid(rows, cols, indexing="ij")  # (grid_h, grid_w)
        centres = torch.stack((centre_x, centre_y), dim=-1)[:, :, None, :].expand(grid_h, grid_w, self.num_anchors, 2)
        sizes = self.anchor_sizes.to(device)[None, None].expand(grid_h, grid_w, self.num_anchors, 2)
        return torch.cat((centres, sizes), dim=-1).reshape(-1, 4)
