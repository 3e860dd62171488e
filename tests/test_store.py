"""Identity store: migrations up and down, schema matches the models, old databases upgrade."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from index.errors import StoreError
from index.models import Base
from index.store import IdentityStore, head_revision


def url_for(path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def any_url(db_url, tmp_path) -> str:
    """A new database: SQLite, then PostgreSQL (the migrations must run on both)."""
    return db_url or url_for(tmp_path / "g.db")


def test_empty_database_to_head_and_back_down(any_url):
    store = IdentityStore(any_url)
    assert store.current_revision() is None
    store.upgrade("head")
    assert store.current_revision() == head_revision()
    assert {"people", "faces", "gallery_state", "api_keys", "audit_log", "gallery_settings",
            "library_photos", "library_faces", "face_clusters"} <= set(inspect(store.engine).get_table_names())
    store.downgrade("0002")
    assert not {"api_keys", "audit_log", "gallery_settings", "library_photos"} & set(inspect(store.engine).get_table_names())
    store.downgrade("0001")
    assert "gallery_state" not in inspect(store.engine).get_table_names()
    assert "gallery_settings" not in inspect(store.engine).get_table_names()
    store.downgrade("base")
    assert store.current_revision() is None
    assert not {"people", "faces"} & set(inspect(store.engine).get_table_names())
    store.upgrade("head")
    assert store.current_revision() == head_revision()
    store.close()


def test_models_match_migrations(any_url):
    store = IdentityStore.open(any_url)
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    store.close()
    assert diff == []


def test_old_schema_with_faces_is_upgraded_on_open(any_url):
    store = IdentityStore(any_url)
    store.upgrade("0001")
    with store.engine.begin() as raw:
        raw.execute(text("INSERT INTO people (id, name, created_at, meta) VALUES (1, 'ada', '2020-01-01', '{}')"))
        raw.execute(text(
            "INSERT INTO faces (person_id, engine, engine_version, dim, embedding, box_x1, box_y1, box_x2, box_y2,"
            " det_score, source_path, source_sha256, created_at) VALUES (1, 'dlib', 'v', 2, :blob,"
            " 0, 0, 1, 1, 1.0, 'a.jpg', 'abc', '2020-01-01')"), {"blob": bytes.fromhex("0000803f00000000")})
    store.close()
    store = IdentityStore.open(any_url)
    assert store.current_revision() == head_revision()
    with store.session() as session:
        assert store.generation(session, "dlib") == 1  # so an index is rebuilt and checked
    assert [p.name for p in store.people()] == ["ada"]
    store.close()


def test_open_without_upgrade_reports_the_revision(tmp_path):
    store = IdentityStore(url_for(tmp_path / "g.db"))
    store.upgrade("0001")
    store.close()
    with pytest.raises(StoreError, match="jointface db upgrade"):
        IdentityStore.open(url_for(tmp_path / "g.db"), upgrade=False)


def test_garbage_database_file_is_a_clear_error(tmp_path):
    path = tmp_path / "g.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open database"):
        IdentityStore.open(url_for(path))
    assert path.read_bytes().startswith(b"this is not a database")  # nothing overwritten


def test_wal_mode_and_foreign_keys(tmp_path):
    store = IdentityStore.open(url_for(tmp_path / "g.db"))
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert store.integrity_check() == []
    store.close()
