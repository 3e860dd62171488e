"""ResNet names, JointNet shapes and gradients, post-processing, and the jointface engine's weights handling."""

import hashlib
import math

import numpy as np
import pytest
import torch

from jointface.engines.joint_engine import JointEngine, WeightsError, default_weights_path
from jointface.net.loss import joint_losses, total_loss
from jointface.net.matching import FaceTargets, match_faces
from jointface.net.model import (JointNet, JointOutput, ModelRecord, build_identity_heads, images_to_tensor, letterbox,
                                  letterbox_batch, postprocess, resize_bilinear)
from jointface.net.resnet import build_resnet, load_torchvision_weights, resnet18, resnet34, resnet50


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = dict(backbone="resnet_tiny", input_size=64, anchor_sizes=[[16.0, 16.0], [32.0, 40.0]], embedding_dim=16,
            neck_channels=16)


def tiny_net(**changes) -> JointNet:
    torch.manual_seed(0)
    return JointNet(ModelRecord(**{**TINY, **changes}))


def test_resnet34_has_torchvision_parameter_names():
    state = resnet34().state_dict()
    # written out by hand from torchvision.models.resnet34().state_dict()
    expected_shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.2.bn2.weight": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer2.3.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn2.bias": (256,),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.2.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in state  # layer1 keeps 64 channels and stride 1
    assert "layer1.3.conv1.weight" not in state and "layer3.6.conv1.weight" not in state
    assert len(state) == 218  # torchvision resnet34: 218 state-dict entries
    assert len(resnet18().state_dict()) == 122


def test_resnet50_bottleneck_names():
    state = resnet50().state_dict()
    assert tuple(state["layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)  # stride on the 3x3 (v1.5)
    assert tuple(state["fc.weight"].shape) == (1000, 2048)
    assert len(state) == 320


def test_load_torchvision_weights_strict(tmp_path):
    source = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = load_torchvision_weights(path)  # architecture inferred, fc dropped
    assert backbone.num_features == 512 and isinstance(backbone.fc, torch.nn.Identity)
    assert torch.equal(backbone.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    broken = dict(source.state_dict())
    broken["layer1.0.extra.weight"] = broken.pop("layer1.0.conv1.weight")
    torch.save(broken, path)
    with pytest.raises(ValueError, match="keys do not match"):
        load_torchvision_weights(path, build_resnet("resnet18"))


def test_forward_shapes_and_unit_embeddings():
    model = tiny_net()
    output = model(torch.randn(2, 3, 64, 96))
    # stride 32: 2 x 3 grid, 2 anchors per cell
    assert output.grid_size == (2, 3)
    assert output.box_raw.shape == (2, 12, 4)
    assert output.face_logits.shape == (2, 12)
    assert output.embeddings.shape == (2, 12, 16)
    assert torch.allclose(output.embeddings.norm(dim=-1), torch.ones(2, 12), atol=1e-5)
    # the prior: every anchor starts near 1% face probability
    assert output.face_logits.sigmoid().mean() < 0.05
    model.eval()
    assert isinstance(model(torch.randn(1, 3, 64, 64)), JointOutput)  # same return type in eval


def _batch(num_images=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, 64, 64, generator=generator)
    faces = []
    for i in range(num_images):
        x, y = 4 + 8 * i, 6 + 4 * i
        faces.append(FaceTargets(torch.tensor([[x, y, x + 30.0, y + 34.0]]), torch.tensor([i % 2]),
                                 torch.randn(1, 128, generator=generator), torch.tensor([True])))
    return images, faces


def test_backward_reaches_every_parameter():
    model = tiny_net()
    heads = build_identity_heads(["classifier", "arcface", "triplet", "distill"], 16, num_classes=2)
    images, faces = _batch()
    output = model(images)
    targets = match_faces(faces, model.anchor_grid, *output.grid_size)
    losses = joint_losses(output, targets, heads, use_triplet=True)
    assert set(losses) == {"box", "confidence", "identity_ce", "identity_margin", "triplet", "distill"}
    total_loss(losses, {}).backward()
    for name, parameter in list(model.named_parameters()) + list(heads.named_parameters()):
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_few_steps_on_eight_images_lower_the_loss():
    model = tiny_net()
    heads = build_identity_heads(["classifier", "triplet"], 16, num_classes=2)
    images, faces = _batch(8)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-2)
    history = []
    for _ in range(40):
        output = model(images)
        targets = match_faces(faces, model.anchor_grid, *output.grid_size)
        loss = total_loss(joint_losses(output, targets, heads, use_triplet=True), {})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


def test_postprocess_decodes_threshold_and_nms():
    model = tiny_net()
    grid = model.anchor_grid
    box_raw = torch.zeros(1, 8, 4)  # 2x2 grid x 2 anchors
    face_logits = torch.full((1, 8), -10.0)
    face_logits[0, 3] = 3.0   # cell (0, 1), anchor 1 (32x40): centre (48, 16)
    face_logits[0, 2] = 2.0   # same cell, anchor 0 (16x16): inside the first box, IoU 256 / 1280 = 0.2
    embeddings = torch.nn.functional.normalize(torch.randn(1, 8, 16), dim=-1)
    detections = postprocess(JointOutput(box_raw, face_logits, embeddings, (2, 2)), grid, conf_threshold=0.5,
                             nms_iou=0.1)
    found = detections[0]
    # raw 0 -> sigmoid 0.5 -> the anchor's own box: (48 - 16, 16 - 20, 48 + 16, 16 + 20)
    assert found.boxes.tolist() == [[32.0, -4.0, 64.0, 36.0]]  # the 16x16 box (IoU 256/1280 = 0.2 > 0.1) suppressed
    assert math.isclose(float(found.scores[0]), 1 / (1 + math.exp(-3.0)), rel_tol=1e-6)
    assert torch.equal(found.embeddings[0], embeddings[0, 3])
    assert found.anchor_idx.tolist() == [3]


def test_letterbox_maps_boxes_back():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    canvas, placement = letterbox(image, 64)
    assert canvas.shape == (64, 64, 3)
    assert placement.scale == pytest.approx(0.32) and placement.pad_x == 0 and placement.pad_y == 16
    back = placement.to_original(np.array([[0.0, 16.0, 32.0, 32.0]]), 200, 100)
    assert np.allclose(back, [[0, 0, 100, 50]])


def test_letterbox_batch_is_letterbox_then_normalise():
    rng = np.random.default_rng(1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((320, 320, 3), (100, 200, 3),
                                                                               (250, 90, 3), (64, 64, 3))]
    images[0].setflags(write=False)  # decoded photos are read-only
    for size in (64, 96):
        batch, placements = letterbox_batch(images, size, mean, std)
        placed = [letterbox(image, size) for image in images]
        assert batch.shape == (4, 3, size, size) and batch.is_contiguous() and batch.dtype == torch.float32
        assert torch.equal(batch, images_to_tensor([canvas for canvas, _ in placed], mean, std))
        assert placements == [placement for _, placement in placed]


def test_resize_bilinear_is_pil_bilinear():
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(320, 320, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(noise[::8, ::8], 8, 0), 8, 1)  # what photos look like
    smooth.setflags(write=False)  # decoded photos are read-only
    for image, (width, height) in ((noise, (240, 240)), (smooth, (192, 100)), (smooth, (500, 37)), (noise, (9, 13))):
        ours = resize_bilinear(image, width, height)
        pil = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        assert ours.shape == pil.shape == (height, width, 3) and ours.dtype == np.uint8
        difference = np.abs(ours.astype(int) - pil.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01  # a few values round apart


# ----------------------------------------------------------------------------- engine
def _write_weights(path, model: JointNet):
    torch.save({"format": "jointface-weights", "format_version": 1, "record": model.record.to_dict(),
                "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}},
               path)


def test_engine_detects_with_weights_file(tmp_path):
    model = tiny_net()
    with torch.no_grad():  # make one anchor certain, so the engine finds exactly one face
        model.detection.bias.view(2, 5)[:, 4] = -20
        model.detection.weight.zero_()
        model.detection.bias.view(2, 5)[1, 4] = 20
    path = tmp_path / "tiny.pt"
    _write_weights(path, model)
    engine = JointEngine(weights=path, conf_threshold=0.5, nms_iou=0.3)
    assert engine.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert engine.dim == 16 and engine.name == "jointface"
    image = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    faces = engine.detect(image)
    assert len(faces) >= 1
    for face in faces:
        assert face.engine == "jointface" and face.engine_version == engine.version
        assert face.embedding.dtype == np.float32 and face.embedding.shape == (16,)
        assert abs(np.linalg.norm(face.embedding) - 1) < 1e-3
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 100
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    batch = engine.detect_batch([image, image[:50]])
    assert len(batch) == 2 and len(batch[0]) == len(faces)
    assert JointEngine(weights=path, bf16=True).detect(image)  # bf16 autocast path runs


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_engine_refuses_pickled_code_and_foreign_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "jointface-weights", "record": {}, "state_dict": {}, "extra": _Payload()}, evil)
    with pytest.raises(WeightsError, match="pickled"):
        JointEngine(weights=evil)
    foreign = tmp_path / "resnet.pt"
    torch.save(resnet18().state_dict(), foreign)
    with pytest.raises(WeightsError, match="not a JointFace weights file"):
        JointEngine(weights=foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError):
        JointEngine(weights=garbage)
    with pytest.raises(WeightsError, match="no such"):
        JointEngine(weights=tmp_path / "missing.pt")


def test_default_weights_path_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("JOINTFACE_WEIGHTS", str(tmp_path / "w.pt"))
    assert default_weights_path() == tmp_path / "w.pt"


@pytest.mark.parametrize("backbone", ["resnet_tiny", "resnet18", "resnet50"])
def test_batchnorm_folding_keeps_the_outputs(backbone):
    from jointface.net.fuse import fuse_batchnorm

    model = tiny_net(backbone=backbone)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial running statistics and affine parameters everywhere
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    model.eval()
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the reference is untouched
    images = torch.randn(2, 3, 64, 96, generator=generator)
    with torch.no_grad():
        expected, got = model(images), fused(images)
        got_channels_last = fused.to(memory_format=torch.channels_last)(
            images.contiguous(memory_format=torch.channels_last))
    for result in (got, got_channels_last):
        assert torch.allclose(result.box_raw, expected.box_raw, atol=1e-3, rtol=1e-3)
        assert torch.allclose(result.face_logits, expected.face_logits, atol=1e-3, rtol=1e-3)
        assert torch.allclose(result.embeddings, expected.embeddings, atol=1e-4)


def test_engine_fast_path_equals_reference_path(tmp_path):
    """The default engine (BN folded, channels-last) against the plain fp32 network on the same image."""
    model = tiny_net()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.fill_(2.0)
                module.running_mean.fill_(0.1)
    path = tmp_path / "tiny.pt"
    _write_weights(path, model)
    fast = JointEngine(weights=path, conf_threshold=0.0, max_faces=5)
    reference = JointEngine(weights=path, conf_threshold=0.0, max_faces=5, fuse=False, channels_last=False)
    assert fast.describe()["fused_batchnorm"] and not reference.describe()["fused_batchnorm"]
    image = np.random.default_rng(3).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    for ref, quick in zip(reference.detect(image), fast.detect(image)):
        assert np.allclose(ref.box, quick.box, atol=1e-2)
        assert abs(ref.score - quick.score) < 1e-4
        assert float(np.dot(ref.embedding, quick.embedding)) > 0.9999


def test_merge_flipped_pairs_mirror_detections_and_averages_them():
    """Flip TTA on hand-built detections: boxes mapped back from the mirror, paired by IoU, averaged."""
    from jointface.net.model import Detections, merge_flipped

    width = 100
    e = torch.eye(4)
    found = Detections(boxes=torch.tensor([[10., 10., 30., 40.], [60., 20., 90., 50.]]),
                       scores=torch.tensor([0.9, 0.8]), embeddings=e[:2].clone(), anchor_idx=torch.tensor([3, 7]))
    # Mirror view: the first face mirrored and shifted by 2 px; a face only the mirror sees; the second face missing.
    mirrored = Detections(boxes=torch.tensor([[72., 10., 92., 40.], [0., 0., 5., 5.]]),
                          scores=torch.tensor([0.7, 0.95]), embeddings=e[2:4].clone(), anchor_idx=torch.tensor([1, 2]))
    merged = merge_flipped(found, mirrored, width)
    assert merged.boxes.shape == (2, 4)  # the faces are found's: the mirror-only face is dropped
    # mirrored back: [8, 10, 28, 40]; mean with [10, 10, 30, 40]
    assert torch.allclose(merged.boxes[0], torch.tensor([9., 10., 29., 40.]))
    assert merged.scores[0].item() == pytest.approx(0.8)
    assert torch.allclose(merged.embeddings[0], torch.tensor([1., 0., 1., 0.]) / math.sqrt(2))
    # the unpaired face keeps its own values
    assert torch.equal(merged.boxes[1], found.boxes[1]) and torch.equal(merged.embeddings[1], e[1])
    assert merged.scores[1].item() == pytest.approx(0.8)
    assert torch.equal(merged.anchor_idx, found.anchor_idx)
    # nothing in the mirror: found unchanged
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert merge_flipped(found, empty, width) is found


def test_an_image_without_pixels_is_refused_clearly():
    from jointface.engines.base import check_image

    with pytest.raises(ValueError, match="no pixels"):
        check_image(np.zeros((0, 10, 3), dtype=np.uint8))
    assert check_image(np.zeros((1, 1, 3), dtype=np.uint8)).shape == (1, 1, 3)
