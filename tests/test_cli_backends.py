"""The CLI on PostgreSQL with each vector backend (real servers), end to end in subprocesses."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("vectors", ["pgvector", "milvus", "faiss"])
def test_session_on_postgresql(run_cli, knn_dir, tmp_path, pg_url, vectors):
    home = tmp_path / "home"
    train = knn_dir / "train"
    common = ("--db-url", pg_url, "--engine", "dlib")

    result = run_cli(*common, "--vectors", vectors, "enroll", "--from-folders", train, home=home)
    assert result.returncode == 0, result.stderr
    assert "9 faces enrolled for 5 people" in result.stderr
    assert not list(home.glob("index-*.jfidx")) or vectors == "faiss"  # FAISS files only for FAISS

    # The backend is recorded in the database: later commands need no --vectors.
    result = run_cli(*common, "search", knn_dir / "test" / "obama_and_biden.jpg", "--json", home=home)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip())
    assert {"obama", "biden"} <= {face["identity"] for face in answer["faces"]}

    assert run_cli(*common, "people", "remove", "biden", "--yes", home=home).returncode == 0
    assert run_cli(*common, "people", "merge", "rose_leslie", "alex_lacamoire", home=home).returncode == 0
    listing = run_cli(*common, "people", "list", "--json", home=home)
    names = {json.loads(line)["name"]: json.loads(line)["faces"] for line in listing.stdout.splitlines()}
    assert names == {"alex_lacamoire": {"dlib": 3}, "kit_harington": {"dlib": 2}, "obama": {"dlib": 2}}
    result = run_cli(*common, "search", knn_dir / "test" / "obama_and_biden.jpg", "--json", home=home)
    assert "biden" not in {face["identity"] for face in json.loads(result.stdout.strip())["faces"]}

    check = run_cli(*common, "index", "check", home=home)
    assert check.returncode == 0 and "ok: database 7 faces" in check.stdout, check.stdout + check.stderr
    rebuild = run_cli(*common, "index", "rebuild", home=home)
    assert rebuild.returncode == 0 and "7 faces" in rebuild.stdout

    if vectors == "pgvector":  # backup and restore with pg_dump / pg_restore
        backup = tmp_path / "gallery.dump"
        result = run_cli(*common, "db", "backup", backup, home=home)
        assert result.returncode == 0, result.stderr
        assert run_cli(*common, "people", "remove", "obama", "--yes", home=home).returncode == 0
        result = run_cli(*common, "db", "restore", backup, "--yes", home=home)
        assert result.returncode == 0, result.stderr
        listing = run_cli(*common, "people", "list", "--json", home=home)
        assert "obama" in listing.stdout
        result = run_cli(*common, "search", knn_dir / "test" / "obama_and_biden.jpg", "--json", home=home)
        assert "obama" in {face["identity"] for face in json.loads(result.stdout.strip())["faces"]}
        assert run_cli(*common, "index", "check", home=home).returncode == 0
        garbage = tmp_path / "garbage.dump"
        garbage.write_bytes(b"nope" * 100)
        result = run_cli(*common, "db", "restore", garbage, "--yes", home=home)
        assert result.returncode == 1 and "not a usable" in result.stderr
        assert "obama" in run_cli(*common, "people", "list", "--json", home=home).stdout


def test_bad_urls_and_backends_exit_non_zero(run_cli, tmp_path, pg_url):
    home = tmp_path / "home"
    for url, message in [("postgres://x@/db", "cannot use database URL"),
                         ("postgresql+psycopg://u:secret@127.0.0.1:9/db", "cannot open database"),
                         ("nonsense", "cannot use database URL")]:
        result = run_cli("--db-url", url, "people", "list", home=home)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "secret" not in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--vectors", "pgvector", "people", "list", home=home)  # SQLite database
    assert result.returncode == 1 and "PostgreSQL" in result.stderr
    result = run_cli("--vectors", "annoy", "people", "list", home=home)
    assert result.returncode == 2 and "unknown vector backend" in result.stderr
    result = run_cli("--db-url", pg_url, "--vectors", "milvus:http://127.0.0.1:9", "people", "list", home=home)
    assert result.returncode == 1 and "cannot reach Milvus" in result.stderr
