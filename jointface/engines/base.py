"""The engine interface: an image in, every face out.

An engine turns an RGB uint8 image of shape ``(H, W, 3)`` into a list of
:class:`Face`, each with

* ``box``: ``(x1, y1, x2, y2)`` in input-image pixels (floats, x2/y2 exclusive);
* ``score``: the detection score (engine-specific scale, higher = surer);
* ``embedding``: an L2-normalised float32 vector of the engine's ``dim``;
* ``engine`` / ``engine_version``: who produced it, so galleries never mix.

Similarity between two faces of the same engine is the inner product of their
embeddings (cosine similarity).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from index.space import EmbeddingSpace


@dataclass(frozen=True)
class Face:
    """One detected face."""

    box: tuple[float, float, float, float]
    score: float
    embedding: np.ndarray = field(repr=False)
    engine: str
    engine_version: str

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an engine input: ``(H, W, 3)`` uint8, C-contiguous."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image has no pixels (shape {image.shape})")
    return np.ascontiguousarray(image)


class Engine(abc.ABC):
    """Base class of face engines."""

    #: Registry name (``--engine NAME``).
    name: str = ""
    #: Embedding dimension.
    dim: int = 0
    #: Cosine similarity above which two faces are called the same person when
    #: the gallery has no calibrated threshold.
    default_threshold: float = 0.5
    #: Photos whose longer side exceeds this many pixels give the same faces when
    #: decoded smaller (the engine shrinks them anyway); None: use every pixel.
    max_useful_side: int | None = None

    @property
    @abc.abstractmethod
    def version(self) -> str:
        """Identifies the model weights; faces of different versions never mix."""

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """Every face in one RGB uint8 image, highest score first."""

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Every face in each of several images (engines may batch this)."""
        return [self.detect(image) for image in images]

    def default_threshold_for(self, people: int) -> tuple[float, str | None]:
        """The threshold for a gallery of ``people`` people when none was calibrated or given, and where it
        comes from (None: the engine's fixed default, whatever the gallery's size)."""
        return self.default_threshold, getattr(self, "threshold_source", None)

    @property
    def sized_thresholds(self) -> bool:
        """Whether :meth:`default_threshold_for` depends on the number of people (so callers count them)."""
        return False

    @property
    def space(self) -> EmbeddingSpace:
        """The embedding space of this engine's vectors: faces of two spaces never compare."""
        return EmbeddingSpace(self.name, self.version, self.dim)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "dim": self.dim}
