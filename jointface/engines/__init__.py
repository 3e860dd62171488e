"""Face engines and their registry.

``get_engine(name)`` returns a shared instance (models are loaded once per
process). Engines register themselves lazily, so importing this module does
not load dlib or torch.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Callable

from .base import Engine, Face, check_image, l2_normalise

__all__ = ["Engine", "Face", "UnknownEngineError", "available_engines", "check_image", "default_engine_name",
           "get_engine", "l2_normalise"]


class UnknownEngineError(ValueError):
    pass


def _make_dlib(**options) -> Engine:
    from .dlib_engine import DlibEngine

    return DlibEngine(**options)


def _make_dlib_cnn(**options) -> Engine:
    """dlib with its CNN (MMOD) detector: same descriptor, so it shares the ``dlib`` gallery."""
    from .dlib_engine import DlibEngine

    return DlibEngine(detector="cnn", **options)


#: The joint network's paths: engine name -> the JointEngine options that make it. All read the same
#: weights (one engine version), but each keeps a gallery of its own.
JOINT_VARIANTS: dict[str, dict] = {
    # the fastest checked path: int8 where the weights' int8 model is beside them (`jointface quantize`;
    # the shipped weights have one), else fp32 torch
    "jointface": {"runtime": "auto"},
    # fp32 torch, BatchNorm folded, channels-last (the default path before int8, and where no int8 model exists)
    "jointface-torch": {"runtime": "torch"},
    # exactly as trained: fp32, BatchNorm unfolded, plain memory layout; the reference the other paths are
    # checked against, in the tests and in P1
    "jointface-reference": {"fuse": False, "channels_last": False},
    # bf16 autocast and channels-last (checked against fp32 in P1)
    "jointface-bf16": {"bf16": True, "channels_last": True},
    # the convolutions on ONNX Runtime (BatchNorm folded); decoding and NMS as in torch
    "jointface-onnx": {"runtime": "onnx"},
    # quantised to int8 (`jointface quantize`) on ONNX Runtime; decoding and NMS as in torch
    "jointface-int8": {"runtime": "int8"},
    # the dense part in bf16 compiled by torch.compile (oneDNN on AMX where the CPU has it): the fastest path
    # on this project's machine for long jobs; the first batch of a process waits for the compilation
    "jointface-compiled": {"runtime": "compiled"},
    # the default path with flip test-time augmentation: every photo also runs mirrored, and each face's
    # embedding is the mean of both views (about half the speed)
    "jointface-flip": {"runtime": "auto", "flip": True},
}


def _joint_factory(name: str, fixed: dict) -> Callable[..., Engine]:
    def make(**options) -> Engine:
        from .joint_engine import JointEngine

        engine = JointEngine(**fixed, **options)
        engine.name = name
        return engine

    return make


_FACTORIES: dict[str, Callable[..., Engine]] = {"dlib": _make_dlib, "dlib-cnn": _make_dlib_cnn,
                                                **{name: _joint_factory(name, fixed)
                                                   for name, fixed in JOINT_VARIANTS.items()}}
_INSTANCES: dict[tuple, Engine] = {}
_LOCK = threading.Lock()


def available_engines() -> list[str]:
    return sorted(_FACTORIES)


#: The joint network becomes the default engine only when its weights card shows (issue 15's rule) P2
#: TPIR at FPIR 0.01 within this many points of dlib's in the same run, and P6b recall at least dlib's at
#: every face width from 48 px; weaker weights stay available with --engine jointface.
DEFAULT_ENGINE_MAX_TPIR_GAP = 0.05
DEFAULT_ENGINE_MIN_FACE = 48


def default_engine_decision(card: dict) -> dict:
    """Which engine a weights card makes the default, and why (the rule above)."""
    p2, p6b = card.get("p2") or {}, card.get("p6b") or {}
    tpir, dlib_tpir = p2.get("tpir@fpir=0.01"), p2.get("dlib_tpir@fpir=0.01")
    if tpir is None or dlib_tpir is None:
        return {"engine": "dlib", "reason": "no P2 comparison with dlib on the card"}
    if tpir < dlib_tpir - DEFAULT_ENGINE_MAX_TPIR_GAP:
        return {"engine": "dlib", "reason": f"P2 TPIR at FPIR 0.01 {tpir:.3f} is more than "
                                            f"{DEFAULT_ENGINE_MAX_TPIR_GAP:.2f} below dlib's {dlib_tpir:.3f}"}
    recall, dlib_recall = p6b.get("recall") or {}, p6b.get("dlib_recall") or {}
    sizes = [size for size in dlib_recall if int(size) >= DEFAULT_ENGINE_MIN_FACE]
    if not sizes:
        return {"engine": "dlib", "reason": "no P6b comparison with dlib on the card"}
    short = [size for size in sizes if (recall.get(size) or 0.0) < dlib_recall[size]]
    if short:
        return {"engine": "dlib", "reason": f"P6b recall below dlib's at {', '.join(short)} px"}
    return {"engine": "jointface", "reason": f"P2 TPIR at FPIR 0.01 within {DEFAULT_ENGINE_MAX_TPIR_GAP:.2f} of "
                                             f"dlib's and P6b recall at least dlib's from {DEFAULT_ENGINE_MIN_FACE} px"}


def default_engine_name() -> str:
    """``jointface`` when its weights are present and good enough, else ``dlib``.

    Weights named by ``$JOINTFACE_WEIGHTS`` are the user's explicit choice.
    Shipped weights carry a sidecar ``jointface.json`` with their measured
    figures; :func:`default_engine_decision` reads it.
    """
    import json

    from jointface.config import library_settings
    from jointface.weights_file import default_weights_path

    path = default_weights_path()
    if path is None:
        return "dlib"
    if library_settings().weights is not None:
        return "jointface"
    try:
        card = json.loads(path.with_suffix(".json").read_text())
        return default_engine_decision(card)["engine"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "dlib"


#: Engines that accept other weights: ``jointface@PATH`` runs the joint network with the weights file at PATH.
WEIGHTS_ENGINES = tuple(JOINT_VARIANTS)


def weights_label(path: str) -> str:
    """A short, file-name-safe label for a weights file: its name without ``.pt``."""
    stem = Path(path).name.removesuffix(".pt")
    label = re.sub(r"[^A-Za-z0-9_.+-]+", "-", stem).strip("-.")
    if not label:
        raise UnknownEngineError(f"weights path {path!r} gives no usable engine label")
    return label


def get_engine(name: str, **options) -> Engine:
    """The shared engine called ``name``.

    ``jointface@PATH`` (also ``jointface-reference@PATH``, ``jointface-bf16@PATH``)
    loads the weights file at PATH and is named ``jointface@LABEL`` (the file
    name without ``.pt``), so several trained networks compare side by side in
    one benchmark run and keep galleries of their own.
    """
    base, _, weights = name.partition("@")
    if base not in _FACTORIES:
        raise UnknownEngineError(f"unknown engine {name!r}; choose one of: {', '.join(available_engines())}"
                                 f" (jointface engines also take @WEIGHTS_PATH)")
    if weights and base not in WEIGHTS_ENGINES:
        raise UnknownEngineError(f"engine {base!r} takes no weights file ({name!r}); only "
                                 f"{', '.join(WEIGHTS_ENGINES)} do")
    if "@" in name and not weights:
        raise UnknownEngineError(f"engine {name!r}: give a weights file after '@'")
    key = (name, tuple(sorted(options.items())))
    with _LOCK:
        if key not in _INSTANCES:
            if weights:
                engine = _FACTORIES[base](weights=weights, **options)
                engine.name = f"{engine.name}@{weights_label(weights)}"
            else:
                engine = _FACTORIES[base](**options)
            _INSTANCES[key] = engine
        return _INSTANCES[key]
