"""Collections, teacher labels, the leak guard and the training-sample composer (issue 14).

The collection layouts are rebuilt in miniature from ``../shared/data`` (the
real collections are never copied into the repository).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jointface.datasets.build import build_training_set, leaking
from jointface.datasets.collections import CollectionError, read_layout
from jointface.datasets.samples import ComposerSettings, Face, Photo, SampleComposer, clip_box, paste
from jointface.datasets.teacher import label_collection, read_face_labels


# ----------------------------------------------------------------------------- layouts in miniature
@pytest.fixture(scope="module")
def mini_collections(tmp_path_factory, knn_dir, lfw_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("collections")
    aaf = base / "All-Age-Faces Dataset" / "original images"
    aaf.mkdir(parents=True)
    for index, photo in enumerate(sorted((knn_dir / "train").glob("*/*.jpg"))[:3]):
        shutil.copy(photo, aaf / f"{index:05d}A{20 + index}.jpg")
    (aaf / "notes.txt").write_text("not a photo")
    utk = base / "UTKFace" / "unlabeled"
    utk.mkdir(parents=True)
    for index, photo in enumerate(sorted((lfw_dir / "Aaron_Peirsol").glob("*.jpg"))[:2]):
        shutil.copy(photo, utk / f"{30 + index}_0_0_2017011{index}.jpg.chip.jpg")
    celeb = base / "celeb"
    (celeb / "Celeb").mkdir(parents=True)
    lines = ["image identity"]
    for index, photo in enumerate(sorted((lfw_dir / "Aaron_Peirsol").glob("*.jpg"))[:2]):
        name = f"{index + 1:06d}.jpg"
        shutil.copy(photo, celeb / "Celeb" / name)
        lines.append(f"{name} 17")
    (celeb / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    return {"aaf": base / "All-Age-Faces Dataset", "utkface": utk.parent, "celeba": celeb}


def test_readers_give_identities_per_layout(mini_collections):
    aaf = read_layout(mini_collections["aaf"], "aaf")
    assert [s.identity for s in aaf] == ["aaf_00000", "aaf_00001", "aaf_00002"]  # one person per photo
    utk = read_layout(mini_collections["utkface"], "utkface")
    assert len(utk) == 2 and all(s.identity is None for s in utk)
    celeb = read_layout(mini_collections["celeba"], "celeba")
    assert [s.identity for s in celeb] == ["celeba_17", "celeba_17"]


def test_readers_refuse_missing_or_foreign_folders(mini_collections, tmp_path):
    with pytest.raises(CollectionError, match="no such folder"):
        read_layout(tmp_path / "nowhere", "aaf")
    with pytest.raises(CollectionError, match="original images"):
        read_layout(tmp_path, "aaf")
    (tmp_path / "Celeb").mkdir()
    shutil.copy(next((mini_collections["celeba"] / "Celeb").iterdir()), tmp_path / "Celeb" / "999999.jpg")
    with pytest.raises(CollectionError, match="identity_CelebA.txt"):
        read_layout(tmp_path, "celeba")
    (tmp_path / "identity_CelebA.txt").write_text("000001.jpg 3\n")
    with pytest.raises(CollectionError, match="not in identity_CelebA.txt"):
        read_layout(tmp_path, "celeba")


# ----------------------------------------------------------------------------- teacher labels
def test_label_every_face_resumes_and_reports(mini_collections, knn_dir, tmp_path):
    root = tmp_path / "group"
    (root / "Celeb").mkdir(parents=True)
    shutil.copy(knn_dir / "test" / "obama_and_biden.jpg", root / "Celeb" / "000001.jpg")
    shutil.copy(knn_dir / "train" / "obama" / "obama.jpg", root / "Celeb" / "000002.jpg")
    (root / "Celeb" / "000003.jpg").write_bytes(b"not a jpeg at all")
    (root / "identity_CelebA.txt").write_text("000001.jpg 1\n000002.jpg 2\n000003.jpg 3\n")
    out = tmp_path / "labels" / "faces.jsonl"
    first = label_collection(root, "celeba", out, workers=1, limit=1, progress=False)
    assert first["photos"] == 1 and first["newly_labelled"] == 1
    manifest = label_collection(root, "celeba", out, workers=2, progress=False)
    records = {r["path"]: r for r in read_face_labels(out)}
    assert len(records) == 3 and manifest["newly_labelled"] == 2  # the first photo was not redone
    group = records["Celeb/000001.jpg"]
    assert group["status"] == "ok" and len(group["faces"]) >= 2  # Obama, Biden (HOG at upsample 1 may see more)
    assert sum(f["subject"] for f in group["faces"]) == 1
    assert all(len(f["teacher"]) == 128 and len(f["landmark_box"]) == 4 for f in group["faces"])
    assert records["Celeb/000003.jpg"]["status"] == "unreadable"
    portrait = records["Celeb/000002.jpg"]
    assert manifest["several_faces"] == 1 and len(manifest["unreadable"]) == 1
    assert manifest["faces"] == len(group["faces"]) + len(portrait["faces"])
    assert json.loads(Path(str(out) + ".manifest.json").read_text())["complete"] is True
    with pytest.raises(ValueError, match="choose another output file"):
        label_collection(mini_collections["aaf"], "aaf", out, workers=1, progress=False)


def _labels_file(path: Path, root: Path, layout: str, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    Path(str(path) + ".manifest.json").write_text(json.dumps({"root": str(root), "layout": layout,
                                                              "complete": True}))
    return path


def _record(path: str, identity, teacher, box=(10.0, 10.0, 60.0, 70.0)) -> dict:
    return {"path": path, "collection": "x", "identity": identity, "width": 250, "height": 250, "status": "ok",
            "detector": "hog", "error": None,
            "faces": [{"box": list(box), "landmark_box": list(box), "score": 1.0, "teacher": [float(v) for v in teacher],
                       "subject": True}]}


def test_leak_guard_drops_a_planted_lfw_evaluation_photo(tmp_path, lfw_dir, dlib_engine):
    """An LFW P2 person's photo planted in an extra collection is dropped; a stranger is kept."""
    from jointface.engines.dlib_engine import reference_box
    from jointface.imageio import load_image

    def teacher(path: Path) -> np.ndarray:
        image = load_image(path)
        return dlib_engine.raw_descriptor(image, reference_box(image))

    evaluation_a = lfw_dir / "Aaron_Guiel" / "Aaron_Guiel_0001.jpg"       # 1 image: a P2 stranger
    planted = lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0002.jpg"        # 4 images: a P2 enrolled person
    evaluation_b = lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    p1_photo = lfw_dir / "Abdullah_Gul" / "Abdullah_Gul_0001.jpg"         # a P1 person: trainable
    lfw = _labels_file(tmp_path / "lfw.jsonl", lfw_dir, "lfw", [
        _record("Aaron_Guiel/Aaron_Guiel_0001.jpg", "Aaron_Guiel", teacher(evaluation_a)),
        _record("Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol", teacher(evaluation_b)),
        _record("Abdullah_Gul/Abdullah_Gul_0001.jpg", "Abdullah_Gul", teacher(p1_photo))])
    stranger = lfw_dir.parent / "knn_examples" / "train" / "alex_lacamoire" / "img1.jpg"
    extra = _labels_file(tmp_path / "celeba.jsonl", tmp_path, "celeba", [
        _record("planted.jpg", "celeba_1", teacher(planted)),
        _record("stranger.jpg", "celeba_2", teacher(stranger))])
    result = build_training_set({"lfw": lfw, "celeba": extra})
    manifest = Path(str(lfw) + ".manifest.json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        build_training_set({"lfw": lfw, "celeba": extra})
    assert result.counts["celeba"]["dropped_by_leak_guard"] == 1
    kept = [Path(p.path).name for p in result.train if p.collection == "x"]
    assert "stranger.jpg" in kept and "planted.jpg" not in kept
    assert result.counts["lfw"]["train_photos"] == 1  # only the P1 person's photo; never a P2 one


def test_leaking_is_a_distance_threshold_with_a_ratio_test_between_sure_and_far():
    from jointface.datasets.build import PLAIN_LEAK_RULE, LeakRule

    def at(*distances):  # descriptors at these distances from the origin, along the first axis
        rows = np.zeros((len(distances), 128), dtype=np.float32)
        rows[:, 0] = distances
        return rows

    evaluation = at(0.0)
    assert leaking(at(0.49, 0.51), evaluation, rule=PLAIN_LEAK_RULE).tolist() == [True, False]
    # two evaluation people on either side of the origin: a face at the origin is as near to both (a crowd),
    # a face beside one of them resembles that one
    crowd = np.zeros((2, 128), dtype=np.float32)
    crowd[0, 1], crowd[1, 1] = 0.45, -0.45
    middle, beside = np.zeros((1, 128), dtype=np.float32), np.zeros((1, 128), dtype=np.float32)
    beside[0, 1] = 0.05
    faces = np.concatenate([middle, beside])
    rule = LeakRule(distance=0.5, sure_distance=0.4, ratio=0.9)
    assert leaking(faces, crowd, np.array(["a", "b"]), rule).tolist() == [False, True]
    assert leaking(faces, crowd, np.array(["a", "b"]), PLAIN_LEAK_RULE).tolist() == [True, True]
    # the same two descriptors as one person: resembling one person, so the middle face leaks too
    assert leaking(faces, crowd, np.array(["a", "a"]), rule).tolist() == [True, True]
    # nearer than the sure distance leaks whatever the crowd
    crowd[0, 1], crowd[1, 1] = 0.35, -0.35
    assert leaking(middle, crowd, np.array(["a", "b"]), rule).tolist() == [True]


# ----------------------------------------------------------------------------- samples
def _photos() -> list[Photo]:
    teacher = np.ones(128, dtype=np.float32)
    return [Photo("a", 200, 100, [Face((20.0, 20.0, 60.0, 70.0), teacher, 3, True),
                                  Face((120.0, 10.0, 150.0, 40.0), None, -1, False)]),
            Photo("b", 100, 100, [Face((40.0, 30.0, 80.0, 80.0), teacher, 5, True)]),
            Photo("c", 300, 300, [])]  # no face: backgrounds only


def _loader(photo: Photo) -> np.ndarray:
    value = {"a": 50, "b": 150, "c": 250}[photo.path]
    return np.full((photo.height, photo.width, 3), value, dtype=np.uint8)


def test_paste_and_clip_by_hand():
    canvas = np.zeros((10, 10, 3), dtype=np.uint8)
    paste(canvas, np.full((4, 4, 3), 9, dtype=np.uint8), 1.0, 2, 3)
    assert canvas[3:7, 2:6].min() == 9 and canvas.sum() == 9 * 16 * 3
    box, visible = clip_box((-10.0, 0.0, 10.0, 10.0), (0, 0, 100, 100))
    assert box == (0.0, 0.0, 10.0, 10.0) and visible == pytest.approx(0.5)


def test_composer_is_deterministic_and_boxes_follow_the_photo():
    settings = ComposerSettings(size=128, colour_jitter=0.0, flip_probability=0.0, scene_background=0.0)
    composer = SampleComposer(_photos(), _loader, settings, seed=7)
    for index in range(40):
        first, again = composer.compose(index), composer.compose(index)
        assert np.array_equal(first.image, again.image) and np.array_equal(first.boxes, again.boxes)
        assert (first.boxes >= 0).all() and (first.boxes <= 128).all()
        for box in first.boxes:  # every face box lies on photo pixels, not on the pad colour
            x, y = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            assert first.image[y, x, 0] in (50, 150)
        if first.kind == "negative":
            assert len(first.boxes) == 0 and first.image.min() == 250
    other_seed = SampleComposer(_photos(), _loader, settings, seed=8)
    assert any(not np.array_equal(other_seed.compose(i).boxes, composer.compose(i).boxes) for i in range(10))


def test_composer_covers_every_face_scale_and_kind():
    settings = ComposerSettings(size=128, colour_jitter=0.0)
    composer = SampleComposer(_photos(), _loader, settings, seed=1)
    samples = [composer.compose(i) for i in range(300)]
    kinds = {s.kind for s in samples}
    assert kinds == {"zoom", "mosaic", "negative"}
    widths = np.concatenate([s.boxes[:, 2] - s.boxes[:, 0] for s in samples if len(s.boxes)])
    assert widths.min() < 16 and widths.max() > 0.8 * 128
    for sample in samples:
        small = (np.minimum(sample.boxes[:, 2] - sample.boxes[:, 0], sample.boxes[:, 3] - sample.boxes[:, 1])
                 < settings.identity_min_face)
        assert not sample.teacher_valid[small].any() and (sample.identities[small] == -1).all()
        assert set(sample.identities[~small].tolist()) <= {3, 5, -1}


def test_composer_needs_a_face():
    with pytest.raises(ValueError, match="no photo with a face"):
        SampleComposer([Photo("c", 300, 300, [])], _loader)


def test_preprocess_all_faces_command(mini_collections, tmp_path):
    from typer.testing import CliRunner

    from cli.app import app

    runner = CliRunner()
    out = tmp_path / "aaf.jsonl"
    args = ["preprocess", str(mini_collections["aaf"]), "--layout", "aaf", "--out", str(out), "--all-faces",
            "--workers", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["photos"] == 3
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["newly_labelled"] == 0
    missing = runner.invoke(app, [*args[:1], str(tmp_path / "nowhere"), *args[2:]])
    assert missing.exit_code == 1 and "no such folder" in missing.output
    foreign = runner.invoke(app, [*args[:3], "aaf", *args[4:]])  # the right layout, but read elsewhere
    assert foreign.exit_code == 0
    utk = runner.invoke(app, ["preprocess", str(mini_collections["utkface"]), "--layout", "utkface", "--out",
                              str(out), "--all-faces"])
    assert utk.exit_code == 1 and "choose another output file" in utk.output
    wrong_layout = runner.invoke(app, [*args[:3], "utkface", *args[4:]])
    assert wrong_layout.exit_code == 1 and "UTKFace naming" in wrong_layout.output


def test_a_second_labelling_run_on_one_file_is_refused(mini_collections, tmp_path):
    from filelock import FileLock

    from jointface.datasets.teacher import LabelsBusy

    out = tmp_path / "aaf.jsonl"
    with FileLock(str(out) + ".lock"):
        with pytest.raises(LabelsBusy, match="another labelling run"):
            label_collection(mini_collections["aaf"], "aaf", out, workers=1, progress=False)


def test_two_folders_of_one_layout_train_together_and_a_shared_photo_counts_once(tmp_path, lfw_dir):
    """``celeba`` and ``celeba_lowres`` (the layout comes from each manifest): a photo already in the first is
    left out of the second, so a person with one photo in both has one photo, not two (no identity class)."""
    rng = np.random.default_rng(0)
    teacher = lambda: rng.normal(0, 0.1, 128)  # noqa: E731
    lfw = _labels_file(tmp_path / "lfw.jsonl", lfw_dir, "lfw", [
        _record("Abdullah_Gul/Abdullah_Gul_0001.jpg", "Abdullah_Gul", teacher())])
    first = _labels_file(tmp_path / "celeba.jsonl", tmp_path / "a", "celeba", [
        _record("Celeb/1.jpg", "celeba_1", teacher()), _record("Celeb/2.jpg", "celeba_1", teacher()),
        _record("Celeb/6.jpg", "celeba_7", teacher())])
    second = _labels_file(tmp_path / "lowres.jsonl", tmp_path / "b", "celeba", [
        _record("Celeb/2.jpg", "celeba_1", teacher()), _record("Celeb/3.jpg", "celeba_5", teacher()),
        _record("Celeb/4.jpg", "celeba_5", teacher()), _record("Celeb/6.jpg", "celeba_7", teacher())])
    result = build_training_set({"lfw": lfw, "celeba": first, "celeba_lowres": second})
    assert result.counts["celeba_lowres"]["already_in_an_earlier_collection"] == 2
    assert result.counts["celeba_lowres"]["train_photos"] == 2 and result.counts["celeba"]["train_photos"] == 3
    assert {"celeba_1", "celeba_5"} <= set(result.class_names) and "celeba_7" not in result.class_names
    paths = [p.path for p in result.train]
    assert str(tmp_path / "b" / "Celeb" / "3.jpg") in paths and str(tmp_path / "b" / "Celeb" / "2.jpg") not in paths
    with pytest.raises(ValueError, match="lfw layout"):
        build_training_set({"lfw": first})


def test_singleton_layouts_make_each_person_of_one_photo_a_class_validation_people_excepted(tmp_path, lfw_dir):
    rng = np.random.default_rng(0)
    lfw = _labels_file(tmp_path / "lfw.jsonl", lfw_dir, "lfw", [
        _record("Abdullah_Gul/Abdullah_Gul_0001.jpg", "Abdullah_Gul", rng.normal(0, 0.1, 128))])
    aaf = _labels_file(tmp_path / "aaf.jsonl", tmp_path, "aaf", [
        _record(f"original images/{i:05d}A20.jpg", f"aaf_{i:05d}", rng.normal(0, 0.1, 128)) for i in range(40)])
    plain = build_training_set({"lfw": lfw, "aaf": aaf})
    assert not any(name.startswith("aaf_") for name in plain.class_names)
    assert all(f.identity == -1 for p in plain.train if "original images" in p.path for f in p.faces)
    single = build_training_set({"lfw": lfw, "aaf": aaf}, singleton_layouts=["aaf"])
    held = {"aaf_00000", "aaf_00033"}  # every 33rd person (sorted) is a validation person
    assert {Path(p.path).name[:5] for p in single.holdout} == {"00000", "00033"}
    assert {n for n in single.class_names if n.startswith("aaf_")} == {f"aaf_{i:05d}" for i in range(40)} - held
    trained = [f.identity for p in single.train if "original images" in p.path for f in p.faces]
    assert len(trained) == 38 and len(set(trained)) == 38 and min(trained) >= 0
    assert set(plain.class_names) <= set(single.class_names)
    with pytest.raises(ValueError, match="no labelled collection of that layout"):
        build_training_set({"lfw": lfw, "aaf": aaf}, singleton_layouts=["utkface"])
    # a collection without identities (UTKFace): each photo a person of its own when asked, else no class
    utk = _labels_file(tmp_path / "utkface.jsonl", tmp_path, "utkface", [
        _record(f"{i}_0_0_2017.jpg.chip.jpg", None, rng.normal(0, 0.1, 128)) for i in range(3)])
    unnamed = build_training_set({"lfw": lfw, "utkface": utk})
    assert all(f.identity == -1 for p in unnamed.train if "chip" in p.path for f in p.faces)
    named = build_training_set({"lfw": lfw, "utkface": utk}, singleton_layouts=["utkface"])
    assert {n for n in named.class_names if n.startswith("utkface:")} == \
        {f"utkface:{i}_0_0_2017.jpg.chip.jpg" for i in range(3)}
    assert sorted(f.identity for p in named.train if "chip" in p.path for f in p.faces) == \
        sorted(named.class_names.index(f"utkface:{i}_0_0_2017.jpg.chip.jpg") for i in range(3))
