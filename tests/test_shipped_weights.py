"""The shipped joint network: loads safely, carries its metadata, finds faces with enroll/search."""

from __future__ import annotations

import json

import pytest

import torch

from jointface.engines.joint_engine import default_weights_path


def test_weights_file_is_shipped_small_and_self_describing(lfw_dir):
    from jointface.datasets.collections import lfw_p1_split

    path = default_weights_path()
    assert path is not None, "jointface/weights/jointface.pt is missing"
    assert path.stat().st_size <= 50 * 1024 * 1024
    payload = torch.load(path, map_location="cpu", weights_only=True)
    record = payload["record"]
    for key in ("backbone", "input_size", "anchor_sizes", "embedding_dim", "mean", "std", "class_names",
                "training_command", "training_data"):
        assert key in record, key
    # every P1 person is a class (v2 weights also have the CelebA people they were trained on)
    p1_people = {path.split("/")[0] for path in lfw_p1_split(lfw_dir)}
    assert len(p1_people) == 311 and p1_people <= set(record["class_names"])
    assert all(t.dtype in (torch.float16, torch.int64, torch.long) for t in payload["state_dict"].values()
               if t.is_floating_point())


def test_shipped_weights_have_their_int8_model_and_the_default_engine_runs_it():
    from jointface.engines import get_engine
    from jointface.engines.onnx_runtime import int8_head_path, int8_model_path

    int8 = int8_model_path(default_weights_path())
    assert int8.is_file(), f"{int8} is missing: make it with `jointface quantize` (see the README)"
    assert int8_head_path(int8).is_file(), f"{int8_head_path(int8)} is missing: `jointface quantize` makes it"
    sizes = [path.stat().st_size for path in (default_weights_path(), int8, int8_head_path(int8))]
    assert sum(sizes) <= 50 * 1024 * 1024
    engine = get_engine("jointface")
    assert engine.describe()["runtime"] == "int8" and engine.describe()["identity_head_runtime"] == "int8"
    assert get_engine("jointface-torch").describe()["runtime"] == "torch"


def test_sidecar_records_the_measured_figures_and_gates_the_default():
    from jointface.engines import default_engine_decision, default_engine_name

    sidecar = json.loads(default_weights_path().with_suffix(".json").read_text())
    assert default_engine_name() == default_engine_decision(sidecar)["engine"]


def test_default_engine_rule_by_hand():
    from jointface.engines import default_engine_decision

    card = {"p2": {"tpir@fpir=0.01": 0.52, "dlib_tpir@fpir=0.01": 0.556},
            "p6b": {"recall": {"24": 0.3, "48": 0.98, "96": 0.99, "192": 0.99, "384": 0.99},
                    "dlib_recall": {"24": 0.015, "48": 0.975, "96": 0.95, "192": 0.975, "384": 0.99}}}
    assert default_engine_decision(card)["engine"] == "jointface"
    below_at_384 = {**card, "p6b": {**card["p6b"], "recall": {**card["p6b"]["recall"], "384": 0.9}}}
    assert "384" in default_engine_decision(below_at_384)["reason"]
    assert default_engine_decision(below_at_384)["engine"] == "dlib"
    far_behind = {**card, "p2": {"tpir@fpir=0.01": 0.50, "dlib_tpir@fpir=0.01": 0.556}}
    assert default_engine_decision(far_behind)["engine"] == "dlib"
    assert default_engine_decision({"p2": card["p2"]})["engine"] == "dlib"  # no P6 on the card


def test_jointface_search_finds_two_faces(run_cli, knn_dir, tmp_path):
    home = tmp_path / "home"
    enrolled = run_cli("--engine", "jointface", "enroll", "--from-folders", knn_dir / "train", "--largest",
                       home=home)
    assert "engine jointface" in enrolled.stderr, enrolled.stderr
    result = run_cli("--engine", "jointface", "search", "--json", knn_dir / "test" / "obama_and_biden.jpg",
                     home=home)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert len(answer["faces"]) >= 2
    # The dlib gallery of the same home stays separate: nothing enrolled there.
    assert "0 faces" in run_cli("--engine", "dlib", "index", "check", home=home).stdout


@pytest.mark.parametrize("fast_name, min_iou, min_cosine", [
    ("jointface-torch", 0.99, 0.999),  # BN folded + channels-last: the same arithmetic up to rounding
    ("jointface", 0.95, 0.99),        # the default: int8 weights and activations (shipped int8 model)
    ("jointface-bf16", 0.9, 0.98),    # bf16 autocast: rounding of 8-bit mantissas
    ("jointface-onnx", 0.99, 0.999),  # ONNX Runtime convolutions: fp32, other summation order
    ("jointface-compiled", 0.9, 0.98),  # bf16 weights and activations through torch.compile
])
def test_fast_paths_match_the_reference_path(lfw_dir, fast_name, min_iou, min_cosine):
    """The default engine and the bf16 path against the network exactly as trained, on real faces.

    Each fast path's best face of a photo is the reference's (box and embedding within the bounds) on at
    least 38 of 40 LFW photos, and its boxes agree on average. Not on every photo: int8 rounding
    sometimes ranks two close candidates the other way, and then the best face is another box (measured
    on 236 other LFW photos: 2 outside the bounds for the int8 models of both the eighth session's weights
    and the fourth's, one of them a different face altogether).
    """
    import numpy as np

    from jointface.bench.metrics import box_iou_np
    from jointface.engines import get_engine
    from jointface.imageio import load_image, resize_shorter_side

    reference, fast = get_engine("jointface-reference"), get_engine(fast_name)
    assert reference.version == fast.version  # one gallery compatibility key: the weights
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:160:4]
    images = [resize_shorter_side(load_image(sorted(p.glob("*.jpg"))[0]), 320) for p in people]
    ious, within = [], 0
    for ref_faces, fast_faces in zip(reference.detect_batch(images), fast.detect_batch(images)):
        assert ref_faces and fast_faces
        ref, quick = ref_faces[0], fast_faces[0]
        ious.append(box_iou_np(np.array([ref.box]), np.array([quick.box]))[0, 0])
        within += ious[-1] > min_iou and float(np.dot(ref.embedding, quick.embedding)) > min_cosine
    assert len(ious) == 40 and within >= 38, f"{within} of 40 photos within IoU {min_iou} and cosine {min_cosine}"
    assert np.median(ious) > 0.98


def test_a_compiled_engine_that_cannot_compile_says_so_when_made(monkeypatch):
    """No C++ compiler (or another Inductor failure) is reported when the engine is made, with the way out."""
    import torch

    from jointface.engines.joint_engine import JointEngine
    from jointface.weights_file import WeightsError

    def broken(function, **options):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(WeightsError, match="torch.compile could not build the network.*--engine jointface"):
        JointEngine(runtime="compiled")


def test_flip_engine_sees_a_photo_and_its_mirror_alike(lfw_dir):
    """jointface-flip averages each face over the photo and its mirror: so a mirrored photo gives the same
    face (box mirrored, embedding equal up to int8 rounding), and the face stays the plain path's face."""
    import numpy as np

    from jointface.bench.metrics import box_iou_np
    from jointface.engines import get_engine
    from jointface.imageio import load_image, resize_shorter_side

    flip, plain = get_engine("jointface-flip"), get_engine("jointface")
    assert flip.version == plain.version and flip.name == "jointface-flip" and flip.flip
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[2:40:4]
    images = [resize_shorter_side(load_image(sorted(p.glob("*.jpg"))[0]), 320) for p in people]
    mirrors = [np.ascontiguousarray(image[:, ::-1]) for image in images]
    gains = []
    for image, faces, mirror_faces, plain_faces in zip(images, flip.detect_batch(images), flip.detect_batch(mirrors),
                                                       plain.detect_batch(images)):
        if not plain_faces:  # a photo the network misses (one of these ten)
            assert not faces
            continue
        assert faces and mirror_faces
        face, mirror, single = faces[0], mirror_faces[0], plain_faces[0]
        width = image.shape[1]
        x1, y1, x2, y2 = mirror.box
        assert box_iou_np(np.array([face.box]), np.array([[width - x2, y1, width - x1, y2]]))[0, 0] > 0.95
        assert float(np.dot(face.embedding, mirror.embedding)) > 0.99
        assert box_iou_np(np.array([face.box]), np.array([single.box]))[0, 0] > 0.8
        assert abs(float(np.linalg.norm(face.embedding)) - 1.0) < 1e-4
        gains.append(float(np.dot(face.embedding, single.embedding)))
    # the mirror view moves the embedding, but it stays the same face's
    assert len(gains) >= 8 and min(gains) > 0.7 and max(gains) < 0.9999


def test_engine_at_weights_path_loads_those_weights_under_its_own_name(tmp_path):
    """``jointface@PATH``: other weights, side by side with the shipped ones, with a gallery name of their own."""
    import shutil

    from jointface.engines import UnknownEngineError, get_engine

    copy = tmp_path / "heads cosface+distill.pt"
    shutil.copy(default_weights_path(), copy)
    engine = get_engine(f"jointface@{copy}")
    assert engine.name == "jointface@heads-cosface+distill"
    assert engine.weights_path == copy
    assert engine.version == get_engine("jointface").version  # same bytes, same version
    assert get_engine(f"jointface@{copy}") is engine  # loaded once per process
    assert get_engine(f"jointface-reference@{copy}").name == "jointface-reference@heads-cosface+distill"
    for bad, message in [("dlib@" + str(copy), "takes no weights"), ("jointface@", "give a weights file"),
                         ("nonsense@" + str(copy), "unknown engine")]:
        with pytest.raises(UnknownEngineError, match=message):
            get_engine(bad)
    from jointface.engines.joint_engine import WeightsError

    with pytest.raises(WeightsError, match="no such weights file"):
        get_engine(f"jointface@{tmp_path / 'missing.pt'}")


def test_default_threshold_comes_from_the_weights_card_of_those_weights(tmp_path):
    import shutil

    from jointface.engines.joint_engine import JointEngine

    copy = tmp_path / "w.pt"
    shutil.copy(default_weights_path(), copy)
    assert JointEngine(copy).default_threshold == JointEngine.default_threshold  # no card: the fixed default
    version = JointEngine(copy).version
    card = {"version": version, "default_threshold": 0.8125, "default_threshold_source": "P2 calibration"}
    copy.with_suffix(".json").write_text(json.dumps(card))
    engine = JointEngine(copy)
    assert (engine.default_threshold, engine.threshold_source) == (0.8125, "P2 calibration")
    copy.with_suffix(".json").write_text(json.dumps({**card, "version": "0" * 12}))  # a card of other weights
    assert JointEngine(copy).default_threshold == JointEngine.default_threshold
    copy.with_suffix(".json").write_text("{ not json")
    assert JointEngine(copy).default_threshold == JointEngine.default_threshold
    # thresholds by gallery size: the default follows the number of people, clamped to the calibrated sizes
    table = {"fpir": 0.1, "people": [2, 20, 200], "threshold": [0.5, 0.7, 0.8], "source": "P2 by size"}
    copy.with_suffix(".json").write_text(json.dumps({**card, "thresholds_by_gallery_size": table}))
    engine = JointEngine(copy)
    assert engine.sized_thresholds and engine.default_threshold == 0.8125
    assert engine.default_threshold_for(20) == (0.7, "P2 by size, for 20 people")
    assert engine.default_threshold_for(1)[0] == 0.5 and "below the smallest" in engine.default_threshold_for(1)[1]
    assert engine.default_threshold_for(5000)[0] == 0.8 and "above the largest" in engine.default_threshold_for(5000)[1]
    broken = {**table, "people": [20, 2, 200]}  # a table that does not read: the single default
    copy.with_suffix(".json").write_text(json.dumps({**card, "thresholds_by_gallery_size": broken}))
    assert not JointEngine(copy).sized_thresholds
    assert JointEngine(copy).default_threshold_for(20) == (0.8125, "P2 calibration")


def test_detection_operating_point_comes_from_the_card_of_those_weights(tmp_path):
    import shutil

    from jointface.engines.joint_engine import JointEngine, WeightsError

    copy = tmp_path / "w.pt"
    shutil.copy(default_weights_path(), copy)
    plain = JointEngine(copy)  # no card: the class defaults
    assert (plain.conf_threshold, plain.large_face_threshold, plain.large_face_side) == (
        JointEngine.CONF_THRESHOLD, JointEngine.V2_LARGE_FACE_THRESHOLD, JointEngine.V2_LARGE_FACE_SIDE)
    point = {"conf_threshold": 0.55, "large_face_threshold": 0.25, "large_face_side": 128.0, "source": "a sweep"}
    card = {"version": plain.version, "detection": point}
    copy.with_suffix(".json").write_text(json.dumps(card))
    engine = JointEngine(copy)
    assert (engine.conf_threshold, engine.large_face_threshold, engine.large_face_side) == (0.55, 0.25, 128.0)
    assert engine.describe()["detection_point"] == "a sweep"  # the bench's cache key changes with the point
    assert engine.describe() != plain.describe()
    assert JointEngine(copy, conf_threshold=0.9).conf_threshold == 0.9  # an option still wins
    one = {"version": plain.version, "detection": {**point, "large_face_threshold": None}}
    copy.with_suffix(".json").write_text(json.dumps(one))  # null: one threshold for every face
    assert (JointEngine(copy).large_face_threshold, JointEngine(copy).large_face_side) == (None, None)
    copy.with_suffix(".json").write_text(json.dumps({**card, "version": "0" * 12}))  # other weights' card
    assert JointEngine(copy).conf_threshold == JointEngine.CONF_THRESHOLD
    for bad in ({"conf_threshold": 7}, {"large_face_threshold": "low"}, {"large_face_side": -3}):
        copy.with_suffix(".json").write_text(json.dumps({**card, "detection": {**point, **bad}}))
        with pytest.raises(WeightsError, match="detection"):
            JointEngine(copy)


def test_onnx_graph_is_cached_and_a_damaged_cache_file_is_exported_again(tmp_path):
    from jointface.engines import get_engine
    from jointface.engines.onnx_runtime import OnnxMaps

    model = get_engine("jointface-reference").model
    images = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        expected = model.forward_maps(images)
    first = OnnxMaps(model, "test", threads=1, folder=tmp_path)
    stamp = first.path.stat().st_mtime_ns
    assert OnnxMaps(model, "test", threads=1, folder=tmp_path).path.stat().st_mtime_ns == stamp  # reused
    first.path.write_bytes(b"not an onnx graph")
    again = OnnxMaps(model, "test", threads=1, folder=tmp_path)
    for got, want in zip(again(images), expected):  # any batch and size: the axes are dynamic
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary files left


def test_space_to_depth_kernel_is_the_same_convolution():
    """A 7x7 stride-2 convolution (pads 3) equals the 4x4 stride-1 one (pads 2, 2, 1, 1) of the moved kernel
    over the input rearranged 2x2 pixels into channels, for every output position, borders included."""
    import numpy as np
    import torch.nn.functional as F

    from jointface.engines.onnx_runtime import space_to_depth, space_to_depth_kernel

    torch.manual_seed(0)
    weight, bias = torch.randn(5, 3, 7, 7), torch.randn(5)
    image = torch.randn(2, 3, 38, 26)
    expected = F.conv2d(image, weight, bias, stride=2, padding=3)
    moved = torch.from_numpy(space_to_depth_kernel(weight.numpy()))
    rearranged = torch.from_numpy(space_to_depth(image.numpy()))
    assert rearranged.shape == (2, 12, 19, 13) and moved.shape == (5, 12, 4, 4)
    got = F.conv2d(F.pad(rearranged, (2, 1, 2, 1)), moved, bias)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4)
    # every tap of the old kernel lands exactly once; the new kernel's other taps are zero
    assert np.count_nonzero(space_to_depth_kernel(np.ones((1, 3, 7, 7)))) == 3 * 49


def test_space_to_depth_rewrite_of_an_fp32_graph_and_graphs_it_leaves_alone(tmp_path):
    """An fp32 graph whose input feeds a 7x7 stride-2 convolution runs the same after the rewrite; a graph
    whose input feeds something else too, or whose first convolution is another, is left as it was."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from jointface.engines.onnx_runtime import space_to_depth, space_to_depth_first_conv

    class Stem(torch.nn.Module):
        def __init__(self, kernel: int, stride: int, also_mean: bool = False):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, kernel, stride, kernel // 2)
            self.tail = torch.nn.Conv2d(8, 4, 1)
            self.also_mean = also_mean

        def forward(self, images):
            out = self.tail(torch.relu(self.conv(images)))
            return out + images.mean() if self.also_mean else out

    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 48)

    def exported(module, name):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module.eval(), (images[:1],), str(path), input_names=["images"], output_names=["out"],
                          dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}}, opset_version=17, dynamo=False)
        return onnx.load(str(path))

    stem = Stem(7, 2)
    model = exported(stem, "stem")
    assert space_to_depth_first_conv(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = stem(images).numpy()
    assert np.allclose(session.run(None, {"images": space_to_depth(images)})[0], want, atol=1e-4)
    for other in (Stem(7, 2, also_mean=True), Stem(3, 1)):
        graph = exported(other, "other")
        before = graph.SerializeToString()
        assert not space_to_depth_first_conv(graph) and graph.SerializeToString() == before


def test_int8_model_runs_its_first_convolution_on_the_rearranged_photo_with_the_same_output(lfw_dir):
    """The default engine's int8 model, rewritten at load (``space_to_depth_first_conv``), gives every output
    map bit for bit as the model on disk does, on real photos; an input of odd side runs the model as it is;
    a graph of another shape (the identity head) is left untouched."""
    import numpy as np
    import onnx

    from jointface.engines import get_engine
    from jointface.engines.onnx_runtime import _int8_session, int8_head_path, space_to_depth_first_conv
    from jointface.imageio import load_image

    engine = get_engine("jointface")
    engine = getattr(engine, "inner", engine)
    maps = engine._maps
    assert maps.first_conv_s2d and engine.describe()["first_conv_space_to_depth"]
    plain, rearranged = _int8_session(maps.path, engine.version, threads=1)
    assert not rearranged
    photos = [load_image(path) for path in sorted(lfw_dir.glob("*/*_0001.jpg"))[:6]]
    batch = engine.network_batch(photos)
    for got, want in zip(maps(torch.from_numpy(batch)), plain.run(None, {"images": batch})):
        assert np.array_equal(got.numpy(), want)
    odd = np.random.default_rng(0).random((1, 3, 97, 130), dtype=np.float32)
    for got, want in zip(maps(torch.from_numpy(odd)), plain.run(None, {"images": odd})):
        assert np.array_equal(got.numpy(), want)
    head = onnx.load(str(int8_head_path(maps.path)))
    before = head.SerializeToString()
    assert not space_to_depth_first_conv(head) and head.SerializeToString() == before


def test_classifier_scores_follow_the_heads_that_were_trained():
    import numpy as np

    from jointface.engines.joint_engine import _classifier_from
    weight, bias = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, 0.0])
    # linear head with its input scale; without one (older weights) the scale is 1
    scaled, _ = _classifier_from({"classifier.fc.weight": weight, "classifier.fc.bias": bias,
                                  "classifier.scale": torch.tensor(30.0)})
    assert np.allclose(scaled, [[30.0, 0.0], [0.0, 60.0]])
    unscaled, b = _classifier_from({"classifier.fc.weight": weight, "classifier.fc.bias": bias})
    assert np.allclose(unscaled, weight.numpy()) and np.allclose(b, bias.numpy())
    # margin head: cosine classifier over normalised class centres, no bias
    cosine, none = _classifier_from({"margin.weight": weight})
    assert np.allclose(cosine, [[1.0, 0.0], [0.0, 1.0]]) and none is None
    assert _classifier_from({}) is None


def test_quantize_writes_an_int8_model_that_only_its_weights_use(run_cli, lfw_dir, tmp_path):
    """`jointface quantize` -> NAME.int8.onnx (and NAME.int8-head.onnx) beside the weights; jointface-int8 runs
    them, checked against fp32."""
    import shutil

    import numpy as np

    from jointface.engines import get_engine
    from jointface.engines.joint_engine import WeightsError
    from jointface.imageio import load_image, resize_shorter_side

    weights = tmp_path / "w.pt"
    shutil.copy(default_weights_path(), weights)
    with pytest.raises(WeightsError, match="jointface quantize"):  # none made yet: says how to make one
        get_engine(f"jointface-int8@{weights}")
    people = sorted(p for p in lfw_dir.iterdir() if p.is_dir())[100:140:2]
    result = run_cli("quantize", "--weights", weights, "--count", "16", *people)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "w.int8.onnx").is_file() and "calibrated on 16 photos" in result.stdout
    assert (tmp_path / "w.int8-head.onnx").is_file() and "identity head's int8 model" in result.stdout
    int8, fp32 = get_engine(f"jointface-int8@{weights}"), get_engine(f"jointface-torch@{weights}")
    assert int8.version == fp32.version and int8.describe()["identity_head_runtime"] == "int8"
    images = [resize_shorter_side(load_image(sorted(p.glob("*.jpg"))[0]), 320)
              for p in sorted(p for p in lfw_dir.iterdir() if p.is_dir())[:40:4]]
    for quick, ref in zip(int8.detect_batch(images), fp32.detect_batch(images)):
        assert quick and ref
        assert float(np.dot(quick[0].embedding, ref[0].embedding)) > 0.99
    # made from other weights: refused, not silently used
    other = tmp_path / "other.pt"
    payload = torch.load(weights, weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first] = payload["state_dict"][first] * 1.01
    torch.save(payload, other)
    shutil.copy(tmp_path / "w.int8.onnx", tmp_path / "other.int8.onnx")
    with pytest.raises(WeightsError, match="quantised from weights"):
        get_engine(f"jointface-int8@{other}")
    # the head's model made from other weights: the head runs in torch, and says so
    shutil.copy(weights, tmp_path / "mixed.pt")
    quantize = run_cli("quantize", "--weights", other, "--count", "16", "--out", tmp_path / "o.int8.onnx", *people)
    assert quantize.returncode == 0, quantize.stderr
    shutil.copy(tmp_path / "o.int8-head.onnx", tmp_path / "mixed.int8-head.onnx")
    shutil.copy(tmp_path / "w.int8.onnx", tmp_path / "mixed.int8.onnx")
    with pytest.warns(RuntimeWarning, match="identity head in fp32 torch.*quantised from weights"):
        mixed = get_engine(f"jointface-int8@{tmp_path / 'mixed.pt'}")
    assert mixed.describe()["identity_head_runtime"] == "torch"
    (tmp_path / "other.int8.onnx").write_bytes(b"damaged")
    with pytest.raises(WeightsError, match="not a readable ONNX model"):
        get_engine(f"jointface-int8@{other}")
    unreadable = run_cli("quantize", "--weights", weights, tmp_path / "nothing-here")
    assert unreadable.returncode != 0 and "only 0 readable calibration photos" in unreadable.stderr
    assert "nothing-here" in unreadable.stderr
    refused = run_cli("quantize", "--weights", weights, "--size", "tiny", *people)
    assert refused.returncode != 0 and "--size 'tiny'" in refused.stderr
