"""Vector backends: where a gallery's embeddings are searched.

The identity database (SQLite or PostgreSQL) is always the source of truth;
a vector backend mirrors each engine's faces for nearest-neighbour search.

* ``faiss`` (the default): one FAISS index file per engine in the home
  folder (:mod:`index.vectors`), written after the database commit and
  repaired from the database on open (generation numbers).
* ``pgvector``: one table per engine (and engine version) in the same
  PostgreSQL database as the people, with an HNSW index; a face's vector is
  written and deleted in the very transaction of its ``faces`` row, so the
  two cannot disagree.
* ``milvus``: one Milvus collection per engine (Milvus Lite, a file in the
  home folder, or a Milvus server/cluster); written after the database
  commit, with the generation it mirrors stored in Milvus, and reconciled on
  open like the FAISS files.

The choice is recorded in the database (``gallery_settings``); opening with
another backend switches the gallery to it (its vectors are rebuilt from the
database on first use).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GalleryError
from .base import VectorBackend

BACKENDS = ("faiss", "pgvector", "milvus")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    uri: str | None = None

    def as_setting(self) -> dict:
        return {"name": self.name, "uri": self.uri}

    @classmethod
    def from_setting(cls, value: dict | None) -> "BackendSpec":
        if not value:
            return cls("faiss")
        return cls(value.get("name") or "faiss", value.get("uri"))

    def __str__(self) -> str:
        return self.name if not self.uri else f"{self.name}:{self.uri}"


def parse_backend(text: str) -> BackendSpec:
    """``faiss``, ``pgvector``, ``milvus`` (Milvus Lite in the home folder), ``milvus:FILE.db`` (Milvus Lite
    there) or ``milvus:http://HOST:19530`` (a Milvus server; ``milvus:https://...`` too)."""
    text = (text or "").strip()
    name, _, uri = text.partition(":")
    name = name.lower()
    if name not in BACKENDS:
        raise GalleryError(f"unknown vector backend {text!r}; choose one of {', '.join(BACKENDS)} "
                           "(milvus:FILE.db or milvus:http://HOST:19530 for another Milvus)")
    if uri and name != "milvus":
        raise GalleryError(f"the {name} backend takes no address ({text!r}); only milvus:URI does")
    if name == "milvus" and uri:
        if not (uri.startswith(("http://", "https://", "tcp://")) or uri.endswith(".db")):
            raise GalleryError(f"milvus address {uri!r}: give a Milvus Lite file ending in .db or a server URL "
                               "such as http://127.0.0.1:19530")
    return BackendSpec(name, uri or None)


def make_backend(gallery, spec: BackendSpec) -> VectorBackend:
    if spec.name == "faiss":
        from .faiss_backend import FaissBackend

        return FaissBackend(gallery)
    if spec.name == "pgvector":
        from .pgvector_backend import PgVectorBackend

        return PgVectorBackend(gallery)
    if spec.name == "milvus":
        from .milvus_backend import MilvusBackend

        return MilvusBackend(gallery, spec.uri)
    raise GalleryError(f"unknown vector backend {spec.name!r}")


__all__ = ["BACKENDS", "BackendSpec", "VectorBackend", "make_backend", "parse_backend"]
