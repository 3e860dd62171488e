"""The gallery: an identity store (SQLite or PostgreSQL: the source of truth) and the vectors that mirror it
(FAISS files by default; pgvector or Milvus: :mod:`index.backends`)."""

from .errors import GalleryError, IndexCorruptError, PersonExistsError, PersonNotFoundError, StoreError
from .gallery import Gallery, SearchHit
from .space import EmbeddingSpace

__all__ = ["EmbeddingSpace", "Gallery", "GalleryError", "IndexCorruptError", "PersonExistsError", "PersonNotFoundError",
           "SearchHit", "StoreError"]
