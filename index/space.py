"""The embedding space a face vector lives in: the engine that made it, that engine's version, the dimension.

Vectors compare only within one space: the gallery stores, indexes and searches each space apart (its
database rows keep the three as columns ``engine``, ``engine_version``, ``dim``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingSpace:
    name: str      # the engine's name (``dlib``, ``jointface``, ...)
    version: str   # the engine's version (weights and settings: vectors of two versions never mix)
    dim: int       # the vectors' dimension
