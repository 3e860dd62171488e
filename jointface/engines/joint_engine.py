"""The ``jointface`` engine: one JointNet pass gives every face's box and embedding.

Pipeline for an RGB uint8 ``(H, W, 3)`` image:

1. letterbox: the longer side is scaled to the model's input size (or the
   ``input_size`` given here; the network is fully convolutional, so a larger
   input finds smaller faces in big group photos) and centred on a square of
   the training pad colour — faces keep their aspect ratio, as in training;
2. one forward pass (``torch.inference_mode``, optional bf16 autocast). By
   default the network runs with its BatchNorm layers folded into the
   convolutions (:func:`jointface.net.fuse.fuse_batchnorm`) in channels-last
   memory format, both measured faster on CPU; ``fuse=False,
   channels_last=False`` gives the plain reference network, and a test
   checks that both give the same faces;
3. decode boxes, keep anchors with face probability >= ``conf_threshold``,
   NMS (IoU > ``nms_iou`` suppressed), keep each surviving anchor's
   embedding (already L2-normalised by the network);
4. map boxes back to input-image pixels (undo the letterbox), clip.

Weights files are read with ``torch.load(weights_only=True)``: a file that
holds pickled code, or is not a JointFace weights file (see
:mod:`jointface.weights_file`), raises :class:`WeightsError`.
``engine_version`` is the first 12 hex digits of the file's SHA-256, so
galleries never mix embeddings of different weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jointface.weights_file import WeightsError, default_weights_path, load_weights, read_card

from .base import Engine, Face, check_image

def _classifier_from(heads: dict):
    """(weight (C, D), bias (C,) or None) of the linear classifier head, else of the margin head."""
    for prefix in ("classifier.fc.", "margin."):
        weight = heads.get(prefix + "weight")
        if weight is not None:
            bias = heads.get(prefix + "bias")
            weight = weight.float().numpy()
            if prefix == "margin.":  # cosine classifier: normalised class centres
                weight = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
            else:  # the linear head scales its input (weights saved before the scale existed: 1)
                scale = heads.get("classifier.scale")
                weight = weight * (1.0 if scale is None else float(scale))
            return weight, None if bias is None else bias.float().numpy()
    return None


class JointEngine(Engine):
    """JointNet face detection + embedding (see the module docstring)."""

    name = "jointface"
    default_threshold = 0.5
    MAX_INPUT_SIZE = 640
    V2_MAX_INPUT_SIZE = 384
    #: v2 feeds a photo at this share of its longer side (see :meth:`network_input_size`)
    V2_INPUT_SCALE = 0.75
    #: v2 keeps faces of ``V2_LARGE_FACE_SIDE`` network input pixels and more (the square root of the box's
    #: area) from this confidence, the others from ``conf_threshold``: close-ups score lower than faces of the
    #: sizes training showed most, and at these sizes a lower threshold added no false detection on P6a or
    #: P6c (``benchmarks/detection_threshold/``: P6b recall at S = 384 px 0.635 -> 0.955, at 192 px
    #: 0.910 -> 0.970, P1 photos without a face 14 -> 6 on the shipped weights)
    V2_LARGE_FACE_THRESHOLD = 0.3
    V2_LARGE_FACE_SIDE = 96.0
    #: faces are kept from this confidence unless the weights card or an option says otherwise
    CONF_THRESHOLD = 0.7

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu", bf16: bool = False,
                 conf_threshold: float | None = None, nms_iou: float = 0.4, input_size: int | None = None,
                 max_faces: int = 100, channels_last: bool = True, fuse: bool = True, runtime: str = "torch",
                 flip: bool = False, large_face_threshold: float | None = None,
                 large_face_side: float | None = None):
        import torch

        from jointface.net.model import JointNet, ModelRecord

        path = Path(weights) if weights is not None else default_weights_path()
        if path is None:
            raise WeightsError("no JointFace weights: train and export some, or set JOINTFACE_WEIGHTS")
        payload, self._version = load_weights(path)
        #: v2 (FPN, three levels, RoI identity head: jointface.net.v2) or the original single-grid network
        self.architecture = "v2" if payload["record"].get("architecture") == "v2" else "v1"
        try:
            if self.architecture == "v2":
                from jointface.net.v2 import JointNetV2, ModelRecordV2

                self.record = ModelRecordV2.from_dict(payload["record"])
                model = JointNetV2(self.record)
            else:
                self.record = ModelRecord.from_dict(payload["record"])
                model = JointNet(self.record)
            model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                   for k, v in payload["state_dict"].items()})
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            raise WeightsError(f"{path}: weights do not fit the network they describe ({exc})") from exc

        self.weights_path = path
        training = payload.get("training") or {}
        self.training = {"identity_heads": list((training.get("config") or {}).get("identity_heads") or []),
                         "training_steps": training.get("step"), "validation": training.get("metrics") or {},
                         "continued_from": _start_weights(training.get("config") or {})}
        card = read_card(path, self._version)  # {} for no card, a damaged one or one of other weights
        self.default_threshold, self.threshold_source = self._card_threshold(card)
        #: the card's thresholds for galleries of each size (``{"people", "threshold", "fpir", "source"}``) or None
        self.gallery_size_thresholds = self._card_sized_thresholds(card)
        #: the detection operating point of these weights (the card's ``detection`` section, written by
        #: ``benchmarks/detection_threshold/sweep.py --write-card``), or the class defaults
        self.detection_point = self._card_detection(card, path.with_suffix(".json"))
        self._classifier = _classifier_from(payload.get("identity_heads") or {})
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.fused = bool(fuse)
        if self.fused:
            from jointface.net.fuse import fuse_batchnorm

            self.model = fuse_batchnorm(self.model)
        if runtime not in ("torch", "onnx", "int8", "auto", "compiled"):
            raise ValueError(f"unknown runtime {runtime!r}: use 'torch', 'onnx', 'int8', 'compiled' or 'auto'")
        if runtime in ("onnx", "int8", "compiled") and bf16:
            raise ValueError("bf16 autocast is an option of the torch runtime; the others do not use it")
        self._maps = None
        if runtime == "auto":  # int8 when these weights have their int8 model beside them, else torch
            self._maps = None if bf16 else self._int8_if_present(path, torch.get_num_threads())
            runtime = "torch" if self._maps is None else "int8"
        elif runtime == "int8":  # quantised by `jointface quantize` from these weights, saved beside them
            from .onnx_runtime import Int8ModelError, OnnxMaps, int8_model_path

            try:
                self._maps = OnnxMaps.int8(int8_model_path(path), self._version, torch.get_num_threads())
            except Int8ModelError as exc:
                raise WeightsError(str(exc)) from exc
        elif runtime == "compiled":  # the dense part in bf16 through torch.compile (engines/compiled.py)
            from .compiled import CompiledMaps, CompiledUnavailable

            try:
                self._maps = CompiledMaps(self.model)
            except CompiledUnavailable as exc:
                raise WeightsError(str(exc)) from exc
        elif runtime == "onnx":  # the convolutions in ONNX Runtime; decoding and NMS stay in torch
            from .onnx_runtime import OnnxMaps

            self._maps = OnnxMaps(self.model, f"{self._version}-{'fused' if self.fused else 'plain'}",
                                  threads=torch.get_num_threads())
        self.runtime = runtime
        #: the v2 identity head's int8 model (``<weights>.int8-head.onnx``, made with the int8 model) when the
        #: int8 path runs and it is there, else None: the head runs in torch
        self._onnx_head = self._int8_head(runtime == "int8", torch.get_num_threads())
        if self._maps is not None:
            channels_last = False  # the torch model only decodes; the runtime lays out its own input
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.bf16 = bool(bf16)
        point = self.detection_point
        self.conf_threshold = float(conf_threshold if conf_threshold is not None else
                                    point.get("conf_threshold", self.CONF_THRESHOLD))
        #: v2: faces of ``large_face_side`` input pixels and more are kept from this confidence (None: every
        #: face from ``conf_threshold``, as v1 networks always do)
        self.large_face_threshold: float | None = None
        self.large_face_side: float | None = None
        if self.architecture == "v2":
            if large_face_threshold is None:
                large_face_threshold = point.get("large_face_threshold", self.V2_LARGE_FACE_THRESHOLD)
            if large_face_threshold is not None:
                self.large_face_threshold = float(large_face_threshold)
                self.large_face_side = float(large_face_side if large_face_side is not None else
                                             point.get("large_face_side", self.V2_LARGE_FACE_SIDE))
        self.nms_iou = float(nms_iou)
        # None: chosen per batch from the image size (see network_input_size).
        self.input_size = int(input_size) if input_size else None
        self.max_faces = int(max_faces)
        # Flip test-time augmentation: each image also runs mirrored (see merge_flipped).
        self.flip = bool(flip)
        self.dim = self.record.embedding_dim

    def _int8_if_present(self, path: Path, threads: int):
        """The int8 model ``<weights>.int8.onnx`` when it was made from these weights and loads, else None.

        A missing int8 model is normal (weights of one's own, not quantised);
        one made from other weights, or damaged, is reported and not used.
        """
        from .onnx_runtime import Int8ModelError, OnnxMaps, OnnxRuntimeUnavailable, int8_model_path

        int8_path = int8_model_path(path)
        if not int8_path.is_file():
            return None
        try:
            return OnnxMaps.int8(int8_path, self._version, threads)
        except (Int8ModelError, OnnxRuntimeUnavailable) as exc:
            import warnings

            warnings.warn(f"running the network in fp32 torch: {exc}", RuntimeWarning, stacklevel=3)
            return None

    def _int8_head(self, int8: bool, threads: int):
        """The int8 identity head beside the int8 model this engine runs, or None (not the int8 path, not v2,
        or an int8 model made before heads had one). One made from other weights, or damaged, is reported and
        the head runs in torch."""
        from .onnx_runtime import Int8ModelError, OnnxHead, int8_head_path

        if not int8 or self.architecture != "v2" or not int8_head_path(self._maps.path).is_file():
            return None
        try:
            return OnnxHead(int8_head_path(self._maps.path), self._version, threads)
        except Int8ModelError as exc:
            import warnings

            warnings.warn(f"running the identity head in fp32 torch: {exc}", RuntimeWarning, stacklevel=3)
            return None

    @classmethod
    def _card_threshold(cls, card: dict) -> tuple[float, str]:
        """The default rejection threshold: from the weights card of these weights (:func:`read_card`).

        ``jointface bench report`` writes the card (``<weights>.json``) with
        P2's calibrated threshold; a card of other weights, or none, leaves the
        fixed class default.
        """
        try:
            if card.get("default_threshold") is not None:
                return float(card["default_threshold"]), str(card.get("default_threshold_source", "weights card"))
        except (ValueError, TypeError):
            pass
        return cls.default_threshold, "fixed default"

    @staticmethod
    def _card_sized_thresholds(card: dict) -> dict | None:
        """The card's ``thresholds_by_gallery_size`` when the table reads (else None)."""
        from jointface.calibration import threshold_for_gallery

        table = card.get("thresholds_by_gallery_size")
        try:
            if table is not None:
                threshold_for_gallery(table, 1)  # a table that does not read is no table
            return table
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    @property
    def sized_thresholds(self) -> bool:
        return self.gallery_size_thresholds is not None

    def default_threshold_for(self, people: int) -> tuple[float, str | None]:
        """The card's threshold for a gallery of ``people`` people (P2's calibration in sub-galleries of that
        size, interpolated in log(people)), else the card's single default."""
        from jointface.calibration import threshold_for_gallery

        table = self.gallery_size_thresholds
        if table is None:
            return self.default_threshold, self.threshold_source
        sizes = table["people"]
        where = (f"{people} people" if sizes[0] <= people <= sizes[-1] else
                 f"{people} people, below the smallest calibrated size {sizes[0]}: its threshold"
                 if people < sizes[0] else
                 f"{people} people, above the largest calibrated size {sizes[-1]}: its threshold, "
                 f"which accepts more strangers than FPIR {table.get('fpir')} here")
        return threshold_for_gallery(table, people), f"{table.get('source', 'weights card')}, for {where}"

    @staticmethod
    def _card_detection(card: dict, card_path: Path) -> dict:
        """The card's detection operating point (``conf_threshold``, ``large_face_threshold``,
        ``large_face_side``, ``source``), else ``{}``.

        Each network's confidences are calibrated its own way, so the point
        belongs to the weights file (chosen by ``benchmarks/detection_threshold/
        sweep.py``); a card of other weights, a damaged one or none leaves the
        class defaults. A value out of [0, 1] is refused loudly: it would
        silently keep every face or none.
        """
        if not isinstance(card.get("detection"), dict):
            return {}
        point = dict(card["detection"])
        for key in ("conf_threshold", "large_face_threshold"):
            value = point.get(key)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise WeightsError(f"{card_path}: detection {key} must be a confidence in [0, 1], not {value!r}")
        side = point.get("large_face_side")
        if side is not None and not (isinstance(side, (int, float)) and side > 0):
            raise WeightsError(f"{card_path}: detection large_face_side must be a positive number "
                               f"of input pixels, not {side!r}")
        return point

    @property
    def version(self) -> str:
        return self._version

    @property
    def max_useful_side(self) -> int | None:
        """A photo with a longer side of twice the largest input size or more runs at that largest size.

        So decoding it at that size (JPEG draft mode) loses nothing the network would see.
        """
        if self.input_size:
            return None  # a fixed input size: keep the behaviour exactly as asked
        return 2 * max(self.MAX_INPUT_SIZE, self.record.input_size)

    @property
    def class_names(self) -> list[str]:
        return list(self.record.class_names)

    def network_input_size(self, longer_side: int) -> int:
        """Input size for an image whose longer side is ``longer_side`` pixels.

        The network was trained on 320 px photos letterboxed to its input size
        (half of it at 160), so faces are seen at about half their size in a
        320 px photo. A larger photo is fed at half its longer side, rounded to
        the stride (32) and kept between the training size and
        :attr:`MAX_INPUT_SIZE`: a 2000 px group photo runs at 640, where its
        faces have the scale the network learnt; the network is fully
        convolutional, so only the grid grows.
        """
        if self.architecture == "v2":
            # v2 learnt faces from 12 px to 95% of its canvas: a photo runs at V2_INPUT_SCALE of its size,
            # between the training canvas and V2_MAX_INPUT_SIZE (a close-up portrait then still fits the
            # largest anchors). Why the scale: its identity was trained on faces as they sit in 192 px canvases, and
            # an LFW photo (250 px) read at 192 rather than 256 gave the P2 proxy 36% rather than 28%
            # (benchmarks/joint_v2/crops/README.md)
            size = 32 * round(longer_side * self.V2_INPUT_SCALE / 32)
            return int(min(max(size, self.record.input_size), max(self.V2_MAX_INPUT_SIZE, self.record.input_size)))
        half = 32 * round(longer_side / 2 / 32)
        return int(min(max(half, self.record.input_size), max(self.MAX_INPUT_SIZE, self.record.input_size)))

    def classify(self, face: Face) -> str | None:
        """The training-set identity the classifier head gives a face (the study's way; None without one).

        Only for the closed set the network was trained on (P1); enrolment and
        search never use it.
        """
        if self._classifier is None:
            return None
        weight, bias = self._classifier
        logits = weight @ np.asarray(face.embedding, dtype=np.float32) + (bias if bias is not None else 0.0)
        return self.record.class_names[int(np.argmax(logits))]

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[np.ndarray], timings: dict[str, float] | None = None
                     ) -> list[list[Face]]:
        """Every face of each image (one network pass for the batch).

        ``timings``, when given, accumulates the seconds spent in each step:
        ``letterbox`` (resize, pad and normalise into the network's input),
        ``network``, ``decode_nms`` (box decoding, threshold, NMS) and
        ``to_faces`` (back to image pixels); P4 reports them.
        """
        import time

        import torch

        from jointface.net.model import merge_flipped, postprocess

        if len(images) == 0:
            return []
        clock = {"now": time.perf_counter()}

        def lap(step: str) -> None:
            now = time.perf_counter()
            if timings is not None:
                timings[step] = timings.get(step, 0.0) + now - clock["now"]
            clock["now"] = now

        images, batch, placed = self._place(images)
        batch = batch.to(self.device)
        if self.flip:  # the mirrored canvases ride in the same batch
            batch = torch.cat([batch, batch.flip(-1)])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        lap("letterbox")
        if self.architecture == "v2":
            return self._detect_v2(images, placed, batch, lap)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.model(batch) if self._maps is None else self.model.output_from_maps(*self._maps(batch))
        lap("network")
        detections = postprocess(output, self.model.anchor_grid, self.conf_threshold, self.nms_iou, self.max_faces)
        if self.flip:
            detections = [merge_flipped(found, mirrored, batch.shape[-1])
                          for found, mirrored in zip(detections[:len(images)], detections[len(images):])]
        lap("decode_nms")
        results = []
        for image, placement, found in zip(images, placed, detections):
            height, width = image.shape[:2]
            boxes = placement.to_original(found.boxes.float().cpu().numpy(), width, height)
            embeddings = found.embeddings.float().cpu().numpy().astype(np.float32)
            scores = found.scores.float().cpu().numpy()
            results.append([
                Face(box=tuple(float(v) for v in box), score=float(score), embedding=embedding,
                     engine=self.name, engine_version=self._version)
                for box, score, embedding in zip(boxes, scores, embeddings)
                if box[2] > box[0] and box[3] > box[1]
            ])
        lap("to_faces")
        return results

    def _detect_v2(self, images, placed, batch, lap) -> list[list[Face]]:
        """v2: one dense pass, decode + NMS, then each kept face's embedding from the RoI head.

        With flip TTA the mirrored canvases ride in the same batch (``batch``
        holds both); faces are found on the unflipped canvases, and each face's
        embedding is the normalised sum of its RoI embedding in both views.
        """
        import torch
        import torch.nn.functional as F

        from jointface.net.v2 import faces_from_maps

        count = len(images)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            maps = self.model.forward_maps(batch) if self._maps is None else self._maps(batch)
            maps = [m.float() for m in maps]
        lap("network")
        with torch.inference_mode():
            if not self.flip:
                found = faces_from_maps(self.model, maps, self.conf_threshold, self.nms_iou, self.max_faces,
                                        **self._large_faces(), head=self._onnx_head)
            else:
                found = self._flip_v2(maps, count, batch.shape[-1])
        lap("decode_nms")
        results = []
        for image, placement, faces in zip(images, placed, found):
            height, width = image.shape[:2]
            boxes = placement.to_original(faces.boxes.float().cpu().numpy(), width, height)
            results.append([
                Face(box=tuple(float(v) for v in box), score=float(score), embedding=embedding,
                     engine=self.name, engine_version=self._version)
                for box, score, embedding in zip(boxes, faces.scores.float().cpu().numpy(),
                                                 faces.embeddings.float().cpu().numpy().astype(np.float32))
                if box[2] > box[0] and box[3] > box[1]
            ])
        lap("to_faces")
        return results

    def _flip_v2(self, maps, count: int, width: int):
        """Flip TTA for v2: faces found in both views are paired (as :func:`merge_flipped` pairs them: box and
        score the mean of the two), and each face's embedding is the normalised sum of its RoI embedding in
        the photo and in the mirror, at the merged box. A mirrored photo so gives the mirrored face."""
        import torch
        import torch.nn.functional as F

        from jointface.net.model import Detections, merge_flipped
        from jointface.net.v2 import FacesV2, boxes_and_images

        found = self._decode(maps)
        merged = []
        for (boxes, scores), (m_boxes, m_scores) in zip(found[:count], found[count:]):
            empty = torch.zeros(len(boxes), 1), torch.zeros(len(m_boxes), 1)
            joined = merge_flipped(Detections(boxes, scores, empty[0], torch.zeros(len(boxes), dtype=torch.long)),
                                   Detections(m_boxes, m_scores, empty[1], torch.zeros(len(m_boxes), dtype=torch.long)),
                                   width)
            merged.append((joined.boxes, joined.scores))
        boxes, image_idx = boxes_and_images(merged)
        if len(boxes) == 0:
            return [FacesV2(b, s, torch.zeros(0, self.record.embedding_dim)) for b, s in merged]
        mirrored = torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)
        identity_maps = [m.float() for m in maps[3:]]
        plain = self.model.embed([m[:count] for m in identity_maps], boxes, image_idx, head=self._onnx_head)
        other = self.model.embed([m[count:] for m in identity_maps], mirrored, image_idx, head=self._onnx_head)
        both = F.normalize(plain + other, dim=-1)
        results, start = [], 0
        for b, sc in merged:
            results.append(FacesV2(b, sc, both[start:start + len(b)]))
            start += len(b)
        return results

    def _decode(self, maps):
        """v2: each image's kept boxes and scores from the network's maps, at this engine's operating point."""
        from jointface.net.v2 import decode_v2

        return decode_v2(self.model, self.model.detections_from_maps(maps[:3]), self.conf_threshold, self.nms_iou,
                         self.max_faces, **self._large_faces())

    def _large_faces(self) -> dict:
        return {"large_threshold": self.large_face_threshold, "large_side": self.large_face_side or 0.0}

    def _place(self, images: Sequence[np.ndarray]):
        """Checked images, the network's input made of them (letterboxed at the input size for the batch and
        normalised) and each image's placement on it."""
        from jointface.net.model import letterbox_batch

        images = [check_image(image) for image in images]
        size = self.input_size or self.network_input_size(max(max(image.shape[:2]) for image in images))
        batch, placements = letterbox_batch(images, size, self.record.mean, self.record.std)
        return images, batch, placements

    def faces_for_head(self, batch: np.ndarray) -> np.ndarray:
        """v2: the identity head's inputs ``(K, C, R, R)`` for the faces found in a network input batch
        (:meth:`network_batch`), as :meth:`detect_batch` pools them (calibrates the int8 head)."""
        import torch

        from jointface.net.v2 import boxes_and_images

        with torch.inference_mode():
            images = torch.from_numpy(batch).to(self.device)
            maps = self.model.forward_maps(images) if self._maps is None else self._maps(images)
            maps = [m.float() for m in maps]
            return self.model.pool_faces(maps[3:], *boxes_and_images(self._decode(maps))).numpy()

    def network_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The float32 ``(B, 3, S, S)`` network input :meth:`detect_batch` makes of ``images``."""
        return self._place(images)[1].numpy()

    def describe(self) -> dict:
        return {**super().describe(), "architecture": self.architecture, "backbone": self.record.backbone,
                "input_size": self.input_size or (
                    f"auto ({self.record.input_size}-{self.MAX_INPUT_SIZE})" if self.architecture != "v2" else
                    f"auto ({self.V2_INPUT_SCALE:g} x photo, {self.record.input_size}-{self.V2_MAX_INPUT_SIZE})"),
                "runtime": self.runtime, "identity_head_runtime": "int8" if self._onnx_head else "torch",
                "first_conv_space_to_depth": bool(getattr(self._maps, "first_conv_s2d", False)),
                "flip_tta": self.flip, "bf16": self.bf16,
                "channels_last": self.channels_last, "fused_batchnorm": self.fused,
                "conf_threshold": self.conf_threshold, "large_face_threshold": self.large_face_threshold,
                "large_face_side": self.large_face_side,
                "detection_point": self.detection_point.get("source", "class defaults"),
                "nms_iou": self.nms_iou, "weights": str(self.weights_path),
                **self.training}


#: calibration sizes: ``None`` is a photo as it is; a number, the photo resized to that shorter side
CALIBRATION_SIZES: tuple[int | None, ...] = (320,)


def quantize_weights(weights: str | os.PathLike | None, photos: Sequence[str | os.PathLike], count: int = 64,
                     out: str | os.PathLike | None = None, progress=None,
                     sizes: Sequence[int | None] = CALIBRATION_SIZES) -> dict:
    """Make the int8 model of a weights file (engine ``jointface-int8``), calibrated on ``photos``.

    ``count`` photos, evenly spaced over the sorted list, are taken at each of
    ``sizes`` (``320``: resized to a shorter side of 320 px as `jointface
    organize` does; ``None``: as they are). They are fed as the engine feeds
    them, alone (batches of 8, one size per batch) and as 2x2 mosaics of four
    (batches of 2), so the activation ranges cover the input sizes the engine
    uses. For a v2 network the identity head gets an int8 model of its own
    (``<name>.int8-head.onnx`` beside the int8 model), calibrated on the RoIs
    of the faces the network finds in those batches.
    Use training photos, never test ones. Unreadable photos are skipped and counted.
    Returns a summary (path, weights version, photos used, skipped, bytes; ``head``: the head's model, None
    when no face was found to calibrate it on).
    """
    from jointface.imageio import ImageLoadError, load_image, mosaic, resize_shorter_side

    from .onnx_runtime import int8_head_path, int8_model_path, quantize_head_int8, quantize_int8

    if not sizes:
        raise ValueError("no calibration sizes")
    engine = JointEngine(weights, channels_last=False)
    photos = sorted(Path(p) for p in photos)
    if not photos:
        raise ValueError("no calibration photos")
    step = max(1, len(photos) // max(1, count))
    chosen = photos[::step][:count]
    by_size: dict[int | None, list[np.ndarray]] = {size: [] for size in sizes}
    skipped = []
    for index, path in enumerate(chosen):
        try:
            image = load_image(path)
            for size in sizes:
                by_size[size].append(image if size is None else resize_shorter_side(image, size))
        except (ImageLoadError, OSError) as exc:
            skipped.append(f"{path}: {exc}")
        if progress is not None:
            progress(index + 1, len(chosen))
    readable = len(chosen) - len(skipped)
    if readable < 8:
        first = f" (first failure: {skipped[0]})" if skipped else ""
        raise ValueError(f"only {readable} readable calibration photos of {len(chosen)}: at least 8 "
                         f"needed{first}")
    batches = []
    for images in by_size.values():
        # photos as they are differ in size: a batch holds photos the engine would run at one input size
        groups: dict[int, list[np.ndarray]] = {}
        for image in images:
            groups.setdefault(engine.network_input_size(max(image.shape[:2])), []).append(image)
        for group in groups.values():
            batches += [engine.network_batch(group[i:i + 8]) for i in range(0, len(group), 8)]
        mosaics = [mosaic(images[i:i + 4]) for i in range(0, len(images) - 3, 4)]
        batches += [engine.network_batch(mosaics[i:i + 2]) for i in range(0, len(mosaics), 2)]
    target = Path(out) if out is not None else int8_model_path(engine.weights_path)
    summary = quantize_int8(engine.model, engine.version, batches, target)
    if engine.architecture == "v2":  # None when no face was found (an untrained network): the head stays in torch
        summary["head"] = quantize_head_int8(engine.model.identity, engine.version,
                                             [engine.faces_for_head(batch) for batch in batches],
                                             int8_head_path(target))
    return {**summary, "weights": str(engine.weights_path), "photos": readable, "skipped": skipped,
            "sizes": ["photo" if size is None else size for size in sizes]}


def _start_weights(config: dict) -> str | None:
    """The weights file a training run started from: v1's ``init_weights``, or the first file of v2's
    ``init_state`` (a list of ``[path, prefixes, ...]`` parts); None for a network trained from scratch."""
    if config.get("init_weights"):
        return str(config["init_weights"])
    parts = config.get("init_state") or []
    return str(parts[0][0]) if parts and isinstance(parts[0], (list, tuple)) and parts[0] else None
