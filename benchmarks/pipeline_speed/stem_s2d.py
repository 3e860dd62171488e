"""Does the 7x7 stem convolution cost less in the int8 graph as a space-to-depth convolution? (issue 15)

ONNX Runtime's profile of the shipped int8 model gives the stem (7x7, stride 2,
3 -> 64 channels) about 14% of the network's time at 384 px, several times the
cost per multiply-add of the other convolutions. The same convolution can be
written exactly as: pad by 3, 2x2 space-to-depth (3 -> 12 channels), 4x4
convolution at stride 1 (the 7x7 kernel padded to 8x8 and regrouped). This
script builds both graphs from the same weights, quantises both on the same
photos as `jointface quantize` does, checks the rewrite is exact in fp32, and
times both (interleaved runs, batch 8) with ONNX Runtime's per-node profile.

    python benchmarks/pipeline_speed/stem_s2d.py [WEIGHTS.pt] [--sizes 256 384] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SpaceToDepthStem(nn.Module):
    """``conv`` (7x7, stride 2, padding 3, no bias) as pad 3 + 2x2 space-to-depth + 4x4 convolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        weight = conv.weight.detach()
        out_channels, in_channels = weight.shape[:2]
        padded = F.pad(weight, (0, 1, 0, 1))  # (O, C, 8, 8): tap 7 weighs nothing
        regrouped = padded.view(out_channels, in_channels, 4, 2, 4, 2).permute(0, 1, 3, 5, 2, 4)
        self.conv = nn.Conv2d(in_channels * 4, out_channels, 4, bias=conv.bias is not None)
        self.conv.weight.data = regrouped.reshape(out_channels, in_channels * 4, 4, 4).contiguous()
        if conv.bias is not None:
            self.conv.bias.data = conv.bias.detach().clone()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pixel_unshuffle(F.pad(images, (3, 3, 3, 3)), 2))


def _session(path: Path, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def node_shares(path: Path, batch: np.ndarray, prefix: str, runs: int = 5) -> dict[str, float]:
    """Share of the kernel time of each node (ONNX Runtime's profiler), over ``runs`` runs."""
    session = _session(path, prefix)
    for _ in range(runs + 1):
        session.run(None, {"images": batch})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"][:-len("_kernel_time")]] += event["dur"]
    total = sum(per_node.values())
    return {name: round(100 * value / total, 2) for name, value in per_node.most_common(12)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", nargs="?", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/lfw"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    from jointface.engines.joint_engine import JointEngine
    from jointface.engines.onnx_runtime import _export, _quantize_static
    from jointface.imageio import load_image, resize_shorter_side

    torch.set_num_threads(2)
    engine = JointEngine(args.weights, channels_last=False)
    model = engine.model.float().eval()
    probe = torch.randn(2, 3, 64, 96)
    stem = SpaceToDepthStem(model.backbone.conv1)
    with torch.no_grad():
        exact = float((stem(probe) - model.backbone.conv1(probe)).abs().max())
    photos = sorted(args.photos.glob("*/*.jpg"))[::200][:32]
    images = [resize_shorter_side(load_image(p), 320) for p in photos]
    calibration = [engine.network_batch(images[i:i + 8]) for i in range(0, len(images), 8)]
    scratch = Path("/tmp/jointface-stem-s2d")
    scratch.mkdir(exist_ok=True)
    graphs = {}
    for name in ("stem_7x7", "stem_space_to_depth"):
        if name == "stem_space_to_depth":
            model.backbone.conv1 = stem
        fp32, int8 = scratch / f"{name}.fp32.onnx", scratch / f"{name}.int8.onnx"
        _export(model, fp32, engine.record.input_size)
        _quantize_static(fp32, int8, "images", calibration)
        graphs[name] = int8
    results = {"weights": engine.version, "fp32_rewrite_max_abs_difference": exact, "sizes": {}}
    sessions = {name: _session(path) for name, path in graphs.items()}
    for size in args.sizes:
        batch = np.random.default_rng(0).standard_normal((8, 3, size, size), dtype=np.float32)
        timings = {name: [] for name in sessions}
        for session in sessions.values():
            session.run(None, {"images": batch})
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"images": batch})
                timings[name].append(1000 * (time.perf_counter() - start) / 8)
        results["sizes"][size] = {
            name: {"ms_per_image_median": round(float(np.median(t)), 2), "ms_per_image_min": round(min(t), 2),
                   "top_nodes_percent": node_shares(graphs[name], batch, str(scratch / f"{name}-{size}"))}
            for name, t in timings.items()}
        print(size, {name: results["sizes"][size][name]["ms_per_image_median"] for name in sessions})
    (args.out / "stem_s2d.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"fp32 rewrite max |difference| {exact:.2e}; written {args.out / 'stem_s2d.json'}")


if __name__ == "__main__":
    main()
