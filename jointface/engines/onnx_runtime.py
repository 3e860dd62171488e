"""The joint network's convolutions on ONNX Runtime: the engine's fast path on CPU.

Only :meth:`JointNet.forward_maps` (backbone, neck, detection and embedding
convolutions) runs in ONNX Runtime; box decoding, embedding normalisation and
NMS stay in torch, shared with the reference path. The graph is exported once
per weights file (about 2 s) into a cache folder and reused; a damaged cached
file is exported again.

The int8 path (engine ``jointface-int8``) runs a statically quantised copy of
that graph: weights int8 per output channel, activations uint8 with ranges
measured on calibration photos (``jointface quantize``, :func:`quantize_int8`).
It is saved beside the weights file as ``<name>.int8.onnx`` and names the
weights version it was made from, so it is never used with other weights.
The v2 network's per-face identity head (two convolutions and a linear layer
on each face's RoI-aligned features) has an int8 model of its own beside it,
``<name>.int8-head.onnx``, calibrated on the RoIs of the faces found in the
calibration photos (:func:`quantize_head_int8`, :class:`OnnxHead`).

The int8 model's first convolution (7x7, stride 2, on three colour channels) is
run on the photo rearranged 2x2 pixels into 12 channels, as the equivalent 4x4
stride-1 convolution (:func:`space_to_depth_first_conv`): the same int8
weights, scales and sums, so the same output bit for bit, about 7% less network
time on 384 px inputs, 5% with the rearrangement (an int8 kernel handles three
input channels poorly; ``benchmarks/pipeline_speed/conv1_s2d/``). The file on
disk keeps the plain layout.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np


class OnnxRuntimeUnavailable(RuntimeError):
    pass


class Int8ModelError(ValueError):
    """No usable int8 model for these weights (missing, damaged, or made from other weights)."""


INT8_SUFFIX = ".int8.onnx"
INT8_HEAD_SUFFIX = ".int8-head.onnx"
#: ONNX metadata key naming the weights version an int8 model was quantised from
VERSION_KEY = "jointface_weights_version"


def int8_model_path(weights_path: str | os.PathLike) -> Path:
    """Where the int8 model of a weights file lives: beside it, ``<name>.int8.onnx``."""
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name.removesuffix(".pt") + INT8_SUFFIX)


def int8_head_path(int8_path: str | os.PathLike) -> Path:
    """Where the int8 identity head that goes with the int8 model at ``int8_path`` lives: beside it,
    ``<name>.int8-head.onnx``."""
    int8_path = Path(int8_path)
    return int8_path.with_name(int8_path.name.removesuffix(INT8_SUFFIX).removesuffix(".onnx") + INT8_HEAD_SUFFIX)


def _session_options(ort, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    # idle ORT threads otherwise spin for the next run, taking the cores from what follows each batch
    # (decoding, NMS, gallery search); the P4 step profile shows the search time per photo
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxRuntimeUnavailable("the onnx runtime paths need the onnxruntime package "
                                     "(pip install onnxruntime)") from exc
    return ort


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jointface" / "onnx"


def output_names(model) -> list[str]:
    """The graph's outputs: v1's two maps, or v2's three detection maps and two identity maps."""
    if getattr(model.record, "architecture", "v1") == "v2":
        return ["detection_s8", "detection_s16", "detection_s32", "identity_s8", "identity_s16"]
    return ["detection", "embedding"]


def _export(model, path: Path, input_size: int) -> None:
    import torch

    class Maps(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net.forward_maps(images)

    example = torch.zeros(1, 3, input_size, input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Maps(model).eval(), (example,), tmp, input_names=["images"],
                              output_names=output_names(model),
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}},
                              opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OnnxMaps:
    """``(B, 3, H, W)`` float tensor -> the network's output maps (:func:`output_names`), by ONNX Runtime."""

    def __init__(self, model, key: str, threads: int, folder: Path | None = None):
        ort = _import_ort()
        import torch

        options = _session_options(ort, threads)
        folder = folder or cache_dir()
        name = f"{key}-torch{torch.__version__.split('+')[0]}-ort{ort.__version__}.onnx"
        try:
            path = folder / name
            self.session = self._session(ort, options, model, path)
        except OSError:  # no writable cache: export into a private temporary folder
            self._tmp = tempfile.TemporaryDirectory(prefix="jointface-onnx-")
            path = Path(self._tmp.name) / name
            self.session = self._session(ort, options, model, path)
        self.path = path

    @staticmethod
    def _session(ort, options, model, path: Path):
        if path.is_file():
            try:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception:  # a truncated or foreign file: export again
                pass
        _export(model, path, model.record.input_size)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def int8(cls, path: str | os.PathLike, weights_version: str, threads: int) -> "OnnxMaps":
        """The int8 model at ``path``, checked to be made from weights ``weights_version``; its first
        convolution runs on the rearranged input (module docstring) for inputs of even sides."""
        maps = cls.__new__(cls)
        maps.session, maps.first_conv_s2d = _int8_session(path, weights_version, threads, first_conv_s2d=True)
        maps.path, maps._version, maps._threads, maps._plain = Path(path), weights_version, threads, None
        return maps

    #: whether :attr:`session` takes the input rearranged by :func:`space_to_depth` (int8 models only)
    first_conv_s2d = False

    def __call__(self, images):
        import torch

        session = self.session
        if self.first_conv_s2d and images.shape[2] % 2 == 0 and images.shape[3] % 2 == 0:
            feed = space_to_depth(images)
        else:
            feed = _as_input(images)
            if self.first_conv_s2d:  # an odd side (an input size given by hand): the model as it is on disk
                if self._plain is None:
                    self._plain, _ = _int8_session(self.path, self._version, self._threads)
                session = self._plain
        return tuple(torch.from_numpy(output) for output in session.run(None, {"images": feed}))


def _as_input(tensor) -> np.ndarray:
    """A torch tensor as ONNX Runtime takes it: contiguous float32 on the CPU (no copy when it already is)."""
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


def space_to_depth(x) -> np.ndarray:
    """``(B, C, H, W)`` (a torch tensor or an array) with even ``H`` and ``W`` -> the contiguous float32
    ``(B, 4C, H/2, W/2)`` array whose channel ``4c + 2dy + dx`` holds pixel ``(2i + dy, 2j + dx)`` of channel
    ``c`` at ``(i, j)`` (the order of ``torch.nn.functional.pixel_unshuffle``; torch's copy is the fastest)."""
    import torch

    x = torch.as_tensor(x).detach().cpu()
    b, c, h, w = x.shape
    blocks = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return blocks.reshape(b, 4 * c, h // 2, w // 2).to(torch.float32).contiguous().numpy()


def space_to_depth_kernel(weight: np.ndarray) -> np.ndarray:
    """A ``(O, C, 7, 7)`` kernel of a stride-2 convolution with pads 3 as the ``(O, 4C, 4, 4)`` kernel of the
    stride-1 convolution with pads (2, 2, 1, 1) over :func:`space_to_depth` that gives the same output:
    output row ``i`` reads input rows ``2i - 3 .. 2i + 3``, which are blocks ``i - 2 .. i + 1`` (tap ``a`` of
    the new kernel, sub-row ``dy``, is row ``2a + dy - 1`` of the old one; zero where it has none)."""
    out, channels, size, _ = weight.shape
    moved = np.zeros((out, channels, 2, 2, 4, 4), weight.dtype)
    for a in range(4):
        for dy in range(2):
            for b in range(4):
                for dx in range(2):
                    ky, kx = 2 * a + dy - 1, 2 * b + dx - 1
                    if 0 <= ky < size and 0 <= kx < size:
                        moved[:, :, dy, dx, a, b] = weight[:, :, ky, kx]
    return moved.reshape(out, 4 * channels, 4, 4)


#: per-tensor element-wise nodes allowed between the graph's input and its first convolution
_ELEMENTWISE = ("QuantizeLinear", "DequantizeLinear")


def space_to_depth_first_conv(model) -> bool:
    """Rewrite an ONNX model in place so its first convolution (7x7, stride 2, pads 3, fed by the graph's
    input alone, perhaps through per-tensor quantise / dequantise nodes) reads :func:`space_to_depth` of
    the input as the equivalent 4x4 stride-1 convolution (:func:`space_to_depth_kernel`). The weights are
    moved, not re-quantised: an int8 kernel keeps its values and per-channel scales, so the output is the
    same. False (and the model untouched) when the graph does not have that shape."""
    from onnx import helper, numpy_helper

    graph = model.graph
    if len(graph.input) != 1:
        return False
    initial = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    chain, tensor = [], graph.input[0].name
    while True:  # from the input through quantise / dequantise nodes to the first convolution
        users = consumers.get(tensor, [])
        if len(users) != 1 or tensor in outputs:
            return False
        node = users[0]
        if node.op_type == "Conv":
            break
        if node.op_type not in _ELEMENTWISE or node.input[0] != tensor:
            return False
        if any(name in initial and numpy_helper.to_array(initial[name]).size != 1 for name in node.input[1:]):
            return False  # a per-channel quantisation of the input would not survive the rearrangement
        chain.append(node)
        tensor = node.output[0]
    conv = node
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if (list(attributes.get("kernel_shape", [])) != [7, 7] or list(attributes.get("strides", [])) != [2, 2]
            or list(attributes.get("pads", [])) != [3, 3, 3, 3] or attributes.get("group", 1) != 1
            or list(attributes.get("dilations", [1, 1])) != [1, 1] or conv.input[0] != tensor):
        return False
    weight_name = conv.input[1]
    if weight_name not in initial:  # int8: the weight comes through its DequantizeLinear
        source = next((n for n in graph.node if weight_name in n.output), None)
        if source is None or source.op_type != "DequantizeLinear" or source.input[0] not in initial \
                or len(consumers.get(weight_name, [])) != 1:
            return False
        weight_name = source.input[0]
    if len(consumers.get(weight_name, [])) != 1:  # a kernel another node reads too is not ours to move
        return False
    weight = numpy_helper.to_array(initial[weight_name])
    if weight.ndim != 4 or weight.shape[2:] != (7, 7):
        return False
    initial[weight_name].CopyFrom(numpy_helper.from_array(space_to_depth_kernel(weight), weight_name))
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [4, 4]), helper.make_attribute("strides", [1, 1]),
                           helper.make_attribute("pads", [2, 2, 1, 1]), helper.make_attribute("dilations", [1, 1]),
                           helper.make_attribute("group", 1)])
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value = 4 * weight.shape[1]
    for dim, name in zip(dims[2:], ("height_half", "width_half")):
        dim.dim_param = name
    stale = {graph.input[0].name, *(output for node in chain for output in node.output)}
    kept = [info for info in graph.value_info if info.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return True


def _int8_session(path: str | os.PathLike, weights_version: str, threads: int, first_conv_s2d: bool = False):
    """An ONNX Runtime session of the int8 model at ``path``, checked to be made from ``weights_version``;
    with ``first_conv_s2d`` its first convolution reads the input rearranged (:func:`space_to_depth_first_conv`)
    when the graph allows. Returns ``(session, rearranged)``."""
    ort = _import_ort()
    path = Path(path)
    if not path.is_file():
        raise Int8ModelError(f"no int8 model for these weights at {path}: make one with "
                             f"`jointface quantize PHOTOS_DIR` (calibrates on photos of faces)")
    try:
        source, rearranged = str(path), False
        if first_conv_s2d:  # the rewrite needs the graph in hand; otherwise ORT reads the file itself
            import onnx

            model = onnx.load(str(path))
            rearranged = space_to_depth_first_conv(model)
            source = model.SerializeToString() if rearranged else source
        session = ort.InferenceSession(source, _session_options(ort, threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnx and ORT raise their own exception types
        raise Int8ModelError(f"{path}: not a readable ONNX model ({exc}); make it again with "
                             f"`jointface quantize`") from exc
    made_from = session.get_modelmeta().custom_metadata_map.get(VERSION_KEY)
    if made_from != weights_version:
        raise Int8ModelError(f"{path} was quantised from weights {made_from or 'unknown'}, not these "
                             f"({weights_version}): make it again with `jointface quantize`")
    return session, rearranged


class OnnxHead:
    """The int8 identity head: ``(K, C, R, R)`` RoI-aligned face features -> ``(K, D)`` embeddings (not
    normalised), as :class:`jointface.net.v2.IdentityHead` gives them."""

    def __init__(self, path: str | os.PathLike, weights_version: str, threads: int):
        self.session, _ = _int8_session(path, weights_version, threads)
        self.path = Path(path)

    def __call__(self, rois):
        import torch

        return torch.from_numpy(self.session.run(None, {"rois": _as_input(rois)})[0])


def _quantize_static(fp32: Path, quantized: Path, input_name: str, batches) -> None:
    """Static int8 quantisation (QDQ): weights int8 per output channel, activations uint8 from the min and max
    over ``batches``; the nodes that give the graph's outputs stay fp32."""
    import logging

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter({input_name: batch} for batch in batches)

        def get_next(self):
            return next(self._items, None)

    graph = onnx.load(str(fp32))
    outputs = {output.name for output in graph.graph.output}
    keep_fp32 = [node.name for node in graph.graph.node if set(node.output) & outputs]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's quantiser logs advice through the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(fp32), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_fp32,
                            extra_options={"CalibTensorRangeSymmetric": False})
    finally:
        root.setLevel(level)


def _save_versioned(quantized: Path, weights_version: str, out_path: Path) -> None:
    """Write the model at ``quantized`` to ``out_path`` atomically, recording ``weights_version``."""
    import onnx

    graph = onnx.load(str(quantized))
    entry = graph.metadata_props.add()
    entry.key, entry.value = VERSION_KEY, weights_version
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        onnx.save(graph, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def quantize_head_int8(head, weights_version: str, rois, out_path: str | os.PathLike) -> dict | None:
    """Quantise the identity head (``(K, C, R, R)`` RoI features -> ``(K, D)``) to int8, calibrated on ``rois``
    (float32 arrays of faces' RoI features as the engine pools them), and write it to ``out_path``; None (and
    nothing written) when ``rois`` hold no face."""
    import torch

    _import_ort()
    rois = [np.ascontiguousarray(batch, dtype=np.float32) for batch in rois if len(batch)]
    if not rois:
        return None
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="jointface-int8-head-") as scratch:
        fp32, quantized = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(head.eval(), (torch.from_numpy(rois[0][:1]),), str(fp32), input_names=["rois"],
                              output_names=["embeddings"], dynamic_axes={"rois": {0: "faces"}},
                              opset_version=17, dynamo=False)
        _quantize_static(fp32, quantized, "rois", rois)
        _save_versioned(quantized, weights_version, out_path)
    return {"path": str(out_path), "faces": int(sum(len(batch) for batch in rois)), "bytes": out_path.stat().st_size}


def quantize_int8(model, weights_version: str, batches, out_path: str | os.PathLike) -> dict:
    """Quantise the (BatchNorm-folded) network to int8 and write it to ``out_path``.

    ``batches``: ``(B, 3, H, W)`` float32 arrays as the engine feeds them (any
    sizes); activation ranges are their minimum and maximum. Weights are int8
    per output channel, activations uint8 (QDQ format); the convolutions that
    give the output maps stay fp32. The file is written atomically and records
    ``weights_version``.
    """
    _import_ort()
    batches = [np.ascontiguousarray(batch, dtype=np.float32) for batch in batches]
    if not batches:
        raise ValueError("no calibration batches")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="jointface-int8-") as scratch:
        fp32, quantized = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        _export(model, fp32, model.record.input_size)
        # the output convolutions stay fp32: one uint8 range over the detection map's box offsets and
        # confidence logits together left boxes off by up to 0.11 IoU; they are a small share of the time
        _quantize_static(fp32, quantized, "images", batches)
        _save_versioned(quantized, weights_version, out_path)
    return {"path": str(out_path), "weights_version": weights_version, "batches": len(batches),
            "images": int(sum(batch.shape[0] for batch in batches)),
            "input_sizes": sorted({int(batch.shape[-1]) for batch in batches}),
            "bytes": out_path.stat().st_size}
