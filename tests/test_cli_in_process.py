"""Every ``jointface`` command run in-process (typer's ``CliRunner``); the end-to-end runs as a subprocess are in
``test_cli.py``, ``test_cluster.py``, ``test_serve_api.py``, ``test_bench_run.py``, ``test_train.py`` and
``test_distributed.py``."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.app import app


@pytest.fixture
def jointface(tmp_path):
    """``jointface --home HOME --engine dlib ARGS`` in this process; returns the typer Result."""
    runner = CliRunner()

    def run(*args, home=None, engine: str | None = "dlib"):
        front = ["--home", str(home or tmp_path / "home")] + (["--engine", engine] if engine else [])
        return runner.invoke(app, front + [str(arg) for arg in args])

    return run


def test_gallery_commands(jointface, knn_dir, lfw_dir, tmp_path):
    train = knn_dir / "train"
    enrolled = jointface("enroll", "--from-folders", train, "--json")
    assert enrolled.exit_code == 0, enrolled.output
    assert "9 faces enrolled for 5 people" in enrolled.stderr
    assert {json.loads(line)["status"] for line in enrolled.stdout.splitlines()} == {"enrolled"}
    again = jointface("enroll", "obama", train / "obama")
    assert again.exit_code == 0 and "2 skipped" in again.stderr

    found = jointface("search", knn_dir / "test" / "obama_and_biden.jpg", "--json")
    assert found.exit_code == 0, found.output
    assert {"obama", "biden"} <= {face["identity"] for face in json.loads(found.stdout)["faces"]}

    show = jointface("people", "show", "obama", "--json")
    assert show.exit_code == 0 and len(json.loads(show.stdout)["faces"]) == 2
    assert jointface("people", "rename", "alex_lacamoire", "alex").exit_code == 0
    assert jointface("people", "merge", "rose_leslie", "alex").exit_code == 0
    assert jointface("people", "remove", "biden", "--yes").exit_code == 0
    listing = jointface("people", "list", "--json")
    assert {json.loads(line)["name"] for line in listing.stdout.splitlines()} == {"alex", "kit_harington", "obama"}

    check = jointface("index", "check")
    assert check.exit_code == 0 and "dlib: ok" in check.stdout
    rebuilt = jointface("index", "rebuild")
    assert rebuilt.exit_code == 0 and "7 faces" in rebuilt.stdout

    assert jointface("db", "upgrade").exit_code == 0
    backup = tmp_path / "backup.db"
    assert jointface("db", "backup", backup).exit_code == 0 and backup.is_file()
    assert jointface("people", "remove", "obama", "--yes").exit_code == 0
    restored = jointface("db", "restore", backup, "--yes")
    assert restored.exit_code == 0 and "restored" in restored.stderr
    assert "obama" in jointface("people", "list").stdout

    strangers = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:4]
    calibrated = jointface("calibrate", "--fpir", "0.5", *[arg for folder in strangers
                                                         for arg in ("--unknowns", folder)])
    assert calibrated.exit_code == 0, calibrated.output
    assert "threshold" in calibrated.stdout and "stored" in calibrated.stdout


def test_keys_and_serve_commands(jointface, monkeypatch):
    created = jointface("keys", "create", "door camera", "--scope", "write", engine=None)
    assert created.exit_code == 0, created.output
    assert created.stdout.strip() and "cannot be shown again" in created.stderr
    listing = jointface("keys", "list", "--json", engine=None)
    assert [json.loads(line)["name"] for line in listing.stdout.splitlines()] == ["door camera"]
    assert jointface("keys", "revoke", "door camera", engine=None).exit_code == 0
    assert "revoked" in jointface("keys", "list", engine=None).stdout

    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **options: served.update(options, app=application))
    result = jointface("serve", "--port", "8123")
    assert result.exit_code == 0, result.output
    assert served["port"] == 8123 and served["host"] == "127.0.0.1" and served["app"] is not None
    assert "no API key yet" in result.stderr and "serving on http://127.0.0.1:8123/" in result.stderr


def test_cluster_commands(jointface, knn_dir):
    found = jointface("cluster", knn_dir / "train", "--json")
    assert found.exit_code == 0, found.output
    summary = json.loads(found.stdout)
    assert summary["photos"] == 9 and summary["clusters"] >= 1
    listing = jointface("clusters", "list", "--json")
    assert listing.exit_code == 0
    clusters = [json.loads(line) for line in listing.stdout.splitlines()]
    first = clusters[0]["id"]
    shown = jointface("clusters", "show", first, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["id"] == first
    split = jointface("clusters", "split", first, "--threshold", "0.5")  # a loose link: the faces stay together
    assert split.exit_code == 0 and "did not split" in split.stderr
    assert jointface("clusters", "ignore", first).exit_code == 0
    assert jointface("clusters", "ignore", first, "--undo").exit_code == 0
    named = jointface("clusters", "name", first, "somebody")
    assert named.exit_code == 0 and "named somebody" in named.stderr
    if len(clusters) > 1:
        merged = jointface("clusters", "merge", first, clusters[1]["id"])
        assert merged.exit_code == 0 and "merged cluster" in merged.stderr


def test_research_commands(jointface, knn_dir, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labelled = jointface("preprocess", knn_dir / "train", "--layout", "folder", "--out", labels, "--limit", "2",
                         engine=None)
    assert labelled.exit_code == 0, labelled.output
    assert json.loads(labelled.stdout)["newly_labelled"] == 2
    organised = jointface("organize", labels, tmp_path / "data", engine=None)
    assert organised.exit_code == 0, organised.output
    assert (tmp_path / "data" / "classes.json").is_file()

    no_data = jointface("train", "--out", tmp_path / "run", engine=None)
    assert no_data.exit_code == 2 and "--data" in no_data.output
    not_organised = jointface("train", "--data", tmp_path, "--out", tmp_path / "run", engine=None)
    assert not_organised.exit_code == 1 and "jointface organize" in not_organised.stderr
    no_config = jointface("train-v2", tmp_path / "none.json", engine=None)
    assert no_config.exit_code == 1 and "no such config file" in no_config.stderr
    no_photos = jointface("quantize", tmp_path / "data" / "nothing-here", engine=None)
    assert no_photos.exit_code == 1
    unknown = jointface("bench", "p9", engine=None)
    assert unknown.exit_code == 2 and "unknown protocol" in unknown.output
