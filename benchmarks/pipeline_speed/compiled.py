"""Which runtime runs the joint network's dense part fastest on this CPU? (issue 15, P4 mosaics)

The int8 model on ONNX Runtime has been the fast path since the first v2
weights, chosen on the AMD EPYC this project ran on before the ninth session.
The Intel Xeon it runs on now has AMX tiles (``amx_bf16``, ``amx_int8`` in
``/proc/cpuinfo``), which oneDNN uses for bf16 convolutions in torch. This
script times the dense part (``forward_maps``, the part ONNX Runtime runs)
of the same weights four ways, interleaved, batch 8, at the input sides P4
feeds (256 px for a 320 px photo, 384 px for a 640 px mosaic):

* ``int8-onnx``: the shipped int8 model on ONNX Runtime (the ``jointface`` engine's path);
* ``fp32``: torch, BatchNorm folded, channels-last (``jointface-torch``);
* ``bf16-eager``: torch, bf16 weights, channels-last;
* ``bf16-compiled``: the same through ``torch.compile`` (dynamic shapes; ``jointface-compiled``).

It also reports each path's maps against fp32 (mean cosine of the identity maps' pixels) and the
compile time of the first call.

    python benchmarks/pipeline_speed/compiled.py [--weights W.pt] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="weights file (default: the shipped weights)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from jointface.engines.compiled import CompiledMaps
    from jointface.engines.joint_engine import JointEngine

    reference = JointEngine(weights=args.weights, runtime="torch")
    int8 = JointEngine(weights=args.weights, runtime="int8")
    start = time.perf_counter()
    compiled = CompiledMaps(reference.model)
    compile_seconds = time.perf_counter() - start
    eager = CompiledMaps.__new__(CompiledMaps)
    eager.model = compiled.model
    eager._forward = compiled.model.forward_maps

    def fp32(images):
        with torch.inference_mode():
            return reference.model.forward_maps(images.contiguous(memory_format=torch.channels_last))

    paths = {"int8-onnx": int8._maps, "fp32": fp32, "bf16-eager": eager, "bf16-compiled": compiled}
    rows = []
    for side in args.sizes:
        images = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(side))
        first = {}
        for name, path in paths.items():  # the first call at this side: compiles a graph only if it must
            start = time.perf_counter()
            first[name] = path(images)
            first[name] = (first[name], time.perf_counter() - start)
        best = {name: float("inf") for name in paths}
        for _ in range(args.repeats):
            for name, path in paths.items():
                start = time.perf_counter()
                path(images)
                best[name] = min(best[name], time.perf_counter() - start)
        truth = [m.float() for m in first["fp32"][0]]
        for name in paths:
            maps = [m.float() for m in first[name][0]]
            cosine = float(torch.stack([F.cosine_similarity(a, b, dim=1).mean()
                                        for a, b in zip(maps[3:], truth[3:])]).mean())
            rows.append({"side": side, "path": name, "ms_per_image": 1000 * best[name] / len(images),
                         "first_call_s": first[name][1], "identity_map_cosine_to_fp32": cosine})
            print(f"{side} px {name:14s} {rows[-1]['ms_per_image']:6.2f} ms/image  first call "
                  f"{rows[-1]['first_call_s']:5.1f} s  identity maps' cosine to fp32 {cosine:.5f}", flush=True)
    result = {"weights": str(reference.weights_path), "version": reference.version, "batch": 8,
              "repeats": args.repeats, "threads": 2, "compile_seconds_at_construction": compile_seconds,
              "cpu_flags": sorted(flag for flag in _cpu_flags() if flag.startswith(("amx", "avx512_bf16",
                                                                                    "avx512_vnni"))),
              "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compiled.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"compile at construction {compile_seconds:.1f} s; wrote {args.out / 'compiled.json'}")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


if __name__ == "__main__":
    main()
