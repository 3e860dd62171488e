"""Uploaded photos: limits checked before decoding, then the same loader as the command line.

Order of the checks for each request: the number of files, each file's
size in bytes (while it is read, in chunks, so an oversized file is not
read to its end), the pixel count written in the image header (Pillow reads
only the header), and only then the decoding, by
:func:`jointface.imageio.load_image` (EXIF rotation, any colour mode).
Uploads are written to a private temporary folder for the loader and
removed before the request ends: photos are never kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jointface.imageio import ImageLoadError, _open_header, load_image, max_pixels


class ApiError(Exception):
    """An error answered as ``{"error": {"code": ..., "message": ...}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, **detail):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail

    def to_json(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.detail:
            body["detail"] = self.detail
        return {"error": body}


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int = 20_000_000
    max_files: int = 16
    max_pixels: int | None = None  # None: JOINTFACE_MAX_PIXELS, else 50,000,000

    @property
    def pixels(self) -> int:
        return self.max_pixels if self.max_pixels is not None else max_pixels()

    @property
    def max_request_bytes(self) -> int:
        """What a whole request body may hold: every file at its limit, plus room for the form's fields."""
        return self.max_files * self.max_file_bytes + 1_000_000


@dataclass
class Photo:
    filename: str
    image: np.ndarray
    sha256: str
    size: tuple[int, int]  # (width, height)


CHUNK = 1 << 20


def read_limited(upload, limits: UploadLimits) -> bytes:
    """The bytes of one ``UploadFile``, refusing it as soon as it passes the limit."""
    name = upload.filename or "upload"
    parts, total = [], 0
    while True:
        chunk = upload.file.read(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > limits.max_file_bytes:
            raise ApiError(413, "file_too_large", f"{name}: more than {limits.max_file_bytes:,} bytes",
                           image=name, limit=limits.max_file_bytes)
        parts.append(chunk)
    return b"".join(parts)


def _header_size(data: bytes, name: str) -> tuple[int, int]:
    """The size written in the header (Pillow reads nothing else here; its own bomb check is off)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open_header(io.BytesIO(data)) as image:
                return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(415, "not_an_image", f"{name}: not an image file, or a format JointFace cannot read",
                       image=name) from exc


def decode_photos(uploads: list, limits: UploadLimits, *, field: str = "photos") -> list[Photo]:
    """Check and decode every upload of a request; the first problem refuses the whole request."""
    if not uploads:
        raise ApiError(422, "no_photos", f"send at least one photo in the form field {field!r}")
    if len(uploads) > limits.max_files:
        raise ApiError(413, "too_many_files", f"{len(uploads)} files sent; at most {limits.max_files} per request",
                       limit=limits.max_files)
    raw = [(upload.filename or f"photo{position + 1}", read_limited(upload, limits))
           for position, upload in enumerate(uploads)]
    budget = limits.pixels
    for name, data in raw:
        if not data:
            raise ApiError(415, "not_an_image", f"{name}: empty file (0 bytes)", image=name)
        width, height = _header_size(data, name)
        if width * height > budget:
            raise ApiError(413, "image_too_large", f"{name}: image is {width}x{height} = {width * height:,} pixels, "
                           f"over the limit of {budget:,} (JOINTFACE_MAX_PIXELS)", image=name, limit=budget)
    photos = []
    with tempfile.TemporaryDirectory(prefix="jointface-upload-") as folder:
        for position, (name, data) in enumerate(raw):
            path = Path(folder) / f"{position}.upload"  # never the client's file name
            path.write_bytes(data)
            try:
                image = load_image(path)
            except ImageLoadError as exc:
                message = str(exc).replace(str(path), name)
                raise ApiError(415, "not_an_image", message, image=name) from exc
            finally:
                os.unlink(path)
            photos.append(Photo(name, image, hashlib.sha256(data).hexdigest(), (image.shape[1], image.shape[0])))
    return photos
