"""P6 (``PROTOCOLS.md``): face detection beyond LFW's single scale.

* **P6a**, human boxes: every ``<image>`` of ``dlib_faces/training.xml`` and
  ``testing.xml`` (dlib imglab XML). A box is found when an unused detection
  overlaps it at IoU >= 0.4; recall and false detections per photo.
* **P6b**, scale sweep: the first image of each of the first 200 P2 enrolled
  people, scaled so its landmark box is S px wide and pasted on a 640x640
  canvas with the face centre at the canvas centre; recall at IoU >= 0.5 and
  false detections per image, for S in 24 ... 384.
* **P6c**, everyday photos (``knn_examples``, ``caltech_faces_1999_half``)
  against dlib's CNN (mmod) detector at upsample 1: share of its faces found
  (IoU >= 0.4) and detections it does not have, per photo.

Matching (:func:`greedy_match`): the expected boxes are taken one by one in
their given order; each takes, among the detections no earlier box took, the
one it overlaps most, if that overlap reaches the IoU threshold (ties: the
higher-scoring detection, i.e. the earlier one in the engine's list). A
detection no box took is a false detection.

A detection is the engine's output at its own default settings, exactly as
``search`` reports it: photos are decoded the way ``search`` decodes them
(:func:`search_detections`); the P6b canvases are arrays handed to the engine.

Boxes are ``(x1, y1, x2, y2)`` pixels, x2/y2 exclusive (as in
:class:`jointface.engines.base.Face`).
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from jointface.engines import Engine
from jointface.imageio import IMAGE_SUFFIXES, load_image, load_image_reduced

from . import plots
from .cache import ResultCache, image_key
from .common import reference_boxes, subset
from .metrics import box_iou_np
from .protocols import p2_split, require_shared_data

if TYPE_CHECKING:
    from .common import BenchContext

Box = tuple[float, float, float, float]

#: P6a and P6c count a box as found at this IoU (human boxes run from brow to chin, looser than landmark boxes).
P6A_MIN_IOU = 0.4
P6C_MIN_IOU = 0.4
#: P6b compares with landmark boxes, scaled: the stricter threshold.
P6B_MIN_IOU = 0.5
#: P6b face widths (landmark box width after scaling), pixels.
P6B_FACE_WIDTHS = (24, 48, 96, 192, 384)
#: P6b takes the first image of this many P2 enrolled people (sorted by name).
P6B_PEOPLE = 200
CANVAS_SIZE = 640
CANVAS_FILL = (124, 116, 104)
#: dlib's CNN (mmod) detector at this upsampling is P6c's reference.
P6C_REFERENCE_UPSAMPLE = 1
P6A_FILES = ("training.xml", "testing.xml")
P6C_FOLDERS = ("knn_examples", "caltech_faces_1999_half")


# -- matching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """Which detection each expected box took (``None``: not found), and the detections nobody took."""

    detection_of_box: tuple[int | None, ...]
    false_detections: int

    @property
    def found(self) -> int:
        return sum(index is not None for index in self.detection_of_box)


def greedy_match(expected: Sequence[Box], detections: Sequence[Box], min_iou: float) -> Matching:
    """Match expected boxes (in their order) to detections (in the engine's order, best score first).

    Each expected box takes the unused detection with the highest IoU, when
    that IoU is at least ``min_iou``; on equal IoU the earlier detection wins.
    """
    iou = box_iou_np(np.asarray(expected, dtype=np.float64).reshape(-1, 4),
                     np.asarray(detections, dtype=np.float64).reshape(-1, 4))
    used: set[int] = set()
    taken: list[int | None] = []
    for row in iou:
        best, best_iou = None, -1.0
        for index, overlap in enumerate(row):
            if index not in used and overlap >= min_iou and overlap > best_iou:
                best, best_iou = index, float(overlap)
        if best is not None:
            used.add(best)
        taken.append(best)
    return Matching(detection_of_box=tuple(taken), false_detections=len(detections) - len(used))


# -- P6a: dlib's imglab XML ----------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatedImage:
    """One ``<image>`` of an imglab XML file: its path and its boxes (file order)."""

    path: Path
    boxes: tuple[Box, ...]
    ignored: tuple[Box, ...]


def read_imglab_xml(path: str | Path) -> list[AnnotatedImage]:
    """Every ``<image>`` of a dlib imglab XML file, boxes in file order.

    A ``<box top= left= width= height=>`` covers pixels ``left .. left + width - 1``
    (dlib's inclusive rectangle), so it becomes ``(left, top, left + width,
    top + height)`` here. Boxes with ``ignore='1'`` are kept apart. Image paths
    are relative to the XML file's folder.
    """
    path = Path(path)
    root = ElementTree.parse(path).getroot()
    images = []
    for element in root.iter("image"):
        boxes, ignored = [], []
        for box in element.iter("box"):
            left, top = float(box.get("left")), float(box.get("top"))
            width, height = float(box.get("width")), float(box.get("height"))
            target = ignored if box.get("ignore", "0") not in ("0", "") else boxes
            target.append((left, top, left + width, top + height))
        images.append(AnnotatedImage(path=path.parent / element.get("file"), boxes=tuple(boxes),
                                     ignored=tuple(ignored)))
    return images


def p6a_images(shared: Path | None = None) -> list[AnnotatedImage]:
    folder = shared / "dlib_faces" if shared is not None else require_shared_data("dlib_faces")
    return [image for name in P6A_FILES for image in read_imglab_xml(folder / name)]


# -- P6b: the scale sweep canvas ----------------------------------------------------------


def place_on_canvas(image: np.ndarray, box: Box, face_width: float, *, canvas_size: int = CANVAS_SIZE,
                    fill: tuple[int, int, int] = CANVAS_FILL) -> tuple[np.ndarray, Box]:
    """The photo scaled so ``box`` is ``face_width`` px wide, pasted with the box centre at the canvas centre.

    Scaling is bilinear (Pillow) to ``round(width * f) x round(height * f)``
    with ``f = face_width / box width``; the box is scaled by the same
    per-axis factors the resize used and shifted by the paste offset (the
    integer offset nearest to centring). What falls outside the canvas is
    cropped; the expected box is clipped to the canvas likewise.
    Returns ``(canvas, expected_box)``.
    """
    x1, y1, x2, y2 = box
    if x2 <= x1:
        raise ValueError(f"box {box} has no width")
    factor = face_width / (x2 - x1)
    height, width = image.shape[:2]
    new_width, new_height = max(1, round(width * factor)), max(1, round(height * factor))
    scaled = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR))
    scale_x, scale_y = new_width / width, new_height / height
    left = round(canvas_size / 2 - (x1 + x2) / 2 * scale_x)
    top = round(canvas_size / 2 - (y1 + y2) / 2 * scale_y)
    canvas = np.empty((canvas_size, canvas_size, 3), dtype=np.uint8)
    canvas[:] = fill
    # the part of the scaled photo that lands on the canvas
    src_x, src_y = max(0, -left), max(0, -top)
    dst_x, dst_y = max(0, left), max(0, top)
    copy_w = min(new_width - src_x, canvas_size - dst_x)
    copy_h = min(new_height - src_y, canvas_size - dst_y)
    if copy_w > 0 and copy_h > 0:
        canvas[dst_y:dst_y + copy_h, dst_x:dst_x + copy_w] = scaled[src_y:src_y + copy_h, src_x:src_x + copy_w]
    expected = (x1 * scale_x + left, y1 * scale_y + top, x2 * scale_x + left, y2 * scale_y + top)
    expected = tuple(float(min(max(v, 0.0), canvas_size)) for v in expected)
    return canvas, expected  # type: ignore[return-value]


# -- detections as `search` reports them ---------------------------------------------------


def search_detections(engine: Engine, path: Path) -> list[Box]:
    """The boxes ``search`` reports for one photo, best score first.

    As in :func:`jointface.service.search`: a photo larger than the engine's
    ``max_useful_side`` is decoded at that size and the boxes scaled back.
    """
    max_side = getattr(engine, "inner", engine).max_useful_side
    if max_side:
        image, (full_width, _) = load_image_reduced(path, max_side)
    else:
        image = load_image(path)
        full_width = image.shape[1]
    scale = full_width / image.shape[1]
    return [tuple(float(v) * scale for v in face.box) for face in engine.detect(image)]


def p6c_photos(shared: Path | None = None) -> dict[str, list[Path]]:
    """P6c's photos per folder: ``knn_examples`` (train/*/ and test/, 14) and ``caltech_faces_1999_half`` (169)."""
    photos = {}
    for name in P6C_FOLDERS:
        folder = shared / name if shared is not None else require_shared_data(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"P6c photo folder not found: {folder}")
        photos[name] = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                              key=lambda p: p.relative_to(folder).as_posix())
    return photos


def _cnn_fingerprint() -> str:
    from jointface.engines.dlib_engine import model_path

    return hashlib.sha256(model_path("cnn_detector").read_bytes()).hexdigest()[:12]


def cnn_reference_boxes(paths: Sequence[Path], ctx: "BenchContext") -> list[list[Box]]:
    """dlib's CNN (mmod) detections at upsample 1 on each full photo (P6c's reference), cached."""
    from jointface.engines.dlib_engine import _rect_to_box, detect_rects

    salt = f"cnn-mmod-upsample-{P6C_REFERENCE_UPSAMPLE}"
    cache = ResultCache(ctx.cache_dir / f"reference-cnn-{_cnn_fingerprint()}.sqlite", commit_every=5)
    found = []
    try:
        for count, path in enumerate(paths, 1):
            image = load_image(path)
            key = image_key(image, salt)
            cached = cache.get(key)
            if cached is None:
                height, width = image.shape[:2]
                boxes = [_rect_to_box(rect, width, height)
                         for rect, _ in detect_rects(image, "cnn", P6C_REFERENCE_UPSAMPLE)]
                cache.put(key, [list(box) for box in boxes], None)
            else:
                boxes = [tuple(box) for box in cached[0]]
            found.append([tuple(float(v) for v in box) for box in boxes])
            ctx.progress("P6c reference (dlib CNN)", count, len(paths))
    finally:
        cache.close()
    return found


# -- the protocol --------------------------------------------------------------------------


def run_p6a(engine: Engine, images: Sequence[AnnotatedImage], ctx: "BenchContext") -> dict:
    per_photo = {}
    boxes = found = false = 0
    for count, annotated in enumerate(images, 1):
        detections = search_detections(engine, annotated.path)
        matching = greedy_match(annotated.boxes, detections, P6A_MIN_IOU)
        extra = matching.false_detections
        if annotated.ignored:  # detections on boxes marked ignore are neither found nor false
            leftover = [box for index, box in enumerate(detections) if index not in matching.detection_of_box]
            extra -= greedy_match(annotated.ignored, leftover, P6A_MIN_IOU).found
        per_photo[annotated.path.name] = {"boxes": len(annotated.boxes), "found": matching.found,
                                          "false_detections": extra}
        boxes, found, false = boxes + len(annotated.boxes), found + matching.found, false + extra
        ctx.progress(f"P6a {engine.name}", count, len(images))
    return {"recall": found / boxes if boxes else float("nan"), "boxes": boxes, "found": found,
            "photos": len(images), "false_detections": false,
            "false_per_photo": false / len(images) if images else float("nan"), "per_photo": per_photo}


def run_p6b(engine: Engine, faces: Sequence[tuple[Path, Box]], ctx: "BenchContext",
            face_widths: Sequence[int] = P6B_FACE_WIDTHS) -> dict:
    by_width: dict[str, dict] = {}
    images = {}
    for width in face_widths:
        found = false = 0
        for count, (path, box) in enumerate(faces, 1):
            if path not in images:
                images[path] = load_image(path)
            canvas, expected = place_on_canvas(images[path], box, width)
            matching = greedy_match([expected], [face.box for face in engine.detect(canvas)], P6B_MIN_IOU)
            found += matching.found
            false += matching.false_detections
            ctx.progress(f"P6b {engine.name} S={width}", count, len(faces))
        by_width[str(width)] = {"recall": found / len(faces) if faces else float("nan"), "found": found,
                                "faces": len(faces), "false_detections": false,
                                "false_per_image": false / len(faces) if faces else float("nan")}
    return by_width


def run_p6c(engine: Engine, photos: dict[str, list[Path]], references: dict[str, list[list[Box]]],
            ctx: "BenchContext") -> dict:
    rows: dict[str, dict] = {}
    totals = {"photos": 0, "reference_faces": 0, "found": 0, "extra_detections": 0}
    for folder, paths in photos.items():
        per_photo = {}
        reference_faces = found = extra = 0
        for count, (path, reference) in enumerate(zip(paths, references[folder]), 1):
            matching = greedy_match(reference, search_detections(engine, path), P6C_MIN_IOU)
            per_photo[path.relative_to(_root_of(path, folder)).as_posix()] = [
                len(reference), matching.found, matching.false_detections]
            reference_faces, found, extra = (reference_faces + len(reference), found + matching.found,
                                             extra + matching.false_detections)
            ctx.progress(f"P6c {engine.name} {folder}", count, len(paths))
        rows[folder] = _p6c_row(len(paths), reference_faces, found, extra)
        rows[folder]["per_photo"] = per_photo  # [reference faces, found, extra detections]
        for key, value in (("photos", len(paths)), ("reference_faces", reference_faces), ("found", found),
                           ("extra_detections", extra)):
            totals[key] += value
    rows["all"] = _p6c_row(totals["photos"], totals["reference_faces"], totals["found"], totals["extra_detections"])
    return rows


def _root_of(path: Path, folder: str) -> Path:
    """The P6c folder (``.../<folder>``) a photo lies in."""
    for parent in path.parents:
        if parent.name == folder:
            return parent
    raise ValueError(f"{path} is not inside a {folder!r} folder")


def _p6c_row(photos: int, reference_faces: int, found: int, extra: int) -> dict:
    return {"photos": photos, "reference_faces": reference_faces, "found": found,
            "share_found": found / reference_faces if reference_faces else float("nan"),
            "extra_detections": extra, "extra_per_photo": extra / photos if photos else float("nan")}


def p6b_faces(ctx: "BenchContext") -> tuple[list[tuple[Path, Box]], int]:
    """P6b's faces: (path, landmark box) of the first image of the first 200 P2 people; and how many had no box."""
    gallery = p2_split(ctx.lfw_root).gallery[:P6B_PEOPLE]  # one image per person, people sorted by name
    paths = [image.path for image in subset(gallery, ctx.limit)]
    boxes = reference_boxes(paths, ctx, load_image, stage="P6b reference boxes")
    faces = [(path, box) for path, box in zip(paths, boxes) if box is not None]
    return faces, len(paths) - len(faces)


def run_p6(engines: Sequence[Engine], ctx: "BenchContext", out_dir: Path | None = None) -> dict:
    """P6a, P6b and P6c for every engine (detections through ``engines``, which may be caching wrappers)."""
    shared = require_shared_data()
    annotated = subset(p6a_images(shared), ctx.limit)
    faces, without_box = p6b_faces(ctx)
    photos = {folder: subset(paths, ctx.limit) for folder, paths in p6c_photos(shared).items()}
    references = {folder: cnn_reference_boxes(paths, ctx) for folder, paths in photos.items()}
    figures = {}
    for engine in engines:
        figures[engine.name] = {"p6a": run_p6a(engine, annotated, ctx), "p6b": run_p6b(engine, faces, ctx),
                                "p6c": run_p6c(engine, photos, references, ctx)}
    result = {"protocol": "P6", "figures": figures,
              "config": {"p6a": {"files": list(P6A_FILES), "photos": len(annotated),
                                 "boxes": sum(len(a.boxes) for a in annotated),
                                 "ignored_boxes": sum(len(a.ignored) for a in annotated), "min_iou": P6A_MIN_IOU},
                         "p6b": {"people": len(faces) + without_box, "faces": len(faces),
                                 "no_reference_box": without_box, "face_widths": list(P6B_FACE_WIDTHS),
                                 "canvas": CANVAS_SIZE, "fill": list(CANVAS_FILL), "min_iou": P6B_MIN_IOU,
                                 "resampling": "bilinear (Pillow)"},
                         "p6c": {"photos": {folder: len(paths) for folder, paths in photos.items()},
                                 "reference": f"dlib CNN (mmod), upsample {P6C_REFERENCE_UPSAMPLE}",
                                 "reference_faces": {folder: sum(map(len, boxes))
                                                     for folder, boxes in references.items()},
                                 "min_iou": P6C_MIN_IOU},
                         "subset": ctx.limit}}
    if out_dir is not None:
        result["plots"] = {"recall_by_face_width": str(plot_recall_by_face_width(
            {name: row["p6b"] for name, row in figures.items()}, out_dir / "p6_scale.png"))}
    return result


# -- output --------------------------------------------------------------------------------


def plot_recall_by_face_width(by_engine: dict[str, dict], path: Path) -> Path:
    """P6b: recall (IoU >= 0.5) against face width, one line per engine, log2 x axis."""
    figure = plots._new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for name, rows in by_engine.items():
        widths = sorted(int(width) for width in rows)
        axes.plot(widths, [rows[str(width)]["recall"] for width in widths], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xticks(P6B_FACE_WIDTHS, [str(width) for width in P6B_FACE_WIDTHS])
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("face width S (landmark box, px) on a 640x640 canvas")
    axes.set_ylabel(f"recall (IoU >= {P6B_MIN_IOU})")
    axes.set_title("P6b detection recall against face size (LFW, P2 people)")
    axes.grid(True, which="both", linewidth=0.3, alpha=0.6)
    if by_engine:
        axes.legend(loc="lower right", fontsize="small")
    return plots._save(figure, path)


def markdown_p6(result: dict) -> str:
    figures, config = result["figures"], result["config"]
    summary = {}
    for name, row in figures.items():
        p6a, p6c = row["p6a"], row["p6c"]["all"]
        summary[name] = {"P6a recall": p6a["recall"], "P6a false / photo": p6a["false_per_photo"],
                         "P6c share of CNN faces found": p6c["share_found"],
                         "P6c extra detections / photo": p6c["extra_per_photo"]}
    text = ("## P6\n\nDetection beyond LFW's scale. P6a: the "
            f"{config['p6a']['boxes']} human boxes of {config['p6a']['photos']} `dlib_faces` photos (IoU >= "
            f"{config['p6a']['min_iou']}). P6c: {sum(config['p6c']['photos'].values())} everyday photos "
            f"against dlib's CNN detector ({sum(config['p6c']['reference_faces'].values())} faces, IoU >= "
            f"{config['p6c']['min_iou']}).\n\n"
            + plots.markdown_table(summary, row_header="engine",
                                   formats={"P6a recall": "{:.3f}", "P6a false / photo": "{:.2f}",
                                            "P6c share of CNN faces found": "{:.3f}",
                                            "P6c extra detections / photo": "{:.2f}"}))
    widths = config["p6b"]["face_widths"]
    sweep = {name: {f"S = {width}": f"{row['p6b'][str(width)]['recall']:.3f} "
                                    f"({row['p6b'][str(width)]['false_per_image']:.2f})" for width in widths}
             for name, row in figures.items()}
    text += (f"\nP6b: recall at IoU >= {config['p6b']['min_iou']} (false detections per image) of "
             f"{config['p6b']['faces']} LFW faces scaled to a landmark-box width of S px on a "
             f"{config['p6b']['canvas']}x{config['p6b']['canvas']} canvas"
             + (f" ({config['p6b']['no_reference_box']} images without a reference box left out)"
                if config["p6b"]["no_reference_box"] else "") + ":\n\n"
             + plots.markdown_table(sweep, row_header="engine"))
    folders = list(config["p6c"]["photos"])
    by_folder = {name: {f"{folder}: {column}": row["p6c"][folder][key] for folder in folders
                        for column, key in (("found", "share_found"), ("extra / photo", "extra_per_photo"))}
                 for name, row in figures.items()}
    text += ("\nP6c per folder: share of the CNN detector's faces found, and detections it does not have per "
             "photo (" + ", ".join(f"{folder} {config['p6c']['photos'][folder]} photos, "
                                   f"{config['p6c']['reference_faces'][folder]} CNN faces" for folder in folders)
             + "):\n\n"
             + plots.markdown_table(by_folder, row_header="engine",
                                    formats={column: ("{:.3f}" if column.endswith("found") else "{:.2f}")
                                             for row in by_folder.values() for column in row}))
    subset = config.get("subset")
    note = f"\nSubset run: {subset} (not the full protocol).\n" if subset else ""
    return text + note
