"""The FAISS backend: the gallery's own index files (:mod:`index.vectors`), as before backends existed.

The index logic (generations, atomic files, repair on open) lives in
:class:`index.gallery.Gallery`; this class is the thin adapter that puts it
behind :class:`~index.backends.base.VectorBackend`.
"""

from __future__ import annotations

import numpy as np

from .base import VectorBackend


class FaissBackend(VectorBackend):
    name = "faiss"

    def begin_add(self, space):
        return self.gallery._index_to_change(space)

    def add_after_commit(self, token, space, ids, vectors, generation):
        gallery, index = self.gallery, token
        if generation is not None and len(ids):
            try:
                index.add(np.asarray(ids, dtype=np.int64), vectors)
                gallery._save_index(index, generation)
            except BaseException:
                gallery._indexes.pop(space.name, None)  # the file is behind: reload (or rebuild) next time
                raise
        gallery._indexes[space.name] = index

    def delete_after_commit(self, ids_by_engine, generations):
        self.gallery._after_delete(ids_by_engine, generations)

    def search(self, space, queries, k):
        index = self.gallery.vectors(space)
        return index.search(queries, min(k, max(len(index), 1)))

    def rebuild(self, space):
        gallery = self.gallery
        with gallery.locked():
            index = gallery._rebuild(space, None)
        gallery._indexes[space.name] = index
        return len(index)

    def check(self, engine, version):
        return self.gallery._check_faiss_index(engine, version)

    def forget(self):
        for index_file in self.gallery.home.glob("index-*.jfidx"):
            index_file.unlink()
        self.gallery._indexes.clear()
