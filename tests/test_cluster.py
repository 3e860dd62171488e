"""``jointface cluster`` and ``jointface clusters``: grouping a photo library, naming, merging, splitting, ignoring.

Real faces (knn_examples, dlib) for what users see; a tiny fake engine on
coloured squares for the bookkeeping (resume, re-clustering, errors).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import Gallery
from jointface.bench.cluster import bcubed_scores, pairwise_scores, score_labels
from jointface.clustering import (DEFAULT_METHOD, ClusterError, cluster_detail, cluster_embeddings, default_threshold,
                                  ignore_cluster, list_clusters, merge_clusters, name_cluster, recluster, scan,
                                  split_cluster)
from jointface.engines import Engine, Face, l2_normalise

PEOPLE = ("alex_lacamoire", "biden", "kit_harington", "obama", "rose_leslie")


# -- grouping and scoring ------------------------------------------------------------------------


def blobs(seed: int = 0, people: int = 4, per_person: int = 6, dim: int = 32, spread: float = 0.15):
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.normal(size=(people, dim)))
    vectors = np.concatenate([l2_normalise(c + spread * rng.normal(size=(per_person, dim)) / np.sqrt(dim))
                              for c in centres])
    return vectors, np.repeat(np.arange(people), per_person)


@pytest.mark.parametrize("method", ["chinese-whispers", "dbscan", "hdbscan"])
def test_each_method_finds_well_separated_people(method):
    vectors, truth = blobs()
    stranger = l2_normalise(np.random.default_rng(9).normal(size=(1, vectors.shape[1])))
    labels = cluster_embeddings(np.concatenate([vectors, stranger]), method=method, threshold=0.8, min_faces=2)
    assert labels[-1] == -1  # a lone face is left unclustered
    assert pairwise_scores(truth, labels[:-1])["f1"] == 1.0


def test_min_faces_leaves_small_groups_unclustered():
    vectors, truth = blobs(people=2, per_person=3)
    assert (cluster_embeddings(vectors, threshold=0.8, min_faces=4) == -1).all()
    assert len(set(cluster_embeddings(vectors, threshold=0.8, min_faces=3).tolist())) == 2


def test_pairwise_and_bcubed_by_hand():
    truth = ["a", "a", "a", "b", "b", "c"]
    predicted = [0, 0, 1, 1, 1, -1]
    # predicted pairs: (0,1) right, (2,3) wrong, (2,4) wrong, (3,4) right -> precision 2/4
    # true pairs: a has 3, b has 1 -> 4; found 2 -> recall 2/4
    pairwise = pairwise_scores(truth, predicted)
    assert pairwise["precision"] == pytest.approx(0.5) and pairwise["recall"] == pytest.approx(0.5)
    bcubed = bcubed_scores(truth, predicted)
    # precision per item: 1, 1, 1/3, 2/3, 2/3, 1; recall: 2/3, 2/3, 1/3, 1, 1, 1
    assert bcubed["precision"] == pytest.approx((1 + 1 + 1 / 3 + 2 / 3 + 2 / 3 + 1) / 6)
    assert bcubed["recall"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 + 1 + 1) / 6)
    everything_apart = score_labels(truth, [-1] * 6)
    assert everything_apart["pairwise_precision"] == 1.0 and everything_apart["pairwise_recall"] == 0.0
    assert everything_apart["unclustered_share"] == 1.0 and everything_apart["clusters"] == 0


# -- bookkeeping with a fake engine --------------------------------------------------------------


class ColourEngine(Engine):
    """One face per photo, the whole photo; its embedding is the photo's mean colour (a black photo: no face)."""

    name = "colour"
    dim = 3
    default_threshold = 0.99

    def __init__(self):
        self.detected = 0

    @property
    def version(self) -> str:
        return "colour-1"

    def detect(self, image):
        self.detected += 1
        mean = image.reshape(-1, 3).mean(axis=0).astype(np.float32)
        if mean.sum() == 0:
            return []
        h, w = image.shape[:2]
        return [Face(box=(0.0, 0.0, float(w), float(h)), score=1.0, embedding=l2_normalise(mean[None])[0],
                     engine=self.name, engine_version=self.version)]


COLOURS = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}


def colour_photos(folder: Path, per_colour: int = 3, colours=COLOURS, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb in colours.items():
        for i in range(start, start + per_colour):
            jitter = np.array(rgb) + i * 3
            path = folder / f"{name}{i}.png"
            Image.new("RGB", (40 + i, 40), tuple(int(v) for v in jitter)).save(path)
            paths.append(path)
    return paths


def groups_by_colour(gallery) -> dict[str, set[int | None]]:
    found: dict[str, set] = {}
    for info in list_clusters(gallery, include_ignored=True, with_faces=True):
        for face in info.faces:
            found.setdefault(Path(face.path).stem.rstrip("0123456789"), set()).add(info.id)
    return found


def test_scan_resumes_and_never_detects_a_photo_twice(tmp_path):
    engine = ColourEngine()
    paths = colour_photos(tmp_path / "photos")
    with Gallery.open(tmp_path / "home") as gallery:
        seen = []

        def interrupt_after_first_batch(outcome):
            seen.append(outcome)
            if len(seen) == 4:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            scan(gallery, engine, paths, batch_size=4, on_progress=interrupt_after_first_batch)
        assert engine.detected == 4  # interrupted as the first batch was reported: it was committed
        report = scan(gallery, engine, paths, batch_size=4)
        assert report.count("seen") == 4 and report.count("scanned") == 5 and engine.detected == 9
        copy = tmp_path / "photos" / "copy_of_red0.png"
        shutil.copy(paths[0], copy)
        again = scan(gallery, engine, [*paths, copy], batch_size=4)
        assert again.count("seen") == 10 and again.count("scanned") == 0  # same content at a new path: seen
        assert engine.detected == 9
        summary = recluster(gallery, engine.name, engine.version, threshold=0.99)
    assert summary.faces == 9 and summary.clusters == 3 and summary.unclustered == 0


def test_reclustering_keeps_named_and_ignored_groups(tmp_path):
    engine = ColourEngine()
    paths = colour_photos(tmp_path / "photos")
    with Gallery.open(tmp_path / "home") as gallery:
        scan(gallery, engine, paths)
        recluster(gallery, engine.name, engine.version, threshold=0.99)
        groups = groups_by_colour(gallery)
        assert all(len(ids) == 1 for ids in groups.values()) and len(set().union(*groups.values())) == 3
        red, green, blue = (groups[c].pop() for c in ("red", "green", "blue"))
        report = name_cluster(gallery, red, "Red Person", engine)
        assert report.enrolled == 3 and report.skipped == 0
        ignore_cluster(gallery, green)
        # more photos of every colour arrive
        more = colour_photos(tmp_path / "more", per_colour=2, colours={k + "x": v for k, v in COLOURS.items()},
                             start=3)
        scan(gallery, engine, more)
        summary = recluster(gallery, engine.name, engine.version, threshold=0.99,
                            match_threshold=engine.default_threshold)
        groups = groups_by_colour(gallery)
        assert groups["red"] == groups["redx"] == {red}  # new faces of the named person join them (gallery match)
        assert groups["green"] == groups["greenx"] == {green}  # and new faces of ignored strangers stay ignored
        assert groups["blue"] == groups["bluex"] == {blue}  # the open group kept its id
        assert summary.matched == 2 and summary.named_clusters == 1 and summary.ignored_clusters == 1
        assert cluster_detail(gallery, red).person == "Red Person"
        assert name_cluster(gallery, red, "Red Person", engine).skipped == 3  # already enrolled: skipped
        assert {c.id for c in list_clusters(gallery)} == {red, blue}  # ignored clusters are hidden by default


def test_merge_split_and_refusals(tmp_path):
    engine = ColourEngine()
    colours = {"red": (200, 20, 20), "pink": (200, 40, 40), "blue": (20, 20, 200)}
    with Gallery.open(tmp_path / "home") as gallery:
        scan(gallery, engine, colour_photos(tmp_path / "photos", colours=colours))
        recluster(gallery, engine.name, engine.version, threshold=0.99)  # red and pink are one group at 0.99
        groups = groups_by_colour(gallery)
        assert groups["red"] == groups["pink"]
        reddish, blue = groups["red"].pop(), groups["blue"].pop()
        parts = split_cluster(gallery, reddish, threshold=0.9995)
        assert sorted(size for _, size in parts) == [3, 3] and parts[0][0] == reddish
        with pytest.raises(ClusterError, match="nothing was changed"):
            split_cluster(gallery, blue, threshold=1.01)
        merge_clusters(gallery, reddish, parts[1][0])
        assert cluster_detail(gallery, reddish).size == 6
        name_cluster(gallery, blue, "Blue", engine)
        name_cluster(gallery, reddish, "Red", engine)
        with pytest.raises(ClusterError, match="people merge"):
            merge_clusters(gallery, reddish, blue, engine)
        with pytest.raises(ClusterError, match="only open"):
            split_cluster(gallery, blue)
        with pytest.raises(ClusterError, match="named"):
            ignore_cluster(gallery, blue)
        with pytest.raises(ClusterError, match="named Blue already"):
            name_cluster(gallery, blue, "Somebody Else", engine)
        with pytest.raises(ClusterError, match="no cluster with id 999"):
            cluster_detail(gallery, 999)
        # removing the person makes the cluster open again at the next clustering; no face is lost
        gallery.remove_person("Blue")
        summary = recluster(gallery, engine.name, engine.version, threshold=0.99)
        assert summary.faces == 9 and summary.named_clusters == 1 and summary.clusters == 1


def test_migration_adds_and_removes_the_tables(tmp_path):
    from sqlalchemy import inspect

    from index.store import IdentityStore, head_revision

    store = IdentityStore(f"sqlite:///{tmp_path / 'g.db'}")
    store.upgrade("head")
    assert {"library_photos", "library_faces", "face_clusters"} <= set(inspect(store.engine).get_table_names())
    store.downgrade("0002")
    assert not {"library_photos", "library_faces", "face_clusters"} & set(inspect(store.engine).get_table_names())
    store.upgrade("head")
    assert store.current_revision() == head_revision()
    store.close()


# -- real faces, through the command line --------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_knn(tmp_path_factory, knn_dir):
    """knn_examples/train copied to a library folder and clustered with dlib by the CLI (read-only: copy it)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("knn_library")
    shutil.copytree(knn_dir / "train", root / "photos")
    script = Path(sys.executable).with_name("jointface")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cli.app"]
    result = subprocess.run([*command, "--home", str(root / "home"), "cluster", "--engine", "dlib",
                             "--json", str(root / "photos")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return root, json.loads(result.stdout)


@pytest.fixture
def library(clustered_knn, tmp_path):
    root, summary = clustered_knn
    copy = tmp_path / "library"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("gallery.lock"))
    with sqlite3.connect(copy / "home" / "jointface.db") as db:  # the copied photos: point the library at them
        db.execute("UPDATE library_photos SET path = replace(path, ?, ?)", (str(root), str(copy)))
    return copy, summary


def cluster_of_each_person(home: Path) -> dict[str, set]:
    with Gallery.open(home) as gallery:
        found: dict[str, set] = {}
        for info in list_clusters(gallery, include_ignored=True, with_faces=True):
            for face in info.faces:
                found.setdefault(Path(face.path).parent.name, set()).add(info.id)
    return found


def test_knn_examples_cluster_into_their_people(library):
    root, summary = library
    assert summary["scanned"] == 9 and summary["faces_found"] == 9 and summary["failed"] == 0
    assert summary["clusters"] == 4 and summary["unclustered"] == 1  # alex_lacamoire has a single photo
    found = cluster_of_each_person(root / "home")
    assert set(found) == {"biden", "kit_harington", "obama", "rose_leslie"}
    assert all(len(ids) == 1 for ids in found.values())  # each person in one cluster ...
    assert len(set().union(*found.values())) == 4  # ... and no two people share one


def test_cluster_list_show_sheet_and_json(library, run_cli, tmp_path):
    root, _ = library
    home = root / "home"
    listing = run_cli("clusters", "list", "--json", "--sheet", tmp_path / "sheets", home=home)
    assert listing.returncode == 0, listing.stderr
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert sorted(row["size"] for row in rows) == [2, 2, 2, 2]
    assert all(row["status"] == "open" and row["nearest_person"] is None for row in rows)
    for row in rows:
        sheet = Image.open(tmp_path / "sheets" / f"cluster-{row['id']}.png")
        assert sheet.size[0] >= 4 * 112 and sheet.size[1] > 112
    show = run_cli("clusters", "show", rows[0]["id"], "--json", home=home)
    detail = json.loads(show.stdout)
    assert show.returncode == 0 and len(detail["faces"]) == 2 and Path(detail["faces"][0]["image"]).exists()
    text = run_cli("clusters", "list", home=home)
    assert text.returncode == 0 and "4 clusters; 9 faces in 9 photos, 1 unclustered" in text.stdout
    for args in (["clusters", "show", "4242"], ["clusters", "name", "4242", "x"], ["clusters", "merge", "4242", "1"],
                 ["clusters", "split", "4242"], ["clusters", "ignore", "4242"]):
        result = run_cli(*args, home=home)
        assert result.returncode == 1 and "no cluster with id 4242" in result.stderr, (args, result.stderr)


def test_naming_a_cluster_enrols_it_and_search_finds_the_person(library, run_cli, knn_dir):
    root, _ = library
    home = root / "home"
    obama = cluster_of_each_person(home)["obama"].pop()
    named = run_cli("clusters", "name", obama, "Barack Obama", home=home)
    assert named.returncode == 0 and "2 faces enrolled" in named.stderr, named.stderr
    found = run_cli("--engine", "dlib", "search", "--json", knn_dir / "test" / "obama1.jpg", home=home)
    assert found.returncode == 0 and json.loads(found.stdout)["faces"][0]["identity"] == "Barack Obama"
    again = run_cli("clusters", "name", obama, "Barack Obama", home=home)
    assert again.returncode == 0 and "0 faces enrolled, 2 already enrolled" in again.stderr
    # more photos: the new Obama face joins the named cluster, which keeps its id and name
    shutil.copy(knn_dir / "test" / "obama1.jpg", root / "photos" / "obama1.jpg")
    rerun = run_cli("cluster", "--engine", "dlib", "--json", root / "photos", home=home)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["scanned"] == 1 and summary["already_seen"] == 9 and summary["matched_to_enrolled"] == 1
    show = json.loads(run_cli("clusters", "show", obama, "--json", home=home).stdout)
    assert show["person"] == "Barack Obama" and show["size"] == 3
    others = [json.loads(line) for line in run_cli("clusters", "list", "--json", home=home).stdout.splitlines()]
    assert all(row["nearest_person"]["name"] == "Barack Obama" for row in others if row["status"] == "open")


def library_rows(home: Path) -> list:
    with sqlite3.connect(home / "jointface.db") as db:
        return [db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
                for table in ("library_photos", "library_faces", "face_clusters", "faces")]


def test_deleted_photo_and_bad_inputs_give_clear_messages(library, run_cli, tmp_path):
    root, _ = library
    home = root / "home"
    kit = cluster_of_each_person(home)["kit_harington"].pop()
    gone = root / "photos" / "kit_harington" / "john1.jpeg"
    gone.unlink()
    before = library_rows(home)
    show = run_cli("clusters", "show", kit, "--sheet", tmp_path / "sheets", home=home)
    assert show.returncode == 1 and "no longer on disk" in show.stderr and "Traceback" not in show.stderr
    assert (tmp_path / "sheets" / f"cluster-{kit}.png").is_file()  # drawn anyway, a grey tile for the lost photo
    assert library_rows(home) == before  # nothing changed
    named = run_cli("clusters", "name", kit, "Kit", home=home)
    assert named.returncode == 0 and "no longer on disk" in named.stderr and "2 faces enrolled" in named.stderr
    # an unreadable photo fails alone; the others are clustered
    (root / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    rerun = run_cli("cluster", "--engine", "dlib", root / "photos", home=home)
    assert rerun.returncode == 1 and "broken.jpg" in rerun.stderr and "not an image" in rerun.stderr
    assert "8 seen before" in rerun.stdout
    # usage errors, a broken database
    assert run_cli("cluster", "--method", "kmeans", root / "photos", home=home).returncode == 2
    assert run_cli("clusters", "name", home=home).returncode == 2
    broken = tmp_path / "broken_home"
    broken.mkdir()
    (broken / "jointface.db").write_bytes(b"garbage" * 100)
    result = run_cli("clusters", "list", home=broken)
    assert result.returncode == 1 and "cannot open database" in result.stderr
    assert (broken / "jointface.db").read_bytes() == b"garbage" * 100


def test_default_thresholds_are_the_measured_peaks(dlib_engine):
    """Each engine's clustering threshold is the pairwise-F1 peak of the default method in the committed full
    benchmark, measured with the engine version in use: new weights need `jointface bench cluster` again (v1's
    0.60, kept after the v2 weights shipped, put nearly all of v2's faces in five clusters)."""
    from jointface.engines.joint_engine import default_weights_path, load_weights

    result = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cluster.json").read_text())
    assert result["config"]["subset"] is None  # the full protocol, not a quick run
    versions = {"dlib": dlib_engine.version, "jointface": load_weights(default_weights_path())[1]}
    for engine, version in versions.items():
        assert result["engines"][engine]["version"] == version, f"{engine}: run `jointface bench cluster` again"
        peak = max(result["sweeps"][engine][DEFAULT_METHOD], key=lambda row: row["pairwise_f1"])
        assert default_threshold(engine) == pytest.approx(peak["parameter"]), engine


def test_bench_cluster_quick_run(tmp_path, lfw_dir, dlib_engine):
    """A 3-person subset of `jointface bench cluster` (dlib): figures, sweep, plot, contact sheet, table."""
    from jointface.bench.run import BenchContext, markdown_for, run_protocol

    ctx = BenchContext(lfw_root=lfw_dir, cache_dir=tmp_path / "cache", limit=3)
    result = run_protocol("cluster", [dlib_engine], ctx, tmp_path / "out")
    row = result["figures"]["dlib"]
    assert row["true_people_with_2_or_more"] == 3 and row["true_people"] == 6
    assert row["scored_images"] + row["no_face"] == row["images"] and row["faces"] >= row["scored_images"]
    assert 0 <= row["pairwise_f1"] <= 1 and 0 <= row["bcubed_f1"] <= 1
    # the library run at its defaults is the sweep's point at the default threshold: the same faces, the same code
    assert row["clusters"] == 3 and row["pairwise_f1"] == 1.0  # three people, each in a cluster of their own
    sweep = {value["parameter"]: value for value in result["sweeps"]["dlib"][row["method"]]}
    assert sweep[row["threshold"]]["pairwise_f1"] == pytest.approx(row["pairwise_f1"])
    assert sweep[row["threshold"]]["clusters"] == row["clusters"]
    assert (tmp_path / "out" / "cluster_f1.png").stat().st_size > 10_000
    assert Image.open(tmp_path / "out" / "cluster_sheet_dlib.png").size[0] >= 4 * 112
    assert row["speed"]["photos"] == row["images"] and row["speed"]["faces_per_second"] > 0
    assert "## Cluster" in markdown_for(result) and "Subset run: 3" in markdown_for(result)
