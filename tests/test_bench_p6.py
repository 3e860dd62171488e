"""P6 (detection beyond LFW's scale): matching, canvas placement, the imglab reader, and small real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jointface.bench import p6
from jointface.bench.p6 import (CANVAS_FILL, greedy_match, markdown_p6, place_on_canvas, read_imglab_xml,
                                run_p6a, run_p6b, run_p6c, search_detections)
from jointface.bench.run import BenchContext
from jointface.engines import Engine, Face

# -- greedy matching (boxes x1, y1, x2, y2, x2/y2 exclusive) ------------------------------------------


def test_iou_threshold_is_inclusive_and_differs_between_p6a_and_p6b():
    truth = [(0, 0, 10, 10)]
    at_040 = [(0, 0, 10, 4)]  # inside the box: 40 / 100 = 0.40
    assert greedy_match(truth, at_040, 0.4).detection_of_box == (0,)
    assert greedy_match(truth, at_040, 0.5).detection_of_box == (None,)
    # shifted by half a width: 50 / 150 = 0.333, found at neither threshold, and a false detection
    shifted = greedy_match(truth, [(5, 0, 15, 10)], 0.4)
    assert shifted.found == 0 and shifted.false_detections == 1


def test_each_detection_is_used_once_boxes_in_file_order():
    a, b = (0, 0, 10, 10), (2, 0, 12, 10)
    between = (1, 0, 11, 10)  # IoU 90 / 110 with both boxes: the first box in file order takes it
    matching = greedy_match([a, b], [between], 0.4)
    assert matching.detection_of_box == (0, None) and matching.false_detections == 0
    matching = greedy_match([b, a], [between], 0.4)
    assert matching.detection_of_box == (0, None)
    # Two detections, listed [exact b, exact a]: each box takes the unused one it overlaps most.
    matching = greedy_match([a, b], [b, a], 0.4)
    assert matching.detection_of_box == (1, 0) and matching.found == 2 and matching.false_detections == 0


def test_greedy_is_not_an_optimal_assignment():
    # A overlaps D1 by 80/120 = 0.667 and D2 by 70/130 = 0.538; B overlaps only D1 (60/140 = 0.429).
    a, b = (0, 0, 10, 10), (6, 0, 16, 10)
    d1, d2 = (2, 0, 12, 10), (-3, 0, 7, 10)
    matching = greedy_match([a, b], [d1, d2], 0.4)
    assert matching.detection_of_box == (0, None)  # A took D1 first; B finds nothing left
    assert matching.found == 1 and matching.false_detections == 1  # D2 matched no box
    # In the other file order B takes D1 and A falls back to D2.
    assert greedy_match([b, a], [d1, d2], 0.4).detection_of_box == (0, 1)


def test_false_detections_count_every_detection_no_box_took():
    truth = [(100, 100, 140, 140)]
    detections = [(0, 0, 20, 20), (101, 99, 141, 139), (300, 300, 330, 330)]
    matching = greedy_match(truth, detections, 0.5)
    assert matching.detection_of_box == (1,) and matching.false_detections == 2
    assert greedy_match([], detections, 0.4).false_detections == 3
    empty = greedy_match(truth, [], 0.4)
    assert empty.found == 0 and empty.false_detections == 0 and empty.detection_of_box == (None,)


def test_equal_overlap_goes_to_the_earlier_higher_scoring_detection():
    truth = [(10, 0, 20, 10)]
    left, right = (8, 0, 18, 10), (12, 0, 22, 10)  # both 80 / 120
    assert greedy_match(truth, [right, left], 0.4).detection_of_box == (0,)
    assert greedy_match(truth, [left, right], 0.4).detection_of_box == (0,)


# -- canvas placement -----------------------------------------------------------------------------------


def test_canvas_scales_centres_and_moves_the_expected_box():
    photo = np.empty((100, 200, 3), np.uint8)
    photo[:] = (1, 2, 3)
    # box 40 px wide -> S = 80: factor 2, photo 400x200; box centre (70, 40) -> (140, 80) -> offset (180, 240)
    canvas, expected = place_on_canvas(photo, (50, 20, 90, 60), 80)
    assert canvas.shape == (640, 640, 3) and canvas.dtype == np.uint8
    assert expected == (280.0, 280.0, 360.0, 360.0)  # centred: (280 + 360) / 2 = 320
    assert (canvas[240:440, 180:580] == (1, 2, 3)).all()
    for y, x in ((239, 300), (440, 300), (300, 179), (300, 580), (0, 0), (639, 639)):
        assert tuple(canvas[y, x]) == CANVAS_FILL


def test_canvas_content_is_the_bilinear_resize_at_the_offset():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    canvas, expected = place_on_canvas(photo, (20, 10, 50, 40), 48)  # factor 1.6: 128x96
    scaled = np.asarray(Image.fromarray(photo).resize((128, 96), Image.Resampling.BILINEAR))
    # box centre (35, 25) * 1.6 = (56, 40): offset (264, 280)
    assert np.array_equal(canvas[280:376, 264:392], scaled)
    assert expected == pytest.approx((296.0, 296.0, 344.0, 344.0))


def test_canvas_crops_a_large_photo_and_clips_the_expected_box():
    photo = np.empty((40, 40, 3), np.uint8)
    photo[:] = (9, 9, 9)
    # box 10 wide, 40 tall -> S = 400: factor 40, photo 1600x1600; centre (5, 20) -> (200, 800): offset (120, -480)
    canvas, expected = place_on_canvas(photo, (0, 0, 10, 40), 400)
    assert expected == (120.0, 0.0, 520.0, 640.0)  # (120, -480, 520, 1120) clipped to the canvas
    assert (canvas[:, 120:] == 9).all() and (canvas[:, :120] == CANVAS_FILL).all()


def test_canvas_rejects_a_box_without_width():
    with pytest.raises(ValueError):
        place_on_canvas(np.zeros((10, 10, 3), np.uint8), (5, 0, 5, 10), 24)


# -- the imglab XML reader and P6c folders ----------------------------------------------------------------


def test_imglab_reader_on_the_real_files(shared_data):
    training = read_imglab_xml(shared_data / "dlib_faces" / "training.xml")
    testing = read_imglab_xml(shared_data / "dlib_faces" / "testing.xml")
    assert [image.path.name for image in training] == ["2007_007763.jpg", "2008_002079.jpg", "2008_001009.jpg",
                                                       "2008_001322.jpg"]
    assert len(testing) == 5
    first = training[0]
    # <box top='90' left='194' width='37' height='37'/>, the first of seven
    assert len(first.boxes) == 7 and first.boxes[0] == (194.0, 90.0, 231.0, 127.0)
    assert first.boxes[-1] == (309.0, 233.0, 354.0, 277.0)  # top 233 left 309 width 45 height 44
    images = p6.p6a_images(shared_data)
    assert len(images) == 9 and sum(len(image.boxes) for image in images) == 43
    assert not any(image.ignored for image in images)
    assert all(image.path.is_file() for image in images)


def test_imglab_reader_keeps_ignored_boxes_apart(tmp_path):
    xml = tmp_path / "faces.xml"
    xml.write_text("<?xml version='1.0'?><dataset><images><image file='sub/a.jpg'>"
                   "<box top='1' left='2' width='3' height='4'/><box top='5' left='6' width='7' height='8' "
                   "ignore='1'/></image></images></dataset>")
    (image,) = read_imglab_xml(xml)
    assert image.path == tmp_path / "sub" / "a.jpg"
    assert image.boxes == ((2.0, 1.0, 5.0, 5.0),) and image.ignored == ((6.0, 5.0, 13.0, 13.0),)


def test_p6c_photo_lists(shared_data):
    photos = p6.p6c_photos(shared_data)
    assert len(photos["knn_examples"]) == 14 and len(photos["caltech_faces_1999_half"]) == 169
    assert any(path.suffix == ".jpeg" for path in photos["knn_examples"])  # kit_harington's photos


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JOINTFACE_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        p6.p6a_images()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        p6.p6c_photos()


# -- detections as `search` reports them, and P6c's sums, with a fake engine -------------------------------


class FixedBoxes(Engine):
    """Returns the same boxes (in input pixels) for every image and remembers the image sizes it saw."""

    name, dim = "fixed", 2

    def __init__(self, boxes, max_useful_side=None):
        self.boxes, self.max_useful_side, self.seen = boxes, max_useful_side, []

    @property
    def version(self) -> str:
        return "1"

    def detect(self, image):
        self.seen.append(image.shape[:2])
        return [Face(box=box, score=1.0, embedding=np.zeros(2, np.float32), engine="fixed", engine_version="1")
                for box in self.boxes]


def _photo(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 80, 70)).save(path)
    return path


def test_search_detections_decode_as_search_does(tmp_path):
    photo = _photo(tmp_path / "big.png", 400, 200)
    reduced = FixedBoxes([(10, 10, 20, 20)], max_useful_side=100)
    assert search_detections(reduced, photo) == [(40.0, 40.0, 80.0, 80.0)]  # found at 100x50, scaled back
    assert reduced.seen == [(50, 100)]
    full = FixedBoxes([(10, 10, 20, 20)])
    assert search_detections(full, photo) == [(10.0, 10.0, 20.0, 20.0)] and full.seen == [(200, 400)]


def test_p6c_sums_reference_faces_found_and_extra_detections(tmp_path):
    photos = {"knn_examples": [_photo(tmp_path / "knn_examples" / "test" / "a.jpg", 64, 64),
                               _photo(tmp_path / "knn_examples" / "train" / "x" / "b.jpg", 64, 64)]}
    references = {"knn_examples": [[(0, 0, 10, 10), (30, 30, 40, 40)], []]}
    engine = FixedBoxes([(0, 0, 10, 10), (50, 50, 60, 60)])
    ctx = BenchContext(lfw_root=tmp_path, cache_dir=tmp_path / "cache")
    rows = run_p6c(engine, photos, references, ctx)
    knn = rows["knn_examples"]
    # photo a: 1 of 2 reference faces found, 1 extra; photo b: no reference face, both detections extra
    assert knn["per_photo"] == {"test/a.jpg": [2, 1, 1], "train/x/b.jpg": [0, 0, 2]}
    assert knn["share_found"] == 0.5 and knn["extra_detections"] == 3 and knn["extra_per_photo"] == 1.5
    assert rows["all"] == {"photos": 2, "reference_faces": 2, "found": 1, "share_found": 0.5,
                           "extra_detections": 3, "extra_per_photo": 1.5}


# -- small real runs --------------------------------------------------------------------------------------


@pytest.fixture
def ctx(lfw_dir, tmp_path) -> BenchContext:
    return BenchContext(lfw_root=lfw_dir, cache_dir=tmp_path / "cache")


def test_p6a_on_dlib_two_photos(shared_data, dlib_engine, ctx):
    images = p6.p6a_images(shared_data)[:2]  # 2007_007763 (7 boxes) and 2008_002079 (6 boxes)
    result = run_p6a(dlib_engine, images, ctx)
    # PROTOCOLS.md: HOG finds every box of these photos (its own demo photos), without false detections.
    assert result["boxes"] == 13 and result["photos"] == 2
    assert result["found"] == 13 and result["recall"] == 1.0
    assert result["false_detections"] == 0 and result["false_per_photo"] == 0.0
    assert result["per_photo"]["2008_002079.jpg"] == {"boxes": 6, "found": 6, "false_detections": 0}


def test_p6b_on_dlib_three_faces_at_one_scale(dlib_engine, ctx, monkeypatch):
    monkeypatch.setattr(p6, "P6B_PEOPLE", 3)
    faces, without_box = p6.p6b_faces(ctx)
    assert [path.name for path, _ in faces] == ["Aaron_Peirsol_0001.jpg", "Aaron_Sorkin_0001.jpg",
                                                 "Abdel_Nasser_Assidi_0001.jpg"]
    assert without_box == 0
    rows = run_p6b(dlib_engine, faces, ctx, face_widths=(96,))
    assert list(rows) == ["96"]
    row = rows["96"]
    assert row["faces"] == 3 and row["found"] == 3 and row["recall"] == 1.0  # dlib's reference: 0.950 at 96 px
    assert row["false_per_image"] == row["false_detections"] / 3
    # The reference boxes went to the cache: a second call computes nothing new and gives the same boxes.
    assert p6.p6b_faces(ctx)[0] == faces


def test_markdown_and_plot_from_a_result(tmp_path):
    sweep = {str(s): {"recall": r, "false_per_image": f} for s, r, f in
             ((24, 0.015, 0.17), (48, 0.975, 0.1), (96, 0.95, 0.16), (192, 0.975, 0.15), (384, 0.99, 0.01))}
    row = {"p6a": {"recall": 1.0, "false_per_photo": 0.0}, "p6b": sweep,
           "p6c": {"all": {"share_found": 0.8, "extra_per_photo": 0.25},
                   "knn_examples": {"share_found": 0.75, "extra_per_photo": 0.5},
                   "caltech_faces_1999_half": {"share_found": 0.8125, "extra_per_photo": 0.125}}}
    config = {"p6a": {"boxes": 43, "photos": 9, "min_iou": 0.4},
              "p6b": {"face_widths": [24, 48, 96, 192, 384], "faces": 200, "canvas": 640, "min_iou": 0.5,
                      "no_reference_box": 0},
              "p6c": {"photos": {"knn_examples": 14, "caltech_faces_1999_half": 169},
                      "reference_faces": {"knn_examples": 16, "caltech_faces_1999_half": 170}, "min_iou": 0.4}}
    text = markdown_p6({"protocol": "P6", "figures": {"dlib": row}, "config": config})
    assert text.startswith("## P6")
    assert "| dlib | 1.000 | 0.00 | 0.800 | 0.25 |" in text
    assert "| dlib | 0.015 (0.17) | 0.975 (0.10) | 0.950 (0.16) | 0.975 (0.15) | 0.990 (0.01) |" in text
    assert "183 everyday photos" in text and "186 faces" in text
    assert "| dlib | 0.750 | 0.50 | 0.812 | 0.12 |" in text and "caltech_faces_1999_half 169 photos, 170 CNN" in text
    png = p6.plot_recall_by_face_width({"dlib": sweep}, tmp_path / "p6_scale.png")
    assert png.stat().st_size > 5000
    json.dumps(row)  # results are plain JSON


def test_bench_p6_cli_on_a_small_data_folder(run_cli, shared_data, tmp_path):
    """`jointface bench p6` end to end: LFW and dlib_faces as they are, one small photo per P6c folder."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("lfw", "dlib_faces"):
        (data / name).symlink_to(shared_data / name)
    small = {"knn_examples": "train/kit_harington/john2.jpeg", "caltech_faces_1999_half": "image_0001.jpg"}
    for folder, photo in small.items():
        (data / folder / photo).parent.mkdir(parents=True)
        (data / folder / photo).symlink_to(shared_data / folder / photo)
    out = tmp_path / "results"
    result = run_cli("bench", "p6", "--engine", "dlib", "--limit", "1", "--out", out, "--cache", tmp_path / "cache",
                     env={"JOINTFACE_SHARED_DATA": str(data)})
    assert result.returncode == 0, result.stderr
    data_json = json.loads((out / "p6.json").read_text())
    assert data_json["protocol"] == "P6" and data_json["config"]["subset"] == 1
    assert data_json["config"]["p6c"]["photos"] == {"knn_examples": 1, "caltech_faces_1999_half": 1}
    figures = data_json["figures"]["dlib"]
    assert figures["p6a"]["photos"] == 1 and figures["p6a"]["boxes"] == 7  # 2007_007763.jpg
    assert set(figures["p6b"]) == {"24", "48", "96", "192", "384"}
    assert all(row["faces"] == 1 for row in figures["p6b"].values())
    assert figures["p6c"]["all"]["photos"] == 2 and figures["p6c"]["all"]["reference_faces"] >= 2
    assert (out / "p6_scale.png").stat().st_size > 5000
    assert (out / "p6.md").read_text().startswith("## P6") and "Subset run: 1" in (out / "p6.md").read_text()


def _sweep_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "detection_threshold" / "sweep.py"
    spec = importlib.util.spec_from_file_location("detection_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detection_sweep_chooses_within_the_false_budget_with_a_step_of_margin(tmp_path):
    """The sweep's rule on detections made up to know its answer, and the card section the engine reads."""
    from jointface.bench.p6 import P6B_FACE_WIDTHS
    from jointface.bench.report import _detection_point

    sweep = _sweep_module()
    face = [10.0, 10.0, 60.0, 60.0]
    # P6a: its face at 0.65 and a false small face at 0.50; knn_examples: a false face at 0.45 (none expected)
    items = {"p6a": [{"expected": [face], "detections": [face + [0.65, 50.0], [100, 100, 120, 120, 0.5, 20.0]]}],
             "p6c_knn_examples": [{"expected": [], "detections": [[0, 0, 20, 20, 0.45, 20.0]]}],
             "p1": [{"expected": [], "detections": [face + [0.9, 50.0]]}]}
    scores = {24: (0.62, 14.0), 384: (0.30, 200.0)}  # a small face at 0.62, a close-up at 0.30
    for width in P6B_FACE_WIDTHS:
        score, side = scores.get(width, (0.9, 50.0))
        items[f"p6b_{width}"] = [{"expected": [face], "detections": [face + [score, side]]}]
    chosen = sweep.choose(items, floor=0.2)
    # every face from 0.50 or lower counts the false ones; 0.55 has no step of margin; from 0.65 the 24 px face
    # is lost; the close-up needs a band from 0.30 (0.25 also works: ties go to the higher threshold)
    assert (chosen["conf_threshold"], chosen["large_face_threshold"]) == (0.6, 0.3)
    assert chosen["mean_recall"] == 1.0 and chosen["figures"]["p6a"]["false_per_photo"] == 0.0
    weights = tmp_path / "w.pt"
    card = weights.with_suffix(".json")
    card.write_text(json.dumps({"version": "abc", "default_threshold": 0.8}))
    sweep.write_card(weights, "abc", chosen, "test sweep")
    written = json.loads(card.read_text())
    assert written["default_threshold"] == 0.8  # the card's other sections are kept
    assert written["detection"] == {"conf_threshold": 0.6, "large_face_threshold": 0.3,
                                    "large_face_side": chosen["large_face_side"], "source": "test sweep"}
    assert _detection_point(card, "abc") == written["detection"]  # bench report keeps it
    assert _detection_point(card, "other") is None
    sweep.write_card(weights, "def", chosen, "again")  # a card of other weights is replaced
    assert set(json.loads(card.read_text())) == {"weights", "version", "detection"}
