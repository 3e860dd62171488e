"""Gallery: database and index kept in step; damage and staleness repaired from the database."""

from __future__ import annotations

import numpy as np
import pytest

from index import EmbeddingSpace, Gallery, GalleryError, PersonExistsError, PersonNotFoundError
from index.gallery import NewFace

DIM = 8
ENGINE = EmbeddingSpace("test", "v1", DIM)


def face(person: str, seed: int, sha: str | None = None) -> NewFace:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return NewFace(person=person, embedding=vector / np.linalg.norm(vector), box=(0, 0, 10, 10), score=1.0,
                   source_path=f"/photos/{person}-{seed}.jpg", source_sha256=sha or f"sha-{person}-{seed}")


@pytest.fixture
def gallery(tmp_path, db_url):
    notices: list[str] = []
    with Gallery.open(tmp_path / "home", db_url, notify=notices.append) as opened:
        opened.notices = notices
        yield opened


def names(gallery, seed) -> list[str]:
    query = face("q", seed).embedding[None]
    return [hit.name for hit in gallery.search(ENGINE, query, top_k=5)[0]]


def test_add_search_and_duplicates(gallery):
    ids = gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2), face("ada", 3)])
    assert all(isinstance(i, int) for i in ids)
    assert gallery.add_faces(ENGINE, [face("ada", 1)]) == [None]  # same image, same person: skipped
    assert gallery.add_faces(ENGINE, [face("bob", 9, sha="sha-ada-1")])[0] is not None  # other person: kept
    hits = gallery.search(ENGINE, face("x", 3).embedding[None], top_k=5)[0]
    assert hits[0].name == "ada" and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert len({hit.name for hit in hits}) == len(hits)  # one hit per person
    people = {p.name: p.face_count for p in gallery.people()}
    assert people == {"ada": 2, "bob": 2}


def test_search_names_the_first_candidates_first_and_the_rest_when_needed(gallery, monkeypatch):
    """The same people as naming every candidate, with one name lookup when the first candidates are
    enough, and a second when a person's several faces (or a deleted face) fill them."""
    import dataclasses

    others = [face(f"p{i}", 100 + i) for i in range(40)]
    near = [dataclasses.replace(face("ada", seed), embedding=(v := face("ada", 1).embedding + 0.01 * seed) /
                                np.linalg.norm(v)) for seed in (1, 2, 3)]  # ada's three faces, the nearest three
    gallery.add_faces(ENGINE, near + others)
    query = face("ada", 1).embedding[None]
    lookups: list[list[int]] = []
    original = gallery._face_names
    monkeypatch.setattr(gallery, "_face_names", lambda ids: lookups.append(ids) or original(ids))
    one = gallery.search(ENGINE, query, top_k=1)[0]
    assert [h.name for h in one] == ["ada"] and one[0].similarity > 0.99
    assert [len(ids) for ids in lookups] == [1]  # one face named, not 32
    lookups.clear()
    two = gallery.search(ENGINE, query, top_k=2)[0]  # ada's faces fill the first candidates: a second lookup
    assert len(lookups) == 2 and two[0].name == "ada" and len({h.name for h in two}) == 2
    # the same answer as naming every candidate at once (top_k larger than any first round leaves short)
    every = gallery.search(ENGINE, query, top_k=43)[0]
    assert [h.name for h in two] == [h.name for h in every[:2]]
    assert [h.similarity for h in two] == [h.similarity for h in every[:2]]
    gallery.remove_person("ada")  # its faces gone from the database: none of them is named
    assert "ada" not in {h.name for h in gallery.search(ENGINE, query, top_k=3)[0]}


def test_what_the_gallery_answers_about_its_faces(gallery):
    ids = gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2)])
    gallery.add_faces(EmbeddingSpace("other", "v9", DIM), [face("ada", 3)])
    assert gallery.engine_versions("test") == {"v1"} and gallery.engine_versions("none") == set()
    assert set(ids) < gallery.face_ids() and len(gallery.face_ids()) == 3
    stored = sorted((name, np.frombuffer(blob, np.float32).tolist()) for name, blob in gallery.embeddings_by_person())
    assert stored == sorted((f.person, f.embedding.tolist()) for f in (face("ada", 1), face("bob", 2), face("ada", 3)))
    assert gallery.enrolled_hashes("test") == {("ada", "sha-ada-1"), ("bob", "sha-bob-2")}


def test_remove_person_removes_vectors(gallery):
    gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2)])
    assert gallery.remove_person("ada") == 1
    assert names(gallery, 1) == ["bob"]
    report = gallery.check_index("test", "v1")
    assert report.healthy and report.db_faces == report.index_faces == 1
    with pytest.raises(PersonNotFoundError):
        gallery.remove_person("ada")


def test_rename_and_merge(gallery):
    gallery.add_faces(ENGINE, [face("ada", 1), face("ada2", 2), face("ada2", 5, sha="sha-ada-1"), face("bob", 3)])
    with pytest.raises(PersonExistsError):
        gallery.rename_person("ada2", "bob")
    gallery.rename_person("bob", "robert")
    moved = gallery.merge_people("ada2", "ada")
    assert moved == 1  # the other face was the same image as one of ada's: dropped
    assert {p.name: p.face_count for p in gallery.people()} == {"ada": 2, "robert": 1}
    assert names(gallery, 2)[0] == "ada"
    assert gallery.check_index("test", "v1").healthy
    with pytest.raises(GalleryError):
        gallery.merge_people("ada", "ada")


def test_rebuilt_index_gives_same_results(gallery):
    gallery.add_faces(ENGINE, [face(f"p{i}", i) for i in range(50)])
    queries = np.stack([face("q", 100 + i).embedding for i in range(20)])
    before = gallery.search(ENGINE, queries, top_k=3)
    gallery.rebuild_index(ENGINE)
    assert gallery.search(ENGINE, queries, top_k=3) == before


def test_deleted_index_file_is_rebuilt_on_next_use(tmp_path, db_url):
    home = tmp_path / "home"
    with Gallery.open(home, db_url) as gallery:
        gallery.add_faces(ENGINE, [face("ada", 1), face("bob", 2)])
        before = names(gallery, 1)
    (home / "index-test.jfidx").unlink()
    notices = []
    with Gallery.open(home, db_url, notify=notices.append) as gallery:
        assert names(gallery, 1) == before
    assert any("missing" in n for n in notices)
    assert (home / "index-test.jfidx").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncate", "stale"])
def test_damaged_or_stale_index_is_repaired(tmp_path, damage, db_url):
    home = tmp_path / "home"
    with Gallery.open(home, db_url) as gallery:
        gallery.add_faces(ENGINE, [face("ada", 1)])
        path = gallery.index_path("test")
        old = path.read_bytes()
        gallery.add_faces(ENGINE, [face("bob", 2)])
    if damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    else:
        path.write_bytes(old)  # an index from before bob: generation behind the database
    notices = []
    with Gallery.open(home, db_url, notify=notices.append) as gallery:
        assert not gallery.check_index("test", "v1").healthy or damage == "none"
        assert sorted(names(gallery, 2)) == ["ada", "bob"]
        assert gallery.check_index("test", "v1").healthy
    assert notices and "rebuilt from the database" in notices[0]


def test_engine_version_change_rebuilds_with_only_matching_faces(gallery):
    gallery.add_faces(ENGINE, [face("ada", 1)])
    gallery.add_faces(EmbeddingSpace("test", "v2", DIM), [face("bob", 2)])
    query = face("q", 1).embedding[None]
    # versions never mix
    assert [h.name for h in gallery.search(EmbeddingSpace("test", "v2", DIM), query)[0]] == ["bob"]
    assert [h.name for h in gallery.search(ENGINE, query)[0]] == ["ada"]


def test_threshold_is_stored(gallery):
    assert gallery.threshold("test") == (None, {})
    gallery.set_threshold("test", 0.7, {"fpir": 0.01})
    assert gallery.threshold("test") == (0.7, {"fpir": 0.01})


def test_backup_and_restore(tmp_path, gallery):
    gallery.add_faces(ENGINE, [face("ada", 1)])
    backup = tmp_path / "backup.db"
    gallery.backup(backup)
    with pytest.raises(GalleryError, match="already exists"):
        gallery.backup(backup)
    gallery.add_faces(ENGINE, [face("bob", 2)])
    gallery.restore(backup)
    assert [p.name for p in gallery.people()] == ["ada"]
    assert names(gallery, 1) == ["ada"]
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"nope" * 1000)
    with pytest.raises(GalleryError, match="not a usable"):
        gallery.restore(garbage)
    assert [p.name for p in gallery.people()] == ["ada"]


def test_read_only_home_is_a_clear_error(tmp_path, db_url):
    import os

    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o500)
    try:
        if os.access(home, os.W_OK):
            # root ignores permission bits: simulate with a path under a file instead
            blocker = tmp_path / "file"
            blocker.write_text("x")
            with pytest.raises(GalleryError, match="cannot create"):
                Gallery.open(blocker / "home", db_url)
        else:
            with pytest.raises(GalleryError, match="not writable"):
                Gallery.open(home, db_url)
    finally:
        home.chmod(0o700)


def test_people_count_follows_enrolment_merges_and_removals(gallery):
    other = EmbeddingSpace("test", "v2", DIM)
    assert gallery.people_count("test", "v1") == 0
    gallery.add_faces(ENGINE, [face("ann", 1), face("ann", 2), face("bob", 3)])
    gallery.add_faces(other, [face("cid", 4)])
    assert gallery.people_count("test", "v1") == 2  # people, not faces; another version's faces not counted
    assert gallery.people_count("test", "v2") == 1
    gallery.add_faces(ENGINE, [face("cid", 5)])
    assert gallery.people_count("test", "v1") == 3  # a new generation: counted again
    gallery.merge_people("cid", "bob")
    assert gallery.people_count("test", "v1") == 2
    gallery.remove_person("ann")
    assert gallery.people_count("test", "v1") == 1


def test_the_default_threshold_follows_the_gallery_size_when_the_engine_has_a_table(gallery):
    from jointface.calibration import threshold_for_gallery
    from jointface.engines.base import Engine
    from jointface.service import resolve_threshold

    class Sized(Engine):
        name, version, dim = "test", "v1", DIM
        default_threshold = 0.9
        table = {"people": [2, 10, 100], "threshold": [0.4, 0.6, 0.8], "fpir": 0.1}

        def detect(self, image):
            return []

        @property
        def sized_thresholds(self):
            return True

        def default_threshold_for(self, people):
            return threshold_for_gallery(self.table, people), f"table, {people} people"

    engine = Sized()
    gallery.add_faces(ENGINE, [face(f"p{i}", i) for i in range(10)])
    chosen = resolve_threshold(gallery, engine, None)
    assert chosen.value == pytest.approx(0.6) and chosen.source == "engine default: table, 10 people"
    assert resolve_threshold(gallery, engine, 0.3).value == 0.3  # an option still wins
    gallery.set_threshold("test", 0.55, {"engine_version": "v1"})
    assert resolve_threshold(gallery, engine, None).source == "calibrated"  # and so does a calibration
