"""Matching ground-truth faces to anchors (YOLOv3's rule), producing loss targets.

Each ground-truth box is assigned to exactly one anchor: the grid cell that
contains its centre, and within that cell the anchor whose prior size has the
best shape IoU with the box. Every other anchor is a negative for the face
confidence, except anchors whose *prior box* overlaps a face with IoU above
``ignore_iou``: those are left out of the confidence loss (a neighbouring cell
that sees most of a face is not punished for saying so; NMS removes its box
at inference).

When two faces land on the same anchor (same cell, same best shape), the
larger face keeps it and the smaller one is dropped from the targets (it still
does not count as a negative thanks to the ignore rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .anchors import AnchorGrid
from .boxes import BoxCoder, box_iou, cxcywh_to_xyxy, wh_iou

TEACHER_DIM = 128


@dataclass
class FaceTargets:
    """Ground truth of one image, in network-input pixels.

    ``boxes`` ``(F, 4)`` xyxy; ``identities`` ``(F,)`` long, -1 = unknown;
    ``teachers`` ``(F, 128)`` dlib descriptors; ``teacher_valid`` ``(F,)`` bool.
    """

    boxes: torch.Tensor
    identities: torch.Tensor
    teachers: torch.Tensor
    teacher_valid: torch.Tensor

    @classmethod
    def empty(cls) -> "FaceTargets":
        return cls(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, TEACHER_DIM),
                   torch.zeros(0, dtype=torch.bool))

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass
class MatchedTargets:
    """Targets of a batch of ``B`` images over ``N`` anchors, ``M`` matched faces.

    * ``objectness`` ``(B, N)``: 1 at matched anchors, else 0;
    * ``confidence_weight`` ``(B, N)``: 0 for ignored anchors, else 1;
    * ``matched_image_idx`` / ``matched_anchor_idx`` ``(M,)``: where each face sits;
    * ``box_targets`` ``(M, 4)``: :meth:`BoxCoder.encode` of each face;
    * ``identities`` ``(M,)`` (-1 unknown), ``teachers`` ``(M, 128)``, ``teacher_valid`` ``(M,)``.
    """

    objectness: torch.Tensor
    confidence_weight: torch.Tensor
    matched_image_idx: torch.Tensor
    matched_anchor_idx: torch.Tensor
    box_targets: torch.Tensor
    identities: torch.Tensor
    teachers: torch.Tensor
    teacher_valid: torch.Tensor

    @property
    def num_faces(self) -> int:
        return len(self.matched_anchor_idx)


def match_faces(faces: list[FaceTargets], anchor_grid: AnchorGrid, grid_h: int, grid_w: int,
                ignore_iou: float = 0.5, device: torch.device | str = "cpu",
                identity_min_size: float = 0.0) -> MatchedTargets:
    """Assign every face of every image to one anchor; see the module docstring.

    Faces whose shorter side is below ``identity_min_size`` input pixels stay
    detection targets but lose their identity and teacher (``-1`` / invalid):
    a 20 px face in a mosaic tile carries too little of a person to learn from.
    """
    anchors = anchor_grid(grid_h, grid_w)  # (N, 4) cxcywh
    anchor_boxes = cxcywh_to_xyxy(anchors)
    coder = BoxCoder(anchor_grid.stride)
    num_anchors_per_cell, stride = anchor_grid.num_anchors, anchor_grid.stride
    batch, total_anchors = len(faces), len(anchors)
    objectness = torch.zeros(batch, total_anchors)
    confidence_weight = torch.ones(batch, total_anchors)
    image_idx, anchor_idx, box_targets, identities, teachers, teacher_valid = [], [], [], [], [], []
    for image_index, image_faces in enumerate(faces):
        if len(image_faces) == 0:
            continue
        boxes = image_faces.boxes.float()
        ignored = (box_iou(anchor_boxes, boxes) > ignore_iou).any(dim=1)
        confidence_weight[image_index, ignored] = 0.0
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        col = (centres[:, 0] // stride).long().clamp(0, grid_w - 1)
        row = (centres[:, 1] // stride).long().clamp(0, grid_h - 1)
        best_shape = wh_iou(boxes[:, 2:] - boxes[:, :2], anchor_grid.anchor_sizes).argmax(dim=1)
        flat = (row * grid_w + col) * num_anchors_per_cell + best_shape
        # larger faces last, so they win an anchor shared with a smaller face
        order = torch.argsort((boxes[:, 2:] - boxes[:, :2]).prod(dim=1), stable=True)
        owner: dict[int, int] = {}
        for face in order.tolist():
            owner[int(flat[face])] = face
        for anchor, face in sorted(owner.items()):
            objectness[image_index, anchor] = 1.0
            confidence_weight[image_index, anchor] = 1.0
            image_idx.append(image_index)
            anchor_idx.append(anchor)
            box_targets.append(coder.encode(boxes[face:face + 1], anchors[anchor:anchor + 1])[0])
            size = boxes[face, 2:] - boxes[face, :2]
            recognisable = bool(size.min() >= identity_min_size)
            identities.append(int(image_faces.identities[face]) if recognisable else -1)
            teachers.append(image_faces.teachers[face].float())
            teacher_valid.append(bool(image_faces.teacher_valid[face]) and recognisable)
    count = len(anchor_idx)
    return MatchedTargets(
        objectness=objectness.to(device),
        confidence_weight=confidence_weight.to(device),
        matched_image_idx=torch.tensor(image_idx, dtype=torch.long, device=device),
        matched_anchor_idx=torch.tensor(anchor_idx, dtype=torch.long, device=device),
        box_targets=(torch.stack(box_targets) if count else torch.zeros(0, 4)).to(device),
        identities=torch.tensor(identities, dtype=torch.long, device=device),
        teachers=(torch.stack(teachers) if count else torch.zeros(0, TEACHER_DIM)).to(device),
        teacher_valid=torch.tensor(teacher_valid, dtype=torch.bool, device=device),
    )
