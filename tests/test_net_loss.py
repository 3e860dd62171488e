"""Loss terms: hand-computed values, finiteness without faces, the non-finite stop."""

import math

import pytest
import torch

from jointface.net.boxes import BoxCoder
from jointface.net.loss import NonFiniteLossError, check_finite, joint_losses, total_loss, triplet_batch_hard
from jointface.net.matching import FaceTargets, MatchedTargets, match_faces
from jointface.net.model import JointNet, JointOutput, MarginClassifier, ModelRecord, build_identity_heads


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ALL_HEADS = ["classifier", "arcface", "triplet", "distill"]


def tiny_net() -> JointNet:
    torch.manual_seed(0)
    return JointNet(ModelRecord(backbone="resnet_tiny", input_size=64, anchor_sizes=[[16.0, 16.0], [32.0, 40.0]],
                                embedding_dim=16, neck_channels=16))


def test_every_term_finite_with_no_faces_in_the_batch():
    model = tiny_net()
    heads = build_identity_heads(ALL_HEADS, 16, num_classes=3)
    output = model(torch.randn(2, 3, 64, 64))
    targets = match_faces([FaceTargets.empty(), FaceTargets.empty()], model.anchor_grid, *output.grid_size)
    losses = joint_losses(output, targets, heads, use_triplet=True)
    assert set(losses) == {"box", "confidence", "identity_ce", "identity_margin", "triplet", "distill"}
    for name, value in losses.items():
        assert torch.isfinite(value), name
        if name != "confidence":
            assert value.item() == 0.0, name
    total_loss(losses, {}).backward()
    for name, parameter in list(model.named_parameters()) + list(heads.named_parameters()):
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name


def test_faces_without_identity_or_teacher_are_finite():
    model = tiny_net()
    heads = build_identity_heads(ALL_HEADS, 16, num_classes=3)
    output = model(torch.randn(1, 3, 64, 64))
    unknown = FaceTargets(torch.tensor([[5.0, 5, 40, 40]]), torch.tensor([-1]), torch.zeros(1, 128),
                          torch.tensor([False]))
    losses = joint_losses(output, match_faces([unknown], model.anchor_grid, *output.grid_size), heads, use_triplet=True)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["identity_ce"] == 0 and losses["distill"] == 0 and losses["box"] > 0


def _hand_output_and_targets():
    """One image, 2 anchors; anchor 1 holds a face whose targets equal the prediction."""
    box_raw = torch.zeros(1, 2, 4)
    face_logits = torch.zeros(1, 2)
    embeddings = torch.nn.functional.normalize(torch.ones(1, 2, 4), dim=-1)
    targets = MatchedTargets(
        objectness=torch.tensor([[0.0, 1.0]]), confidence_weight=torch.ones(1, 2),
        matched_image_idx=torch.tensor([0]), matched_anchor_idx=torch.tensor([1]),
        box_targets=BoxCoder.to_target_space(torch.zeros(1, 4)),  # (0.5, 0.5, 0, 0)
        identities=torch.tensor([0]), teachers=torch.zeros(1, 128), teacher_valid=torch.tensor([True]))
    return JointOutput(box_raw, face_logits, embeddings, (1, 1)), targets


def test_box_and_confidence_hand_computed():
    output, targets = _hand_output_and_targets()
    losses = joint_losses(output, targets, torch.nn.ModuleDict())
    assert float(losses["box"]) == 0.0
    # two anchors at logit 0: BCE = log 2 each, summed, divided by 1 face
    assert math.isclose(float(losses["confidence"]), 2 * math.log(2), rel_tol=1e-6)
    targets.confidence_weight[0, 0] = 0.0  # ignored anchor
    assert math.isclose(float(joint_losses(output, targets, torch.nn.ModuleDict())["confidence"]), math.log(2),
                        rel_tol=1e-6)
    targets.box_targets = torch.tensor([[0.5, 0.5, 1.0, 0.0]])  # w off by 1 -> smooth L1 (beta 0.1) = 0.95, / 4
    assert math.isclose(float(joint_losses(output, targets, torch.nn.ModuleDict())["box"]), 0.95 / 4, rel_tol=1e-6)


def test_triplet_batch_hard_hand_computed():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    # face 0: hardest positive sqrt2 (face 1), hardest negative 0 (face 2) -> sqrt2 + m
    # face 1: positive sqrt2, negative sqrt2 -> m;  face 2: no positive -> left out
    margin = 0.2
    expected = (math.sqrt(2) + margin + margin) / 2
    assert math.isclose(float(triplet_batch_hard(embeddings, labels, margin)), expected, rel_tol=1e-5)
    assert float(triplet_batch_hard(embeddings[:2], labels[:2], margin)) == 0.0  # one person: no negatives


def test_margin_heads_hand_computed():
    arcface = MarginClassifier(2, 2, "arcface", scale=10.0, margin=0.5)
    cosface = MarginClassifier(2, 2, "cosface", scale=10.0, margin=0.35)
    for head in (arcface, cosface):
        with torch.no_grad():
            head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    embedding, label = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # true class at theta = 0: ArcFace cos(0 + 0.5), CosFace 1 - 0.35; other class cos = 0
    assert torch.allclose(arcface(embedding, label), torch.tensor([[10 * math.cos(0.5), 0.0]]), atol=1e-4)
    assert torch.allclose(cosface(embedding, label), torch.tensor([[10 * 0.65, 0.0]]), atol=1e-4)
    assert torch.allclose(arcface(embedding), torch.tensor([[10.0, 0.0]]), atol=1e-4)


def test_linear_classifier_scales_unit_embeddings_and_loads_unscaled_heads():
    from jointface.net.model import LinearClassifier
    head = LinearClassifier(2, 2, scale=30.0)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.fc.bias.copy_(torch.tensor([0.5, 0.0]))
    assert torch.allclose(head(torch.tensor([[0.0, 1.0]])), torch.tensor([[0.5, 30.0]]))
    # a head saved before the scale existed (no 'scale' entry) keeps its unscaled logits
    old = {"fc.weight": head.fc.weight.detach().clone(), "fc.bias": head.fc.bias.detach().clone()}
    reloaded = LinearClassifier(2, 2, scale=30.0)
    reloaded.load_state_dict(old)
    assert float(reloaded.scale) == 1.0
    assert torch.allclose(reloaded(torch.tensor([[0.0, 1.0]])), torch.tensor([[0.5, 1.0]]))
    saved = LinearClassifier(2, 2, scale=30.0).state_dict()
    assert float(saved["scale"]) == 30.0


def test_check_finite_names_the_term():
    losses = {"box": torch.tensor(1.0), "distill": torch.tensor(float("nan")), "confidence": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError, match="step 7: distill=nan, confidence=inf"):
        check_finite(losses, step=7)
    check_finite({"box": torch.tensor(0.0)}, step=0)


def test_total_loss_uses_weights():
    losses = {"box": torch.tensor(2.0), "confidence": torch.tensor(3.0)}
    assert float(total_loss(losses, {"box": 5.0})) == 13.0


def test_margin_ramp_zero_gives_plain_scaled_cosines():
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    for kind in ("arcface", "cosface"):
        head = MarginClassifier(8, 3, kind, scale=16.0, margin=0.4)
        plain = head(embeddings)
        head.ramp = 0.0
        assert torch.allclose(head(embeddings, labels), plain, atol=1e-5)
        head.ramp = 0.5
        halfway = head(embeddings, labels)
        cosine = head.cosine(embeddings)
        true = torch.nn.functional.one_hot(labels, 3).bool()
        if kind == "cosface":  # cos - m/2 on the true class only
            assert torch.allclose(halfway[true], 16.0 * (cosine[true] - 0.2), atol=1e-5)
        assert torch.allclose(halfway[~true], plain[~true], atol=1e-5)


def test_distillation_loss_is_one_minus_cosine_to_the_centred_teacher():
    from jointface.net.model import DistillationHead

    mean = torch.linspace(-0.1, 0.1, 128)
    head = DistillationHead(128, teacher_mean=mean)
    with torch.no_grad():  # relu(x) - relu(-x) = x: the head becomes the identity map
        eye = torch.eye(128)
        head.mlp[0].weight.copy_(torch.cat((eye, -eye)))
        head.mlp[0].bias.zero_()
        head.mlp[2].weight.copy_(torch.cat((eye, -eye), dim=1))
        head.mlp[2].bias.zero_()
    torch.manual_seed(1)
    teachers = mean + 0.05 * torch.randn(4, 128)
    centred = teachers - mean
    with torch.no_grad():
        assert float(head.loss(centred * 3.0, teachers)) == pytest.approx(0.0, abs=1e-6)  # same direction, any length
        assert float(head.loss(-centred, teachers)) == pytest.approx(2.0, abs=1e-6)
        orthogonal = torch.zeros(4, 128)
        orthogonal[:, 0] = centred[:, 1]
        orthogonal[:, 1] = -centred[:, 0]
        assert float(head.loss(orthogonal, teachers)) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(head.state_dict()["teacher_mean"], mean)  # travels with the weights
