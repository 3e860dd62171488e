"""Reliability: crashes, concurrent processes, damaged files, hostile input."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import crash_harness
from index import EmbeddingSpace, Gallery, GalleryError
from index.gallery import NewFace
from index.vectors import VectorIndex
from jointface.imageio import ImageLoadError, load_image

CI_TRIALS = int(os.environ.get("JOINTFACE_CRASH_TRIALS", "10"))
SPACE = EmbeddingSpace("t", "v", 4)


# -- crashes -----------------------------------------------------------------------------------


def _assert_all_ok(results):
    bad = [r for r in results if not r.ok]
    assert not bad, bad
    print(f"\n{len(results)} trials, {sum(not r.finished_before_kill for r in results)} killed mid-run, "
          f"{sum(r.repaired_on_open for r in results)} repaired on open: all consistent")


def test_enroll_killed_at_random_moments(lfw_dir):
    _assert_all_ok(crash_harness.enroll_trials(lfw_dir, CI_TRIALS, seed=11))


def test_remove_and_merge_killed_at_random_moments(lfw_dir):
    _assert_all_ok(crash_harness.people_trials(lfw_dir, CI_TRIALS, seed=12))


@pytest.mark.slow
def test_fifty_crash_trials_each(lfw_dir):
    _assert_all_ok(crash_harness.enroll_trials(lfw_dir, 50, seed=21))
    _assert_all_ok(crash_harness.people_trials(lfw_dir, 50, seed=22))


def test_crash_between_commit_and_index_save_is_repaired(tmp_path, monkeypatch, db_url):
    """The window a SIGKILL rarely hits, made certain: the index write never happens."""
    home = tmp_path / "home"
    vector = np.ones(4, dtype=np.float32) / 2
    new = NewFace("ada", vector, (0, 0, 1, 1), 1.0, "/a.jpg", "sha-a")
    with Gallery.open(home, db_url) as gallery:
        gallery.add_faces(SPACE, [NewFace("bob", -vector, (0, 0, 1, 1), 1.0, "/b.jpg", "sha-b")])

        def crash(*args, **kwargs):
            raise KeyboardInterrupt("simulated crash after commit")

        monkeypatch.setattr(VectorIndex, "save", crash)
        with pytest.raises(KeyboardInterrupt):
            gallery.add_faces(SPACE, [new])
    monkeypatch.undo()
    notices = []
    with Gallery.open(home, db_url, notify=notices.append) as gallery:
        hits = gallery.search(SPACE, vector[None], top_k=2)[0]
        assert hits[0].name == "ada"  # committed face is searchable after the repair
        assert gallery.check_index("t", "v").healthy
    assert any("out of date" in n for n in notices)


def test_full_disk_on_index_write_is_a_clear_error_and_loses_nothing(tmp_path, monkeypatch, db_url):
    home = tmp_path / "home"
    vector = np.ones(4, dtype=np.float32) / 2
    with Gallery.open(home, db_url) as gallery:
        gallery.add_faces(SPACE, [NewFace("bob", -vector, (0, 0, 1, 1), 1.0, "/b.jpg", "sha-b")])

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(VectorIndex, "save", full)
        with pytest.raises(GalleryError, match="No space left on device.*database is intact"):
            gallery.add_faces(SPACE, [NewFace("ada", vector, (0, 0, 1, 1), 1.0, "/a.jpg", "sha-a")])
    monkeypatch.undo()
    with Gallery.open(home, db_url) as gallery:
        assert [p.name for p in gallery.people()] == ["ada", "bob"]
        assert gallery.search(SPACE, vector[None])[0][0].name == "ada"
        assert gallery.check_index("t", "v").healthy


def test_tiny_filesystem(tmp_path):
    """A real full disk: a 1 MiB tmpfs (needs root and mount; otherwise the simulated test above covers it)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        vector = np.ones(256, dtype=np.float32) / 16
        with pytest.raises(GalleryError) as caught:
            with Gallery.open(mount_point) as gallery:
                for start in range(0, 4000, 200):
                    gallery.add_faces(EmbeddingSpace("t", "v", 256), [
                        NewFace(f"p{i}", vector, (0, 0, 1, 1), 1.0, f"/{i}.jpg", f"sha{i}")
                        for i in range(start, start + 200)])
        assert "space" in str(caught.value).lower() or "full" in str(caught.value).lower()
        # Whatever was committed is consistent and readable.
        with Gallery.open(mount_point) as gallery:
            assert gallery.store.integrity_check() == []
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


# -- concurrency -------------------------------------------------------------------------------


def test_two_enrolls_and_a_search_at_once(run_cli, lfw_dir, tmp_path, knn_dir):
    tree_a, tree_b = tmp_path / "a", tmp_path / "b"
    crash_harness.make_people_tree(lfw_dir, tree_a, people=3, per_person=5)
    names = [p.name for p in sorted(lfw_dir.iterdir()) if p.is_dir() and len(list(p.glob("*.jpg"))) >= 5]
    for name in names[3:6]:  # three other people for the second process
        (tree_b / name).mkdir(parents=True)
        for image in sorted((lfw_dir / name).glob("*.jpg"))[:5]:
            (tree_b / name / image.name).write_bytes(image.read_bytes())
    home = tmp_path / "home"
    assert run_cli("--engine", "dlib", "enroll", "seed", knn_dir / "train" / "obama" / "obama.jpg",
                   home=home).returncode == 0
    env = {**os.environ, "JOINTFACE_HOME": str(home)}
    command = crash_harness.jointface_command()
    enrolls = [subprocess.Popen([*command, "--engine", "dlib", "enroll", "--largest", "--batch-size", "2",
                                 "--from-folders", str(tree)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for tree in (tree_a, tree_b)]
    searches = []
    while any(p.poll() is None for p in enrolls):
        searches.append(subprocess.run([*command, "--engine", "dlib", "search", "--json",
                                        str(knn_dir / "test" / "obama1.jpg")], env=env, capture_output=True,
                                       text=True, timeout=300))
    for process in enrolls:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr
    assert searches and all(s.returncode == 0 for s in searches), [s.stderr for s in searches]
    assert all(json.loads(s.stdout)["faces"][0]["identity"] == "seed" for s in searches)
    listing = run_cli("people", "list", "--json", home=home)
    counts = {json.loads(line)["name"]: json.loads(line)["faces"]["dlib"] for line in listing.stdout.splitlines()}
    assert len(counts) == 7 and sum(counts.values()) == 1 + 30
    check = run_cli("--engine", "dlib", "index", "check", home=home)
    assert check.returncode == 0, check.stdout


# -- hostile input -----------------------------------------------------------------------------


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 10), (1, 2, 3, 4)).save(buffer, "PNG")
    return buffer.getvalue()


SEEDS = [_jpeg_bytes(), _png_bytes()]


@st.composite
def damaged_images(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(damaged_images(), st.binary(max_size=2000)), suffix=st.sampled_from([".jpg", ".png", ".gif"]))
def test_fuzzed_files_load_or_fail_cleanly(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except ImageLoadError as exc:
        assert str(path) in str(exc)
    else:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


NAMES = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=40)
HOSTILE = ["Robert'); DROP TABLE people;--", 'quote " and \' both', "slash/and\\back", "Ünïcödé 名前 😀",
           "  padded  ", "%s %d {0}", "-starts-with-dash"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(NAMES, st.sampled_from(HOSTILE)))
def test_any_name_round_trips(tmp_path_factory, name):
    home = tmp_path_factory.mktemp("names")
    vector = np.ones(4, dtype=np.float32) / 2
    with Gallery.open(home) as gallery:
        if not name.strip():
            return
        gallery.add_faces(SPACE, [NewFace(name.strip(), vector, (0, 0, 1, 1), 1.0, "/a.jpg", "sha")])
        assert [p.name for p in gallery.people()] == [name.strip()]
        assert gallery.search(SPACE, vector[None])[0][0].name == name.strip()
        gallery.rename_person(name.strip(), "renamed")
        assert [p.name for p in gallery.people()] == ["renamed"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_through_the_cli(run_cli, tmp_path, knn_dir, name):
    home = tmp_path / "home"
    photo = knn_dir / "train" / "obama" / "obama.jpg"
    result = run_cli("--engine", "dlib", "enroll", "--", name, photo, home=home)
    assert result.returncode == 0, result.stderr
    shown = run_cli("people", "show", "--json", "--", name.strip(), home=home)
    assert shown.returncode == 0 and json.loads(shown.stdout)["name"] == name.strip()
    found = run_cli("--engine", "dlib", "search", "--json", photo, home=home)
    assert json.loads(found.stdout)["faces"][0]["identity"] == name.strip()
    assert run_cli("people", "remove", "--", name.strip(), home=home).returncode == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.one_of(st.sampled_from(["--top-k", "--threshold", "--json", "-1", "0", "nan", "1e309",
                                                "--home", "", "people", "remove", "--fpir"]),
                               st.text(st.characters(exclude_characters="\x00"), max_size=10)), max_size=5))
def test_fuzzed_arguments_never_crash_in_process(tmp_path_factory, args):
    """Command lines cannot hold NUL bytes (argv is C strings), so the fuzzer leaves them out."""
    from typer.testing import CliRunner

    from cli.app import app

    home = tmp_path_factory.mktemp("fuzz-home")
    result = CliRunner().invoke(app, ["--home", str(home), "search", *args])
    # Usage errors (2) or clean failures (1), never a traceback.
    assert result.exit_code in (0, 1, 2), (args, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
