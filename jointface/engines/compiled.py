"""The joint network's dense part in bf16, compiled by ``torch.compile`` (engine ``jointface-compiled``).

Why: on a CPU with AMX (Intel Xeon since Sapphire Rapids; this project's CI
machine) oneDNN runs bf16 convolutions on the tile unit. Measured here
(``benchmarks/pipeline_speed/compiled.py``, ``compiled.json``): the dense part
at 384 px in batches of 8 took 9.42 ms per image compiled, 16.24 ms in eager
bf16 and 18.53 ms on the int8 ONNX Runtime path, and bf16 keeps the fp32
identity maps to a cosine of 0.99999 where int8 keeps them to 0.999. What it
costs: construction compiles the network (17-24 s cold on 2 cores, about 5 s
once Inductor's on-disk cache holds it), so it serves long jobs (the service,
large searches, benchmarks), not one photo from the command line.

The network is compiled once with dynamic shapes (one graph for every batch
size and input side); compilation happens at construction, on a small
batch, so a missing C++ compiler or an unsupported platform is reported
there, not in the middle of a search.
"""

from __future__ import annotations

import copy


class CompiledUnavailable(RuntimeError):
    """``torch.compile`` could not build the network on this machine (no C++ compiler, unsupported platform)."""


class CompiledMaps:
    """Callable like :class:`~jointface.engines.onnx_runtime.OnnxMaps`: a float ``(B, 3, S, S)`` batch in, the
    network's maps (``forward_maps``) out as float32 tensors."""

    #: the warm-up batch: batch and side above 1 so that Dynamo keeps both symbolic (it specialises sizes 0 and 1)
    WARMUP_SHAPE = (2, 3, 224, 224)

    def __init__(self, model):
        import torch

        self.model = copy.deepcopy(model).eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._forward = torch.compile(self.model.forward_maps, dynamic=True)
        try:
            self(torch.zeros(self.WARMUP_SHAPE))
        except Exception as exc:  # Inductor raises its own types for a missing compiler and the like
            raise CompiledUnavailable(f"torch.compile could not build the network here ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); use "
                                      f"--engine jointface (int8 on ONNX Runtime) instead") from exc

    def __call__(self, images):
        import torch

        batch = images.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return tuple(output.float() for output in self._forward(batch))
