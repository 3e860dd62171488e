"""The JointFace weights file: its format, where the default one is, writing it and reading it.

Training writes it (:func:`jointface.train.loop.export_weights`, :mod:`jointface.train.v2`), the joint
engine and the benchmark report read it. Layout (``torch.load(path, weights_only=True)``)::

    {"format": "jointface-weights", "format_version": 1,
     "record": the network's record as a dict (backbone, input_size, anchor_sizes, embedding_dim,
               mean, std, class_names, training_command, training_data, ...),
     "state_dict": the network's tensors (fp16),
     "identity_heads": classifier/margin/distillation tensors (fp16; not needed for inference),
     "training": {"step", "epoch", "metrics", "config", ...}}

v2 files (``record["architecture"] == "v2"``) carry no ``format_version`` (they never did; no reader needs it).
Tensors and plain Python values only: a file holding pickled code is refused. Importing this module does
not import torch.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

WEIGHTS_FORMAT = "jointface-weights"
WEIGHTS_ENV = "JOINTFACE_WEIGHTS"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "jointface.pt"
#: Shipped weights over this size draw a warning when written.
SHIPPED_BUDGET_MB = 50


def read_card(weights_path: str | os.PathLike, version: str | None = None) -> dict:
    """The card beside a weights file (``<weights>.json``: measured figures, thresholds, the detection
    operating point) as a dict; ``{}`` when there is none, it does not read, or (given ``version``) it
    describes other weights."""
    import json

    try:
        card = json.loads(Path(weights_path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(card, dict) or (version is not None and card.get("version") != version):
        return {}
    return card


class WeightsError(ValueError):
    """A weights file is missing, not JointFace's, or unsafe to load."""


def default_weights_path() -> Path | None:
    """``$JOINTFACE_WEIGHTS`` if set, else ``jointface/weights/jointface.pt`` when shipped, else None."""
    from jointface.config import library_settings

    override = library_settings().weights
    if override is not None:
        return override
    return SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.is_file() else None


# -- writing -----------------------------------------------------------------------------------


def half_precision(state: dict) -> dict:
    """Floating-point tensors as fp16 (contiguous), the others as they are."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def write_weights(path: str | Path, *, record: dict, state_dict: dict, identity_heads: dict, training: dict,
                  format_version: int | None = 1) -> dict:
    """Write a weights file (the layout above; give fp16 tensors) through a temporary file, so a crash never
    leaves half a file; ``format_version=None`` leaves the key out (v2). Returns ``{"path", "bytes", "sha256"}``."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": WEIGHTS_FORMAT, "format_version": format_version, "record": record,
               "state_dict": state_dict, "identity_heads": identity_heads, "training": training}
    if format_version is None:
        del payload["format_version"]
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    data = path.read_bytes()
    size_mb = len(data) / 1e6
    if size_mb > SHIPPED_BUDGET_MB:
        print(f"warning: {path} is {size_mb:.1f} MB, over the {SHIPPED_BUDGET_MB} MB budget for shipped weights")
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- reading -----------------------------------------------------------------------------------


def load_weights(path: str | os.PathLike) -> tuple[dict, str]:
    """Read and check a weights file to run it; returns ``(payload, short sha256)``; :class:`WeightsError`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    data = path.read_bytes()
    version = hashlib.sha256(data).hexdigest()[:12]
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: refused: the file holds pickled Python objects or code, not just tensors "
                           f"(only files written by `export_weights` are accepted)") from exc
    except Exception as exc:  # zip/torch format errors: not a torch file at all
        raise WeightsError(f"{path}: not a readable torch weights file ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(f"{path}: not a JointFace weights file (no '{WEIGHTS_FORMAT}' format marker)")
    for key in ("record", "state_dict"):
        if key not in payload:
            raise WeightsError(f"{path}: JointFace weights file without its {key!r} entry")
    return payload, version


def read_torch_file(path: str | Path, formats: tuple[str, ...]) -> dict:
    """``torch.load(weights_only=True)`` of a JointFace file (weights, checkpoint) whose ``format`` is one of
    ``formats``, to train from it.

    A missing, damaged or foreign file raises ``FileNotFoundError`` or ``ValueError`` naming it.
    """
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refused: damaged, not a torch file, or holding pickled Python objects "
                         f"beyond tensors") from exc
    except Exception as exc:  # zip / torch format errors: damaged, or not a torch file at all
        raise ValueError(f"{path}: not a readable torch file ({exc.__class__.__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise ValueError(f"{path}: not a JointFace {' or '.join(f.replace('jointface-', '') for f in formats)} file")
    return payload
