"""P4: would the int8 network's first convolution run faster on a space-to-depth input? (issue 15)

    python benchmarks/pipeline_speed/conv1_s2d/s2d.py [INT8_MODEL] [--size 384] [--batch 8] [--seconds 6]

ONNX Runtime's profile of the shipped int8 model (batch 8 at 384 px, the 2x2 mosaics' input) puts 17% of
the network's time in its first convolution (7x7, stride 2, 3 -> 64 channels): about four times the time
per multiply-add of the other convolutions, since an int8 kernel handles three input channels poorly. The
same convolution on the photo rearranged 2x2 pixels into 12 channels is a 4x4, stride-1 convolution (pads
2 before, 1 after; the 7x7 kernel's taps moved into place, zeros where it has none): the same int8
weights, scales and sums, so the outputs are bit for bit the same. This rewrites the int8 model that
way (no re-quantisation; ``space_to_depth_first_conv``, what the engine now does when it loads an int8
model), checks the outputs are identical on random input, and times both models alternately, plus the
input copies: the engine's float CHW batch as ONNX Runtime takes it (no copy) against its rearrangement
(``space_to_depth``, a torch copy).
Writes ``results.json`` and ``results.md`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from jointface.engines.onnx_runtime import _session_options, space_to_depth, space_to_depth_first_conv


def rewrite(model_path: Path, out_path: Path) -> None:
    import onnx

    model = onnx.load(str(model_path))
    if not space_to_depth_first_conv(model):
        raise SystemExit(f"{model_path}: its first convolution is not a 7x7 stride-2 one fed by the input")
    onnx.save(model, str(out_path))


def session(path: Path):
    """An ONNX Runtime session of the model at ``path`` with the engine's options on 2 threads."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), _session_options(ort, 2), providers=["CPUExecutionProvider"])


def ms_per_image(run, batch: int, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += 1
    return (time.perf_counter() - start) / count / batch * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="jointface/weights/jointface.int8.onnx")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    x = ((rng.random((args.batch, 3, args.size, args.size)) - 0.5) * 3).astype(np.float32)
    batch = torch.from_numpy(x)
    with tempfile.TemporaryDirectory() as scratch:
        rewritten = Path(scratch) / "s2d.onnx"
        rewrite(Path(args.model), rewritten)
        plain, s2d = session(Path(args.model)), session(rewritten)
        x2 = space_to_depth(x)
        differences = [float(np.abs(a - b).max()) for a, b in zip(plain.run(None, {"images": x}),
                                                                   s2d.run(None, {"images": x2}))]
        rounds = []
        for _ in range(args.rounds):
            rounds.append({
                "network_plain": ms_per_image(lambda: plain.run(None, {"images": x}), args.batch, args.seconds),
                "network_s2d": ms_per_image(lambda: s2d.run(None, {"images": x2}), args.batch, args.seconds),
                "s2d_copy": ms_per_image(lambda: space_to_depth(batch), args.batch, 2)})
            print({k: round(v, 3) for k, v in rounds[-1].items()}, flush=True)
    mean = {k: float(np.mean([r[k] for r in rounds])) for k in rounds[0]}
    result = {"model": args.model, "size": args.size, "batch": args.batch, "max_output_difference": differences,
              "rounds": rounds, "mean_ms_per_image": mean}
    lines = [f"int8 model {args.model}, batch {args.batch} at {args.size} px, 2 threads, {args.rounds} alternating "
             f"rounds; largest output difference {max(differences):g}", "",
             "| ms per image | original first conv | space-to-depth first conv |", "|---|---|---|",
             f"| network | {mean['network_plain']:.2f} | {mean['network_s2d']:.2f} |",
             f"| input rearrangement | - | {mean['s2d_copy']:.2f} |",
             f"| both | {mean['network_plain']:.2f} | {mean['network_s2d'] + mean['s2d_copy']:.2f} |"]
    out = Path(__file__).parent
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
