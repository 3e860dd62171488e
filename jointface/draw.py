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


def annotate(image: np.ndarray, faces: Sequence, out_path: Path) -> Path:
    """Draw each face's box with its name (or ``unknown``) and similarity; write a JPEG/PNG."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 400))
    font = _font(max(12, round(max(canvas.size) / 45)))
    for face in faces:
        x1, y1, x2, y2 = face.box
        colour = KNOWN_COLOUR if face.identity else UNKNOWN_COLOUR
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        label = face.identity or "unknown"
        if face.similarity is not None:
            label += f" {face.similarity:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_h = bottom - top + 4
        ty = y1 - text_h if y1 - text_h >= 0 else y2
        draw.rectangle([x1, ty, x1 + (right - left) + 6, ty + text_h], fill=colour)
        draw.text((x1 + 3, ty + 2 - top), label, fill=(255, 255, 255), font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path, quality=92)
    return out_path
