"""Training losses: a pure function of predictions and matched targets.

:func:`joint_losses` returns a dict of named, *unweighted* terms; the training
loop multiplies them by the configured weights and sums them
(:func:`total_loss`). Terms:

* ``box``: smooth L1 between the matched anchors' predictions and the
  :meth:`BoxCoder.encode` targets (x/y after sigmoid, log w/h ratios), mean
  over matched faces;
* ``confidence``: BCE on the face logit of every non-ignored anchor, summed
  and divided by the number of faces (at least 1) — RetinaNet's
  normalisation, which with the 1% prior bias keeps the many easy negatives
  from swamping the few positives;
* ``identity_ce``: cross-entropy of the linear classifier;
* ``identity_margin``: cross-entropy of the ArcFace/CosFace logits;
* ``triplet``: batch-hard triplet loss over the faces of the batch;
* ``distill``: ``1 - cosine`` between the distillation head's output and the
  dlib teacher descriptor minus the training faces' mean descriptor
  (:meth:`DistillationHead.loss`).

Identity terms use only matched faces with a known identity (and a teacher
descriptor for ``distill``). With no such face every term is an exact 0 that
still belongs to the graph (``x.sum() * 0``), so a batch without faces is
finite and backward still works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import BoxCoder
from .matching import MatchedTargets
from .model import JointOutput


def _zero_like_graph(tensor: torch.Tensor) -> torch.Tensor:
    """An exact 0 connected to ``tensor``'s graph (gradients are zeros, not None)."""
    return tensor.sum() * 0.0


def triplet_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) over ``(M, D)`` embeddings with ``(M,)`` labels.

    For each face: its farthest same-identity face and its nearest other-identity
    face; loss ``relu(d_pos - d_neg + margin)`` on Euclidean distances, mean over
    faces that have both. 0 when no face has both (e.g. one person in the batch).
    """
    if len(embeddings) < 2:
        return _zero_like_graph(embeddings)
    squared = (embeddings[:, None, :] - embeddings[None, :, :]).pow(2).sum(-1)
    distances = torch.sqrt(squared.clamp(min=1e-12))
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive_mask, negative_mask = same & ~eye, ~same
    valid = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    if not valid.any():
        return _zero_like_graph(embeddings)
    hardest_positive = distances.masked_fill(~positive_mask, float("-inf")).max(dim=1).values
    hardest_negative = distances.masked_fill(~negative_mask, float("inf")).min(dim=1).values
    return F.relu(hardest_positive[valid] - hardest_negative[valid] + margin).mean()


def joint_losses(output: JointOutput, targets: MatchedTargets, identity_heads: nn.ModuleDict,
                 *, use_triplet: bool = False, triplet_margin: float = 0.2,
                 box_beta: float = 0.1) -> dict[str, torch.Tensor]:
    """Every loss term by name (see the module docstring).

    Shapes: see :class:`JointOutput` and :class:`MatchedTargets`.
    """
    box_raw, face_logits, embeddings = output.box_raw.float(), output.face_logits.float(), output.embeddings.float()
    num_faces = max(targets.num_faces, 1)
    image_idx, anchor_idx = targets.matched_image_idx, targets.matched_anchor_idx

    losses: dict[str, torch.Tensor] = {}
    predicted_boxes = BoxCoder.to_target_space(box_raw[image_idx, anchor_idx])  # (M, 4)
    losses["box"] = F.smooth_l1_loss(predicted_boxes, targets.box_targets, beta=box_beta,
                                     reduction="sum") / (4 * num_faces) + _zero_like_graph(box_raw)
    confidence = F.binary_cross_entropy_with_logits(face_logits, targets.objectness, reduction="none")
    losses["confidence"] = (confidence * targets.confidence_weight).sum() / num_faces

    face_embeddings = embeddings[image_idx, anchor_idx]  # (M, D)
    known = targets.identities >= 0
    known_embeddings, known_labels = face_embeddings[known], targets.identities[known]
    has_faces = bool(known.any())
    if "classifier" in identity_heads:
        logits = identity_heads["classifier"](known_embeddings)
        losses["identity_ce"] = F.cross_entropy(logits, known_labels) if has_faces else _zero_like_graph(logits)
    if "margin" in identity_heads:
        logits = identity_heads["margin"](known_embeddings, known_labels)
        losses["identity_margin"] = F.cross_entropy(logits, known_labels) if has_faces else _zero_like_graph(logits)
    if use_triplet:
        losses["triplet"] = (triplet_batch_hard(known_embeddings, known_labels, triplet_margin)
                             + _zero_like_graph(embeddings))
    if "distill" in identity_heads:
        head, with_teacher = identity_heads["distill"], targets.teacher_valid
        losses["distill"] = (head.loss(face_embeddings[with_teacher], targets.teachers[with_teacher])
                             if bool(with_teacher.any()) else _zero_like_graph(head(face_embeddings[with_teacher])))
    return losses


def total_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of the terms (a term without a weight counts 1)."""
    return sum(weights.get(name, 1.0) * value for name, value in losses.items())


class NonFiniteLossError(FloatingPointError):
    """Raised by the training loop when a loss term is NaN or infinite."""


def check_finite(losses: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming every non-finite term."""
    bad = {name: value.detach().item() for name, value in losses.items() if not torch.isfinite(value).all()}
    if bad:
        terms = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise NonFiniteLossError(f"non-finite loss at step {step}: {terms}. Training stopped; lower the learning "
                                 f"rate or that term's weight, or check the data of this batch.")
