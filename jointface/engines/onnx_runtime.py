"""The joint network's convolutions on ONNX Runtime: the engine's fast path on CPU.

Only :meth:`JointNet.forward_maps` (backbone, neck, detection and embedding
convolutions) runs in ONNX Runtime; box decoding, embedding normalisation and
NMS stay in torch, shared with the reference path. The graph is exported once
per weights file (about 2 s) into a cache folder and reused; a damaged cached
file is exported again.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np


class OnnxRuntimeUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jointface" / "onnx"


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
                              output_names=["detection", "embedding"],
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}},
                              opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OnnxMaps:
    """``(B, 3, H, W)`` float tensor -> the network's two output maps, computed by ONNX Runtime."""

    def __init__(self, model, key: str, threads: int, folder: Path | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise OnnxRuntimeUnavailable("the onnx runtime path needs the onnxruntime package "
                                         "(pip install onnxruntime)") from exc
        import torch

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        # idle ORT threads otherwise spin for the next run, taking the cores from what follows each batch
        # (decoding, NMS, gallery search): measured 66 against 88 photos/s with a search after each batch
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
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

    def __call__(self, images):
        import torch

        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        detection, embedding = self.session.run(None, {"images": array})
        return torch.from_numpy(detection), torch.from_numpy(embedding)
