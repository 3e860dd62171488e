"""Every CLI command end to end, in a subprocess, with its exit status."""

from __future__ import annotations

import json
import sqlite3

from typer.testing import CliRunner

from cli.app import app
from index.store import head_revision


def test_full_session(run_cli, knn_dir, tmp_path):
    from index.store import head_revision

    home = tmp_path / "home"
    train = knn_dir / "train"

    result = run_cli("--engine", "dlib", "enroll", "--from-folders", train, home=home)
    assert result.returncode == 0, result.stderr
    assert "9 faces enrolled for 5 people" in result.stderr

    again = run_cli("--engine", "dlib", "enroll", "obama", train / "obama", home=home)
    assert again.returncode == 0 and "2 skipped" in again.stderr

    result = run_cli("--engine", "dlib", "search", knn_dir / "test" / "obama_and_biden.jpg", "--json",
                     "--annotate", tmp_path / "annotated", home=home)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip())
    assert answer["error"] is None
    assert {"obama", "biden"} <= {face["identity"] for face in answer["faces"]}
    face = answer["faces"][0]
    assert set(face) == {"box", "score", "identity", "similarity", "candidates"} and len(face["box"]) == 4
    assert "threshold" in result.stderr
    assert (tmp_path / "annotated" / "obama_and_biden.jpg").stat().st_size > 10_000

    result = run_cli("--engine", "dlib", "search", knn_dir / "test", home=home)
    assert result.returncode == 0 and result.stdout.count("kit_harington") >= 2

    listing = run_cli("people", "list", "--json", home=home)
    assert listing.returncode == 0
    people = {json.loads(line)["name"]: json.loads(line)["faces"] for line in listing.stdout.splitlines()}
    assert people["obama"] == {"dlib": 2} and len(people) == 5
    assert run_cli("people", "list", home=home).returncode == 0

    show = run_cli("people", "show", "obama", "--json", home=home)
    assert show.returncode == 0 and len(json.loads(show.stdout)["faces"]) == 2

    assert run_cli("people", "rename", "alex_lacamoire", "alex", home=home).returncode == 0
    assert run_cli("people", "merge", "rose_leslie", "alex", home=home).returncode == 0
    assert run_cli("people", "remove", "biden", home=home).returncode == 0
    listing = run_cli("people", "list", "--json", home=home)
    names = {json.loads(line)["name"]: json.loads(line)["faces"] for line in listing.stdout.splitlines()}
    assert names == {"alex": {"dlib": 3}, "kit_harington": {"dlib": 2}, "obama": {"dlib": 2}}

    check = run_cli("--engine", "dlib", "index", "check", home=home)
    assert check.returncode == 0 and "ok" in check.stdout
    (home / "index-dlib.jfidx").write_bytes(b"garbage")
    check = run_cli("--engine", "dlib", "index", "check", home=home)
    assert check.returncode == 1 and "rebuild" in check.stderr
    rebuild = run_cli("--engine", "dlib", "index", "rebuild", home=home)
    assert rebuild.returncode == 0 and "7 faces" in rebuild.stdout
    assert run_cli("--engine", "dlib", "index", "check", home=home).returncode == 0

    upgrade = run_cli("db", "upgrade", home=home)
    assert upgrade.returncode == 0 and head_revision() in upgrade.stdout
    backup = tmp_path / "backup.db"
    assert run_cli("db", "backup", backup, home=home).returncode == 0
    assert run_cli("people", "remove", "obama", home=home).returncode == 0
    assert run_cli("db", "restore", backup, home=home).returncode == 0
    listing = run_cli("people", "list", "--json", home=home)
    assert "obama" in listing.stdout
    result = run_cli("--engine", "dlib", "search", knn_dir / "test" / "obama1.jpg", "--json", home=home)
    assert json.loads(result.stdout)["faces"][0]["identity"] == "obama"


def test_failures_and_exit_codes(run_cli, knn_home_copy, knn_dir, tmp_path):
    home = knn_home_copy
    (tmp_path / "bad.jpg").write_text("not a photo")
    result = run_cli("--engine", "dlib", "search", knn_dir / "test" / "obama1.jpg", tmp_path / "bad.jpg",
                     tmp_path / "missing.jpg", "--json", home=home)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["error"] is None for line in lines] == [True, False, False]
    assert "not an image" in lines[1]["error"] and "no such file" in lines[2]["error"]

    result = run_cli("--engine", "dlib", "enroll", "newbie", knn_dir / "test" / "kit_with_rose.jpg",
                     tmp_path / "bad.jpg", home=home)
    assert result.returncode == 1
    assert "2 faces found; use --largest" in result.stderr and "not an image" in result.stderr
    result = run_cli("--engine", "dlib", "enroll", "newbie", "--largest", knn_dir / "test" / "kit_with_rose.jpg",
                     home=home)
    assert result.returncode == 0

    for args in (["people", "show", "nobody"], ["people", "remove", "nobody"], ["people", "rename", "nobody", "x"],
                 ["people", "merge", "nobody", "obama"], ["people", "rename", "obama", "biden"]):
        result = run_cli(*args, home=home)
        assert result.returncode == 1, args
        assert result.stderr.startswith("error: "), (args, result.stderr)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("ignored: not an image suffix")
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (mixed / "obama.jpg").write_bytes((knn_dir / "test" / "obama1.jpg").read_bytes())
    result = run_cli("--engine", "dlib", "search", "--json", mixed, home=home)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1 and len(lines) == 2
    assert lines[0]["error"] and lines[1]["faces"][0]["identity"] == "obama"

    assert run_cli("enroll", home=home).returncode == 2  # usage
    assert run_cli("search", home=home).returncode == 2
    assert run_cli("--engine", "nope", "search", knn_dir / "test", home=home).returncode == 1
    assert run_cli("frobnicate", home=home).returncode == 2


def test_broken_database_is_reported_not_overwritten(run_cli, tmp_path, knn_dir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "jointface.db").write_bytes(b"garbage" * 1000)
    result = run_cli("people", "list", home=home)
    assert result.returncode == 1 and "cannot open database" in result.stderr
    assert (home / "jointface.db").read_bytes() == b"garbage" * 1000


def test_old_database_upgraded_by_command(run_cli, tmp_path):
    from index.store import IdentityStore, head_revision

    home = tmp_path / "home"
    home.mkdir()
    store = IdentityStore(f"sqlite:///{home / 'jointface.db'}")
    store.upgrade("0001")
    store.close()
    result = run_cli("db", "upgrade", home=home)
    assert result.returncode == 0
    with sqlite3.connect(home / "jointface.db") as raw:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head_revision()


def test_in_process_runner(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "people", "list"])
    assert result.exit_code == 0 and "empty" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "jointface" in result.output


def test_preprocess_and_organize_commands(run_cli, knn_dir, tmp_path):
    """`preprocess` labels a folder-per-person tree and prints its counts; `organize` splits it."""
    labels = tmp_path / "labels.jsonl"
    result = run_cli("preprocess", knn_dir / "train", "--layout", "folder", "--out", labels, "--limit", "3")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["images"] == 3 and counts["newly_labelled"] == 3
    assert len(labels.read_text().splitlines()) == 3
    assert json.loads(labels.with_suffix(".summary.json").read_text())["images"] == 3
    again = run_cli("preprocess", knn_dir / "train", "--layout", "folder", "--out", labels, "--limit", "3")
    assert again.returncode == 0 and json.loads(again.stdout)["already_labelled"] == 3
    organised = run_cli("organize", labels, tmp_path / "data")
    assert organised.returncode == 0, organised.stderr
    assert (tmp_path / "data" / "train.jsonl").is_file() and (tmp_path / "data" / "classes.json").is_file()
    missing = run_cli("organize", tmp_path / "nope.jsonl", tmp_path / "data2")
    assert missing.returncode == 1 and "preprocess" in missing.stderr


def test_index_kind_option(run_cli, knn_home_copy, knn_dir):
    from index.vectors import VectorIndex

    rebuilt = run_cli("--engine", "dlib", "--index-kind", "hnsw", "index", "rebuild", home=knn_home_copy)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert VectorIndex.load(knn_home_copy / "index-dlib.jfidx").kind == "hnsw"
    found = run_cli("--engine", "dlib", "--index-kind", "hnsw", "search", "--json",
                    knn_dir / "test" / "obama_and_biden.jpg", home=knn_home_copy)
    assert found.returncode == 0, found.stderr
    names = {face["identity"] for face in json.loads(found.stdout)["faces"]}
    assert {"obama", "biden"} <= names
    # an explicit kind replaces an index of another kind (with a note); auto keeps what is there
    photo = knn_dir / "test" / "obama_and_biden.jpg"
    flat = run_cli("--engine", "dlib", "--index-kind", "flat", "search", photo, home=knn_home_copy)
    assert flat.returncode == 0 and "hnsw" in flat.stderr
    assert VectorIndex.load(knn_home_copy / "index-dlib.jfidx").kind == "flat"
    env_kind = run_cli("--engine", "dlib", "search", photo, home=knn_home_copy, env={"JOINTFACE_INDEX_KIND": "ivf"})
    assert env_kind.returncode == 0 and VectorIndex.load(knn_home_copy / "index-dlib.jfidx").kind == "ivf"
    kept = run_cli("--engine", "dlib", "search", photo, home=knn_home_copy)
    assert kept.returncode == 0 and VectorIndex.load(knn_home_copy / "index-dlib.jfidx").kind == "ivf"
    bad = run_cli("--index-kind", "bogus", "people", "list", home=knn_home_copy)
    assert bad.returncode == 2 and "bogus" in bad.stderr


def test_global_options_after_the_command_are_hoisted():
    from cli.app import hoist_global_options

    assert hoist_global_options(["search", "--engine", "dlib", "x.jpg"]) == ["--engine", "dlib", "search", "x.jpg"]
    assert hoist_global_options(["--home", "h", "people", "list", "--engine=dlib", "--json"]) == \
        ["--home", "h", "--engine=dlib", "people", "list", "--json"]
    # bench has an --engine of its own: it stays with bench
    assert hoist_global_options(["bench", "p1", "--engine", "dlib", "--threads", "2"]) == \
        ["--threads", "2", "bench", "p1", "--engine", "dlib"]
    assert hoist_global_options(["search", "--", "--engine"]) == ["search", "--", "--engine"]
    assert hoist_global_options(["--version"]) == ["--version"]


def test_global_option_after_the_command_end_to_end(run_cli, knn_dir, tmp_path):
    result = run_cli("search", "--engine", "dlib", "--json", knn_dir / "test" / "obama1.jpg", home=tmp_path / "h")
    assert result.returncode == 0, result.stderr
    assert "engine dlib" in result.stderr and len(json.loads(result.stdout)["faces"]) == 1


def test_an_unknown_face_is_shown_with_the_nearest_person(run_cli, knn_home_copy, knn_dir):
    home = knn_home_copy
    assert run_cli("people", "remove", "obama", home=home).returncode == 0
    result = run_cli("--engine", "dlib", "search", knn_dir / "test" / "obama1.jpg", home=home)
    assert result.returncode == 0, result.stderr
    face = next(line for line in result.stdout.splitlines() if line.strip().startswith("["))
    nearest = face.split("(nearest: ")[1].split(",")[0]
    assert face.split("] ")[1].startswith("unknown (nearest: ") and nearest in {"biden", "alex_lacamoire",
                                                                               "kit_harington", "rose_leslie"}


def test_the_annotated_caption_names_an_unknown_faces_nearest_person():
    from jointface.draw import face_label
    from jointface.service import FaceResult

    known = FaceResult((0, 0, 10, 10), 0.9, "obama", 0.812, [("obama", 0.812), ("biden", 0.41)])
    unknown = FaceResult((0, 0, 10, 10), 0.9, None, 0.521, [("rose_leslie", 0.521), ("kit_harington", 0.3)])
    empty_gallery = FaceResult((0, 0, 10, 10), 0.9, None, None, [])
    assert face_label(known) == "obama 0.81"
    assert face_label(unknown) == "unknown (nearest: rose_leslie 0.52)"
    assert face_label(empty_gallery) == "unknown"
