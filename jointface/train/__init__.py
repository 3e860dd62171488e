"""Training the joint network: labels (:mod:`.labels`), data (:mod:`.data`), config, loop.

Library entry points behind the CLI: :func:`preprocess`, :func:`organize`,
:func:`train`, :func:`export_weights`. Imports are lazy so ``import jointface.train``
does not load torch.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("preprocess", "organize", "read_layout", "lfw_p1_split"):
        from . import labels
        return getattr(labels, name)
    if name in ("train", "export_weights", "TrainResult"):
        from . import loop
        return getattr(loop, name)
    if name in ("TrainConfig", "tiny_config"):
        from . import config
        return getattr(config, name)
    raise AttributeError(name)


__all__ = ["TrainConfig", "TrainResult", "export_weights", "lfw_p1_split", "organize", "preprocess", "read_layout",
           "tiny_config", "train"]
