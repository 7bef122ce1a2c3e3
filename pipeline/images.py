"""The one set of decode rules: what counts as an image, and how it becomes model input.

``ingest`` accepts a file only if :func:`decode_file` decodes it completely; training, evaluation
and prediction load pixels with :func:`load_pixels`, which applies the same rules. So nothing that
ingest accepted can fail to decode later.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

# MPO is a JPEG with a multi-picture header (phones: Ultra HDR gain maps, Samsung and Apple
# multi-picture): its first picture is the photo, as an animated GIF's first frame is.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit
EXIF_ORIENTATION = 0x0112
# The turn or mirror for each EXIF orientation, as Pillow's ImageOps.exif_transpose makes it.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageRejected(Exception):
    """A file that is not a usable image; ``reason`` is one line for the rejected-files report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ImageInfo(NamedTuple):
    """What ingest records about an accepted image (a tuple: it crosses from the pool's workers)."""

    sha256: str
    width: int
    height: int
    channels: int


class DecodedFile(NamedTuple):
    """A file's SHA-256 and its decoded, upright image."""

    sha256: str
    image: Image.Image


def decode_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedFile:
    """Hash and fully decode one file; raise :class:`ImageRejected` with the reason if it is unusable."""
    data = _read_bytes(path)
    return DecodedFile(hashlib.sha256(data).hexdigest(), _decode(data, max_pixels))


def describe(decoded: DecodedFile) -> ImageInfo:
    """What ingest records about a decoded file."""
    image = decoded.image
    channels = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
    return ImageInfo(decoded.sha256, image.width, image.height, channels)


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Hash and fully decode one file (:func:`decode_file`) and describe it."""
    return describe(decode_file(path, max_pixels))


def load_pixels(path: str | Path, image_size: int, channels: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode, orient, convert and resize one image to a ``(size, size, channels)`` uint8 array.

    Files in a manifest passed ingest's pixel limit already, so by default there is no limit here.
    """
    image = _decode(_read_bytes(path), max_pixels)
    return to_model_pixels(image, image_size, channels)


def load_pixels_from_bytes(data: bytes, image_size: int, channels: int,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """:func:`load_pixels` for bytes already in memory (a request body, an upload)."""
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    return to_model_pixels(_decode(data, max_pixels), image_size, channels)


def to_model_pixels(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Convert a decoded image to the model's input layout (values 0-255, no scaling)."""
    image = _flatten_mode(image, channels)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return pixels


def to_gray(image: Image.Image) -> Image.Image:
    """Any mode as 8-bit grayscale (``L``), by the same rules as the model's input."""
    return _flatten_mode(image, 1)


def _read_bytes(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except PermissionError:
        raise ImageRejected("cannot be read (permission denied)") from None
    except IsADirectoryError:
        raise ImageRejected("is a directory") from None
    except OSError as error:
        raise ImageRejected(f"cannot be read ({error.strerror or error})") from None
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    return data


def _decode(data: bytes, max_pixels: int | None) -> Image.Image:
    """Decode every pixel (not only the header) under a pixel limit; return an oriented image.

    ``max_pixels`` is the only limit (None: none, for files ingest has already vetted). Pillow's
    own global limit is switched off so that the params, not a library default, decide.
    """
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise ImageRejected(f"unsupported image format {image.format} (accepted: JPEG, PNG, BMP, GIF)")
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageRejected(
                    f"too large: {image.width}x{image.height} pixels is over the limit of {max_pixels} "
                    "(ingest.max_image_pixels)")
            image.load()   # an MPO's first picture, a GIF's first frame
            return _upright(image)
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (no known image format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected("too large: decompression bomb (ingest.max_image_pixels)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageRejected(f"corrupt image: {error}") from None


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (phones store their rotation there).

    Not ``ImageOps.exif_transpose``: it also rewrites the EXIF block, which raises on a tag whose
    stored type does not match its value. The pixels are the same; the EXIF is left as read.
    """
    try:
        method = ORIENTATION_TRANSPOSE.get(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:   # Pillow raises many types on a damaged EXIF block: no orientation, as stored
        return image
    # Most photos need no turn, and a copy of every decoded image is not free.
    return image if method is None else image.transpose(method)


def _flatten_mode(image: Image.Image, channels: int) -> Image.Image:
    """Bring any mode (palette, RGBA, CMYK, 16-bit) to ``L`` or ``RGB``; transparency over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (values up to 65535): map the full range to 8 bits, 65535 / 257 = 255.
        # Mode "I" does not say its bit depth; values over 255 mean it holds 16-bit data.
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or array.max() > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)
