"""Errors of the gallery, each with a message meant for the user."""


class GalleryError(RuntimeError):
    """Base class: something about the gallery (database or index) is wrong."""


class StoreError(GalleryError):
    """The database cannot be opened, read or written."""


class ClusterError(GalleryError):
    """A cluster operation that cannot be done (unknown id, wrong state); the message says why."""


class IndexCorruptError(GalleryError):
    """A vector index file is damaged (it can be rebuilt from the database)."""


class PersonNotFoundError(GalleryError, KeyError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no person named {self.name!r} in the gallery (see `jointface people list`)"


class PersonExistsError(GalleryError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"a person named {self.name!r} already exists (use `jointface people merge` to join two people)"
