"""JointNet: one pass from an image to face boxes, confidences and embeddings.

Architecture::

    image (B, 3, S, S) -> ResNet.forward_features -> (B, C, S/32, S/32)
      -> neck: 3x3 conv + BN + ReLU -> (B, neck, G, G)
      -> 1x1 conv -> per anchor 4 box numbers + 1 face logit   (B, G*G*A, 5)
      -> 1x1 conv -> per anchor a D-dim embedding, L2-normalised (B, G*G*A, D)

The grid: ResNet's native stride 32, so a 320 px input gives a 10x10 grid
(the study added a further stride to get 5x5 at 320 px). We keep 32 because
(a) a torchvision checkpoint is used exactly as trained, with no extra layer
learnt from scratch; (b) mosaic training images and group photos hold several
faces of 60-100 px, and 32 px cells keep their centres in different cells,
where 64 px cells would make two faces compete for one cell's anchors; and
(c) the grid follows the input size, so a 160 px model has the study's 5x5
grid (and costs about a fifth of the CPU time) with the very same code.
Anchor ``a`` of cell ``(row, col)`` is prediction
``(row * G + col) * A + a``; see :mod:`jointface.net.anchors`.

The identity heads (:class:`LinearClassifier`, :class:`MarginClassifier`,
:class:`DistillationHead`) are separate modules that take embeddings; they
are not part of :class:`JointNet`, so inference and enrolment never need
them (an exported weights file may carry them under their own key, for
closed-set P1 scoring only). :class:`ModelRecord` is the metadata that travels
with the weights (backbone, input size, anchors, embedding size, mean/std,
class names, training command and data).

``forward`` returns the same :class:`JointOutput` in training and eval mode;
decoding to boxes is :func:`postprocess`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .anchors import AnchorGrid
from .boxes import BoxCoder, box_iou, logit, nms
from .resnet import ResNet, build_resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Prior face probability of an anchor at initialisation (RetinaNet's trick:
#: the ~300 negative anchors per image do not swamp the first steps).
FACE_PRIOR = 0.01


@dataclass
class ModelRecord:
    """Everything needed to rebuild and use a JointNet, stored with its weights.

    ``anchor_sizes``: list of ``[w, h]`` in input pixels; ``mean``/``std``: per
    channel, applied to RGB in ``[0, 1]``. Only plain Python types, so the
    record survives ``torch.load(weights_only=True)``.
    """

    backbone: str = "resnet34"
    input_size: int = 320
    anchor_sizes: list[list[float]] = field(default_factory=lambda: [[64.0, 80.0], [110.0, 130.0], [170.0, 200.0]])
    embedding_dim: int = 512
    neck_channels: int = 256
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    class_names: list[str] = field(default_factory=list)
    training_command: str = ""
    training_data: str = ""
    stride: int = ResNet.stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelRecord":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model record fields: {sorted(unknown)}")
        return cls(**values)


class JointOutput(NamedTuple):
    """Raw predictions over ``N = G_h * G_w * A`` anchors.

    ``box_raw`` ``(B, N, 4)``: numbers for :meth:`BoxCoder.decode`;
    ``face_logits`` ``(B, N)``; ``embeddings`` ``(B, N, D)`` L2-normalised;
    ``grid_size``: ``(G_h, G_w)``.
    """

    box_raw: torch.Tensor
    face_logits: torch.Tensor
    embeddings: torch.Tensor
    grid_size: tuple[int, int]


class JointNet(nn.Module):
    """Backbone + YOLO head + per-anchor embeddings (see the module docstring)."""

    def __init__(self, record: ModelRecord):
        super().__init__()
        self.record = record
        self.backbone = build_resnet(record.backbone, num_classes=0)
        num_anchors = len(record.anchor_sizes)
        self.neck = nn.Sequential(
            nn.Conv2d(self.backbone.num_features, record.neck_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(record.neck_channels),
            nn.ReLU(inplace=True),
        )
        self.detection = nn.Conv2d(record.neck_channels, num_anchors * 5, 1)
        self.embedding = nn.Conv2d(record.neck_channels, num_anchors * record.embedding_dim, 1)
        self.register_buffer("anchor_sizes", torch.tensor(record.anchor_sizes, dtype=torch.float32))
        nn.init.normal_(self.detection.weight, std=0.01)
        with torch.no_grad():
            bias = self.detection.bias.view(num_anchors, 5)
            bias.zero_()
            bias[:, 4] = logit(FACE_PRIOR)

    @property
    def num_anchors(self) -> int:
        return len(self.record.anchor_sizes)

    @property
    def anchor_grid(self) -> AnchorGrid:
        return AnchorGrid(self.anchor_sizes, self.record.stride)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, neck, G_h, G_w)``."""
        return self.neck(self.backbone.forward_features(images))

    def forward_head(self, features: torch.Tensor) -> JointOutput:
        return self.output_from_maps(self.detection(features), self.embedding(features))

    def forward_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two convolutional output maps, ``(B, A*5, G_h, G_w)`` and ``(B, A*D, G_h, G_w)``.

        Everything learnt, and nothing else: the part exported to ONNX Runtime.
        """
        features = self.forward_features(images)
        return self.detection(features), self.embedding(features)

    def output_from_maps(self, detection: torch.Tensor, embedding: torch.Tensor) -> JointOutput:
        """Per-anchor boxes, confidences and L2-normalised embeddings from :meth:`forward_maps`'s maps."""
        batch, _, grid_h, grid_w = detection.shape
        anchors, dim = self.num_anchors, self.record.embedding_dim
        # (B, A*k, G_h, G_w) -> (B, G_h, G_w, A, k) -> (B, G_h*G_w*A, k)
        detection = detection.view(batch, anchors, 5, grid_h, grid_w)
        detection = detection.permute(0, 3, 4, 1, 2).reshape(batch, -1, 5)
        embedding = embedding.view(batch, anchors, dim, grid_h, grid_w)
        embedding = embedding.permute(0, 3, 4, 1, 2).reshape(batch, -1, dim)
        embedding = F.normalize(embedding.float(), dim=-1)
        return JointOutput(detection[..., :4], detection[..., 4], embedding, (grid_h, grid_w))

    def forward(self, images: torch.Tensor) -> JointOutput:
        return self.forward_head(self.forward_features(images))


# ----------------------------------------------------------------------------- identity heads
class LinearClassifier(nn.Module):
    """Softmax classifier over embeddings: ``(M, D)`` -> ``(M, num_classes)`` logits.

    A linear layer on each embedding is exactly a 1x1 convolution over the
    embedding map; taking the matched anchors' vectors avoids scoring the
    hundreds of background anchors.

    The embeddings are L2-normalised, so ``W e + b`` alone has logits bounded
    by the row norms of ``W``, which weight decay keeps small: at ``scale=1``
    the cross-entropy of 311 classes stayed at ``ln 311`` for ten epochs from
    scratch. The embeddings are therefore multiplied by ``scale`` first (the
    margin heads' ``s``); the scale is stored with the head (weights saved
    before it existed load with 1).
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "fc.weight" in state_dict and prefix + "scale" not in state_dict:
            state_dict[prefix + "scale"] = torch.tensor(1.0)  # saved before the scale existed
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.fc(embeddings * self.scale)


class MarginClassifier(nn.Module):
    """ArcFace (``cos(theta + m)``) or CosFace (``cos(theta) - m``) logits, scaled by ``s``.

    ``forward(embeddings, labels)`` puts the margin on each row's true class
    (training); ``labels=None`` gives the plain scaled cosines (prediction).
    Embeddings must be L2-normalised; the class weights are normalised here.
    """

    def __init__(self, embedding_dim: int, num_classes: int, kind: str = "arcface",
                 scale: float = 30.0, margin: float | None = None):
        super().__init__()
        if kind not in ("arcface", "cosface"):
            raise ValueError(f"unknown margin head {kind!r}: use 'arcface' or 'cosface'")
        self.kind = kind
        self.scale = scale
        self.margin = margin if margin is not None else (0.5 if kind == "arcface" else 0.35)
        #: share of the margin in use (the training loop ramps it from 0 to 1: a margin from the first
        #: step of a network trained from scratch keeps every class out of reach and nothing is learnt)
        self.ramp = 1.0
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(embeddings, F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = self.cosine(embeddings).clamp(-1.0, 1.0)
        if labels is None:
            return self.scale * cosine
        true_class = F.one_hot(labels, cosine.shape[1]).bool()
        margin = self.margin * self.ramp
        if self.kind == "cosface":
            adjusted = cosine - margin
        else:
            # cos(theta + m) = cos cos m - sin sin m, without acos (whose gradient blows up at cos = 1)
            sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=1e-12))
            with_margin = cosine * math.cos(margin) - sine * math.sin(margin)
            # past theta = pi - m, cos(theta + m) would rise again: fall off linearly instead (insightface)
            adjusted = torch.where(cosine > math.cos(math.pi - margin), with_margin,
                                   cosine - margin * math.sin(margin))
        return self.scale * torch.where(true_class, adjusted, cosine)


class DistillationHead(nn.Module):
    """Predicts the direction of the dlib teacher's 128-d descriptor from an embedding: ``(M, D)`` -> ``(M, 128)``.

    dlib's descriptors all lie in a narrow cone (two strangers have a cosine
    of about 0.9), so regressing them raw teaches little: predicting their mean
    already gives a tiny error. The target is therefore the teacher minus
    ``teacher_mean`` (the mean descriptor of the training faces, a buffer that
    travels with the head), and :meth:`loss` is ``1 - cosine`` to that.
    """

    def __init__(self, embedding_dim: int, teacher_dim: int = 128, hidden: int = 256,
                 teacher_mean: torch.Tensor | None = None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, teacher_dim))
        mean = torch.zeros(teacher_dim) if teacher_mean is None else torch.as_tensor(teacher_mean).float()
        self.register_buffer("teacher_mean", mean.reshape(teacher_dim).clone())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.mlp(embeddings)

    def loss(self, embeddings: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
        """Mean ``1 - cos(prediction, teacher - teacher_mean)`` over ``(M, D)`` embeddings, ``(M, 128)`` teachers."""
        target = teachers.float() - self.teacher_mean
        return (1.0 - F.cosine_similarity(self(embeddings), target, dim=1, eps=1e-8)).mean()


IDENTITY_HEAD_NAMES = ("classifier", "arcface", "cosface", "triplet", "distill")


def build_identity_heads(names: Sequence[str], embedding_dim: int, num_classes: int,
                         margin_scale: float = 30.0, margin: float | None = None,
                         teacher_mean: torch.Tensor | None = None, classifier_scale: float = 1.0) -> nn.ModuleDict:
    """The trainable identity heads named in ``names`` (``triplet`` has no parameters)."""
    unknown = set(names) - set(IDENTITY_HEAD_NAMES)
    if unknown:
        raise ValueError(f"unknown identity heads {sorted(unknown)}; choose from {IDENTITY_HEAD_NAMES}")
    if "arcface" in names and "cosface" in names:
        raise ValueError("choose one margin head: 'arcface' or 'cosface'")
    heads = nn.ModuleDict()
    if "classifier" in names:
        heads["classifier"] = LinearClassifier(embedding_dim, num_classes, classifier_scale)
    for kind in ("arcface", "cosface"):
        if kind in names:
            heads["margin"] = MarginClassifier(embedding_dim, num_classes, kind, margin_scale, margin)
    if "distill" in names:
        heads["distill"] = DistillationHead(embedding_dim, teacher_mean=teacher_mean)
    return heads


def classify(heads: nn.ModuleDict, embeddings: torch.Tensor) -> torch.Tensor | None:
    """Class scores ``(M, C)`` from the classifier head (else the margin head), or None."""
    if "classifier" in heads:
        return heads["classifier"](embeddings)
    if "margin" in heads:
        return heads["margin"](embeddings)
    return None


# ----------------------------------------------------------------------------- pre/post-processing
@dataclass
class Letterbox:
    """How an image was placed on the square input: ``input = original * scale + (pad_x, pad_y)``."""

    scale: float
    pad_x: float
    pad_y: float

    def to_original(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """``(K, 4)`` xyxy in input pixels -> original image pixels, clipped to the image."""
        boxes = np.asarray(boxes, dtype=np.float64).copy()
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - self.pad_x) / self.scale).clip(0, width)
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - self.pad_y) / self.scale).clip(0, height)
        return boxes


def _resized_chw(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, height, width)`` uint8 tensor (a channels-last view), PIL's ``BILINEAR``
    filter (antialiased when shrinking) done by torch on uint8; the image itself when the size is its own."""
    with warnings.catch_warnings():  # decoded photos are read-only arrays; they are only read here
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # a view, channels-last
    if pixels.shape[-2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return pixels[0]


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(height, width, 3)`` uint8, PIL's ``BILINEAR`` filter (antialiased when
    shrinking) done by torch on uint8: PIL's pixels to one grey level in a few values
    (``test_resize_bilinear_is_pil_bilinear``), faster (P4's step profile: letterbox 1.55 -> 0.90 ms per
    320 px photo)."""
    return _resized_chw(image, width, height).permute(1, 2, 0).numpy()


#: the colour of the letterbox's borders (about the ImageNet mean)
LETTERBOX_FILL = (124, 116, 104)


def _placement(height: int, width: int, size: int) -> tuple[int, int, Letterbox]:
    """Resized width, height and placement of an image whose longer side becomes ``size``, centred."""
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return new_w, new_h, Letterbox(new_w / width, (size - new_w) // 2, (size - new_h) // 2)


def letterbox(image: np.ndarray, size: int, fill: Sequence[int] = LETTERBOX_FILL) -> tuple[np.ndarray, Letterbox]:
    """Resize ``(H, W, 3)`` uint8 so the longer side is ``size``, centred on a ``size x size`` canvas."""
    height, width = image.shape[:2]
    new_w, new_h, placement = _placement(height, width, size)
    if (new_w, new_h) != (width, height):
        image = resize_bilinear(image, new_w, new_h)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = np.asarray(fill, dtype=np.uint8)
    pad_x, pad_y = int(placement.pad_x), int(placement.pad_y)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = image
    return canvas, placement


def images_to_tensor(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Same-size ``(H, W, 3)`` uint8 images -> ``(B, 3, H, W)`` float, normalised."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def letterbox_batch(images: Sequence[np.ndarray], size: int, mean: Sequence[float], std: Sequence[float],
                    fill: Sequence[int] = LETTERBOX_FILL) -> tuple[torch.Tensor, list[Letterbox]]:
    """``(H, W, 3)`` uint8 images of any sizes -> the contiguous ``(B, 3, size, size)`` float network input
    and each image's placement: exactly ``images_to_tensor`` of their :func:`letterbox` canvases
    (``test_letterbox_batch_is_letterbox_then_normalise``), written straight into one tensor, with the
    normalisation done once in place over the batch (P4's step profile: 1.4 -> 0.4 ms per 320 px photo).
    """
    batch = torch.empty(len(images), 3, size, size)
    batch[:] = torch.tensor([float(v) for v in fill]).view(1, 3, 1, 1)
    placements = []
    for index, image in enumerate(images):
        height, width = image.shape[:2]
        new_w, new_h, placement = _placement(height, width, size)
        pad_x, pad_y = int(placement.pad_x), int(placement.pad_y)
        batch[index, :, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = _resized_chw(image, new_w, new_h)
        placements.append(placement)
    batch.div_(255.0)
    batch.sub_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    batch.div_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    return batch, placements


class Detections(NamedTuple):
    """Faces kept in one image: ``boxes`` ``(K, 4)`` xyxy input pixels, ``scores`` ``(K,)`` in [0, 1],
    ``embeddings`` ``(K, D)``, ``anchor_idx`` ``(K,)``; highest score first."""

    boxes: torch.Tensor
    scores: torch.Tensor
    embeddings: torch.Tensor
    anchor_idx: torch.Tensor


def postprocess(output: JointOutput, anchor_grid: AnchorGrid, conf_threshold: float = 0.5,
                nms_iou: float = 0.4, max_faces: int = 100, pre_nms_top_k: int = 200) -> list[Detections]:
    """Decode boxes, keep anchors scoring >= ``conf_threshold``, NMS per image, keep their embeddings.

    At most ``pre_nms_top_k`` best anchors per image enter NMS. ``conf_threshold=0``
    keeps the best anchors whatever their score (validation takes the best face).
    """
    anchors = anchor_grid(*output.grid_size, device=output.box_raw.device)
    boxes = BoxCoder(anchor_grid.stride).decode(output.box_raw.float(), anchors)  # (B, N, 4)
    scores = output.face_logits.float().sigmoid()  # (B, N)
    top_k = min(pre_nms_top_k, scores.shape[1])
    results = []
    for image in range(scores.shape[0]):
        candidate_scores, candidate_idx = scores[image].topk(top_k)  # sorted, highest first
        above = candidate_scores >= conf_threshold
        candidate_scores, candidate_idx = candidate_scores[above], candidate_idx[above]
        kept = candidate_idx[nms(boxes[image, candidate_idx], candidate_scores, nms_iou)][:max_faces]
        results.append(Detections(boxes[image, kept], scores[image, kept],
                                  output.embeddings[image, kept].float(), kept))
    return results


def merge_flipped(found: Detections, mirrored: Detections, canvas_width: int, match_iou: float = 0.5) -> Detections:
    """Flip test-time augmentation: ``found`` (one image) joined with ``mirrored`` (the same canvas mirrored).

    The mirrored detections' boxes are mapped back (``x -> canvas_width - x``)
    and paired greedily, best IoU first, with ``found``'s (IoU >= ``match_iou``).
    A paired face gets the mean of the two boxes and scores and the
    L2-normalised sum of the two embeddings, the embedding of the face and of
    its mirror image. The faces are ``found``'s: one seen only in the mirror
    is dropped, one not seen there keeps its own values.
    """
    if len(found.scores) == 0 or len(mirrored.scores) == 0:
        return found
    back = mirrored.boxes.float().clone()
    back[:, 0], back[:, 2] = canvas_width - mirrored.boxes[:, 2], canvas_width - mirrored.boxes[:, 0]
    iou = box_iou(found.boxes.float(), back)
    boxes, scores = found.boxes.float().clone(), found.scores.float().clone()
    embeddings = found.embeddings.float().clone()
    while True:
        best = int(iou.argmax())
        i, j = divmod(best, iou.shape[1])
        if float(iou[i, j]) < match_iou:
            break
        boxes[i] = (boxes[i] + back[j]) / 2
        scores[i] = (scores[i] + mirrored.scores[j].float()) / 2
        embeddings[i] = F.normalize(embeddings[i] + mirrored.embeddings[j].float(), dim=0)
        iou[i, :] = -1.0
        iou[:, j] = -1.0
    return Detections(boxes, scores, embeddings, found.anchor_idx)
