"""Annotated images: boxes and names drawn on a photo."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KNOWN_COLOUR = (40, 200, 80)
UNKNOWN_COLOUR = (230, 60, 50)


def _font(size: int):
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def face_label(face) -> str:
    """A face's caption: ``name 0.83``; an unknown face names its nearest person: ``unknown (nearest: name 0.52)``
    (a face has a similarity exactly when it has candidates: :func:`jointface.service.identify`)."""
    if face.identity:
        return f"{face.identity} {face.similarity:.2f}"
    if face.candidates:
        name, similarity = face.candidates[0]
        return f"unknown (nearest: {name} {similarity:.2f})"
    return "unknown"


def annotate(image: np.ndarray, faces: Sequence, out_path: Path) -> Path:
    """Draw each face's box with its caption (``face_label``); write a JPEG/PNG."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 400))
    font = _font(max(12, round(max(canvas.size) / 45)))
    for face in faces:
        x1, y1, x2, y2 = face.box
        colour = KNOWN_COLOUR if face.identity else UNKNOWN_COLOUR
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        label = face_label(face)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_h = bottom - top + 4
        ty = y1 - text_h if y1 - text_h >= 0 else y2
        tx = max(0, min(x1, canvas.size[0] - (right - left) - 6))  # the caption stays on the picture
        draw.rectangle([tx, ty, tx + (right - left) + 6, ty + text_h], fill=colour)
        draw.text((tx + 3, ty + 2 - top), label, fill=(255, 255, 255), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, quality=92)
    return out_path
