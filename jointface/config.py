"""One settings object: where the gallery lives, which database, which engine, threads.

Resolved from (first wins) command-line flags, environment variables
(``JOINTFACE_HOME``, ``JOINTFACE_DB_URL``, ``JOINTFACE_ENGINE``,
``JOINTFACE_THREADS``, ``JOINTFACE_INDEX_KIND``) and defaults. Nothing is read at import time.
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

    def engine_name(self) -> str:
        from .engines import default_engine_name

        return self.engine or default_engine_name()

    def apply_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
