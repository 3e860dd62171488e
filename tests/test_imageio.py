"""Image loading: bad files give clear errors, odd formats become upright RGB."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jointface.imageio import ImageLoadError, list_images, load_image


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR then claims ``width`` x ``height`` (CRC fixed up)."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr_start = 8 + 8  # signature, then length + "IHDR"
    data[ihdr_start:ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr_start + 13])) & 0xFFFFFFFF
    data[ihdr_start + 13:ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture
def face_jpeg(lfw_dir):
    return lfw_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(path)


def test_truncated_jpeg(tmp_path, face_jpeg):
    path = tmp_path / "truncated.jpg"
    path.write_bytes(face_jpeg.read_bytes()[:2000])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(path)


def test_huge_header_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(30000, 30000))
    with pytest.raises(ImageLoadError, match="30000x30000"):
        load_image(path)


def test_pixel_limit_is_configurable(tmp_path, face_jpeg, monkeypatch):
    monkeypatch.setenv("JOINTFACE_MAX_PIXELS", "1000")
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(face_jpeg)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


def test_modes_become_rgb(tmp_path, face_jpeg):
    rgb = load_image(face_jpeg)
    assert rgb.shape == (250, 250, 3) and rgb.dtype == np.uint8
    source = Image.open(face_jpeg)
    cases = {
        "gray.png": source.convert("L"),
        "rgba.png": source.convert("RGBA"),
        "cmyk.jpg": source.convert("CMYK"),
        "palette.gif": source.convert("P"),
        "gray16.png": Image.fromarray((np.asarray(source.convert("L"), dtype=np.uint16) * 257)),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.shape == (250, 250, 3) and loaded.dtype == np.uint8, name
        # Same picture: close to the original's luminance.
        diff = np.abs(loaded.mean(axis=2) - rgb.mean(axis=2)).mean()
        assert diff < 25, (name, diff)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()


def test_exif_orientation_applied(tmp_path, face_jpeg):
    upright = load_image(face_jpeg)
    rotated = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    rotated.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "sideways.jpg")
    assert loaded.shape == upright.shape
    assert np.abs(loaded.astype(int) - upright.astype(int)).mean() < 8


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    loaded = load_image(tmp_path / "anim.gif")
    assert loaded.shape == (16, 16, 3) and loaded[0, 0, 0] > 200


def test_draft_downscale(face_jpeg):
    small = load_image(face_jpeg, max_size=100)
    assert max(small.shape[:2]) <= 100


def test_list_images_keeps_explicit_files_and_filters_folders(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.PNG").write_bytes(b"x")
    found = list_images([tmp_path, tmp_path / "explicit.txt"])
    assert [p.name for p in found] == ["a.jpg", "b.PNG", "explicit.txt"]
