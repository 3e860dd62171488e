"""JointNet v2: one backbone pass, faces at every scale, identity read from face-aligned features.

Architecture::

    image (B, 3, H, W) -> ResNet stages -> C3 (s8), C4 (s16), C5 (s32)
      -> FPN (top-down, ``fpn_channels``) -> P3, P4, P5
      -> per level a YOLO head: 3x3 conv + ReLU -> 1x1 conv: per anchor 4 box numbers + 1 face logit
         (``detection_neck="own"``: the heads read a second FPN on the same C3-C5, so detection's
         gradients never reach the features identity reads)
         (``identity_stages``: identity's FPN reads its own copies of stages 2-4 (from C2 on with stage 2,
         else from C3 on), so a run that teaches identity can leave every weight detection uses as it was)
      -> identity map: 3x3 conv + BN + ReLU on P3 and P4 (shared weights)
      -> RoIAlign of each face box (enlarged by ``roi_margin``) from P3 (small faces) or P4
         (faces of ``roi_split`` px and more) into ``roi_size x roi_size``
      -> identity head: two 3x3 convs (the second stride 2) -> flatten -> linear -> BatchNorm
         -> ``embedding_dim`` (L2-normalised for search)

Why (issue 15, measured in ``benchmarks/joint_v2/``): v1 read identity from one
cell of the stride-32 grid, so a 60-100 px face was 2x2 cells of a map shared
with detection. Person-search and tracking networks that work (OIM, JDE,
FairMOT) read identity from features aligned to each detected person on a
finer map. The RoI read-out is still one network and one pass: the backbone
runs once per photo; only the small identity head runs per face.

Detection keeps the study's YOLO head and loss family (smooth L1 boxes, BCE
confidence), extended to three levels; anchors come from k-means over the
training boxes (9 sizes, 3 per level, smallest on the finest level). A face
is assigned to the one anchor, over all levels, whose shape fits it best
(YOLOv3's rule), in the cell holding its centre.

The training forward takes the ground-truth boxes (jittered) as RoIs, so the
identity head learns on every face; inference takes the boxes kept after NMS.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import AnchorGrid
from .boxes import BoxCoder, box_iou, cxcywh_to_xyxy, logit, nms, wh_iou
from .model import FACE_PRIOR, IMAGENET_MEAN, IMAGENET_STD
from .resnet import RESNET_SPECS, build_resnet, resnet_stage

ARCHITECTURE = "v2"
TEACHER_DIM = 128
DETECTION_NECKS = ("shared", "own")


@dataclass
class ModelRecordV2:
    """Everything needed to rebuild and use a JointNetV2, stored with its weights (plain types only)."""

    architecture: str = ARCHITECTURE
    backbone: str = "resnet18"
    input_size: int = 256
    level_strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    #: per level, the anchors' ``[w, h]`` in input pixels
    anchor_sizes: list[list[list[float]]] = field(default_factory=lambda: [
        [[16.0, 19.0], [26.0, 31.0], [38.0, 46.0]], [[56.0, 67.0], [80.0, 96.0], [112.0, 134.0]],
        [[160.0, 190.0], [220.0, 260.0], [300.0, 350.0]]])
    fpn_channels: int = 128
    identity_channels: int = 128
    embedding_dim: int = 128
    roi_size: int = 8
    #: channels of the identity head's two convolutions (the second halves the RoI; issue 15's fit test)
    identity_head_widths: list[int] = field(default_factory=lambda: [192, 256])
    roi_margin: float = 1.25
    roi_split: float = 112.0
    #: ``shared``: detection heads and the identity map read one FPN; ``own``: detection has an FPN of its
    #: own on the same backbone maps, so detection training leaves identity's features alone (issue 15)
    detection_neck: str = "shared"
    #: the backbone stages the identity branch has copies of its own, consecutive: ``[3, 4]`` (stages 3 and 4 run
    #: twice from the stride-8 map, once for detection and once, with identity's weights, for identity), ``[4]``
    #: (identity's C4 is the backbone's), ``[3]`` (identity's C4 its own, its C5 the backbone's) or, from the
    #: stride-4 map, ``[2, 3]`` / ``[2, 3, 4]`` (identity's C3 its own too), so identity can learn with
    #: detection's every weight fixed (issue 15). The counts 0, 1 and 2 of older records mean ``[]``, ``[4]``
    #: and ``[3, 4]`` (the last N stages)
    identity_stages: list[int] | int = field(default_factory=list)
    #: planes of identity's own stage 3 (``identity_stages`` with 3, without 4): 0 is the backbone's; fewer make
    #: identity's extra stage cheaper (a ResNet18 stage 3 of 128 planes costs about 0.3 of one of 256)
    identity_stage_width: int = 0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    class_names: list[str] = field(default_factory=list)
    training_command: str = ""
    training_data: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelRecordV2":
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model record fields: {sorted(unknown)}")
        if values.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise ValueError(f"not a {ARCHITECTURE} record: {values.get('architecture')!r}")
        return cls(**values)

    def __post_init__(self) -> None:
        if len(self.identity_head_widths) != 2 or min(self.identity_head_widths) < 1:
            raise ValueError(f"identity_head_widths is two channel counts: {self.identity_head_widths!r}")
        self.identity_head_widths = [int(width) for width in self.identity_head_widths]
        if self.detection_neck not in DETECTION_NECKS:
            raise ValueError(f"detection_neck must be one of {DETECTION_NECKS}: {self.detection_neck!r}")
        self.identity_stages = identity_stage_list(self.identity_stages)
        if self.identity_stages and self.detection_neck != "own":
            raise ValueError("identity stages of its own need a detection neck of its own (detection_neck 'own')")
        if self.identity_stage_width and (3 not in self.identity_stages or 4 in self.identity_stages
                                          or self.identity_stage_width < 0):
            raise ValueError("identity_stage_width sets the planes of identity's own stage 3, so it needs "
                             "identity_stages with stage 3 and without stage 4 (which reads a full-width C4) and a "
                             f"positive width: {self.identity_stage_width!r}, stages {self.identity_stages!r}")

    @property
    def stride(self) -> int:
        return max(self.level_strides)


def identity_stage_list(stages: Sequence[int] | int) -> list[int]:
    """``identity_stages`` as a sorted list of stage numbers (a count N of an older record: the last N stages)."""
    if isinstance(stages, bool):
        raise ValueError(f"identity_stages must be a list of stages (2-4) or a count 0, 1 or 2: {stages!r}")
    if isinstance(stages, int):
        if stages not in (0, 1, 2):
            raise ValueError(f"identity_stages must be a list of stages (2-4) or a count 0, 1 or 2: {stages!r}")
        return [3, 4][2 - stages:] if stages else []
    chosen = sorted(set(int(stage) for stage in stages))
    consecutive = chosen == list(range(chosen[0], chosen[0] + len(chosen))) if chosen else True
    if len(chosen) != len(list(stages)) or not set(chosen) <= {2, 3, 4} or not consecutive:
        raise ValueError(f"identity_stages must name consecutive stages of 2-4, each once: {list(stages)!r}")
    if chosen == [2]:
        raise ValueError("identity's own stage 2 needs its own stage 3 too (identity_stages [2, 3]): the "
                         "backbone's stage 3 reads the backbone's C3")
    return chosen


class DetectionsV2(NamedTuple):
    """Raw predictions of every level, flattened: ``box_raw`` ``(B, N, 4)``, ``face_logits`` ``(B, N)``;
    ``grid_sizes``: ``[(G_h, G_w)]`` per level (N = sum of G_h * G_w * A)."""

    box_raw: torch.Tensor
    face_logits: torch.Tensor
    grid_sizes: list[tuple[int, int]]


def _tap_weights(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear interpolation as weights: ``(K, P)`` feature coordinates -> ``(K, P, size)``, each row the
    weights of the two feature cells around its coordinate (cells outside the map weigh nothing)."""
    low = coords.floor()
    fraction = coords - low
    slot = low.long() + 1  # slots 0 and size + 1, one on each side of the map, take the taps outside it
    weights = coords.new_zeros(*coords.shape, size + 2)
    weights.scatter_add_(-1, slot.clamp(0, size + 1)[..., None], (1 - fraction)[..., None])
    weights.scatter_add_(-1, (slot + 1).clamp(0, size + 1)[..., None], fraction[..., None])
    return weights[..., 1:size + 1]


def roi_align(features: torch.Tensor, boxes: torch.Tensor, image_idx: torch.Tensor, stride: int,
              output_size: int, sampling: int = 2) -> torch.Tensor:
    """RoIAlign (Mask R-CNN): ``(B, C, H, W)`` map, ``(K, 4)`` xyxy boxes in input pixels, ``(K,)`` image
    indices -> ``(K, C, output_size, output_size)``.

    Each output bin averages ``sampling x sampling`` bilinear samples; a sample
    at input pixel ``x`` reads feature column ``x / stride - 0.5`` (pixel
    centres), zero outside the map. The samples form a grid, so sampling and
    averaging are two small matrices per face, one for rows and one for
    columns: ``rows (R, h) @ window (C, h, w) @ columns (w, R)``, on the window
    of the map the face covers (no map is copied).
    """
    count, channels = len(boxes), features.shape[1]
    if count == 0:
        return features.new_zeros(0, channels, output_size, output_size)
    height, width = features.shape[-2:]
    points = output_size * sampling
    steps = (torch.arange(points, dtype=features.dtype, device=features.device) + 0.5) / points  # (P,)
    x1, y1, x2, y2 = boxes.to(features.dtype).unbind(-1)
    xs = (x1[:, None] + (x2 - x1)[:, None] * steps[None]) / stride - 0.5  # (K, P) feature coordinates
    ys = (y1[:, None] + (y2 - y1)[:, None] * steps[None]) / stride - 0.5
    columns = _tap_weights(xs, width).view(count, output_size, sampling, width).mean(2)  # (K, R, W)
    rows = _tap_weights(ys, height).view(count, output_size, sampling, height).mean(2)  # (K, R, H)
    # the rows and columns of the map each face reads
    window = torch.stack((ys[:, 0].floor(), ys[:, -1].floor() + 2, xs[:, 0].floor(), xs[:, -1].floor() + 2), 1)
    window = torch.minimum(window.clamp(min=0), window.new_tensor([height, height, width, width])).long()
    pooled = []
    for face, (image, (top, bottom, left, right)) in enumerate(zip(image_idx.tolist(), window.tolist())):
        if bottom <= top or right <= left:  # wholly outside the map
            pooled.append(features.new_zeros(channels, output_size, output_size))
            continue
        region = features[image, :, top:bottom, left:right]
        pooled.append(rows[face, :, top:bottom] @ region @ columns[face, :, left:right].t())
    return torch.stack(pooled)


def enlarge(boxes: torch.Tensor, factor: float) -> torch.Tensor:
    """Boxes ``(K, 4)`` xyxy scaled by ``factor`` about their centres (the face plus some context)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2 * factor
    return torch.cat((centre - half, centre + half), dim=-1)


class IdentityHead(nn.Module):
    """``(K, C, R, R)`` aligned face features -> ``(K, D)`` embeddings (not normalised)."""

    def __init__(self, in_channels: int, roi_size: int, embedding_dim: int, widths: Sequence[int] = (192, 256)):
        super().__init__()
        width, out = widths
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
        )
        side = (roi_size + 1) // 2
        self.fc = nn.Linear(out * side * side, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(torch.flatten(self.convs(rois), 1)))


class JointNetV2(nn.Module):
    """Backbone + FPN + YOLO heads on three levels + RoI identity head (see the module docstring)."""

    def __init__(self, record: ModelRecordV2):
        super().__init__()
        self.record = record
        self.backbone = build_resnet(record.backbone, num_classes=0)
        width = self.backbone.num_features // 8  # C3 channels (stage 2 of 4)
        in_channels = [width * 2, width * 4, width * 8]  # C3, C4, C5
        channels = record.fpn_channels
        identity_in = list(in_channels)
        if record.identity_stage_width:  # identity's own C4 has the planes of its narrower stage 3
            identity_in[1] = record.identity_stage_width * RESNET_SPECS[record.backbone].block.expansion
        self.lateral, self.smooth = self._fpn(identity_in, channels)
        #: with ``detection_neck == "own"`` the detection heads read these, and ``lateral``/``smooth`` feed
        #: identity alone (which reads P3 and P4, so ``smooth[2]`` is then unused: kept for the weights' layout,
        #: except with identity stages of its own, whose networks have none)
        self.detection_lateral, self.detection_smooth = (self._fpn(in_channels, channels)
                                                         if record.detection_neck == "own" else (None, None))
        if record.identity_stages:
            del self.smooth[2]
        anchors_per_level = [len(sizes) for sizes in record.anchor_sizes]
        self.heads = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                                 nn.Conv2d(channels, count * 5, 1))
                                   for count in anchors_per_level)
        for head, count in zip(self.heads, anchors_per_level):
            nn.init.normal_(head[-1].weight, std=0.01)
            with torch.no_grad():
                bias = head[-1].bias.view(count, 5)
                bias.zero_()
                bias[:, 4] = logit(FACE_PRIOR)
        self.identity_map = nn.Sequential(nn.Conv2d(channels, record.identity_channels, 3, padding=1, bias=False),
                                          nn.BatchNorm2d(record.identity_channels), nn.ReLU(inplace=True))
        self.identity = IdentityHead(record.identity_channels, record.roi_size, record.embedding_dim,
                                     record.identity_head_widths)
        #: the identity branch's own copies of the backbone stages ``identity_stages`` (``layer2``-``layer4``);
        #: they start as copies of the backbone's (:meth:`split_identity_stages`)
        self.identity_backbone = nn.ModuleDict()
        if record.identity_stages:
            for stage in record.identity_stages:  # stage 3 narrower with identity_stage_width
                planes = record.identity_stage_width if stage == 3 and record.identity_stage_width else None
                self.identity_backbone[f"layer{stage}"] = resnet_stage(record.backbone, stage, planes)
        #: training option: no gradient through the stem and the first N residual stages (0-3); their
        #: backward is most of a step's cost on a CPU. Set by the training run, never stored
        self.frozen_stages = 0
        #: every anchor at each grid size met so far (:meth:`all_anchors`): the same for every photo batch
        self._anchor_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        #: the distillation target lives in the teacher's 128 dimensions: with another embedding size a
        #: bias-free linear map takes the embedding there (with 128 the embedding itself is distilled)
        self.teacher_projection = (nn.Identity() if record.embedding_dim == TEACHER_DIM
                                   else nn.Linear(record.embedding_dim, TEACHER_DIM, bias=False))
        #: mean dlib descriptor of the training faces: the distillation target is the teacher minus this
        self.register_buffer("teacher_mean", torch.zeros(TEACHER_DIM))

    @staticmethod
    def _fpn(in_channels: Sequence[int], channels: int) -> tuple[nn.ModuleList, nn.ModuleList]:
        lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                             nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
                               for _ in in_channels)
        return lateral, smooth

    @staticmethod
    def _top_down(lateral: nn.ModuleList, smooth: nn.ModuleList, c3: torch.Tensor, c4: torch.Tensor,
                  c5: torch.Tensor, levels: int = 3) -> list[torch.Tensor]:
        """FPN: P3, P4, P5 (the first ``levels`` of them smoothed and returned)."""
        p5 = lateral[2](c5)
        p4 = lateral[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = lateral[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        return [block(p) for block, p in zip(smooth[:levels], (p3, p4, p5))]

    def split_detection_neck(self) -> None:
        """Start the own detection FPN as a copy of the shared one (a shared-neck network's weights loaded)."""
        if self.detection_lateral is None:
            raise ValueError("this network has no detection neck of its own (detection_neck is 'shared')")
        self.detection_lateral.load_state_dict(self.lateral.state_dict())
        self.detection_smooth.load_state_dict(self.smooth.state_dict())

    def split_identity_stages(self) -> list[str]:
        """Start the identity branch's own stages as copies of the backbone's; a narrower stage 3 is left as
        it is (it cannot be a copy: start it from a slimmed network, benchmarks/joint_v2/slim_stage3/slim.py).
        Returns the stages copied."""
        if not self.record.identity_stages:
            raise ValueError("this network's identity branch has no stages of its own (identity_stages is 0)")
        copied = []
        for name, stage in self.identity_backbone.items():
            if name == "layer3" and self.record.identity_stage_width:
                continue
            stage.load_state_dict(getattr(self.backbone, name).state_dict())
            copied.append(name)
        if not copied:
            raise ValueError("identity's only own stage is a stage 3 narrower than the backbone's: it cannot start "
                             "as a copy (start it from a slimmed network, benchmarks/joint_v2/slim_stage3/slim.py)")
        return copied

    # ------------------------------------------------------------------ the dense part (one pass per photo)
    def anchor_grids(self) -> list[AnchorGrid]:
        return [AnchorGrid(torch.tensor(sizes, dtype=torch.float32), stride)
                for sizes, stride in zip(self.record.anchor_sizes, self.record.level_strides)]

    def all_anchors(self, grid_sizes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`all_anchors` of this network's levels at these grid sizes (kept for the next photo batch)."""
        key = tuple((int(h), int(w)) for h, w in grid_sizes)
        if key not in self._anchor_cache:
            if len(self._anchor_cache) > 16:  # photos of many sizes: keep the newest few
                self._anchor_cache.pop(next(iter(self._anchor_cache)))
            self._anchor_cache[key] = all_anchors(self.anchor_grids(), key)
        return self._anchor_cache[key]

    def forward_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` -> 3 detection maps ``(B, A*5, G_h, G_w)`` (s8, s16, s32) and 2 identity maps
        ``(B, C, H/8, W/8)``, ``(B, C, H/16, W/16)``. Everything dense, and nothing else: the part exported
        to ONNX Runtime."""
        c2, c3, c4, c5 = self._backbone_maps(images)
        if self.detection_lateral is None:
            p3, p4, p5 = self._top_down(self.lateral, self.smooth, c3, c4, c5)
            detection_levels = (p3, p4, p5)
        else:  # identity needs P3 and P4 of its FPN only; detection reads its own three levels
            p3, p4 = self._identity_levels(c2, c3, c4, c5)
            detection_levels = self._top_down(self.detection_lateral, self.detection_smooth, c3, c4, c5)
        detection = [head(p) for head, p in zip(self.heads, detection_levels)]
        return (*detection, self.identity_map(p3), self.identity_map(p4))

    def identity_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two identity maps of :meth:`forward_maps` alone (a training step that teaches identity only
        skips the detection FPN and heads, and the shared stages identity has copies of)."""
        own = self.record.identity_stages  # the shared stages identity reads: up to the first it has its own
        p3, p4 = self._identity_levels(*self._backbone_maps(images, stages=4 if 4 not in own else min(own) - 1))
        return self.identity_map(p3), self.identity_map(p4)

    def _backbone_maps(self, images: torch.Tensor, stages: int = 4) -> tuple[torch.Tensor | None, ...]:
        """C2 (stage 1's output, stride 4), C3, C4, C5 of the shared backbone (``None`` past ``stages``)."""
        b = self.backbone
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.frozen_stages < 1):
            c2 = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(images)))))
        if stages < 2:
            return c2, None, None, None
        with torch.set_grad_enabled(grad and self.frozen_stages < 2):
            c3 = b.layer2(c2)
        if stages < 3:
            return c2, c3, None, None
        with torch.set_grad_enabled(grad and self.frozen_stages < 3):
            c4 = b.layer3(c3)
        return c2, c3, c4, (b.layer4(c4) if stages > 3 else None)

    def _identity_levels(self, c2: torch.Tensor, c3: torch.Tensor | None, c4: torch.Tensor | None,
                         c5: torch.Tensor | None) -> list[torch.Tensor]:
        """P3 and P4 of identity's FPN: on the shared C3-C5, with C3, C4 and/or C5 from identity's own stages."""
        own = self.identity_backbone
        if "layer2" in own:
            c3 = own["layer2"](c2)
        if "layer3" in own:
            c4 = own["layer3"](c3)
        if "layer4" in own:
            c5 = own["layer4"](c4)
        return self._top_down(self.lateral, self.smooth, c3, c4, c5, levels=2)

    def detections_from_maps(self, maps: Sequence[torch.Tensor]) -> DetectionsV2:
        """Flatten the detection maps: anchor ``a`` of cell ``(row, col)`` of level ``l`` follows the
        anchors of the levels before it, at ``(row * G_w + col) * A + a``."""
        boxes, logits, grids = [], [], []
        for level_map, sizes in zip(maps, self.record.anchor_sizes):
            batch, _, grid_h, grid_w = level_map.shape
            count = len(sizes)
            flat = level_map.view(batch, count, 5, grid_h, grid_w).permute(0, 3, 4, 1, 2).reshape(batch, -1, 5)
            boxes.append(flat[..., :4])
            logits.append(flat[..., 4])
            grids.append((grid_h, grid_w))
        return DetectionsV2(torch.cat(boxes, 1), torch.cat(logits, 1), grids)

    # ------------------------------------------------------------------ the per-face part
    def pool_faces(self, identity_maps: Sequence[torch.Tensor], boxes: torch.Tensor, image_idx: torch.Tensor
                   ) -> torch.Tensor:
        """The identity head's input for face boxes ``(K, 4)`` (input pixels) in images ``image_idx`` ``(K,)``:
        each box enlarged by the RoI margin, RoI-aligned from the stride-8 map (small faces) or the stride-16
        map, ``(K, C, R, R)``."""
        record = self.record
        rois = enlarge(boxes.float(), record.roi_margin)
        side = (rois[:, 2:] - rois[:, :2]).clamp(min=1).prod(dim=1).sqrt()
        fine = side < record.roi_split * record.roi_margin
        pooled = identity_maps[0].new_zeros(len(rois), identity_maps[0].shape[1], record.roi_size, record.roi_size)
        for mask, level_map, stride in ((fine, identity_maps[0], record.level_strides[0]),
                                        (~fine, identity_maps[1], record.level_strides[1])):
            if bool(mask.any()):
                pooled[mask] = roi_align(level_map, rois[mask], image_idx[mask], stride, record.roi_size)
        return pooled

    def embed(self, identity_maps: Sequence[torch.Tensor], boxes: torch.Tensor, image_idx: torch.Tensor,
              normalise: bool = True, head=None) -> torch.Tensor:
        """Embeddings ``(K, D)`` of face boxes ``(K, 4)`` (input pixels) in images ``image_idx`` ``(K,)``.
        ``head``: what runs the identity head on the pooled faces (default: this network's own, in torch)."""
        embeddings = (head or self.identity)(self.pool_faces(identity_maps, boxes, image_idx))
        return F.normalize(embeddings.float(), dim=-1) if normalise else embeddings

    def forward_train(self, images: torch.Tensor, boxes: torch.Tensor, image_idx: torch.Tensor
                      ) -> tuple[DetectionsV2, torch.Tensor]:
        """Detections of every anchor and the embeddings of the given boxes (the training forward)."""
        maps = self.forward_maps(images)
        return self.detections_from_maps(maps[:3]), self.embed(maps[3:], boxes, image_idx)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.forward_maps(images)


# ----------------------------------------------------------------------------- targets
@dataclass
class MatchedV2:
    """Detection targets of a batch over all levels' anchors (see :func:`match_multilevel`)."""

    objectness: torch.Tensor          # (B, N)
    confidence_weight: torch.Tensor   # (B, N)
    matched_image_idx: torch.Tensor   # (M,)
    matched_anchor_idx: torch.Tensor  # (M,)
    box_targets: torch.Tensor         # (M, 4) in BoxCoder target space of the anchor's level

    @property
    def num_faces(self) -> int:
        return len(self.matched_anchor_idx)


def all_anchors(grids: Sequence[AnchorGrid], grid_sizes: Sequence[tuple[int, int]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every anchor of every level ``(N, 4)`` cxcywh and its stride ``(N,)``, in the flattened order."""
    anchors, strides = [], []
    for grid, (grid_h, grid_w) in zip(grids, grid_sizes):
        level = grid(grid_h, grid_w)
        anchors.append(level)
        strides.append(torch.full((len(level),), float(grid.stride)))
    return torch.cat(anchors), torch.cat(strides)


def match_multilevel(boxes_per_image: Sequence[torch.Tensor], grids: Sequence[AnchorGrid],
                     grid_sizes: Sequence[tuple[int, int]], ignore_iou: float = 0.5) -> MatchedV2:
    """Assign each face (``(F, 4)`` xyxy per image) to one anchor over all levels (best shape IoU, then
    the cell holding its centre). Anchors whose prior box overlaps a face above ``ignore_iou`` are left
    out of the confidence loss; of two faces on one anchor the larger keeps it."""
    anchors, strides = all_anchors(grids, grid_sizes)
    anchor_boxes = cxcywh_to_xyxy(anchors)
    sizes = torch.cat([grid.anchor_sizes for grid in grids])  # (L*A, 2) in level order
    per_level = [grid.num_anchors for grid in grids]
    level_of = torch.repeat_interleave(torch.arange(len(grids)), torch.tensor(per_level))
    first_of_level = torch.tensor([0] + per_level).cumsum(0)[:-1]
    offsets = [0]
    for (grid_h, grid_w), count in zip(grid_sizes, per_level):
        offsets.append(offsets[-1] + grid_h * grid_w * count)
    batch = len(boxes_per_image)
    objectness = torch.zeros(batch, len(anchors))
    weight = torch.ones(batch, len(anchors))
    image_idx, anchor_idx, targets = [], [], []
    for image, boxes in enumerate(boxes_per_image):
        if len(boxes) == 0:
            continue
        boxes = boxes.float()
        weight[image, (box_iou(anchor_boxes, boxes) > ignore_iou).any(dim=1)] = 0.0
        best = wh_iou(boxes[:, 2:] - boxes[:, :2], sizes).argmax(dim=1)
        owner: dict[int, int] = {}
        order = torch.argsort((boxes[:, 2:] - boxes[:, :2]).prod(dim=1), stable=True)  # larger last: they win
        for face in order.tolist():
            level = int(level_of[best[face]])
            anchor_in_level = int(best[face] - first_of_level[level])
            grid_h, grid_w = grid_sizes[level]
            stride = grids[level].stride
            centre = (boxes[face, :2] + boxes[face, 2:]) / 2
            col = min(max(int(centre[0] // stride), 0), grid_w - 1)
            row = min(max(int(centre[1] // stride), 0), grid_h - 1)
            flat = offsets[level] + (row * grid_w + col) * per_level[level] + anchor_in_level
            owner[flat] = face
        for flat, face in sorted(owner.items()):
            objectness[image, flat] = 1.0
            weight[image, flat] = 1.0
            image_idx.append(image)
            anchor_idx.append(flat)
            coder = BoxCoder(int(strides[flat]))
            targets.append(coder.encode(boxes[face:face + 1], anchors[flat:flat + 1])[0])
    return MatchedV2(objectness, weight, torch.tensor(image_idx, dtype=torch.long),
                     torch.tensor(anchor_idx, dtype=torch.long),
                     torch.stack(targets) if targets else torch.zeros(0, 4))


# ----------------------------------------------------------------------------- losses
def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the pairwise cosines of unit ``(M, D)`` student and ``(M, T)`` teacher
    vectors, off the diagonal (the student keeps the teacher's geometry within the batch)."""
    if len(student) < 2:
        return student.sum() * 0.0
    student_sim, teacher_sim = student @ student.T, teacher @ teacher.T
    off = ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    return (student_sim - teacher_sim)[off].pow(2).mean()


def bank_contrast_loss(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor,
                       student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Cross-entropy between the teacher's and the student's similarity distributions over a bank of
    teacher vectors (SEED-style distillation against a memory bank).

    ``student`` and ``teacher`` are unit ``(M, D)`` rows of the same faces, ``bank`` unit ``(N, D)`` teacher
    vectors (the training faces, these among them). The target is ``softmax(teacher @ bank.T / tau_t)``:
    nearly all its mass on the face itself and the teacher's near-duplicates of it (the same person), so the
    student learns to be nearer its own teacher vector than to any other face's of tens of thousands, where
    the in-batch ``relational`` term sees 47. That is the open-set question search asks of an embedding.
    """
    with torch.no_grad():
        target = torch.softmax(teacher @ bank.T / teacher_temperature, dim=1)
    log_student = torch.log_softmax(student @ bank.T / student_temperature, dim=1)
    return -(target * log_student).sum(1).mean()


def identity_losses(embeddings: torch.Tensor, teachers: torch.Tensor, teacher_valid: torch.Tensor,
                    identities: torch.Tensor, teacher_mean: torch.Tensor, margin_head: nn.Module | None = None,
                    teacher_projection: nn.Module | None = None, teacher_bank: torch.Tensor | None = None,
                    bank_temperatures: tuple[float, float] = (0.05, 0.05)) -> dict[str, torch.Tensor]:
    """The identity terms of :func:`losses_v2` (unit ``(K, D)`` embeddings of ``K`` faces):
    ``distill``, ``relational``, with a margin head ``identity_margin``, and with ``teacher_bank`` (unit,
    centred teacher vectors) ``bank_contrast`` (:func:`bank_contrast_loss` at ``bank_temperatures``,
    student then teacher)."""
    zero = lambda tensor: tensor.sum() * 0.0  # noqa: E731 - an exact 0 in the graph
    losses = {}
    if bool(teacher_valid.any()):
        target = F.normalize(teachers[teacher_valid].float() - teacher_mean, dim=-1)
        student = embeddings[teacher_valid]
        if teacher_projection is not None:
            student = F.normalize(teacher_projection(student), dim=-1)
        losses["distill"] = (1.0 - (student * target).sum(-1)).mean()
        losses["relational"] = relational_loss(student, target)
        if teacher_bank is not None:
            losses["bank_contrast"] = bank_contrast_loss(student, target, teacher_bank, *bank_temperatures)
    else:
        losses["distill"] = losses["relational"] = zero(embeddings)
        if teacher_bank is not None:
            losses["bank_contrast"] = zero(embeddings)
    if margin_head is not None:
        known = identities >= 0
        if bool(known.any()):
            logits = margin_head(embeddings[known], identities[known])
            losses["identity_margin"] = F.cross_entropy(logits, identities[known])
        else:
            losses["identity_margin"] = zero(embeddings) + zero(margin_head.weight)
    return losses


def losses_v2(detections: DetectionsV2, matched: MatchedV2, embeddings: torch.Tensor, teachers: torch.Tensor,
              teacher_valid: torch.Tensor, identities: torch.Tensor, teacher_mean: torch.Tensor,
              margin_head: nn.Module | None = None, box_beta: float = 0.1,
              teacher_projection: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Named, unweighted loss terms (the training loop weights and sums them).

    * ``box``: smooth L1 in box-coder target space over matched anchors;
    * ``confidence``: BCE over non-ignored anchors, divided by the number of faces;
    * ``distill``: ``1 - cos(embedding, teacher - teacher_mean)`` over faces with a teacher;
    * ``relational``: :func:`relational_loss` against the centred teachers;
    * ``identity_margin``: CosFace/ArcFace cross-entropy over faces with a known identity.
    """
    zero = lambda tensor: tensor.sum() * 0.0  # noqa: E731 - an exact 0 in the graph
    box_raw, face_logits = detections.box_raw.float(), detections.face_logits.float()
    faces = max(matched.num_faces, 1)
    predicted = BoxCoder.to_target_space(box_raw[matched.matched_image_idx, matched.matched_anchor_idx])
    losses = {"box": F.smooth_l1_loss(predicted, matched.box_targets, beta=box_beta, reduction="sum") / (4 * faces)
              + zero(box_raw)}
    confidence = F.binary_cross_entropy_with_logits(face_logits, matched.objectness, reduction="none")
    losses["confidence"] = (confidence * matched.confidence_weight).sum() / faces
    losses.update(identity_losses(embeddings, teachers, teacher_valid, identities, teacher_mean, margin_head,
                                  teacher_projection))
    return losses


# ----------------------------------------------------------------------------- inference
class FacesV2(NamedTuple):
    """Faces kept in one image: ``boxes`` ``(K, 4)`` xyxy input pixels, ``scores`` ``(K,)``,
    ``embeddings`` ``(K, D)`` unit vectors; highest score first."""

    boxes: torch.Tensor
    scores: torch.Tensor
    embeddings: torch.Tensor


def decode_v2(model: JointNetV2, detections: DetectionsV2, conf_threshold: float = 0.5, nms_iou: float = 0.4,
              max_faces: int = 100, pre_nms_top_k: int = 300, large_threshold: float | None = None,
              large_side: float = 96.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Boxes ``(K, 4)`` and scores ``(K,)`` per image after threshold and NMS (all levels together).

    A face is kept from ``conf_threshold``, or, with ``large_threshold``, a face of ``large_side`` input pixels
    and more (the square root of its box's area) from ``large_threshold``. Only the best ``pre_nms_top_k``
    anchors of an image that pass a threshold are decoded."""
    anchors, strides = model.all_anchors(detections.grid_sizes)
    scores = detections.face_logits.float().sigmoid()
    batch = scores.shape[0]
    top_scores, top_idx = scores.topk(min(pre_nms_top_k, scores.shape[1]), dim=1)
    above = top_scores >= (conf_threshold if large_threshold is None else min(conf_threshold, large_threshold))
    # every image's candidates at once (image by image, best first), then one NMS within each image
    image = torch.arange(batch)[:, None].expand_as(top_idx)[above]
    candidate_scores, candidate_idx = top_scores[above], top_idx[above]
    targets = BoxCoder.to_target_space(detections.box_raw[image, candidate_idx].float())
    chosen, chosen_strides = anchors[candidate_idx], strides[candidate_idx, None]
    xy = chosen[:, :2] + (targets[:, :2] - 0.5) * chosen_strides
    wh = chosen[:, 2:] * torch.exp(targets[:, 2:].clamp(max=BoxCoder.max_log_ratio))
    boxes = cxcywh_to_xyxy(torch.cat((xy, wh), dim=-1))
    if large_threshold is not None:
        large = wh.prod(dim=1).sqrt() >= large_side
        kept = candidate_scores >= torch.where(large, large_threshold, conf_threshold)
        boxes, candidate_scores, image = boxes[kept], candidate_scores[kept], image[kept]
    keep = nms(boxes, candidate_scores, nms_iou, groups=image)
    boxes, candidate_scores, image = boxes[keep], candidate_scores[keep], image[keep]
    results = []
    for index in range(batch):
        mine = image == index
        results.append((boxes[mine][:max_faces], candidate_scores[mine][:max_faces]))
    return results


def boxes_and_images(found: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_v2`'s faces of every image as one ``(K, 4)`` box tensor and each box's image ``(K,)``."""
    boxes = torch.cat([b for b, _ in found]) if found else torch.zeros(0, 4)
    image_idx = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, (b, _) in enumerate(found)]) \
        if found else torch.zeros(0, dtype=torch.long)
    return boxes, image_idx


def faces_from_maps(model: JointNetV2, maps: Sequence[torch.Tensor], conf_threshold: float = 0.5,
                    nms_iou: float = 0.4, max_faces: int = 100, large_threshold: float | None = None,
                    large_side: float = 96.0, head=None) -> list[FacesV2]:
    """Every kept face of each image with its embedding, from :meth:`JointNetV2.forward_maps`'s output
    (thresholds as in :func:`decode_v2`; ``head`` as in :meth:`JointNetV2.embed`)."""
    found = decode_v2(model, model.detections_from_maps(maps[:3]), conf_threshold, nms_iou, max_faces,
                      large_threshold=large_threshold, large_side=large_side)
    boxes, image_idx = boxes_and_images(found)
    embeddings = model.embed([m.float() for m in maps[3:]], boxes, image_idx, head=head) if len(boxes) else \
        torch.zeros(0, model.record.embedding_dim)
    results, start = [], 0
    for box, score in found:
        results.append(FacesV2(box, score, embeddings[start:start + len(box)]))
        start += len(box)
    return results


def kmeans_level_anchors(box_sizes: torch.Tensor, levels: int = 3, per_level: int = 3) -> list[list[list[float]]]:
    """Anchors per level, finest level first: the boxes are split into ``levels`` bands of equal width in
    log face size (not of equal count: small mosaic faces outnumber close-ups, and a plain 9-way k-means
    would give the coarsest level nothing near a close-up), then k-means within each band."""
    from .anchors import kmeans_anchors

    box_sizes = torch.as_tensor(box_sizes, dtype=torch.float32).reshape(-1, 2)
    box_sizes = box_sizes[(box_sizes > 0).all(dim=1)]
    size = box_sizes.prod(dim=1).sqrt().log()
    edges = torch.linspace(float(size.min()), float(size.max()), levels + 1)
    anchors = []
    for level in range(levels):
        upper = size <= edges[level + 1] if level == levels - 1 else size < edges[level + 1]
        band = box_sizes[(size >= edges[level]) & upper]
        if len(band) < per_level:  # too few boxes to cluster: sizes evenly spaced in log over the band
            aspect = float((box_sizes[:, 1] / box_sizes[:, 0]).median())
            steps = (torch.arange(per_level, dtype=torch.float32) + 0.5) / per_level
            sides = (edges[level] + steps * (edges[level + 1] - edges[level])).exp()
            band_anchors = torch.stack((sides / aspect ** 0.5, sides * aspect ** 0.5), dim=1)
        else:
            band_anchors = kmeans_anchors(band, per_level)
        anchors.append([[round(float(w), 1), round(float(h), 1)] for w, h in band_anchors])
    return anchors


def check_record_fits(record: ModelRecordV2) -> None:
    """The record's levels and anchors agree (raises ValueError)."""
    if len(record.level_strides) != 3 or len(record.anchor_sizes) != 3:
        raise ValueError("a v2 record has three levels (strides 8, 16, 32) with anchors for each")
    if any(not sizes for sizes in record.anchor_sizes):
        raise ValueError("every level needs at least one anchor")
    if not math.isfinite(record.roi_margin) or record.roi_margin <= 0:
        raise ValueError("roi_margin must be positive")
