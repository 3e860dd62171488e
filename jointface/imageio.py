"""Image loading: the one place where files become RGB arrays.

Every image that enters JointFace goes through :func:`load_image`, which

* applies the EXIF orientation, so a photo taken sideways is upright;
* converts grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit
  images to 8-bit RGB;
* refuses images whose declared size exceeds a pixel budget *before* decoding
  them, so a 30000x30000 header cannot exhaust memory (decompression bomb);
* reports every failure as :class:`ImageLoadError` with a message that names
  the file and says what is wrong.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jointface.config import library_settings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class ImageLoadError(ValueError):
    """An image could not be turned into pixels; the message says why."""


def max_pixels() -> int:
    """Pixel budget, overridable with ``JOINTFACE_MAX_PIXELS`` (:mod:`jointface.config`)."""
    try:
        return library_settings().max_pixels
    except ValueError as exc:
        raise ImageLoadError(str(exc)) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: scale the actual range to 0..255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((array - lo) * scale).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


_OPEN_LOCK = threading.Lock()


def _open_header(path: Path) -> Image.Image:
    """``Image.open`` (which reads only the header) without Pillow's own bomb check.

    Pillow would refuse huge headers with a message that does not give the
    size; :func:`load_image` checks the size itself, before decoding.
    """
    with _OPEN_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | os.PathLike, *, max_size: int | None = None) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array, upright.

    ``max_size`` (optional) downsamples so the longer side is at most that many
    pixels, using JPEG draft mode where possible (decoding at 1/2, 1/4 or 1/8
    scale is much cheaper than decoding in full and resizing).
    """
    return _decode(Path(path), max_size)[0]


def load_image_reduced(path: str | os.PathLike, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_image` at a longer side of at most ``max_side`` (JPEG draft decoding), and the full size.

    Returns ``(image, (width, height))``: the reduced upright image and the
    size of the full upright photo, so that coordinates found in ``image``
    scale back by ``width / image.shape[1]``.
    """
    return _decode(Path(path), max_side)


def _decode(path: Path, max_size: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The upright RGB pixels (reduced to ``max_size`` when given) and the full upright ``(width, height)``."""
    if not path.exists():
        raise ImageLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a folder, not an image")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(f"{path}: cannot read ({exc.strerror})") from exc
    if size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    budget = max_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_header(path) as image:
                width, height = image.size
                if width <= 0 or height <= 0:
                    raise ImageLoadError(f"{path}: image has no pixels ({width}x{height})")
                if width * height > budget:
                    raise ImageLoadError(
                        f"{path}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
                        f"{budget:,} (set JOINTFACE_MAX_PIXELS to raise it)"
                    )
                if getattr(image, "is_animated", False):
                    image.seek(0)  # first frame of an animated GIF/PNG/WebP
                if max_size is not None and image.format == "JPEG" and max(width, height) > max_size:
                    image.draft("RGB", (max_size, max_size))
                image.load()
                if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF: stored turned by 90 degrees
                    width, height = height, width
                image = ImageOps.exif_transpose(image) or image
                rgb = _to_rgb(image)
                if max_size is not None and max(rgb.size) > max_size:
                    rgb.thumbnail((max_size, max_size), Image.Resampling.BILINEAR)
                return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), (width, height)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{path}: not an image file, or a format JointFace cannot read") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{path}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow raises OSError for truncated files ("image file is truncated"),
        # SyntaxError / ValueError for some malformed headers.
        reason = str(exc) or exc.__class__.__name__
        raise ImageLoadError(f"{path}: damaged or truncated image ({reason})") from exc
    except MemoryError as exc:
        raise ImageLoadError(f"{path}: not enough memory to decode this image") from exc


def list_images(inputs: list[str | os.PathLike], *, recursive: bool = True) -> list[Path]:
    """Expand files and folders into a sorted list of image paths.

    Files given explicitly are kept whatever their suffix (so that a bad file
    gets its own error); inside folders only files with an image suffix are
    taken. Missing paths are kept too, so the caller reports them.
    """
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            walker = item.rglob("*") if recursive else item.glob("*")
            paths.extend(sorted(p for p in walker if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(item)
    return paths


def resize_shorter_side(image: np.ndarray, shorter: int) -> np.ndarray:
    """Resize so the shorter side is ``shorter`` pixels (bilinear)."""
    height, width = image.shape[:2]
    scale = shorter / min(height, width)
    if scale == 1.0:
        return image
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.BILINEAR))


def mosaic(tiles: Sequence[np.ndarray], tile: int = 320) -> np.ndarray:
    """A 2x2 mosaic of four images, each centre-cropped / padded to ``tile`` x ``tile``."""
    canvas = np.zeros((2 * tile, 2 * tile, 3), dtype=np.uint8)
    for index, image in enumerate(tiles[:4]):
        height, width = image.shape[:2]
        top, left = max(0, (height - tile) // 2), max(0, (width - tile) // 2)
        crop = image[top:top + tile, left:left + tile]
        row, col = divmod(index, 2)
        canvas[row * tile:row * tile + crop.shape[0], col * tile:col * tile + crop.shape[1]] = crop
    return canvas
