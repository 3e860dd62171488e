"""Labelling, organising, data augmentation and the training loop, on a few real LFW photos.

The shared data (``/work/shared/data`` or ``$JOINTFACE_SHARED_DATA``) must be
present: without it these tests fail rather than skip.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jointface.engines.joint_engine import JointEngine
from jointface.imageio import load_image
from jointface.net.loss import NonFiniteLossError
from jointface.train import loop
from jointface.train.config import TrainConfig, tiny_config
from jointface.train.data import Augmentation, FaceDataset, PKBatchSampler, load_class_names, load_records
from jointface.train.labels import lfw_p1_split, organize, preprocess, read_labels, read_layout
from jointface.train.loop import export_weights, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PEOPLE, IMAGES_EACH = 8, 6


def shared_data() -> Path:
    path = Path(os.environ.get("JOINTFACE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    assert (path / "lfw").is_dir(), f"shared face data not found at {path} (set JOINTFACE_SHARED_DATA)"
    return path


@pytest.fixture(scope="module")
def lfw_split() -> dict[str, str]:
    return lfw_p1_split(shared_data() / "lfw")


@pytest.fixture(scope="module")
def mini_lfw(tmp_path_factory, lfw_split) -> Path:
    """An LFW-layout tree: the first 6 images of 8 P1 people (48 photos, each person exactly at the P1 minimum)."""
    root = tmp_path_factory.mktemp("lfw_mini") / "lfw"
    people = sorted({path.split("/")[0] for path in lfw_split})[:PEOPLE]
    for person in people:
        (root / person).mkdir(parents=True)
        for source in sorted((shared_data() / "lfw" / person).iterdir())[:IMAGES_EACH]:
            shutil.copy(source, root / person / source.name)
    return root


@pytest.fixture(scope="module")
def organised(mini_lfw, tmp_path_factory) -> tuple[Path, dict, dict]:
    work = tmp_path_factory.mktemp("organised")
    labels = work / "labels.jsonl"
    labelled = preprocess(mini_lfw, "lfw", labels, progress=False)
    summary = organize(labels, work / "data", "lfw", progress=False)
    return work / "data", labelled, summary


def test_p1_split_counts_on_full_lfw(lfw_split):
    people = {path.split("/")[0] for path in lfw_split}
    counts = {part: sum(v == part for v in lfw_split.values()) for part in ("train", "test", "extra")}
    assert len(people) == 311
    assert counts["train"] == 3372 and counts["test"] == 703
    assert counts["extra"] > 0
    assert lfw_split["Abdullah_Gul/Abdullah_Gul_0005.jpg"] == "test"  # sorted position 4
    assert lfw_split["Abdullah_Gul/Abdullah_Gul_0004.jpg"] == "train"


def test_preprocess_labels_and_caches(organised, mini_lfw, tmp_path):
    data_dir, labelled, _ = organised
    assert labelled["images"] == PEOPLE * IMAGES_EACH
    assert labelled["newly_labelled"] == PEOPLE * IMAGES_EACH
    assert labelled["ok"] + len(labelled["no_face"]) + len(labelled["unreadable"]) == labelled["images"]
    records = read_labels(data_dir.parent / "labels.jsonl")
    ok = [r for r in records if r["status"] == "ok"]
    assert ok and all(len(r["teacher"]) == 128 and len(r["landmark_box"]) == 4 for r in ok)
    for path, count in labelled["several_faces"]:  # several faces are recorded, the subject kept
        assert count > 1 and any(r["path"] == path and r["status"] == "ok" for r in records)
    again = preprocess(mini_lfw, "lfw", data_dir.parent / "labels.jsonl", progress=False)
    assert again["newly_labelled"] == 0 and again["already_labelled"] == PEOPLE * IMAGES_EACH


def test_organize_follows_p1(organised):
    data_dir, _, summary = organised
    assert summary["train"] == PEOPLE * 5 and summary["test"] == PEOPLE and summary["train_extra"] == 0
    assert summary["classes"] == PEOPLE
    test_lines = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    assert all(Path(e["image"]).name.endswith("_0005.jpg") for e in test_lines)
    image = load_image(data_dir / test_lines[0]["image"])
    assert min(image.shape[:2]) == 320  # 250 -> 320
    box = test_lines[0]["landmark_box"]
    assert box is None or (0 <= box[0] < box[2] <= 321 and 0 <= box[1] < box[3] <= 321)


def test_layout_readers(tmp_path):
    lfw = shared_data() / "lfw"
    photos = sorted((lfw / "Abdullah_Gul").iterdir())[:4]
    fei = tmp_path / "fei" / "originalimages_part1"
    gt = tmp_path / "gt" / "gt_db"
    for index, photo in enumerate(photos):
        fei.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, fei / f"{1 + index // 2}-{index % 2 + 1:02d}.jpg")
        (gt / f"s{1 + index // 2:02d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, gt / f"s{1 + index // 2:02d}" / f"{index % 2 + 1:02d}.jpg")
    assert [(p.path.name, p.identity) for p in read_layout(tmp_path / "fei", "fei")] == [
        ("1-01.jpg", "fei_001"), ("1-02.jpg", "fei_001"), ("2-01.jpg", "fei_002"), ("2-02.jpg", "fei_002")]
    assert [(p.path.name, p.identity) for p in read_layout(tmp_path / "gt", "gt")] == [
        ("01.jpg", "gt_s01"), ("02.jpg", "gt_s01"), ("01.jpg", "gt_s02"), ("02.jpg", "gt_s02")]
    caltech = read_layout(shared_data() / "caltech_faces_1999_half", "caltech")
    assert len(caltech) == 169 and caltech[0].identity is not None
    assert sum(image.identity is None for image in caltech) == 2  # the two unlabelled photos
    with pytest.raises(ValueError, match="unknown layout"):
        read_layout(tmp_path, "nope")


def test_augmentation_is_deterministic_and_makes_mosaics(organised):
    data_dir, _, _ = organised
    classes = load_class_names(data_dir)
    records = load_records(data_dir, "train", classes)
    dataset = FaceDataset(records, 128, [0.5] * 3, [0.25] * 3, Augmentation(mosaic_probability=1.0))
    first_image, first_faces = dataset.render(0, seed=123)
    second_image, second_faces = dataset.render(0, seed=123)
    assert np.array_equal(first_image, second_image) and first_faces == second_faces
    assert first_image.shape == (128, 128, 3)
    assert len(first_faces) >= 2  # four tiles, most with a visible face
    for box, identity, _ in first_faces:
        assert 0 <= box[0] < box[2] <= 128 and 0 <= box[1] < box[3] <= 128 and 0 <= identity < len(classes)
    other_image, _ = dataset.render(0, seed=124)
    assert not np.array_equal(first_image, other_image)
    cached = FaceDataset(records, 128, [0.5] * 3, [0.25] * 3, Augmentation(mosaic_probability=1.0), cache_images=True)
    for _ in range(2):  # the first render fills the cache, the second reads it: both equal the uncached one
        cached_image, cached_faces = cached.render(0, seed=123)
        assert np.array_equal(cached_image, first_image) and cached_faces == first_faces
    sampler = PKBatchSampler(records, people=2, images_per_person=2, seed=5)
    assert sampler.batches(3) == PKBatchSampler(records, 2, 2, seed=5).batches(3)
    batch = sampler.batches(0)[0]
    people = [records[i].identity for i, _ in batch]
    assert len(batch) == 4 and people[0] == people[1] and people[2] == people[3] and people[0] != people[2]


def _config(data_dir, out_dir, **changes) -> TrainConfig:
    return tiny_config(data_dir=str(data_dir), out_dir=str(out_dir), **changes)


def test_training_smoke_run_and_export(organised, tmp_path):
    data_dir, _, _ = organised
    result = train(_config(data_dir, tmp_path / "run", max_steps=6, training_command="pytest smoke"))
    assert result.step == 6
    out = tmp_path / "run"
    for name in ("config.json", "model_record.json", "steps.csv", "curves.png", "checkpoints/last.pt", "jointface.pt"):
        assert (out / name).is_file(), name
    assert TrainConfig.load(out / "config.json").max_steps == 6
    assert set(result.last_losses) >= {"box", "confidence", "identity_ce", "identity_margin", "triplet", "distill"}
    assert all(np.isfinite(v) for v in result.last_losses.values())
    assert {"top1_classifier", "top1_nearest", "mean_iou"} <= set(result.metrics)

    weights = torch.load(out / "jointface.pt", weights_only=True)
    record = weights["record"]
    assert record["backbone"] == "resnet_tiny" and record["input_size"] == 64 and len(record["anchor_sizes"]) == 2
    assert record["class_names"] == load_class_names(data_dir) and record["training_command"] == "pytest smoke"
    assert all(v.dtype in (torch.float16, torch.int64) for v in weights["state_dict"].values())

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return isinstance(value, (torch.Tensor, str, int, float, bool, type(None)))

    assert plain(weights)
    engine = JointEngine(weights=out / "jointface.pt", conf_threshold=0.0)
    image = load_image(next((data_dir / "images").rglob("*.jpg")))
    faces = engine.detect(image)
    assert faces and faces[0].embedding.shape == (16,)
    exported = export_weights(out / "checkpoints" / "last.pt", tmp_path / "again.pt", include_heads=False)
    assert exported["bytes"] > 0 and len(exported["sha256"]) == 64


def test_resume_gives_the_same_next_step(organised, tmp_path):
    data_dir, _, _ = organised
    straight = train(_config(data_dir, tmp_path / "straight", max_steps=3, validate=False))
    train(_config(data_dir, tmp_path / "resumed", max_steps=2, validate=False))
    resumed = train(_config(data_dir, tmp_path / "resumed", max_steps=3, validate=False))
    assert resumed.step == 3
    assert resumed.last_losses == pytest.approx(straight.last_losses, rel=1e-5, abs=1e-6)
    steps = (tmp_path / "resumed" / "steps.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in steps[1:]] == ["1", "2", "3"]


def test_fast_training_options_resume_the_same(organised, tmp_path):
    """channels-last, image cache, margin warm-up, small-face rule, sparse validation: resuming still replays."""
    data_dir, _, _ = organised
    options = dict(validate=False, channels_last=True, cache_images=True, margin_warmup_steps=4,
                   identity_min_face=20.0, identity_heads=["cosface", "distill"])
    straight = train(_config(data_dir, tmp_path / "straight", max_steps=3, **options))
    train(_config(data_dir, tmp_path / "resumed", max_steps=2, **options))
    resumed = train(_config(data_dir, tmp_path / "resumed", max_steps=3, **options))
    assert resumed.last_losses == pytest.approx(straight.last_losses, rel=1e-4, abs=1e-5)
    assert set(resumed.last_losses) >= {"identity_margin", "distill"}
    assert loop.margin_ramp(TrainConfig(margin_warmup_steps=4), 1) == 0.25
    assert loop.margin_ramp(TrainConfig(margin_warmup_steps=4), 9) == 1.0
    assert loop.margin_ramp(TrainConfig(), 0) == 1.0


def test_continue_from_exported_weights(organised, tmp_path):
    data_dir, _, _ = organised
    first = train(_config(data_dir, tmp_path / "first", max_steps=2, validate=False))
    exported = first.out_dir / "jointface.pt"
    start = loop.load_start_weights(exported, load_class_names(data_dir))
    checkpoint = loop.load_checkpoint(first.checkpoint)
    for name, tensor in checkpoint["model"].items():  # fp16 storage: equal to half precision
        assert torch.allclose(start["model"][name].float(), tensor.float(), atol=2e-3, rtol=1e-3), name
    assert set(start["heads"]) == set(checkpoint["heads"])
    assert start["record"]["anchor_sizes"] == checkpoint["model_record"]["anchor_sizes"]
    with pytest.raises(ValueError, match="other classes"):
        loop.load_start_weights(exported, ["someone else"])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt: refused"):
        loop.load_start_weights(garbage, load_class_names(data_dir))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        loop.load_start_weights(tmp_path / "missing.pt", load_class_names(data_dir))
    second = train(_config(data_dir, tmp_path / "second", max_steps=1, validate=False, init_weights=str(exported)))
    assert second.step == 1  # a new run (step 0) that started from the exported network
    record = json.loads((tmp_path / "second" / "model_record.json").read_text())
    assert record["anchor_sizes"] == checkpoint["model_record"]["anchor_sizes"]


def test_bf16_autocast_and_onecycle_schedule_resume(organised, tmp_path):
    data_dir, _, _ = organised
    config = _config(data_dir, tmp_path / "bf16", max_steps=1, validate=False, bf16=True, schedule="onecycle")
    assert train(config).step == 1
    resumed = train(config.replace(max_steps=2))  # the onecycle scheduler state survives weights_only loading
    assert resumed.step == 2 and all(np.isfinite(v) for v in resumed.last_losses.values())


def test_non_finite_loss_stops_training_naming_the_term(organised, tmp_path, monkeypatch):
    data_dir, _, _ = organised
    real = loop.joint_losses

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        losses["distill"] = losses["distill"] * float("nan")
        return losses

    monkeypatch.setattr(loop, "joint_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="distill=nan"):
        train(_config(data_dir, tmp_path / "nan", max_steps=2, validate=False))


def test_config_json_round_trip(tmp_path):
    config = tiny_config(identity_heads=["cosface", "distill"], scale_jitter=(0.5, 1.5))
    config.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({"nonsense": 1})
