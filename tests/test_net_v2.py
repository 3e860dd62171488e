"""JointNet v2: RoIAlign, multi-level matching, losses, training run with resume, engine (issue 15)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jointface.net.anchors import AnchorGrid
from jointface.net.v2 import (DetectionsV2, JointNetV2, ModelRecordV2, all_anchors, decode_v2, faces_from_maps,
                              bank_contrast_loss, losses_v2, match_multilevel, relational_loss, roi_align)

TINY_ANCHORS = [[[12.0, 12.0], [20.0, 20.0]], [[32.0, 32.0], [48.0, 48.0]], [[64.0, 64.0], [96.0, 96.0]]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def tiny_record(**changes) -> ModelRecordV2:
    values = dict(backbone="resnet_tiny", input_size=64, anchor_sizes=TINY_ANCHORS, fpn_channels=16,
                  identity_channels=16, embedding_dim=16, roi_size=4, class_names=["a", "b"])
    values.update(changes)
    return ModelRecordV2(**values)


def test_roi_align_by_hand():
    # feature value = its column index; stride 8: column j covers input pixels [8j, 8j + 8)
    features = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    # the box covering columns 1 and 2 exactly (input x 8..24): bins at x = 12 and 20 -> columns 1.0 and 2.0
    pooled = roi_align(features, torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([0]), 8, 2, sampling=1)
    assert torch.allclose(pooled[0, 0], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    # two samples per bin: x = 10, 14 -> columns 0.75, 1.25 -> mean 1.0
    pooled = roi_align(features, torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([0]), 8, 2, sampling=2)
    assert torch.allclose(pooled[0, 0], torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    assert roi_align(features, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 8, 2).shape == (0, 1, 2, 2)


def test_roi_align_is_grid_sampling_then_averaging():
    # the reference: each face's sample points read by F.grid_sample (zero outside the map), then the mean of
    # each bin's sampling x sampling samples; boxes inside, across the edges and wholly outside the map
    torch.manual_seed(0)
    features = torch.randn(3, 5, 12, 10, dtype=torch.float64)
    corner = torch.rand(40, 2, dtype=torch.float64) * 120 - 20
    boxes = torch.cat((corner, corner + torch.rand(40, 2, dtype=torch.float64) * 60 + 2), 1)
    boxes[0] = torch.tensor([-50.0, -50.0, -20.0, -10.0])
    image_idx = torch.randint(0, 3, (40,))
    stride, size, sampling = 8, 4, 2
    points = size * sampling
    steps = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    for face in range(40):
        x1, y1, x2, y2 = boxes[face]
        gx = ((x1 + (x2 - x1) * steps) / (stride * 10)) * 2 - 1  # align_corners=False: -1 is pixel 0's left edge
        gy = ((y1 + (y2 - y1) * steps) / (stride * 12)) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        sampled = F.grid_sample(features[image_idx[face]][None], grid, align_corners=False)
        expected = F.avg_pool2d(sampled, sampling)[0]
        got = roi_align(features, boxes[face:face + 1], image_idx[face:face + 1], stride, size, sampling)[0]
        assert torch.allclose(got, expected, atol=1e-10), face
    together = roi_align(features, boxes, image_idx, stride, size, sampling)
    assert together.shape == (40, 5, size, size) and bool((together[0] == 0).all())


def test_each_face_goes_to_the_level_of_its_size():
    grids = [AnchorGrid(torch.tensor(sizes), stride) for sizes, stride in zip(TINY_ANCHORS, (8, 16, 32))]
    grid_sizes = [(8, 8), (4, 4), (2, 2)]
    small = torch.tensor([[-2.0, -2.0, 10.0, 10.0]])      # centre (4, 4): level 0, cell (0, 0), anchor 0
    large = torch.tensor([[0.0, 0.0, 96.0, 96.0]])        # centre (48, 48): level 2, cell (1, 1), anchor 1
    matched = match_multilevel([small, large], grids, grid_sizes)
    assert matched.matched_image_idx.tolist() == [0, 1]
    level2_start = 8 * 8 * 2 + 4 * 4 * 2
    assert matched.matched_anchor_idx.tolist() == [0, level2_start + (1 * 2 + 1) * 2 + 1]
    anchors, strides = all_anchors(grids, grid_sizes)
    assert len(anchors) == level2_start + 2 * 2 * 2 and strides[-1] == 32
    # the face sits exactly on its anchor: centre offset 0.5 (cell centre), log size ratio 0
    assert torch.allclose(matched.box_targets, torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 2), atol=1e-6)
    assert matched.objectness.sum() == 2


def test_relational_loss_is_zero_for_the_same_geometry():
    vectors = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    assert relational_loss(vectors, vectors).item() == pytest.approx(0.0, abs=1e-7)
    assert relational_loss(vectors, torch.nn.functional.normalize(torch.randn(5, 8), dim=1)).item() > 0


def test_bank_contrast_is_lowest_where_the_student_is_its_own_teacher_and_teaches_it_there():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(200, 8), dim=1)
    teacher = bank[:6]
    # the teacher's target is nearly one-hot on itself, so a student equal to its teacher beats a shuffled one
    own = bank_contrast_loss(teacher, teacher, bank, 0.1, 0.05)
    shuffled = bank_contrast_loss(teacher.roll(1, 0), teacher, bank, 0.1, 0.05)
    assert own.item() < shuffled.item()
    # gradient steps on a random student bring each row to its own teacher vector
    student = torch.randn(6, 8, requires_grad=True)
    optimiser = torch.optim.SGD([student], lr=0.5)
    for _ in range(200):
        optimiser.zero_grad()
        bank_contrast_loss(F.normalize(student, dim=1), teacher, bank, 0.1, 0.05).backward()
        optimiser.step()
    nearest = (F.normalize(student.detach(), dim=1) @ bank.T).argmax(1)
    assert torch.equal(nearest, torch.arange(6))


def test_forward_backward_reaches_every_parameter_and_a_step_lowers_the_loss(one_torch_thread):
    from jointface.net.model import MarginClassifier

    torch.manual_seed(0)
    model = JointNetV2(tiny_record())
    head = MarginClassifier(16, 2, "cosface")
    images = torch.randn(2, 3, 64, 64)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([[20.0, 16.0, 36.0, 36.0]])]
    teachers, valid, identities = torch.randn(2, 128), torch.tensor([True, True]), torch.tensor([0, 1])
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05)

    def loss() -> torch.Tensor:
        detections, embeddings = model.forward_train(images, torch.cat(boxes), torch.tensor([0, 1]))
        matched = match_multilevel(boxes, model.anchor_grids(), detections.grid_sizes)
        terms = losses_v2(detections, matched, embeddings, teachers, valid, identities, torch.zeros(128), head,
                          teacher_projection=model.teacher_projection)
        assert set(terms) == {"box", "confidence", "distill", "relational", "identity_margin"}
        return sum(terms.values())

    first = loss()
    first.backward()
    missing = [name for name, p in [*model.named_parameters(), *head.named_parameters()] if p.grad is None]
    assert not missing
    for _ in range(5):
        optimizer.step()
        optimizer.zero_grad()
        loss().backward()
    assert loss().item() < first.item()


def test_inference_gives_unit_embeddings_per_kept_face():
    model = JointNetV2(tiny_record()).eval()
    with torch.no_grad():
        maps = model.forward_maps(torch.randn(2, 3, 96, 64))
        faces = faces_from_maps(model, maps, conf_threshold=0.0, max_faces=5)
    assert len(faces) == 2
    for found in faces:
        assert len(found.boxes) == len(found.scores) == len(found.embeddings) <= 5
        assert torch.allclose(found.embeddings.norm(dim=1), torch.ones(len(found.embeddings)), atol=1e-5)


def test_large_faces_are_kept_from_their_own_threshold():
    model = JointNetV2(tiny_record())
    grids = [(8, 8), (4, 4), (2, 2)]  # a 64 px input
    count = sum(h * w * 2 for h, w in grids)
    logits = torch.full((1, count), -20.0)
    logits[0, 0] = 0.0  # score 0.5: the first anchor of the finest level, a 12 px face at (4, 4)
    logits[0, count - 1] = 0.0  # score 0.5: the last anchor of the coarsest level, a 96 px face at (48, 48)
    detections = DetectionsV2(torch.zeros(1, count, 4), logits, grids)
    sides = lambda found: sorted(round(float(b[2] - b[0])) for b in found[0][0])  # noqa: E731
    assert sides(decode_v2(model, detections, conf_threshold=0.4)) == [12, 96]
    assert sides(decode_v2(model, detections, conf_threshold=0.7)) == []
    assert sides(decode_v2(model, detections, conf_threshold=0.7, large_threshold=0.3, large_side=50.0)) == [96]
    assert sides(decode_v2(model, detections, conf_threshold=0.7, large_threshold=0.3, large_side=100.0)) == []
    assert sides(decode_v2(model, detections, conf_threshold=0.4, large_threshold=0.6, large_side=50.0)) == [12]


# ----------------------------------------------------------------------------- a training run and the engine
def _labels(tmp_path: Path, lfw_dir: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    records = []
    for person in ("Abdullah_Gul", "Adrien_Brody"):  # P1 people (>= 6 photos)
        for path in sorted((lfw_dir / person).glob("*.jpg"))[:4]:
            records.append({"path": f"{person}/{path.name}", "collection": "lfw", "identity": person,
                            "width": 250, "height": 250, "status": "ok", "detector": "hog", "error": None,
                            "faces": [{"box": [80.0, 80.0, 170.0, 180.0], "landmark_box": [82.0, 90.0, 168.0, 180.0],
                                       "score": 1.0, "teacher": [float(v) for v in rng.normal(0, 0.1, 128)],
                                       "subject": True}]})
    labels = tmp_path / "lfw.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in records))
    Path(str(labels) + ".manifest.json").write_text(json.dumps({"root": str(lfw_dir), "layout": "lfw"}))
    return {"lfw": str(labels)}


def test_v2_export_round_trips_through_the_weights_file_reader(tmp_path, one_torch_thread):
    from dataclasses import asdict

    from jointface.net.model import MarginClassifier
    from jointface.train.v2 import TrainConfigV2, export_weights
    from jointface.weights_file import load_weights

    model = JointNetV2(tiny_record()).to(memory_format=torch.channels_last)
    head = MarginClassifier(16, 2, "cosface", 30.0, 0.35)
    config = TrainConfigV2(embedding_dim=16)
    path = tmp_path / "run" / "jointface.pt"
    assert export_weights(model, head, config, 7, {"p2proxy_rank1": 0.5}, path, {"lfw": {"photos": 3}}) == path
    payload, version = load_weights(path)
    assert len(version) == 12 and not path.with_suffix(".tmp").exists()
    # the keys and values v2 exports always wrote (no format_version), so earlier v2 weights read alike
    assert list(payload) == ["format", "record", "state_dict", "identity_heads", "training"]
    assert payload["format"] == "jointface-weights" and payload["record"] == model.record.to_dict()
    state = model.state_dict()
    assert list(payload["state_dict"]) == list(state)
    for name, tensor in state.items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        assert payload["state_dict"][name].dtype == expected.dtype and torch.equal(payload["state_dict"][name], expected)
    assert list(payload["identity_heads"]) == ["margin.weight"]
    assert torch.equal(payload["identity_heads"]["margin.weight"], head.weight.detach().half())
    assert payload["training"] == {"step": 7, "config": {**asdict(config),
                                                         "identity_heads": ["distill", "relational", "cosface"]},
                                   "metrics": {"p2proxy_rank1": 0.5}, "data": {"lfw": {"photos": 3}}}
    restored = JointNetV2(ModelRecordV2.from_dict(payload["record"]))
    restored.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    export_weights(model, None, config, 8, {}, path, {})
    assert load_weights(path)[0]["identity_heads"] == {}


def test_training_run_resumes_and_exports_weights_the_engine_runs(tmp_path, lfw_dir, knn_dir, one_torch_thread):
    from jointface.engines.joint_engine import JointEngine
    from jointface.imageio import load_image
    from jointface.train.v2 import Run, TrainConfigV2

    config = TrainConfigV2(labels=_labels(tmp_path, lfw_dir), out_dir=str(tmp_path / "run"), backbone="resnet_tiny",
                           input_size=64, fpn_channels=16, identity_channels=16, embedding_dim=16, roi_size=4,
                           batch_size=2, max_steps=2, warmup_steps=1, checkpoint_every=1, log_every=1,
                           validate_every=0, anchor_sample_images=20, num_threads=1, progress=False)
    result = Run(config).run()
    assert result["step"] == 2
    config.max_steps = 4
    resumed = Run(config)
    assert resumed.step == 2  # from the checkpoint, not from scratch
    assert resumed.run()["step"] == 4
    steps = [int(line.split(",")[0]) for line in (tmp_path / "run" / "steps.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    weights = tmp_path / "run" / "jointface.pt"
    engine = JointEngine(weights, conf_threshold=0.0)
    assert engine.architecture == "v2" and engine.dim == 16
    # a photo runs at 3/4 of its longer side (rounded to 32), within the training canvas and 384 px
    assert [engine.network_input_size(side) for side in (40, 250, 320, 640, 3000)] == [64, 192, 256, 384, 384]
    faces = engine.detect(load_image(knn_dir / "test" / "obama1.jpg"))
    assert faces and all(f.embedding.shape == (16,) for f in faces)
    flipped = JointEngine(weights, conf_threshold=0.0, flip=True).detect(load_image(knn_dir / "test" / "obama1.jpg"))
    # flip TTA keeps the photo's faces (boxes averaged with their mirror twins), with unit embeddings
    assert len(flipped) == len(faces)
    assert all(abs(float(np.linalg.norm(f.embedding)) - 1.0) < 1e-4 for f in flipped)

    # the fast paths: the dense maps on ONNX Runtime (fp32, then int8), RoI read-out in torch
    from jointface.engines.joint_engine import quantize_weights

    photos = sorted((lfw_dir / "Abdullah_Gul").glob("*.jpg"))[:12]
    summary = quantize_weights(weights, photos, count=12)
    assert Path(summary["path"]).is_file() and summary["sizes"] == [320]
    # photos as they are (250 px: input 192) beside the 320 px ones (input 256)
    other = quantize_weights(weights, photos, count=12, sizes=(None, 320), out=tmp_path / "other.int8.onnx")
    assert other["sizes"] == ["photo", 320]
    assert len(other["input_sizes"]) > len(summary["input_sizes"]) and other["images"] > summary["images"]
    with pytest.raises(ValueError, match="no calibration sizes"):
        quantize_weights(weights, photos, count=12, sizes=(), out=tmp_path / "x.int8.onnx")
    image = load_image(knn_dir / "test" / "obama1.jpg")
    reference = JointEngine(weights, conf_threshold=0.0, fuse=False, channels_last=False).detect(image)
    for runtime in ("onnx", "int8", "auto"):
        engine = JointEngine(weights, conf_threshold=0.0, runtime=runtime)
        assert engine.runtime == ("int8" if runtime == "auto" else runtime)
        found = engine.detect(image)
        # an untrained tiny network scores its anchors nearly alike, so rounding may reorder them: compare the
        # reference's best face with the face of this path that overlaps it most
        target = np.array(reference[0].box)
        ious = [_iou(np.array(f.box), target) for f in found]
        twin = found[int(np.argmax(ious))]
        assert max(ious) > 0.9
        assert float(np.dot(twin.embedding, reference[0].embedding)) > 0.98


def test_train_v2_command(tmp_path, lfw_dir, one_torch_thread):
    from typer.testing import CliRunner

    from cli.app import app

    config = {"labels": _labels(tmp_path, lfw_dir), "out_dir": str(tmp_path / "run"), "backbone": "resnet_tiny",
              "input_size": 64, "fpn_channels": 16, "identity_channels": 16, "embedding_dim": 16, "roi_size": 4,
              "batch_size": 2, "max_steps": 1, "warmup_steps": 1, "log_every": 1, "validate_every": 0,
              "anchor_sample_images": 20, "progress": False}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(config))
    runner = CliRunner()
    result = runner.invoke(app, ["--threads", "1", "train-v2", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 1 and (tmp_path / "run" / "jointface.pt").is_file()
    path.write_text(json.dumps({**config, "learning_rate": 1}))
    bad = runner.invoke(app, ["train-v2", str(path)])
    assert bad.exit_code == 1 and "unknown config fields ['learning_rate']" in bad.output
    missing = runner.invoke(app, ["train-v2", str(tmp_path / "none.json")])
    assert missing.exit_code == 1 and "no such config file" in missing.output


def test_a_second_run_on_one_folder_is_refused(tmp_path, lfw_dir, one_torch_thread):
    from filelock import FileLock

    from jointface.train.v2 import Run, TrainConfigV2

    config = TrainConfigV2(labels=_labels(tmp_path, lfw_dir), out_dir=str(tmp_path / "run"), backbone="resnet_tiny",
                           input_size=64, fpn_channels=16, identity_channels=16, embedding_dim=16, roi_size=4,
                           batch_size=2, max_steps=1, validate_every=0, anchor_sample_images=20, progress=False)
    run = Run(config)
    with FileLock(str(tmp_path / "run" / "run.lock")):
        with pytest.raises(RuntimeError, match="in use by another training run"):
            run.run()


# ----------------------------------------------------------------------------- the identity branch on face crops
def test_crop_batches_are_deterministic_and_keep_the_face_in_the_canvas(tmp_path, lfw_dir):
    from jointface.datasets.build import PhotoLoader, build_training_set
    from jointface.train.crops import CropSettings, build_bank, crop_batch

    data = build_training_set(_labels(tmp_path, lfw_dir))
    settings = CropSettings(face_low=40, face_high=60, context=1.75, bank_face=50, bank_context=2.0)
    bank = build_bank(data.train, PhotoLoader(), settings, tmp_path / "bank")
    assert len(bank) == 8 and bank.images.shape == (8, 100, 100, 3)
    # the bank face is bank_face px wide, centred
    widths = np.maximum(bank.boxes[:, 2] - bank.boxes[:, 0], bank.boxes[:, 3] - bank.boxes[:, 1])
    assert np.allclose(widths, 50, atol=0.01)
    assert np.allclose((bank.boxes[:, :2] + bank.boxes[:, 2:]) / 2, 50, atol=0.01)
    assert build_bank(data.train, PhotoLoader(), settings, tmp_path / "bank").images.filename  # reopened
    first, boxes, chosen = crop_batch(bank, settings, 6, seed=3, step=7)
    again, boxes_again, chosen_again = crop_batch(bank, settings, 6, seed=3, step=7)
    assert np.array_equal(first, again) and np.array_equal(boxes, boxes_again)
    assert np.array_equal(chosen, chosen_again)
    size = first.shape[1]
    assert size % 16 == 0 and 40 * 1.75 <= size <= 60 * 1.75 + 16
    width = boxes[:, 2] - boxes[:, 0]
    assert np.all(width > 40 * 0.85) and np.all(width < 60 * 1.15)
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= size)
    # the photo's pixels are in the face box, not the pad colour
    x1, y1, x2, y2 = boxes[0].astype(int)
    assert first[0, y1:y2, x1:x2].std() > 10


def test_a_labelled_share_draws_that_many_crops_of_known_people():
    from jointface.train.crops import CropBank, choose_faces

    identities = np.array([-1] * 90 + list(range(10)))  # 10 of 100 faces belong to a known person
    bank = CropBank(np.zeros((100, 4, 4, 3), np.uint8), np.zeros((100, 4), np.float32),
                    np.zeros((100, 128), np.float32), identities)
    uniform = choose_faces(bank, 0.0, 1000, np.random.default_rng(0))
    assert 0.05 < (identities[uniform] >= 0).mean() < 0.15
    chosen = choose_faces(bank, 0.5, 48, np.random.default_rng(0))
    assert len(chosen) == 48 and (identities[chosen[:24]] >= 0).all()
    many = choose_faces(bank, 0.5, 2000, np.random.default_rng(1))
    assert 0.5 < (identities[many] >= 0).mean() < 0.6  # half of them, plus the uniform half's tenth
    with pytest.raises(ValueError, match="known people"):
        choose_faces(CropBank(bank.images, bank.boxes, bank.teachers, np.full(100, -1)), 0.5, 8,
                     np.random.default_rng(0))


def test_identity_crops_run_trains_only_the_identity_branch_and_a_joint_run_starts_from_it(
        tmp_path, lfw_dir, one_torch_thread):
    from jointface.train.modes import run_for
    from jointface.train.v2 import Run, TrainConfigV2

    labels = _labels(tmp_path, lfw_dir)
    tiny = dict(labels=labels, backbone="resnet_tiny", input_size=64, fpn_channels=16, identity_channels=16,
                embedding_dim=16, roi_size=4, batch_size=2, warmup_steps=1, checkpoint_every=1, log_every=1,
                validate_every=0, anchor_sample_images=20, num_threads=1, progress=False)
    joint = Run(TrainConfigV2(out_dir=str(tmp_path / "joint"), max_steps=1, **tiny))
    joint.run()
    reference = tmp_path / "joint" / "jointface.pt"
    crops = run_for(TrainConfigV2(mode="identity-crops", out_dir=str(tmp_path / "crops"), max_steps=2,
                                  anchors_from=str(reference), init_state=[[str(reference), ["backbone."]]],
                                  crops={"face_low": 20, "face_high": 30, "bank_face": 24}, **tiny))
    assert type(crops).__name__ == "CropRun"
    assert crops.model.record.anchor_sizes == joint.model.record.anchor_sizes
    before = {k: v.clone() for k, v in crops.model.state_dict().items()}
    assert crops.run()["step"] == 2
    assert "bank_contrast" not in (tmp_path / "crops" / "steps.csv").read_text().splitlines()[0]
    after = crops.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert "identity" in changed and "heads" not in changed  # detection untouched
    # a joint run takes the identity branch from the crops run and the detection heads from the joint one
    crop_weights = tmp_path / "crops" / "jointface.pt"
    start = Run(TrainConfigV2(out_dir=str(tmp_path / "joint2"), max_steps=1, anchors_from=str(reference),
                              init_state=[[str(reference), ["heads."]],
                                          [str(crop_weights), ["backbone.", "identity.", "margin."]]], **tiny))
    crop_state = torch.load(crop_weights, weights_only=True)["state_dict"]
    joint_state = torch.load(reference, weights_only=True)["state_dict"]
    mine = start.model.state_dict()
    assert torch.allclose(mine["identity.fc.weight"], crop_state["identity.fc.weight"].float())
    assert torch.allclose(mine["heads.0.0.weight"], joint_state["heads.0.0.weight"].float())
    # detection heads alone learn: everything else, BatchNorm statistics included, stays as it was
    heads = Run(TrainConfigV2(out_dir=str(tmp_path / "heads"), max_steps=1, anchors_from=str(reference),
                              init_state=[[str(crop_weights), ["backbone.", "identity.", "lateral.", "smooth."]]],
                              trainable=["heads."], **tiny))
    before = {k: v.clone() for k, v in heads.model.state_dict().items()}
    heads.run()
    after = heads.model.state_dict()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"heads"}
    # the bank term, when asked for, is one more logged and weighted term of the same steps (here with the
    # forward pass in bf16 autocast, the losses in fp32)
    contrast = run_for(TrainConfigV2(mode="identity-crops", out_dir=str(tmp_path / "contrast"), max_steps=1,
                                     anchors_from=str(reference), loss_weights={"bank_contrast": 0.5}, bf16=True,
                                     crops={"face_low": 20, "face_high": 30, "bank_face": 24,
                                            "bank_contrast": True}, **tiny))
    contrast.run()
    header, row = (tmp_path / "contrast" / "steps.csv").read_text().splitlines()[:2]
    value = float(row.split(",")[header.split(",").index("bank_contrast")])
    assert 0 < value <= 2 / 0.05 + math.log(len(contrast.crops.bank))  # cosine logits span at most 2 / tau
    assert contrast.crops.teacher_bank.shape == (len(contrast.crops.bank), 128)
    bad = TrainConfigV2(mode="crops", out_dir=str(tmp_path / "x"), **tiny)
    with pytest.raises(ValueError, match="unknown mode"):
        run_for(bad)


def test_proxy_open_set_thresholds_on_the_strangers(tmp_path, lfw_dir):
    from jointface.train.v2 import p2_proxy_set, proxy_open_set

    labels = _labels(tmp_path, lfw_dir)["lfw"]
    record = json.loads(Path(labels).read_text().splitlines()[0])
    with open(labels, "a") as handle:  # a person of one photo: a stranger, not one of the enrolled
        handle.write(json.dumps({**record, "path": "Aaron_Eckhart/Aaron_Eckhart_0001.jpg",
                                 "identity": "Aaron_Eckhart"}) + "\n")
    assert {person for person, _, _ in p2_proxy_set(labels, 5, photos=(1, 1))} == {"Aaron_Eckhart"}
    assert {person for person, _, _ in p2_proxy_set(labels, 5, photos=(2, 5))} == {"Abdullah_Gul", "Adrien_Brody"}
    assert len(p2_proxy_set(labels, 1)) == 4 and p2_proxy_set(labels, 0) == []
    axes = np.eye(4)
    people = ["a", "b", "a", "b", "a"]
    embeddings = [axes[0], axes[1], axes[0], 0.6 * axes[1] + 0.8 * axes[2], 0.9 * axes[0] + 0.436 * axes[3]]
    # mated probes score 1.0, 0.6 and 0.9, all named right; of 100 strangers 98 score 0.5, one 0.95, one 0.7
    strangers = [0.5 * axes[0] + 0.866 * axes[3]] * 98 + [0.95 * axes[0] + 0.312 * axes[3],
                                                          0.7 * axes[1] + 0.714 * axes[3]]
    figures = proxy_open_set(people, embeddings, strangers)
    assert figures["p2proxy_tpir01"] == pytest.approx(1 / 3)   # threshold 0.95 (one stranger): the probe at 1.0
    assert figures["p2proxy_tpir10"] == pytest.approx(2 / 3)   # threshold 0.7 (two; 0.5 would pass all 100)
    assert math.isnan(proxy_open_set(people, embeddings, [])["p2proxy_tpir01"])


def test_multi_scale_canvases_alternate_by_step(tmp_path, lfw_dir, one_torch_thread):
    from jointface.train.v2 import Run, TrainConfigV2

    labels = _labels(tmp_path, lfw_dir)
    record = json.loads(Path(labels["lfw"]).read_text().splitlines()[0])
    with open(labels["lfw"], "a") as handle:  # one stranger for the proxy's open-set figure
        handle.write(json.dumps({**record, "path": "Aaron_Eckhart/Aaron_Eckhart_0001.jpg",
                                 "identity": "Aaron_Eckhart"}) + "\n")
    run = Run(TrainConfigV2(labels=labels, out_dir=str(tmp_path / "run"), backbone="resnet_tiny",
                            input_size=64, canvas_sizes=[64, 96], fpn_channels=16, identity_channels=16,
                            embedding_dim=16, roi_size=4, batch_size=2, max_steps=2, warmup_steps=1,
                            validate_every=2, p2proxy_people=2, anchor_sample_images=20, num_threads=1,
                            progress=False, keep_exports=True))
    assert [run.batch(step)[0].shape[1] for step in range(4)] == [64, 96, 64, 96]
    result = run.run()
    assert result["step"] == 2 and result["p2proxy_probes"] == 6
    assert result["p2proxy_strangers"] == 1 and 0 <= result["p2proxy_tpir10"] <= 1
    # validated once at the last step, not twice
    assert len((tmp_path / "run" / "validation.csv").read_text().splitlines()) == 2
    assert (tmp_path / "run" / "jointface.step2.pt").read_bytes() == (tmp_path / "run" / "jointface.pt").read_bytes()


def test_a_truncated_crop_bank_is_cut_again(tmp_path, lfw_dir):
    from jointface.datasets.build import PhotoLoader, build_training_set
    from jointface.train.crops import CropSettings, build_bank

    data = build_training_set(_labels(tmp_path, lfw_dir))
    settings = CropSettings(face_low=40, face_high=60, bank_face=50, bank_context=2.0)
    first = np.array(build_bank(data.train, PhotoLoader(), settings, tmp_path / "bank").images)
    path = tmp_path / "bank" / "bank.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = build_bank(data.train, PhotoLoader(), settings, tmp_path / "bank", progress=False)
    assert np.array_equal(np.asarray(again.images), first)


def test_a_limited_bank_is_a_seeded_subset_of_the_whole():
    from jointface.train.crops import CropBank, limit_bank

    bank = CropBank(np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3),
                    np.arange(40, dtype=np.float32).reshape(10, 4), np.eye(10, 128, dtype=np.float32),
                    np.arange(10) - 3)
    small = limit_bank(bank, 4, seed=7)
    assert len(small) == 4 and small.images.shape == (4, 2, 2, 3)
    rows = [int(np.argmax(t)) for t in small.teachers]  # each face keeps its own image, box, teacher and identity
    assert rows == sorted(set(rows))
    assert np.array_equal(small.images, bank.images[rows]) and np.array_equal(small.boxes, bank.boxes[rows])
    assert np.array_equal(small.identities, bank.identities[rows])
    assert [int(np.argmax(t)) for t in limit_bank(bank, 4, seed=7).teachers] == rows  # seeded
    assert limit_bank(bank, 0, seed=7) is bank and limit_bank(bank, 10, seed=7) is bank


def test_a_mixed_run_learns_detection_and_identity_on_crops_in_one_step(tmp_path, lfw_dir, one_torch_thread):
    import csv

    from jointface.train.modes import run_for
    from jointface.train.v2 import TrainConfigV2

    tiny = dict(labels=_labels(tmp_path, lfw_dir), backbone="resnet_tiny", input_size=64, fpn_channels=16,
                identity_channels=16, embedding_dim=16, roi_size=4, batch_size=2, warmup_steps=1, log_every=1,
                validate_every=0, anchor_sample_images=20, num_threads=1, progress=False)
    run = run_for(TrainConfigV2(mode="joint+crops", out_dir=str(tmp_path / "mixed"), max_steps=2,
                                crops={"face_low": 20, "face_high": 30, "bank_face": 24, "batch_size": 3},
                                loss_weights={"box": 1, "confidence": 1, "distill": 1, "relational": 1,
                                              "identity_margin": 0.1, "crop_distill": 2, "crop_relational": 2,
                                              "crop_identity_margin": 0.2}, **tiny))
    assert type(run).__name__ == "MixedRun" and run.crops.batch_size == 3
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert run.run()["step"] == 2
    after = run.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"identity", "heads", "backbone"} <= changed
    rows = list(csv.DictReader((tmp_path / "mixed" / "steps.csv").open()))
    assert len(rows) == 2
    terms = {"box", "confidence", "distill", "crop_distill", "crop_relational", "crop_identity_margin"}
    assert terms <= set(rows[0])
    # the total is the weighted sum of both halves' terms
    row = {k: float(v) for k, v in rows[0].items()}
    weights = run.config.loss_weights
    expected = sum(weights[k] * row[k] for k in weights)
    assert abs(row["total"] - expected) < 1e-3 * max(1.0, expected)
    assert json.loads((tmp_path / "mixed" / "data.json").read_text())["crop_bank_faces"] == len(run.crops.bank)


def test_an_own_detection_neck_keeps_detection_gradients_away_from_identity(one_torch_thread):
    torch.manual_seed(0)
    shared = JointNetV2(tiny_record()).eval()
    own = JointNetV2(tiny_record(detection_neck="own")).eval()
    own.load_state_dict(shared.state_dict(), strict=False)
    own.split_detection_neck()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # split from a shared network, the own neck gives the same maps
        for a, b in zip(shared.forward_maps(images), own.forward_maps(images)):
            assert torch.allclose(a, b, atol=1e-6)
    # a detection loss reaches the detection neck and heads, never the FPN identity reads
    own.train()
    detections = own.detections_from_maps(own.forward_maps(images)[:3])
    (detections.box_raw.square().mean() + detections.face_logits.mean()).backward()
    grads = {name.split(".")[0] for name, p in own.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"detection_lateral", "detection_smooth", "heads", "backbone"} <= grads
    assert not grads & {"lateral", "smooth", "identity_map", "identity"}
    with pytest.raises(ValueError, match="no detection neck of its own"):
        shared.split_detection_neck()
    with pytest.raises(ValueError, match="detection_neck"):
        ModelRecordV2.from_dict({**tiny_record().to_dict(), "detection_neck": "twin"})
    assert ModelRecordV2.from_dict(own.record.to_dict()).detection_neck == "own"
    # a record written before the field existed reads as a shared neck
    old = tiny_record().to_dict()
    del old["detection_neck"]
    assert ModelRecordV2.from_dict(old).detection_neck == "shared"


def test_a_detection_neck_run_starts_from_a_shared_network_and_leaves_identity_as_it_was(
        tmp_path, lfw_dir, one_torch_thread):
    from jointface.train.v2 import Run, TrainConfigV2

    tiny = dict(labels=_labels(tmp_path, lfw_dir), backbone="resnet_tiny", input_size=64, fpn_channels=16,
                identity_channels=16, embedding_dim=16, roi_size=4, batch_size=2, warmup_steps=1,
                checkpoint_every=1, log_every=1, validate_every=0, anchor_sample_images=20, num_threads=1,
                progress=False)
    Run(TrainConfigV2(out_dir=str(tmp_path / "joint"), max_steps=1, **tiny)).run()
    reference = tmp_path / "joint" / "jointface.pt"
    neck = Run(TrainConfigV2(out_dir=str(tmp_path / "neck"), max_steps=2, anchors_from=str(reference),
                             init_state=[[str(reference), ["backbone.", "lateral.", "smooth.", "identity_map.",
                                                           "identity.", "heads."]]],
                             detection_neck="own", split_detection_neck=True,
                             trainable=["detection_lateral.", "detection_smooth.", "heads."], **tiny))
    state = neck.model.state_dict()
    assert torch.equal(state["detection_lateral.0.weight"], state["lateral.0.weight"])
    before = {k: v.clone() for k, v in state.items()}
    neck.run()
    after = neck.model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"detection_lateral", "detection_smooth", "heads"}
    from jointface.weights_file import load_weights
    assert load_weights(tmp_path / "neck" / "jointface.pt")[0]["record"]["detection_neck"] == "own"


def test_validation_reads_an_embedding_of_another_size_in_the_teachers_space(one_torch_thread):
    from types import SimpleNamespace

    from jointface.train.v2 import validate

    model = JointNetV2(tiny_record(embedding_dim=16))  # 16-d embedding, 128-d teacher
    teacher = np.random.default_rng(0).normal(size=128)
    photo = SimpleNamespace(faces=[SimpleNamespace(teacher=teacher, box=(8.0, 8.0, 40.0, 40.0))])
    metrics = validate(model, [photo], np.zeros(128), [], lambda _: np.zeros((64, 64, 3), np.uint8), 64)
    assert metrics["holdout_faces"] == 1 and -1.0 <= metrics["holdout_cos"] <= 1.0


def test_identity_stages_of_its_own_leave_every_detection_weight_alone(one_torch_thread):
    torch.manual_seed(0)
    own = JointNetV2(tiny_record(detection_neck="own")).eval()
    twin = JointNetV2(tiny_record(detection_neck="own", identity_stages=2)).eval()
    twin.load_state_dict(own.state_dict(), strict=False)
    twin.split_identity_stages()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # split from a network without them, the maps are that network's
        for a, b in zip(own.forward_maps(images), twin.forward_maps(images)):
            assert torch.allclose(a, b, atol=1e-6)
        for a, b in zip(twin.forward_maps(images)[3:], twin.identity_maps(images)):
            assert torch.allclose(a, b, atol=1e-6)
    # identity's loss reaches its own stages and never a weight detection reads
    twin.train()
    twin.frozen_stages = 2
    embeddings = twin.embed(twin.identity_maps(images), torch.tensor([[8.0, 8.0, 40.0, 40.0], [4.0, 10.0, 30.0, 50.0]]),
                            torch.tensor([0, 1]), normalise=False)
    embeddings.square().sum().backward()
    grads = {name.split(".")[0] for name, p in twin.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"identity_backbone", "lateral", "smooth", "identity_map", "identity"}
    # one stage of its own: identity's C4 is the backbone's, its C5 its own
    single = JointNetV2(tiny_record(detection_neck="own", identity_stages=1)).eval()
    assert list(single.identity_backbone) == ["layer4"]
    with torch.no_grad():
        for a, b in zip(single.forward_maps(images)[3:], single.identity_maps(images)):
            assert torch.allclose(a, b, atol=1e-6)
    # stage 3 of its own alone: identity's C4 its own, its C5 the backbone's (identity reads every shared stage)
    third = JointNetV2(tiny_record(detection_neck="own", identity_stages=[3])).eval()
    third.load_state_dict(own.state_dict(), strict=False)
    third.split_identity_stages()
    assert list(third.identity_backbone) == ["layer3"]
    with torch.no_grad():
        for a, b in zip(own.forward_maps(images), third.forward_maps(images)):
            assert torch.allclose(a, b, atol=1e-6)
        for a, b in zip(third.forward_maps(images)[3:], third.identity_maps(images)):
            assert torch.allclose(a, b, atol=1e-6)
        third.identity_backbone["layer3"][0].conv1.weight.mul_(0.5)  # identity's C4 is now its own
        changed = third.forward_maps(images)
        for a, b in zip(own.forward_maps(images)[:3], changed[:3]):
            assert torch.equal(a, b)
        assert not torch.allclose(own.forward_maps(images)[3], changed[3])
    # a count of an older record is the last N stages; the list form round-trips through the record
    assert tiny_record(detection_neck="own", identity_stages=2).identity_stages == [3, 4]
    assert ModelRecordV2.from_dict(third.record.to_dict()).identity_stages == [3]
    for bad in ([5], [3, 3], True):
        with pytest.raises(ValueError, match="identity_stages"):
            tiny_record(detection_neck="own", identity_stages=bad)
    with pytest.raises(ValueError, match="detection neck of its own"):
        tiny_record(identity_stages=2)
    with pytest.raises(ValueError, match="identity_stages"):
        tiny_record(detection_neck="own", identity_stages=3)
    with pytest.raises(ValueError, match="no stages of its own"):
        own.split_identity_stages()


def test_a_narrower_identity_stage_3_slimmed_from_a_full_one(one_torch_thread):
    """``identity_stage_width``: identity's own stage 3 with fewer planes; the slimming script keeps the channels
    that matter, so channels that carry nothing are dropped without changing a single output."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "joint_v2" / "slim_stage3" / "slim.py"
    spec = importlib.util.spec_from_file_location("slim_stage3", path)
    slim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slim)
    torch.manual_seed(0)
    full = JointNetV2(tiny_record(detection_neck="own", identity_stages=[3])).eval()
    stage = full.identity_backbone["layer3"]
    planes, width = stage[0].bn2.weight.numel(), 12
    with torch.no_grad():  # channels from `width` on carry nothing: zero BatchNorm outputs, unread by the FPN
        for bn in [stage[0].bn1, stage[0].bn2, stage[0].downsample[1]]:
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.normal_()
            bn.weight[width:] = 0.0
            bn.bias[width:] = 0.0
        full.lateral[1].weight[:, width:] = 0.0
    narrow = JointNetV2(tiny_record(detection_neck="own", identity_stages=[3], identity_stage_width=width)).eval()
    narrow.load_state_dict(slim.slim_state(full.state_dict(), width))
    assert narrow.identity_backbone["layer3"][0].bn2.weight.numel() == width < planes
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(full.forward_maps(images), narrow.forward_maps(images)):
            assert torch.allclose(a, b, atol=1e-5)
    assert ModelRecordV2.from_dict(narrow.record.to_dict()).identity_stage_width == width
    with pytest.raises(ValueError, match="cannot start as a copy"):
        narrow.split_identity_stages()
    for bad in (dict(identity_stages=[3, 4]), dict(identity_stages=[]), dict(identity_stages=[3])):
        with pytest.raises(ValueError, match="identity_stage_width"):
            tiny_record(detection_neck="own", identity_stage_width=-4 if bad["identity_stages"] == [3] else 8,
                        **bad)


def test_an_own_stage_2_gives_identity_its_own_stride_8_map_and_leaves_detection_alone(one_torch_thread):
    """``identity_stages [2, 3]``: identity's C3 comes from its own copy of stage 2 (on the shared stride-4 map),
    so a run with the stem and stage 1 frozen teaches identity from finer features than detection's C3."""
    torch.manual_seed(0)
    own = JointNetV2(tiny_record(detection_neck="own")).eval()
    deep = JointNetV2(tiny_record(detection_neck="own", identity_stages=[2, 3], identity_stage_width=12)).eval()
    assert list(deep.identity_backbone) == ["layer2", "layer3"]
    shapes = {key: value.shape for key, value in deep.state_dict().items()}
    deep.load_state_dict({key: value for key, value in own.state_dict().items() if shapes.get(key) == value.shape},
                         strict=False)  # identity's C4 lateral reads the narrower stage: its own
    assert deep.split_identity_stages() == ["layer2"]  # the narrower stage 3 cannot be a copy: left as it is
    for key, value in own.backbone.layer2.state_dict().items():
        assert torch.equal(deep.identity_backbone["layer2"].state_dict()[key], value)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = deep.forward_maps(images)
        for a, b in zip(own.forward_maps(images)[:3], before[:3]):  # detection is the shared network's
            assert torch.allclose(a, b, atol=1e-6)
        for a, b in zip(before[3:], deep.identity_maps(images)):
            assert torch.allclose(a, b, atol=1e-6)
        deep.identity_backbone["layer2"][0].conv1.weight.mul_(0.5)  # identity's C3 is now its own
        after = deep.forward_maps(images)
        for a, b in zip(before[:3], after[:3]):
            assert torch.equal(a, b)
        assert not torch.allclose(before[3], after[3])
    # with the stem and stage 1 frozen, identity's loss reaches its own stage 2 and no weight detection reads
    deep.train()
    deep.frozen_stages = 2
    embeddings = deep.embed(deep.identity_maps(images), torch.tensor([[8.0, 8.0, 40.0, 40.0], [4.0, 10.0, 30.0, 50.0]]),
                            torch.tensor([0, 1]), normalise=False)
    embeddings.square().sum().backward()
    reached = {name.rsplit(".", 3)[0] for name, p in deep.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(name.startswith("identity_backbone.layer2") for name in reached)
    # (the backbone's stages 3-4 still make identity's C5, as with identity_stages [3]: a run's `trainable`
    # keeps them as they are)
    assert not any(name.startswith(("backbone.conv1", "backbone.layer1", "backbone.layer2", "heads", "detection_"))
                   for name in reached)
    assert ModelRecordV2.from_dict(deep.record.to_dict()).identity_stages == [2, 3]
    for bad in ([2], [2, 4]):
        with pytest.raises(ValueError, match="identity"):
            tiny_record(detection_neck="own", identity_stages=bad)
    with pytest.raises(ValueError, match="identity_stage_width"):
        tiny_record(detection_neck="own", identity_stages=[2, 3, 4], identity_stage_width=12)


def test_init_state_renames_tensors_and_takes_margin_rows_by_class_name(tmp_path, one_torch_thread):
    from jointface.net.model import MarginClassifier
    from jointface.train.v2 import load_parts, margin_rows
    from jointface.weights_file import half_precision, write_weights

    torch.manual_seed(0)
    source = JointNetV2(tiny_record(detection_neck="own", class_names=["a", "b", "c"]))
    weights = tmp_path / "source.pt"
    margin = torch.randn(3, source.record.embedding_dim)
    write_weights(weights, record=source.record.to_dict(), state_dict=half_precision(source.state_dict()),
                  identity_heads={"margin.weight": margin.half()}, training={}, format_version=None)
    target = JointNetV2(tiny_record(detection_neck="own", identity_stages=2, class_names=["c", "new", "a"]))
    head = MarginClassifier(target.record.embedding_dim, 3, "cosface", 30.0, 0.35)
    untouched = head.weight[1].detach().clone()
    said = load_parts(target, head, [[str(weights), ["backbone.layer3.", "backbone.layer4.", "margin."],
                                      {"backbone.": "identity_backbone."}]])
    assert "2 of 3 classes" in said[0]
    state, mine = torch.load(weights, weights_only=True)["state_dict"], target.state_dict()
    name = "backbone.layer4.0.conv1.weight"
    assert torch.equal(mine["identity_backbone." + name[len("backbone."):]], state[name].float())
    assert not torch.equal(mine[name], state[name].float())  # the backbone itself was not asked for
    assert torch.equal(head.weight[0], margin[2].half().float()) and torch.equal(head.weight[2], margin[0].half().float())
    assert torch.equal(head.weight[1], untouched)
    other = torch.zeros(3, 4)
    assert margin_rows(["x"], ["x"], torch.ones(1, 5), other) == 0  # another embedding size: nothing
    with pytest.raises(ValueError, match="init_state part"):
        load_parts(target, head, [[str(weights)]])


def test_a_wider_identity_head_grown_from_trained_weights_starts_as_their_function(tmp_path, one_torch_thread):
    from jointface.train.v2 import grow_tensor, load_parts
    from jointface.weights_file import write_weights

    torch.manual_seed(0)
    source = JointNetV2(tiny_record(identity_head_widths=[12, 16]))
    with torch.no_grad():  # trained-looking statistics, so that eval mode exercises them
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "source.pt"
    write_weights(weights, record=source.record.to_dict(), state_dict=source.state_dict(), identity_heads={},
                  training={}, format_version=None)
    wide = JointNetV2(tiny_record(identity_head_widths=[20, 28]))
    said = load_parts(wide, None, [[str(weights), ["backbone.", "lateral.", "smooth.", "identity_map.", "identity."]]],
                      grow=["identity."])
    assert "grown into wider layers" in said[0]
    source.eval(), wide.eval()
    images, boxes = torch.randn(2, 3, 64, 64), torch.tensor([[8.0, 8.0, 40.0, 40.0], [4.0, 10.0, 30.0, 50.0]])
    with torch.no_grad():
        embedded = [net.embed(net.forward_maps(images)[3:], boxes, torch.tensor([0, 1]), normalise=False)
                    for net in (source, wide)]
    assert torch.allclose(embedded[0], embedded[1], atol=1e-5)
    # the new channels are there and learn: the second conv reads them with weight zero, their own weights are not
    first, second = wide.identity.convs[0].weight, wide.identity.convs[3].weight
    assert first[12:].abs().sum() > 0 and second[:, 12:].abs().sum() == 0 and second[16:, :12].abs().sum() > 0
    wide.train()
    wide.embed(wide.forward_maps(images)[3:], boxes, torch.tensor([0, 1]), normalise=False).square().sum().backward()
    assert second.grad[:, 12:].abs().sum() > 0
    # without `grow` a smaller tensor is left out, as before; a larger one never grows into a smaller layer
    fresh = JointNetV2(tiny_record(identity_head_widths=[20, 28]))
    before = fresh.identity.fc.weight.detach().clone()
    load_parts(fresh, None, [[str(weights), ["identity."]]])
    assert torch.equal(fresh.identity.fc.weight, before)
    with pytest.raises(ValueError, match="cannot grow"):
        grow_tensor(torch.zeros(4, 4), torch.zeros(5, 4))


def test_the_identity_head_takes_its_widths_from_the_record(one_torch_thread):
    wide = JointNetV2(tiny_record(identity_head_widths=[24, 40])).eval()
    assert wide.identity.convs[0].out_channels == 24 and wide.identity.convs[3].out_channels == 40
    maps = wide.forward_maps(torch.randn(1, 3, 64, 64))
    assert wide.embed(maps[3:], torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.tensor([0])).shape[1] == \
        wide.record.embedding_dim
    assert ModelRecordV2.from_dict(wide.record.to_dict()).identity_head_widths == [24, 40]
    assert ModelRecordV2().identity_head_widths == [192, 256]  # older records: the head they were built with
    with pytest.raises(ValueError, match="identity_head_widths"):
        tiny_record(identity_head_widths=[24])


def test_mixup_views_carry_dlibs_own_descriptor_of_each_blend_and_resume(tmp_path, lfw_dir):
    import dlib

    from jointface.datasets.build import PhotoLoader, build_training_set
    from jointface.train.crops import CropSettings, build_bank, with_views
    from jointface.engines.dlib_engine import model_path
    from jointface.train.views import blend, build_views, view_recipe

    data = build_training_set(_labels(tmp_path, lfw_dir))
    folder = tmp_path / "run"
    bank = build_bank(data.train, PhotoLoader(), CropSettings(bank_face=100, bank_context=2.6), folder, progress=False)
    views = build_views(bank, folder / "bank.npy", 5, 0, folder, workers=1, progress=False, chunk_size=2)
    pairs, weights = view_recipe(5, len(bank), 0)
    assert views.images.shape == (5, 260, 260, 3) and views.teachers.shape == (5, 128)
    assert (pairs[:, 0] != pairs[:, 1]).all() and ((weights >= 0.2) & (weights <= 0.8)).all()
    for row in range(5):
        assert np.array_equal(views.images[row], blend(bank.images, pairs[row], float(weights[row])))
    # the target is dlib's descriptor of the blend itself, not a blend of the two faces' descriptors
    landmarks, network = model_path("landmarks_5"), model_path("descriptor")
    view, box = np.ascontiguousarray(views.images[3]), views.boxes[3]
    shape = dlib.shape_predictor(str(landmarks))(view, dlib.rectangle(*(int(round(float(v))) for v in box)))
    direct = np.asarray(dlib.face_recognition_model_v1(str(network)).compute_face_descriptor(view, shape))
    assert np.allclose(views.teachers[3], direct, atol=1e-5)
    mixed = weights[3] * bank.teachers[pairs[3, 0]] + (1 - weights[3]) * bank.teachers[pairs[3, 1]]
    assert not np.allclose(views.teachers[3], mixed, atol=0.05)
    # an interrupted cut resumes: only the chunks not yet made are made, and the result is the same
    made, images = views.teachers.copy(), np.array(views.images)
    (folder / "views.npy").replace(folder / "views.tmp.npy")
    (folder / "views.npz").unlink()
    partial = np.load(folder / "views.tmp.npy", mmap_mode="r+")
    partial[2:] = 0
    partial.flush()
    teachers = made.copy()
    teachers[2:] = 0
    np.savez(folder / "views.progress.npz", pairs=pairs, bank_size=len(bank), teachers=teachers,
             done=np.array([True, False, False]))
    again = build_views(bank, folder / "bank.npy", 5, 0, folder, workers=1, progress=False, chunk_size=2)
    assert np.allclose(again.teachers, made, atol=1e-6) and np.array_equal(np.asarray(again.images), images)
    assert not (folder / "views.progress.npz").exists()
    # views follow the bank; a batch draws its share of views from them, known people and bank faces apart
    from jointface.train.crops import choose_faces

    both = with_views(bank, again)
    assert len(both.boxes) == len(bank) + 5 and np.array_equal(both.images[len(bank) + 1], images[1])
    assert (both.identities[len(bank):] == -1).all()
    assert np.array_equal(both.images[[0, len(bank)]], np.stack([bank.images[0], images[0]]))
    chosen = choose_faces(both, 0.5, 8, np.random.default_rng(0), view_share=0.25, view_start=len(bank))
    assert (chosen[-2:] >= len(bank)).all() and (chosen[:-2] < len(bank)).all()
    assert (both.identities[chosen[:4]] >= 0).all()


def test_singleton_rows_start_at_the_students_own_embedding_of_their_one_face(one_torch_thread):
    import contextlib
    from types import SimpleNamespace

    from jointface.net.model import MarginClassifier
    from jointface.train.crops import CropBank, CropSettings, CropSource

    torch.manual_seed(0)
    model = JointNetV2(tiny_record(class_names=["a", "b", "c", "d"])).train()
    head = MarginClassifier(16, 4, "cosface", 30.0, 0.35)
    before = head.weight.detach().clone()
    rng = np.random.default_rng(0)
    # class 0 has two faces (a known person: its row stays), classes 2 and 3 one each, class 1 none
    bank = CropBank(rng.integers(0, 255, size=(5, 52, 52, 3), dtype=np.uint8),
                    np.tile(np.array([[16.0, 16.0, 36.0, 36.0]], dtype=np.float32), (5, 1)),
                    np.zeros((5, 128), dtype=np.float32), np.array([0, 0, 2, -1, 3]))
    source = object.__new__(CropSource)
    source.run = SimpleNamespace(model=model, margin_head=head, autocast=contextlib.nullcontext)
    source.settings, source.bank, source.view_start = CropSettings(bank_face=20, context=1.75), bank, None
    assert source.start_singleton_rows(width=20) == 2
    assert model.training  # the network is left in the mode it was in
    assert torch.equal(head.weight[:2], before[:2])
    rows = torch.nn.functional.normalize(head.weight[2:], dim=1)
    # what the network says of face 2 and face 4 placed alone, centred, at the same width
    model.eval()
    with torch.no_grad():
        canvas = np.empty((1, 64, 64, 3), dtype=np.uint8)  # the smallest crop canvas (4 x 16 px)
        from jointface.datasets.samples import PAD_COLOUR, paste
        from jointface.train.v2 import normalise

        expected = []
        for index in (2, 4):
            canvas[:] = PAD_COLOUR
            paste(canvas[0], bank.images[index], 1.0, 6.0, 6.0)  # the face's centre (26, 26) at the canvas's
            maps = model.identity_maps(normalise(torch.from_numpy(canvas), model.record))
            expected.append(model.embed(maps, torch.tensor([[22.0, 22.0, 42.0, 42.0]]), torch.tensor([0]))[0])
    assert torch.allclose(rows, torch.stack(expected), atol=1e-4)
    norms = head.weight.norm(dim=1)
    assert torch.allclose(norms[2:], before[:2].norm(dim=1).median().expand(2), atol=1e-5)


def test_singleton_rows_by_momentum_follow_their_face_and_get_no_gradient(one_torch_thread):
    from types import SimpleNamespace

    from jointface.net.model import MarginClassifier
    from jointface.train.crops import CropBank, CropSettings, CropSource

    torch.manual_seed(0)
    head = MarginClassifier(16, 4, "cosface", 30.0, 0.35)
    before = head.weight.detach().clone()
    bank = CropBank(np.zeros((5, 8, 8, 3), dtype=np.uint8), np.zeros((5, 4), dtype=np.float32),
                    np.zeros((5, 128), dtype=np.float32), np.array([0, 0, 2, -1, 3]))
    source = object.__new__(CropSource)
    source.run = SimpleNamespace(margin_head=head)
    source.bank, source.view_start, source.pending_rows = bank, None, None
    source.settings = CropSettings(singleton_momentum=0.5)
    mask = source.hold_singleton_rows()
    assert mask.tolist() == [False, False, True, True]
    embeddings = torch.randn(3, 16, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(head(embeddings, torch.tensor([0, 2, 3])), torch.tensor([0, 2, 3]))
    loss.backward()
    assert head.weight.grad[2:].abs().sum() == 0 and head.weight.grad[:2].abs().sum() > 0
    # after the step: rows 2 and 3 halfway (on the sphere) to their face's embedding, their norm kept
    source.pending_rows = (torch.tensor([2, 3]), embeddings.detach()[1:])
    source.update_rows()
    unit = torch.nn.functional.normalize
    expected = unit(0.5 * unit(before[2:], dim=1) + 0.5 * unit(embeddings.detach()[1:], dim=1), dim=1)
    assert torch.allclose(unit(head.weight.detach()[2:], dim=1), expected, atol=1e-6)
    assert torch.allclose(head.weight.detach()[2:].norm(dim=1), before[2:].norm(dim=1), atol=1e-5)
    assert torch.equal(head.weight.detach()[:2], before[:2]) and source.pending_rows is None
    source.settings = CropSettings(singleton_momentum=1.0)
    with pytest.raises(ValueError, match="singleton_momentum"):
        source.hold_singleton_rows()


def test_a_reopened_crop_bank_takes_the_identities_of_the_run_that_reopens_it(tmp_path, lfw_dir):
    import dataclasses

    from jointface.datasets.build import PhotoLoader, build_training_set
    from jointface.train.crops import CropSettings, build_bank

    data = build_training_set(_labels(tmp_path, lfw_dir))
    settings = CropSettings(face_low=40, face_high=60, bank_face=50, bank_context=2.0)
    first = build_bank(data.train, PhotoLoader(), settings, tmp_path / "bank", progress=False)
    stamp = (tmp_path / "bank" / "bank.npy").stat().st_mtime_ns
    for photo in data.train:  # another run's classes: the same faces, other identity numbers
        photo.faces[:] = [dataclasses.replace(face, identity=face.identity + 5) for face in photo.faces]
    again = build_bank(data.train, PhotoLoader(), settings, tmp_path / "bank", progress=False)
    assert np.array_equal(again.identities, first.identities + 5)
    assert (tmp_path / "bank" / "bank.npy").stat().st_mtime_ns == stamp  # the images were not cut again
    assert np.array_equal(np.load(tmp_path / "bank" / "bank.npz")["identities"], first.identities + 5)
