"""Teacher labels for every face of every photo of a collection (``jointface preprocess --all-faces``).

For each photo, one JSON line (``faces.jsonl``)::

    {"path": relative POSIX path, "collection": layout, "identity": str | null,
     "width": int, "height": int, "status": "ok" | "no_face" | "unreadable",
     "detector": "hog" | "cnn" | null, "error": str | null,
     "faces": [{"box": [x1, y1, x2, y2], "landmark_box": [...], "score": float,
                "teacher": [128 floats], "subject": bool}, ...]}

* every face dlib's HOG detector finds (upsample 1); where it finds none, the
  CNN (MMOD) detector (both on a copy at most :data:`HOG_MAX_SIDE` px, boxes
  mapped back, so a large photo does not take seconds);
* each face's 68-landmark box (PROTOCOLS.md's reference box) and dlib's raw
  128-d descriptor (the distillation teacher);
* ``subject``: the face that carries the photo's identity (nearest the centre,
  or the largest for in-the-wild layouts, see ``collections.SUBJECT_RULE``).

The work runs in ``workers`` processes; the parent writes each finished photo
at once (flushed), so an interrupted run loses at most the photos in flight,
and a rerun skips every photo already in the file. A manifest
(``<labels>.manifest.json``) counts photos, faces, photos with none or
several faces and the labelling time, summed over runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from jointface.imageio import ImageLoadError, load_image

from .collections import SUBJECT_RULE, SourceImage, read_layout

#: Detectors run on a copy of a large photo shrunk to this longer side (boxes mapped back; landmarks and
#: descriptors use the full photo): HOG at upsample 1 on a 1600 x 1200 photo takes seconds, and its faces
#: are large. Faces under about 40 px in such a photo are then missed. LFW, All-Age-Faces and UTKFace
#: photos are smaller than this and see no change. The CNN detector (the fallback where HOG finds no face)
#: costs about ten times HOG's time, so it gets a smaller copy still.
HOG_MAX_SIDE = 640
CNN_MAX_SIDE = 360
TEACHER_DIM = 128


class LabelsMismatch(ValueError):
    """An output file already labels another collection."""


class LabelsBusy(RuntimeError):
    """Another labelling run holds the output file."""


def _rect_box(rect, width: int, height: int, scale: float = 1.0) -> list[float]:
    return [float(min(max(rect.left() * scale, 0), width)), float(min(max(rect.top() * scale, 0), height)),
            float(min(max((rect.right() + 1) * scale, 0), width)),
            float(min(max((rect.bottom() + 1) * scale, 0), height))]


def find_faces(image: np.ndarray) -> tuple[str | None, list[tuple[list[float], float]]]:
    """dlib's faces of one photo: ``(detector, [(box, score), ...])``, HOG first, then the CNN."""
    from PIL import Image

    from jointface.engines import dlib_engine

    height, width = image.shape[:2]

    def shrunk(max_side: int) -> tuple[np.ndarray, float]:
        if max(height, width) <= max_side:
            return image, 1.0
        scale = max(height, width) / max_side
        return np.asarray(Image.fromarray(image).resize((round(width / scale), round(height / scale)),
                                                        Image.Resampling.BILINEAR)), scale

    small, scale = shrunk(HOG_MAX_SIDE)
    found = dlib_engine.detect_rects(small, "hog", 1)
    if found:
        return "hog", [(_rect_box(rect, width, height, scale), score) for rect, score in found]
    small, scale = shrunk(CNN_MAX_SIDE)
    found = dlib_engine.detect_rects(small, "cnn", 1)
    if found:
        return "cnn", [(_rect_box(rect, width, height, scale), score) for rect, score in found]
    return None, []


def choose_subject(boxes: list[list[float]], width: int, height: int, rule: str = "centre") -> int:
    """Index of the face carrying the photo's identity: nearest the centre, or the largest."""
    if rule == "largest":
        return max(range(len(boxes)), key=lambda i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))
    cx, cy = width / 2.0, height / 2.0
    return min(range(len(boxes)), key=lambda i: ((boxes[i][0] + boxes[i][2]) / 2 - cx) ** 2
               + ((boxes[i][1] + boxes[i][3]) / 2 - cy) ** 2)


def label_photo(image: np.ndarray, subject_rule: str = "centre") -> dict:
    """Every face of one photo with its landmark box and teacher descriptor (see the module docstring)."""
    import dlib

    from jointface.engines import dlib_engine

    height, width = image.shape[:2]
    detector, found = find_faces(image)
    if not found:
        return {"status": "no_face", "detector": None, "faces": []}
    boxes = [box for box, _ in found]
    rects = [dlib_engine._box_to_rect(box) for box in boxes]
    shapes = dlib.full_object_detections()
    predictor = dlib_engine._load("landmarks_5")
    for rect in rects:
        shapes.append(predictor(image, rect))
    descriptors = dlib_engine._load("descriptor").compute_face_descriptor(image, shapes, 0)
    subject = choose_subject(boxes, width, height, subject_rule)
    faces = []
    for index, ((box, score), rect, descriptor) in enumerate(zip(found, rects, descriptors)):
        points = dlib_engine.landmarks_68(image, rect)
        landmark_box = [float(points[:, 0].min()), float(points[:, 1].min()),
                        float(points[:, 0].max() + 1), float(points[:, 1].max() + 1)]
        faces.append({"box": [round(v, 2) for v in box], "landmark_box": [round(v, 2) for v in landmark_box],
                      "score": round(float(score), 4), "teacher": [round(float(v), 6) for v in descriptor],
                      "subject": index == subject})
    return {"status": "ok", "detector": detector, "faces": faces}


def _label_one(job: tuple[str, str, str | None, str, str]) -> dict:
    """Worker: label one photo (never raises; a failure is the record's ``status``)."""
    absolute, relative, identity, layout, rule = job
    record = {"path": relative, "collection": layout, "identity": identity, "width": None, "height": None,
              "status": None, "detector": None, "faces": [], "error": None}
    try:
        image = load_image(absolute)
        record.update(width=int(image.shape[1]), height=int(image.shape[0]))
        record.update(label_photo(image, rule))
    except ImageLoadError as exc:
        record.update(status="unreadable", error=str(exc))
    except Exception as exc:  # a dlib failure on one photo must not stop a 20,000-photo run
        record.update(status="unreadable", error=f"{type(exc).__name__}: {exc}")
    return record


def read_face_labels(path: str | os.PathLike) -> list[dict]:
    """Records of a ``faces.jsonl`` file, one per photo (a truncated line from a crash is ignored; a photo
    written twice, by two runs on one file, counts once, its first record)."""
    path = Path(path)
    if not path.exists():
        return []
    records, seen = [], set()
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("path") not in seen:
                    seen.add(record.get("path"))
                    records.append(record)
    return records


def manifest_path(labels_path: Path) -> Path:
    return labels_path.with_name(labels_path.name + ".manifest.json")


def summarise(records: Iterable[dict]) -> dict:
    """Counts of a labels file: photos, faces, photos with none / several faces, identities."""
    records = list(records)
    ok = [r for r in records if r["status"] == "ok"]
    return {
        "photos": len(records),
        "photos_with_faces": len(ok),
        "faces": sum(len(r["faces"]) for r in ok),
        "no_face": sum(r["status"] == "no_face" for r in records),
        "several_faces": sum(len(r["faces"]) > 1 for r in ok),
        "unreadable": [[r["path"], r["error"]] for r in records if r["status"] == "unreadable"],
        "cnn_fallback": sum(r.get("detector") == "cnn" for r in records),
        "identities": len({r["identity"] for r in ok if r.get("identity")}),
    }


def label_collection(root: str | os.PathLike, layout: str, out_path: str | os.PathLike, *, workers: int = 2,
                     limit: int | None = None, progress: bool = True) -> dict:
    """Label every photo of a collection (resumable; see the module docstring). Returns the manifest."""
    from filelock import FileLock, Timeout

    root, out_path = Path(root).resolve(), Path(out_path)
    sources: list[SourceImage] = read_layout(root, layout)[:limit]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out_path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LabelsBusy(f"{out_path} is being written by another labelling run; wait for it or stop it") from None
    try:
        return _label_locked(root, layout, out_path, sources, workers, progress)
    finally:
        lock.release()


def _label_locked(root: Path, layout: str, out_path: Path, sources: list[SourceImage], workers: int,
                  progress: bool) -> dict:
    manifest_file = manifest_path(out_path)
    previous = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    if previous and (previous.get("root") != str(root) or previous.get("layout") != layout):
        raise LabelsMismatch(f"{out_path} labels {previous.get('root')} ({previous.get('layout')}), "
                             f"not {root} ({layout}); choose another output file")
    done = {record["path"] for record in read_face_labels(out_path)}
    rule = SUBJECT_RULE.get(layout, "centre")
    jobs = [(str(s.path), s.path.relative_to(root).as_posix(), s.identity, layout, rule)
            for s in sources if s.path.relative_to(root).as_posix() not in done]
    seconds = float(previous.get("seconds", 0.0))
    started = time.monotonic()

    def write_manifest(interrupted: bool) -> dict:
        wanted = {s.path.relative_to(root).as_posix() for s in sources}
        manifest = {"root": str(root), "layout": layout, "labels": str(out_path),
                    **summarise(r for r in read_face_labels(out_path) if r["path"] in wanted),
                    "seconds": round(seconds + time.monotonic() - started, 1),
                    "newly_labelled": newly, "complete": not interrupted and len(wanted) <= len(done) + newly}
        manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    newly = 0
    write_manifest(interrupted=True)  # names the collection from the start; rewritten when the run ends
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) stops a run as Ctrl-C does: the manifest is written, finished photos are kept
        def stop(signum, frame):
            raise KeyboardInterrupt

        previous_handler = signal.signal(signal.SIGTERM, stop)
    else:
        previous_handler = None
    columns = (TextColumn("labelling {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        with out_path.open("a") as handle, Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(layout, total=len(jobs))
            results = pool.imap(_label_one, jobs, chunksize=4) if pool else map(_label_one, jobs)
            for record in results:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                newly += 1
                bar.advance(task)
    except KeyboardInterrupt:
        write_manifest(interrupted=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return write_manifest(interrupted=False)
