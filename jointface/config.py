"""Settings, and every environment variable JointFace reads, in one place. Nothing is read at import time.

* :class:`Settings`: where the gallery lives, which database, which engine, threads, index kind, vector
  backend. Resolved from (first wins) command-line flags, environment variables (``JOINTFACE_HOME``,
  ``JOINTFACE_DB_URL``, ``JOINTFACE_ENGINE``, ``JOINTFACE_THREADS``, ``JOINTFACE_INDEX_KIND``,
  ``JOINTFACE_VECTORS``) and defaults.
* :class:`LibrarySettings`: what the library reads where no flag reaches (``JOINTFACE_WEIGHTS``,
  ``JOINTFACE_MAX_PIXELS``, ``JOINTFACE_SHARED_DATA``), read afresh on each call
  (:func:`library_settings`), so a changed variable takes effect at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("jointface", appauthor=False))


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str | None
    engine: str | None
    threads: int | None
    index_kind: str = "auto"
    vectors: str | None = None  # vector backend (index.backends); None: the one the gallery records

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None, db_url: str | None = None, engine: str | None = None,
                threads: int | None = None, index_kind: str | None = None,
                vectors: str | None = None) -> "Settings":
        env = os.environ
        home_value = home or env.get("JOINTFACE_HOME")
        threads_value = threads if threads is not None else env.get("JOINTFACE_THREADS")
        return cls(
            home=Path(home_value).expanduser() if home_value else default_home(),
            db_url=db_url or env.get("JOINTFACE_DB_URL") or None,
            engine=engine or env.get("JOINTFACE_ENGINE") or None,
            threads=int(threads_value) if threads_value not in (None, "") else None,
            index_kind=index_kind or env.get("JOINTFACE_INDEX_KIND") or "auto",
            vectors=vectors or env.get("JOINTFACE_VECTORS") or None,
        )

    def apply_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


REPO = Path(__file__).resolve().parents[1]
#: Default pixel budget of a decoded image: 50 megapixels (an 8K photo is 33 MP).
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class LibrarySettings:
    weights: Path | None  # $JOINTFACE_WEIGHTS: the joint engine's weights instead of the shipped ones
    shared_data: Path  # $JOINTFACE_SHARED_DATA, else <repo>/../shared/data: the benchmark and training data
    max_pixels_text: str | None  # $JOINTFACE_MAX_PIXELS as given (see :attr:`max_pixels`)

    @property
    def max_pixels(self) -> int:
        """The largest image decoded, in pixels; ``ValueError`` when the variable is not an integer."""
        if self.max_pixels_text is None:
            return DEFAULT_MAX_PIXELS
        try:
            return int(self.max_pixels_text)
        except ValueError as exc:
            raise ValueError(f"JOINTFACE_MAX_PIXELS must be an integer, got {self.max_pixels_text!r}") from exc


def library_settings() -> LibrarySettings:
    env = os.environ
    shared = env.get("JOINTFACE_SHARED_DATA")
    return LibrarySettings(
        weights=Path(env["JOINTFACE_WEIGHTS"]) if env.get("JOINTFACE_WEIGHTS") else None,
        shared_data=Path(shared).expanduser() if shared else REPO.parent / "shared" / "data",
        max_pixels_text=env.get("JOINTFACE_MAX_PIXELS"),
    )
