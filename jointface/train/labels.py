"""Labelling face photo collections with the dlib engine, and organising them for training.

Two steps, both resumable and deterministic:

1. :func:`preprocess` walks a collection (``layout``: ``lfw``, ``folder``, ``fei``,
   ``caltech``, ``gt``), and for every image records, as one JSON line:
   the identity (from the layout), dlib's detector box, the 68-landmark
   reference box (PROTOCOLS.md), and dlib's raw 128-d descriptor of that face
   (the distillation teacher). Images already in the output file are
   skipped, so an interrupted run continues where it stopped. Nothing is
   dropped silently: images where dlib finds no face, or several faces, or
   that cannot be read, stay in the file with their ``status`` and
   ``faces_found`` and are listed in the returned summary. With several faces
   the one nearest the image centre is taken (the subject of an LFW-style
   centred crop), or, when the collection gives a box (Caltech's
   ``ImageData.mat``), the face overlapping that box most.

2. :func:`organize` resizes every labelled image to a shorter side of 320 px
   and splits it into train / test (boxes scaled alike):

   * LFW: exactly PROTOCOLS.md P1 — the first 30 images (sorted) of each of
     the 311 people with >= 6 images, position ``i % 5 == 4`` is TEST. The
     extra training images the study allows are the P1 people's images
     *beyond* their first 30 (``"extra": true``); nobody else is ever used.
   * other layouts: the same rule per person (``i % 5 == 4`` -> test) over
     that person's sorted images.

Record fields (``labels.jsonl``): ``path`` (relative to the root, POSIX),
``identity``, ``status`` (``ok`` / ``no_face`` / ``unreadable`` / ``unlabelled``),
``faces_found``, ``detector`` (``hog`` / ``cnn``), ``box`` and ``landmark_box``
(xyxy original pixels or null), ``given_box`` (from the collection, or null),
``teacher`` (128 floats or null), ``width``, ``height``, ``error``.
A sidecar ``<labels>.meta.json`` keeps the collection root and layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from jointface.imageio import ImageLoadError, load_image, resize_shorter_side

from jointface.datasets.collections import (P1_IMAGES_PER_PERSON, P1_MIN_IMAGES, SourceImage,  # noqa: F401
                                            lfw_p1_split, read_caltech, read_fei, read_folder_per_person,
                                            read_georgia_tech, read_lfw)
from jointface.datasets.collections import read_layout as _read_any_layout

#: The layouts of the subject-only labels (the extra collections go through ``preprocess --all-faces``).
LAYOUTS = ("lfw", "folder", "fei", "caltech", "gt")
ORGANIZED_SHORTER_SIDE = 320


def read_layout(root: str | os.PathLike, layout: str) -> list[SourceImage]:
    """The images of a collection in one of :data:`LAYOUTS` (LFW: only the P1 people), in a stable order."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    return _read_any_layout(root, layout, lfw_p1_only=True)


# ----------------------------------------------------------------------------- labelling
def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def label_image(image: np.ndarray, engine, given_box=None) -> dict:
    """dlib labels of the subject of one image: status, faces_found, detector, box, landmark_box, teacher."""
    from jointface.engines import dlib_engine

    height, width = image.shape[:2]
    detector, found = "hog", dlib_engine.detect_rects(image, "hog", 1)
    if not found:
        detector, found = "cnn", dlib_engine.detect_rects(image, "cnn", 1)
    if not found:
        return {"status": "no_face", "faces_found": 0, "detector": None, "box": None, "landmark_box": None,
                "teacher": None}

    def rect_box(rect) -> tuple[float, float, float, float]:
        return (float(min(max(rect.left(), 0), width)), float(min(max(rect.top(), 0), height)),
                float(min(max(rect.right() + 1, 0), width)), float(min(max(rect.bottom() + 1, 0), height)))

    if given_box is not None:
        rect = max(found, key=lambda item: _iou(rect_box(item[0]), given_box))[0]
    else:
        centre_x, centre_y = width / 2.0, height / 2.0
        rect = min(found, key=lambda item: ((item[0].left() + item[0].right()) / 2 - centre_x) ** 2
                   + ((item[0].top() + item[0].bottom()) / 2 - centre_y) ** 2)[0]
    points = dlib_engine.landmarks_68(image, rect)
    landmark_box = [float(points[:, 0].min()), float(points[:, 1].min()),
                    float(points[:, 0].max() + 1), float(points[:, 1].max() + 1)]
    box = rect_box(rect)
    teacher = engine.raw_descriptor(image, box)
    return {"status": "ok", "faces_found": len(found), "detector": detector, "box": list(box),
            "landmark_box": landmark_box, "teacher": [round(float(v), 6) for v in teacher]}


def read_labels(path: str | os.PathLike) -> list[dict]:
    """Records of a labels JSON-lines file (a truncated last line from a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _meta_path(labels_path: Path) -> Path:
    return labels_path.with_name(labels_path.name + ".meta.json")


def summarise_labels(records: Iterable[dict]) -> dict:
    """Counts plus the lists of images needing attention."""
    records = list(records)
    return {
        "images": len(records),
        "ok": sum(r["status"] == "ok" for r in records),
        "no_face": [r["path"] for r in records if r["status"] == "no_face"],
        "several_faces": [[r["path"], r["faces_found"]] for r in records if r.get("faces_found", 0) > 1],
        "unreadable": [[r["path"], r.get("error")] for r in records if r["status"] == "unreadable"],
        "unlabelled": [r["path"] for r in records if r["status"] == "unlabelled"],
        "cnn_fallback": [r["path"] for r in records if r.get("detector") == "cnn"],
    }


def preprocess(root: str | os.PathLike, layout: str, out_labels_path: str | os.PathLike, progress: bool = True,
               *, limit: int | None = None, engine=None) -> dict:
    """Label every image of a collection with dlib (see the module docstring); returns a summary.

    ``limit``: label only the first N images (tests). ``engine``: a
    ``DlibEngine`` to reuse. Returns :func:`summarise_labels` of the whole file
    plus ``newly_labelled`` / ``already_labelled`` counts and ``labels_path``.
    """
    root, out_labels_path = Path(root).resolve(), Path(out_labels_path)
    sources = read_layout(root, layout)[:limit]
    out_labels_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = _meta_path(out_labels_path)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("root") != str(root) or meta.get("layout") != layout:
            raise ValueError(f"{out_labels_path} labels {meta.get('root')} ({meta.get('layout')}), "
                             f"not {root} ({layout}); choose another output file")
    meta_path.write_text(json.dumps({"root": str(root), "layout": layout}, indent=2) + "\n")
    done = {record["path"] for record in read_labels(out_labels_path)}
    todo = [source for source in sources if source.path.relative_to(root).as_posix() not in done]
    if todo and engine is None:
        from jointface.engines.dlib_engine import DlibEngine
        engine = DlibEngine()

    from rich.progress import Progress

    with out_labels_path.open("a") as handle, Progress(disable=not progress) as bar:
        task = bar.add_task("labelling", total=len(todo))
        for source in todo:
            record = {"path": source.path.relative_to(root).as_posix(), "identity": source.identity,
                      "given_box": list(source.given_box) if source.given_box else None, "error": None}
            try:
                image = load_image(source.path)
                record.update(width=int(image.shape[1]), height=int(image.shape[0]))
                record.update(label_image(image, engine, source.given_box))
                if source.identity is None:
                    record["status"] = "unlabelled"
            except ImageLoadError as exc:
                record.update(status="unreadable", faces_found=0, detector=None, box=None, landmark_box=None,
                              teacher=None, width=None, height=None, error=str(exc))
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            bar.advance(task)
    wanted = {source.path.relative_to(root).as_posix() for source in sources}
    summary = summarise_labels(r for r in read_labels(out_labels_path) if r["path"] in wanted)
    summary.update(newly_labelled=len(todo), already_labelled=len(sources) - len(todo),
                   labels_path=str(out_labels_path))
    return summary


# ----------------------------------------------------------------------------- organising
def _scale_box(box, scale: float):
    return None if box is None else [round(v * scale, 3) for v in box]


def split_records(records: list[dict], layout: str, root: Path) -> dict[str, str]:
    """Relative path -> ``train`` / ``test`` / ``extra`` (see the module docstring)."""
    if layout == "lfw":
        return lfw_p1_split(root)
    by_person: dict[str, list[str]] = {}
    for record in records:
        if record.get("identity") is not None:
            by_person.setdefault(record["identity"], []).append(record["path"])
    split = {}
    for paths in by_person.values():
        for position, path in enumerate(sorted(paths)):
            split[path] = "test" if position % 5 == 4 else "train"
    return split


def organize(labels_path: str | os.PathLike, out_dir: str | os.PathLike, layout: str | None = None,
             progress: bool = True) -> dict:
    """Resize labelled images to shorter side 320 and write ``train.jsonl`` / ``test.jsonl`` / ``classes.json``.

    ``out_dir/images/<relative path>`` holds the resized JPEGs (existing ones are
    kept, so reruns are cheap). Every split record keeps its labels with boxes
    in the resized image's pixels. ``classes.json`` lists the training
    identities, sorted; class index = position. Returns counts per split and the
    images left out (unreadable, unlabelled, not a P1 person for LFW).
    """
    labels_path, out_dir = Path(labels_path), Path(out_dir)
    meta = json.loads(_meta_path(labels_path).read_text())
    root, layout = Path(meta["root"]), layout or meta["layout"]
    if layout != meta["layout"]:
        raise ValueError(f"{labels_path} was made with layout {meta['layout']!r}, not {layout!r}")
    records = read_labels(labels_path)
    split = split_records(records, layout, root)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    outputs: dict[str, list[dict]] = {"train": [], "test": []}
    left_out: list[list[str]] = []

    from PIL import Image
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        task = bar.add_task("organising", total=len(records))
        for record in records:
            bar.advance(task)
            part = split.get(record["path"])
            if part is None:
                left_out.append([record["path"], "not a P1 person" if layout == "lfw" else "no identity"])
                continue
            if record["status"] in ("unreadable", "unlabelled"):
                left_out.append([record["path"], record["status"]])
                continue
            scale = ORGANIZED_SHORTER_SIDE / min(record["width"], record["height"])
            target = out_dir / "images" / record["path"]
            if not target.exists():
                image = resize_shorter_side(load_image(root / record["path"]), ORGANIZED_SHORTER_SIDE)
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(target, quality=95)
            entry = {
                "image": f"images/{record['path']}", "identity": record["identity"], "status": record["status"],
                "faces_found": record["faces_found"], "box": _scale_box(record["box"], scale),
                "landmark_box": _scale_box(record["landmark_box"], scale), "teacher": record["teacher"],
                "width": round(record["width"] * scale), "height": round(record["height"] * scale),
                "extra": part == "extra",
            }
            outputs["test" if part == "test" else "train"].append(entry)
    for part, entries in outputs.items():
        with (out_dir / f"{part}.jsonl").open("w") as handle:
            for entry in sorted(entries, key=lambda e: e["image"]):
                handle.write(json.dumps(entry) + "\n")
    classes = sorted({e["identity"] for e in outputs["train"]})
    (out_dir / "classes.json").write_text(json.dumps(classes, indent=0) + "\n")
    summary = {
        "train": sum(not e["extra"] for e in outputs["train"]),
        "train_extra": sum(e["extra"] for e in outputs["train"]),
        "test": len(outputs["test"]),
        "classes": len(classes),
        "train_without_face": [e["image"] for e in outputs["train"] if e["status"] != "ok"],
        "test_without_face": [e["image"] for e in outputs["test"] if e["status"] != "ok"],
        "left_out": left_out,
        "out_dir": str(out_dir),
    }
    (out_dir / "organize_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
