"""The gallery: an SQLite identity store (source of truth) and FAISS vector indexes that mirror it."""

from .errors import GalleryError, IndexCorruptError, PersonExistsError, PersonNotFoundError, StoreError
from .gallery import Gallery, SearchHit

__all__ = ["Gallery", "GalleryError", "IndexCorruptError", "PersonExistsError", "PersonNotFoundError",
           "SearchHit", "StoreError"]
