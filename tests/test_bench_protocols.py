"""Benchmark protocol splits: the rules on a tiny built folder, the counts on the real LFW.

The real-data tests need the shared data folder (``$JOINTFACE_SHARED_DATA`` or
``<repo>/../shared/data``); when it is missing they fail with a message that
says where they looked. They never skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jointface.bench import protocols
from jointface.bench.protocols import (
    LabelledImage,
    p1_extra_train,
    p1_split,
    p2_split,
    p3_pairs,
    pairs_without_p1,
    require_shared_data,
)

# --------------------------------------------------------------------------
# The rules, on a small folder in the LFW layout
# --------------------------------------------------------------------------

TINY_PEOPLE = {"Zed": 32, "Bob": 3, "Eve": 6, "Carl": 1, "Alice": 7, "Dora": 5}


@pytest.fixture()
def tiny_lfw(tmp_path: Path) -> Path:
    root = tmp_path / "lfw"
    for person, count in TINY_PEOPLE.items():  # created out of sorted order
        (root / person).mkdir(parents=True)
        for number in range(count, 0, -1):
            (root / person / f"{person}_{number:04d}.jpg").write_bytes(b"")
    (root / "README.txt").write_text("stray file at the root")
    (root / "Bob" / "Thumbs.db").write_bytes(b"")
    return root


def _keys(images) -> list[str]:
    return [image.key for image in images]


def test_p1_rules_on_tiny_folder(tiny_lfw):
    split = p1_split(tiny_lfw)
    assert split.people == ("Alice", "Eve", "Zed")  # >= 6 images, sorted
    assert split.label_of == {"Alice": 0, "Eve": 1, "Zed": 2}
    # Test = sorted positions 4, 9, 14, ... within the first 30.
    assert _keys(split.test) == [
        "Alice/Alice_0005.jpg",
        "Eve/Eve_0005.jpg",
        *(f"Zed/Zed_{n:04d}.jpg" for n in (5, 10, 15, 20, 25, 30)),
    ]
    assert len(split.train) == 6 + 5 + 24
    assert all(image.position % 5 != 4 and image.position < 30 for image in split.train)
    assert split.train[0] == LabelledImage("Alice", 0, tiny_lfw / "Alice" / "Alice_0001.jpg")
    assert _keys(p1_extra_train(tiny_lfw)) == ["Zed/Zed_0031.jpg", "Zed/Zed_0032.jpg"]


def test_p2_rules_on_tiny_folder(tiny_lfw):
    split = p2_split(tiny_lfw)
    assert split.people == ("Bob", "Dora")  # 2 to 5 images
    assert _keys(split.gallery) == ["Bob/Bob_0001.jpg", "Dora/Dora_0001.jpg"]
    assert _keys(split.mated) == ["Bob/Bob_0002.jpg", "Bob/Bob_0003.jpg"] + [
        f"Dora/Dora_{n:04d}.jpg" for n in (2, 3, 4, 5)
    ]
    assert _keys(split.nonmated) == ["Carl/Carl_0001.jpg"]

    three = p2_split(tiny_lfw, gallery_size=3)
    assert three.people == ("Dora",)  # 4 or 5 images
    assert _keys(three.gallery) == [f"Dora/Dora_{n:04d}.jpg" for n in (1, 2, 3)]
    assert _keys(three.mated) == ["Dora/Dora_0004.jpg", "Dora/Dora_0005.jpg"]
    assert three.nonmated == split.nonmated
    with pytest.raises(ValueError, match="gallery_size"):
        p2_split(tiny_lfw, gallery_size=5)


def test_p3_pairs_on_tiny_folder(tiny_lfw, tmp_path):
    pairs_txt = tmp_path / "pairs.txt"
    pairs_txt.write_text("2\t1\nBob\t1\t2\nAlice\t1\tCarl\t1\nDora 1 3\nBob 2 Dora 4\n")
    folds = p3_pairs(pairs_txt, tiny_lfw)
    assert [len(fold) for fold in folds] == [2, 2]
    first = folds[0][0]
    assert (first.fold, first.same, first.left_person, first.right_number) == (0, True, "Bob", 2)
    assert first.left_path == tiny_lfw / "Bob" / "Bob_0001.jpg"
    assert [pair.has_p1_person for fold in folds for pair in fold] == [False, True, False, False]
    assert [len(fold) for fold in pairs_without_p1(folds)] == [1, 2]


def test_p3_pairs_reports_bad_files(tiny_lfw, tmp_path):
    pairs_txt = tmp_path / "pairs.txt"
    pairs_txt.write_text("1\t1\nBob\t1\tDora\t1\nBob\t1\t2\n")  # different line where a same line belongs
    with pytest.raises(ValueError, match="pairs.txt:2"):
        p3_pairs(pairs_txt, tiny_lfw)
    pairs_txt.write_text("1\t1\nBob\t1\t9\nBob\t1\tDora\t1\n")  # Bob_0009 does not exist
    with pytest.raises(FileNotFoundError, match="Bob_0009"):
        p3_pairs(pairs_txt, tiny_lfw)
    pairs_txt.write_text("2\t1\nBob\t1\t2\n")
    with pytest.raises(ValueError, match="header says"):
        p3_pairs(pairs_txt, tiny_lfw)


def test_missing_shared_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JOINTFACE_SHARED_DATA", str(tmp_path / "nowhere"))
    assert protocols.default_shared_data() == tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="JOINTFACE_SHARED_DATA"):
        require_shared_data("lfw")


# --------------------------------------------------------------------------
# The real LFW
# --------------------------------------------------------------------------


def _shared(*parts: str) -> Path:
    try:
        return require_shared_data(*parts)
    except FileNotFoundError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # a missing data set fails, never skips


@pytest.fixture(scope="module")
def lfw_root() -> Path:
    return _shared("lfw")


@pytest.fixture(scope="module")
def real_p1(lfw_root):
    return p1_split(lfw_root)


@pytest.fixture(scope="module")
def real_p2(lfw_root):
    return p2_split(lfw_root)


@pytest.fixture(scope="module")
def real_pairs(lfw_root):
    return p3_pairs(_shared("lfw_protocol", "pairs.txt"), lfw_root)


def test_real_p1_counts(real_p1, lfw_root):
    assert len(real_p1.people) == 311
    assert len(real_p1.train) == 3372
    assert len(real_p1.test) == 703
    assert len(real_p1.train) + len(real_p1.test) == 4075
    assert all(image.path.is_file() for image in real_p1.test)
    extra = p1_extra_train(lfw_root)
    assert len(extra) == 1350
    assert not set(_keys(extra)) & set(_keys(real_p1.train) + _keys(real_p1.test))


def test_real_p2_counts(real_p2):
    assert len(real_p2.people) == 1369
    assert len(real_p2.gallery) == 1369
    assert len(real_p2.mated) == 2370
    assert len(real_p2.nonmated) == 4069
    assert {image.person for image in real_p2.mated} == set(real_p2.people)


def test_real_p2_gallery_of_three(lfw_root, real_p2):
    three = p2_split(lfw_root, gallery_size=3)
    assert (len(three.people), len(three.gallery), len(three.mated)) == (299, 897, 411)
    assert three.nonmated == real_p2.nonmated


def test_real_p1_and_p2_people_do_not_overlap(real_p1, real_p2):
    p1 = set(real_p1.people)
    assert not p1 & set(real_p2.people)
    assert not p1 & {image.person for image in real_p2.nonmated}
    p2_images = set(_keys(real_p2.gallery) + _keys(real_p2.mated) + _keys(real_p2.nonmated))
    assert not p2_images & set(_keys(real_p1.train) + _keys(real_p1.test))


def test_real_pairs(real_pairs, real_p1):
    assert len(real_pairs) == 10
    assert all(len(fold) == 600 for fold in real_pairs)
    assert all(sum(pair.same for pair in fold) == 300 for fold in real_pairs)
    assert all(pair.fold == index for index, fold in enumerate(real_pairs) for pair in fold)
    p1 = set(real_p1.people)
    for fold in real_pairs:
        for pair in fold:
            assert pair.has_p1_person == (pair.left_person in p1 or pair.right_person in p1)
    without = pairs_without_p1(real_pairs)
    # Regression value, measured when the protocol was implemented.
    assert sum(len(fold) for fold in without) == 4661


def test_real_splits_are_deterministic(lfw_root, real_p1, real_p2, real_pairs):
    assert p1_split(lfw_root) == real_p1
    assert p2_split(lfw_root) == real_p2
    assert p3_pairs(_shared("lfw_protocol", "pairs.txt"), lfw_root, check_files=False) == real_pairs
