"""The identity store: people and faces in a SQL database (SQLite by default).

The database is the source of truth; the vector indexes are derived from it.

* Any SQLAlchemy URL works; SQLite databases are opened in WAL mode with a
  busy timeout and foreign keys on, so several processes can share one.
* The schema is brought to the newest Alembic revision on first use
  (:meth:`IdentityStore.open`), or explicitly with ``jointface db upgrade``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from migrations import MIGRATIONS_DIR

from .errors import StoreError
from .models import FaceRow, GalleryState, Person

BUSY_TIMEOUT_MS = 30_000


def alembic_config(connection=None, url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def make_engine(url: str) -> SAEngine:
    is_sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_MS / 1000}} if is_sqlite else {}
    engine = create_engine(url, **kwargs)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@dataclass(frozen=True)
class PersonSummary:
    id: int
    name: str
    created_at: object
    meta: dict
    faces_by_engine: dict[str, int]

    @property
    def face_count(self) -> int:
        return sum(self.faces_by_engine.values())


class IdentityStore:
    """Opens the database, migrates it, hands out sessions."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True) -> "IdentityStore":
        try:
            store = cls(url)
        except (ArgumentError, NoSuchModuleError) as exc:
            raise StoreError(f"cannot use database URL {display_url(url)}: {exc} (examples: "
                             "sqlite:////path/to/jointface.db, postgresql+psycopg://USER:PASSWORD@HOST/DB)") from exc
        except ImportError as exc:
            raise StoreError(f"the driver for {display_url(url)} is not installed ({exc.name}); for PostgreSQL: "
                             'pip install -e ".[scale]"') from exc
        try:
            store._enable_wal()
            current = store.current_revision()
            if current != head_revision():
                if not upgrade:
                    raise StoreError(
                        f"database {display_url(url)} is at schema revision {current or 'empty'}, expected {head_revision()}: "
                        "run `jointface db upgrade`"
                    )
                store.upgrade()
        except StoreError:
            store.close()
            raise
        except (DatabaseError, sqlite3.DatabaseError) as exc:
            store.close()
            raise StoreError(f"cannot open database {display_url(url)}: {_reason(exc)}") from exc
        return store

    def _enable_wal(self) -> None:
        if self.engine.dialect.name != "sqlite" or self.url in ("sqlite://", "sqlite:///:memory:"):
            return
        with self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode = WAL")

    def close(self) -> None:
        self.engine.dispose()

    def current_revision(self) -> str | None:
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def upgrade(self, revision: str = "head") -> None:
        with self.engine.begin() as connection:
            command.upgrade(alembic_config(connection), revision)

    def downgrade(self, revision: str) -> None:
        with self.engine.begin() as connection:
            command.downgrade(alembic_config(connection), revision)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            raise StoreError(f"database {display_url(self.url)}: {_reason(exc)}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    # -- queries used by the gallery ---------------------------------------------------------

    def generation(self, session: Session, engine: str) -> int:
        state = session.get(GalleryState, engine)
        return state.generation if state else 0

    def bump_generation(self, session: Session, engine: str) -> int:
        state = session.get(GalleryState, engine)
        if state is None:
            state = GalleryState(engine=engine, generation=0, threshold=None, threshold_info={})
            session.add(state)
        state.generation += 1
        session.flush()
        return state.generation

    def people(self) -> list[PersonSummary]:
        with self.session() as session:
            counts: dict[int, dict[str, int]] = {}
            rows = session.execute(
                select(FaceRow.person_id, FaceRow.engine, func.count()).group_by(FaceRow.person_id, FaceRow.engine)
            )
            for person_id, engine, count in rows:
                counts.setdefault(person_id, {})[engine] = count
            return [
                PersonSummary(p.id, p.name, p.created_at, dict(p.meta or {}), counts.get(p.id, {}))
                for p in session.scalars(select(Person).order_by(Person.name))
            ]

    def integrity_check(self) -> list[str]:
        """SQLite's own integrity check plus JointFace's invariants; an empty list means healthy."""
        problems: list[str] = []
        with self.engine.connect() as connection:
            if self.engine.dialect.name == "sqlite":
                for (row,) in connection.execute(text("PRAGMA integrity_check")):
                    if row != "ok":
                        problems.append(f"sqlite: {row}")
                for row in connection.execute(text("PRAGMA foreign_key_check")):
                    problems.append(f"foreign key violation: {tuple(row)}")
            orphans = connection.execute(
                text("SELECT COUNT(*) FROM faces WHERE person_id NOT IN (SELECT id FROM people)")
            ).scalar_one()
            if orphans:
                problems.append(f"{orphans} face rows without a person")
        return problems


def display_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _reason(exc: BaseException) -> str:
    original = getattr(exc, "orig", None)
    return str(original or exc).strip()


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, if any."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        return Path(url[len(prefix):])
    return None
