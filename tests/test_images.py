"""The one set of decode rules: which files are images, and how they become model input."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.images import (
    ImageInfo,
    ImageRejected,
    decode_file,
    inspect_image,
    load_pixels,
    load_pixels_from_bytes,
    to_model_pixels,
)

EXIF_ORIENTATION = 0x0112


def _noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


# --- inspect_image: accepted files ---------------------------------------------------------------

@pytest.mark.parametrize(("name", "mode", "channels"), [
    ("rgb.png", "RGB", 3),
    ("gray.png", "L", 1),
    ("rgb.jpg", "RGB", 3),
    ("gray.jpg", "L", 1),
    ("rgb.bmp", "RGB", 3),
    ("pal.gif", "P", 3),
])
def test_inspect_image_reports_size_channels_and_hash(tmp_path: Path, name: str, mode: str, channels: int) -> None:
    pixels = _noise(7, 13, channels=1 if mode == "L" else 3)
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.convert("P")
    path = _save(image, tmp_path / name)

    info = inspect_image(path)

    assert isinstance(info, ImageInfo)
    assert (info.width, info.height) == (13, 7)
    assert info.channels == channels
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_image_accepts_a_str_path(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_noise(5, 5)), tmp_path / "a.png")
    assert inspect_image(str(path)).width == 5


def test_inspect_image_hash_differs_for_different_pixels(tmp_path: Path) -> None:
    a = inspect_image(_save(Image.fromarray(_noise(6, 6, seed=1)), tmp_path / "a.png"))
    b = inspect_image(_save(Image.fromarray(_noise(6, 6, seed=2)), tmp_path / "b.png"))
    assert a.sha256 != b.sha256


def test_inspect_image_judges_content_not_extension(tmp_path: Path) -> None:
    # A PNG named .jpg is still a good PNG.
    path = _save(Image.fromarray(_noise(4, 9)), tmp_path / "really-a-png.jpg", format="PNG")
    assert (inspect_image(path).width, inspect_image(path).height) == (9, 4)


# --- inspect_image: rejected files ---------------------------------------------------------------

def _reason(path: Path, **kwargs) -> str:
    with pytest.raises(ImageRejected) as info:
        inspect_image(path, **kwargs)
    assert info.value.reason == str(info.value)
    assert "\n" not in info.value.reason
    return info.value.reason


def test_rejects_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert _reason(path) == "empty file (0 bytes)"


def test_rejects_text_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 10)
    assert _reason(path) == "not an image (no known image format)"


def test_rejects_truncated_jpeg(tmp_path: Path) -> None:
    full = _save(Image.fromarray(_noise(64, 64)), tmp_path / "full.jpg", quality=95)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    assert _reason(truncated).startswith("corrupt image:")


def test_rejects_truncated_png(tmp_path: Path) -> None:
    full = _save(Image.fromarray(_noise(64, 64)), tmp_path / "full.png")
    data = full.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    assert _reason(truncated).startswith("corrupt image:")


def test_rejects_tiff_as_unsupported_format(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_noise(8, 8)), tmp_path / "scan.tif")
    reason = _reason(path)
    assert "unsupported image format TIFF" in reason
    assert "JPEG, PNG, BMP, GIF" in reason


def test_rejects_image_over_max_pixels(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_noise(10, 20)), tmp_path / "big.png")
    reason = _reason(path, max_pixels=199)
    assert "too large" in reason and "20x10" in reason and "199" in reason
    # Exactly at the limit is fine.
    assert inspect_image(path, max_pixels=200).width == 20


def test_rejects_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert _reason(folder) == "is a directory"


def test_rejects_a_missing_file(tmp_path: Path) -> None:
    assert _reason(tmp_path / "gone.png").startswith("cannot be read")


def test_load_pixels_applies_the_same_rules(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_noise(8, 8)), tmp_path / "scan.tif")
    with pytest.raises(ImageRejected, match="unsupported image format TIFF"):
        load_pixels(path, 32, 3)
    big = _save(Image.fromarray(_noise(10, 10)), tmp_path / "big.png")
    with pytest.raises(ImageRejected, match="too large"):
        load_pixels(big, 32, 3, max_pixels=99)


# --- load_pixels: every mode comes out as (size, size, channels) uint8 ---------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba", "palette", "gray16", "gif", "bmp", "jpeg"])
def test_load_pixels_shape_and_dtype(tmp_path: Path, kind: str, channels: int) -> None:
    rgb = _noise(9, 15)
    images = {
        "gray": (Image.fromarray(rgb[:, :, 0]), "png"),
        "rgb": (Image.fromarray(rgb), "png"),
        "rgba": (Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])), "png"),
        "palette": (Image.fromarray(rgb).convert("P"), "png"),
        "gray16": (Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257), "png"),
        "gif": (Image.fromarray(rgb), "gif"),
        "bmp": (Image.fromarray(rgb), "bmp"),
        "jpeg": (Image.fromarray(rgb), "jpg"),
    }
    image, extension = images[kind]
    path = _save(image, tmp_path / f"{kind}.{extension}")

    pixels = load_pixels(path, 32, channels)

    assert pixels.shape == (32, 32, channels)
    assert pixels.dtype == np.uint8


def test_grayscale_to_rgb_repeats_the_gray_value(tmp_path: Path) -> None:
    gray = _noise(16, 16, channels=1)
    path = _save(Image.fromarray(gray), tmp_path / "gray.png")
    pixels = load_pixels(path, 16, 3)
    assert pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(pixels[:, :, 0], gray)
    np.testing.assert_array_equal(pixels[:, :, 1], gray)
    np.testing.assert_array_equal(pixels[:, :, 2], gray)


def test_rgb_not_resized_keeps_pixels_exactly(tmp_path: Path) -> None:
    rgb = _noise(16, 16)
    path = _save(Image.fromarray(rgb), tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_pixels(path, 16, 3), rgb)


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[:, :8] = (10, 20, 30, 255)  # opaque left half
    rgba[:, 8:] = (10, 20, 30, 0)  # fully transparent right half
    path = _save(Image.fromarray(rgba), tmp_path / "rgba.png")
    pixels = load_pixels(path, 16, 3)
    assert pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(pixels[:, :8], np.broadcast_to([10, 20, 30], (16, 8, 3)))
    np.testing.assert_array_equal(pixels[:, 8:], np.full((16, 8, 3), 255))


def test_palette_png_keeps_its_colours(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:8] = (255, 0, 0)
    rgb[8:] = (0, 0, 255)
    image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    path = _save(image, tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    pixels = load_pixels(path, 16, 3)
    np.testing.assert_array_equal(pixels, rgb)


def test_palette_png_with_transparency_over_white(tmp_path: Path) -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, 8:] = (0, 255, 0)
    image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    black_index = image.getpixel((0, 0))
    path = _save(image, tmp_path / "transparent.png", transparency=black_index)
    pixels = load_pixels(path, 16, 3)
    np.testing.assert_array_equal(pixels[:, :8], np.full((16, 8, 3), 255))
    np.testing.assert_array_equal(pixels[:, 8:], np.broadcast_to([0, 255, 0], (16, 8, 3)))


def test_16_bit_png_full_range_is_scaled_to_8_bits(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    info = inspect_image(path)
    assert info.channels == 1
    pixels = load_pixels(path, 4, 1)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 1, 128, 255])


def test_dark_16_bit_png_stays_dark(tmp_path: Path) -> None:
    values = np.full((4, 4), 200, dtype=np.uint16)  # 200 / 65535: almost black
    path = _save(Image.fromarray(values), tmp_path / "dark16.png")
    pixels = load_pixels(path, 4, 1)
    assert int(pixels.max()) <= 1


# --- EXIF orientation ----------------------------------------------------------------------------

def _rotated_jpeg(path: Path) -> Path:
    """Stored 40 wide x 20 tall, left half black, right half white, EXIF orientation 6 (rotate 90 CW)."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, 20:] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    raw = Image.open(path)
    assert raw.size == (40, 20) and raw.getexif()[EXIF_ORIENTATION] == 6
    return path


def test_exif_rotated_jpeg_reports_upright_size(tmp_path: Path) -> None:
    info = inspect_image(_rotated_jpeg(tmp_path / "phone.jpg"))
    assert (info.width, info.height) == (20, 40)


def test_exif_rotated_jpeg_pixels_are_upright(tmp_path: Path) -> None:
    # Rotating 90 degrees clockwise puts the stored left (black) half on top.
    pixels = load_pixels(_rotated_jpeg(tmp_path / "phone.jpg"), 40, 1)[:, :, 0].astype(int)
    assert pixels.shape == (40, 40)
    assert pixels[2:18].mean() < 20  # top half black
    assert pixels[22:38].mean() > 235  # bottom half white
    # Not merely left/right as stored.
    assert abs(pixels[:, 2:18].mean() - pixels[:, 22:38].mean()) < 20


@pytest.mark.parametrize("extension", ["jpg", "png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_gives_the_pixels_pillow_s_exif_transpose_gives(
        tmp_path: Path, orientation: int, extension: str) -> None:
    """Training and serving share these pixels (and fingerprints and hashes depend on them)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = _save(Image.fromarray(_noise(6, 10)), tmp_path / f"o{orientation}.{extension}", exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(path))
    decoded = decode_file(path).image
    assert decoded.size == expected.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))


def _jpeg_with_mistyped_exif_tag() -> bytes:
    """Orientation 6, and XResolution (a RATIONAL tag) stored as ASCII "72": Pillow reads it, but
    cannot write it back (ImageOps.exif_transpose raised TypeError on rewriting the EXIF)."""
    tiff = bytes.fromhex("4d4d002a00000008" "0002" "011a00020000000337320000" "01120003000000010006000000000000")
    buffer = io.BytesIO()
    Image.fromarray(_noise(20, 40)).save(buffer, "JPEG", exif=b"Exif\0\0" + tiff)
    return buffer.getvalue()


def test_a_mistyped_exif_tag_still_decodes_upright(tmp_path: Path) -> None:
    path = tmp_path / "odd-exif.jpg"
    path.write_bytes(_jpeg_with_mistyped_exif_tag())
    assert Image.open(path).getexif()[EXIF_ORIENTATION] == 6
    assert (inspect_image(path).width, inspect_image(path).height) == (20, 40)
    assert load_pixels_from_bytes(path.read_bytes(), 24, 3).shape == (24, 24, 3)


def test_an_exif_block_that_cannot_be_read_leaves_the_pixels_as_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _rotated_jpeg(tmp_path / "phone.jpg")

    def unreadable(self):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image.Image, "getexif", unreadable)
    assert (inspect_image(path).width, inspect_image(path).height) == (40, 20)


def test_a_multi_picture_jpeg_decodes_its_first_picture() -> None:
    """Phones write JPEGs with an MPF header (gain maps, multi-picture): Pillow calls them MPO."""
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (200, 0, 0)).save(buffer, "MPO", save_all=True,
                                                 append_images=[Image.new("RGB", (30, 20), (0, 0, 200))])
    assert Image.open(buffer).format == "MPO"
    pixels = load_pixels_from_bytes(buffer.getvalue(), 8, 3).astype(int)
    assert np.abs(pixels - [200, 0, 0]).max() < 8


def test_load_pixels_from_bytes_matches_load_pixels(tmp_path: Path) -> None:
    path = _rotated_jpeg(tmp_path / "phone.jpg")
    np.testing.assert_array_equal(load_pixels_from_bytes(path.read_bytes(), 24, 3), load_pixels(path, 24, 3))
    with pytest.raises(ImageRejected):
        load_pixels_from_bytes(b"", 24, 3)
    with pytest.raises(ImageRejected, match="not an image"):
        load_pixels_from_bytes(b"hello", 24, 3)


def test_to_model_pixels_resizes_only_when_needed() -> None:
    rgb = _noise(10, 10)
    same = to_model_pixels(Image.fromarray(rgb), 10, 3)
    np.testing.assert_array_equal(same, rgb)
    smaller = to_model_pixels(Image.fromarray(rgb), 5, 1)
    assert smaller.shape == (5, 5, 1) and smaller.dtype == np.uint8


def test_to_model_pixels_does_not_scale_values() -> None:
    white = Image.new("RGB", (7, 3), (255, 255, 255))
    pixels = to_model_pixels(white, 32, 3)
    assert pixels.shape == (32, 32, 3)
    assert pixels.min() == 255 and pixels.max() == 255
