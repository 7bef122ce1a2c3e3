"""A hostile image source folder, written on the fly, with the exact verdict ingest owes each entry.

:func:`make_hostile_folder` writes ``cat/`` and ``dog/`` with good images in every mode and format
ingest must take (grayscale, RGBA, palette, 16-bit, CMYK, animated GIF, BMP, EXIF-rotated, a PNG
named ``.jpg``, upper-case extensions, nested folders, odd names) and the files it must refuse
(truncated, empty, text or HTML posing as JPEG, decompression bombs, hidden and system files,
symbolic links out of the folder or to nowhere, the same picture under both labels, stray files
at the top). Every file's bytes depend only on its name, so writing the folder in another order
gives the same content; :func:`tree_state` is the fingerprint that proves ingest changed nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 10_000_000          # the ingest.max_image_pixels the hostile tests run with
BOMB_SIDE = 40_000               # 1.6 gigapixels: ~1.6 GB if ever decoded, ~190 KB on disk
PIXEL_LIMIT_BOMB_SIDE = 5_000    # 25 megapixels: under Pillow's own limit, over MAX_PIXELS
EXIF_ORIENTATION = 0x0112
EXIF_STORED_SIZE = (40, 20)      # width x height as stored; orientation 6 shows it 20 wide, 40 tall
EXIF_DISPLAY_SIZE = (20, 40)

HTML_ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                   b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p>"
                   b"</body></html>\n")


@dataclass
class HostileFolder:
    """A written hostile folder and what ingest must make of it (paths relative to ``root``)."""

    root: Path
    outside: Path                                   # a folder beside root, for the outward symlink
    expected_accepted: dict[str, str]               # relative path -> label
    expected_rejected: set[str]
    reason_hints: dict[str, str] = field(default_factory=dict)  # rejected path -> word its reason holds
    exif_rotated: str = "cat/rotated.jpg"
    bomb: str = "cat/bomb.png"
    pixel_limit_bomb: str = "dog/medium_bomb.png"
    unreadable: str = "dog/locked.png"
    unreadable_is_readable: bool = False            # True when running as root: chmod 000 stops nobody
    max_pixels: int = MAX_PIXELS

    def labels(self) -> list[str]:
        return sorted(set(self.expected_accepted.values()))


# --- bytes of each kind of file ------------------------------------------------------------------

def _seed(name: str) -> int:
    """A seed from the file's name alone, so content does not depend on the order of creation."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _noise(name: str, height: int = 16, width: int = 16, channels: int = 3, dtype=np.uint8,
           high: int = 256) -> np.ndarray:
    rng = np.random.default_rng(_seed(name))
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, high, size=shape, dtype=dtype)


def encode_image(image: Image.Image, format: str, **options) -> bytes:
    """The bytes of ``image`` saved in ``format``, as a file of that format would hold them."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _rgb(name: str, format: str = "PNG", **options) -> bytes:
    if format == "JPEG":
        options.setdefault("quality", 95)
    return encode_image(Image.fromarray(_noise(name)), format, **options)


def _gray(name: str) -> bytes:
    return encode_image(Image.fromarray(_noise(name, channels=1), mode="L"), "PNG")


def _rgba(name: str) -> bytes:
    pixels = _noise(name, channels=4)
    pixels[:4, :, 3] = 0  # a fully transparent band, composited over white on load
    return encode_image(Image.fromarray(pixels, mode="RGBA"), "PNG")


def _palette(name: str) -> bytes:
    return encode_image(Image.fromarray(_noise(name)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def _sixteen_bit(name: str) -> bytes:
    image = Image.fromarray(_noise(name, channels=1, dtype=np.uint16, high=65536))
    assert image.mode.startswith("I;16"), image.mode
    return encode_image(image, "PNG")


def _bilevel(name: str) -> bytes:
    return encode_image(Image.fromarray(_noise(name, channels=1) > 127).convert("1"), "PNG")


def _cmyk(name: str) -> bytes:
    return encode_image(Image.fromarray(_noise(name)).convert("CMYK"), "JPEG", quality=95)


def _animated_gif(name: str) -> bytes:
    frames = [Image.fromarray(_noise(f"{name}#{i}")).convert("P") for i in range(3)]
    return encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def _exif_rotated(name: str) -> bytes:
    """Stored 40 wide x 20 tall, left half red, right half blue; EXIF orientation 6 (turn 90 degrees
    clockwise to view) shows it 20 wide x 40 tall with red on top and blue below."""
    width, height = EXIF_STORED_SIZE
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (220, 20, 20)
    pixels[:, width // 2:] = (20, 20, 220)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode_image(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _truncated_jpeg(name: str) -> bytes:
    whole = encode_image(Image.fromarray(_noise(name, 64, 64)), "JPEG", quality=95)
    return whole[: len(whole) // 2]


def _tiff(name: str) -> bytes:
    return encode_image(Image.fromarray(_noise(name)), "TIFF")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@cache
def zero_png(side: int, bit_depth: int) -> bytes:
    """A valid grayscale PNG of side x side zeros, written without ever holding the pixels.

    Rows are fed to zlib a block at a time (each row a filter byte and zeros), so a 40,000 x
    40,000 1-bit bomb takes well under a second and about 200 KB; cached, as the bytes never vary.
    """
    row = b"\0" * (1 + (side * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    block = row * rows_per_block
    parts = []
    for start in range(0, side, rows_per_block):
        parts.append(compressor.compress(block if start + rows_per_block <= side else row * (side - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)  # colour type 0 = grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


# --- the folder ------------------------------------------------------------------------------------

ACCEPT = "accept"
REJECT = "reject"


@dataclass(frozen=True)
class _Entry:
    relative: str
    write: Callable[[Path, HostileFolder], None]
    verdict: str          # ACCEPT or REJECT
    hint: str = ""        # for REJECT: a word the rejection reason must hold


def _bytes(produce: Callable[[], bytes]) -> Callable[[Path, HostileFolder], None]:
    def write(path: Path, _: HostileFolder) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(produce())
    return write


def _symlink(target: Callable[[HostileFolder], Path], directory: bool = False) -> Callable[[Path, HostileFolder], None]:
    def write(path: Path, folder: HostileFolder) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target(folder), target_is_directory=directory)
    return write


def _unreadable(produce: Callable[[], bytes]) -> Callable[[Path, HostileFolder], None]:
    def write(path: Path, folder: HostileFolder) -> None:
        _bytes(produce)(path, folder)
        path.chmod(0)
    return write


def _entries() -> list[_Entry]:
    def good(rel, make):
        return _Entry(rel, _bytes(make), ACCEPT)

    def bad(rel, make, hint):
        return _Entry(rel, _bytes(make), REJECT, hint)

    def shared():
        return _rgb("the same picture in both classes")

    def duplicate():
        return _rgb("one picture twice in dog")

    entries = [
        # cat: plain good images, then every awkward-but-good kind.
        *(good(f"cat/cat_{i:02d}.png", lambda i=i: _rgb(f"cat {i}")) for i in range(3)),
        *(good(f"cat/cat_{i:02d}.jpg", lambda i=i: _rgb(f"cat {i}", "JPEG")) for i in range(3, 6)),
        good("cat/photo.JPG", lambda: _rgb("upper-case jpg", "JPEG")),
        good("cat/gray.png", lambda: _gray("gray")),
        good("cat/rgba.png", lambda: _rgba("rgba")),
        good("cat/deep16.png", lambda: _sixteen_bit("16-bit")),
        good("cat/animated.gif", lambda: _animated_gif("animated")),
        good("cat/rotated.jpg", lambda: _exif_rotated("exif")),
        good("cat/really_a_png.jpg", lambda: _rgb("png named jpg", "PNG")),
        good("cat/progressive.jpg", lambda: _rgb("progressive", "JPEG", progressive=True)),
        good("cat/one_pixel.png", lambda: encode_image(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")),
        good("cat/nested/deeper.png", lambda: _rgb("nested deeper")),
        # cat: what must be refused.
        bad("cat/shared.png", shared, "several labels"),
        bad("cat/truncated.jpg", lambda: _truncated_jpeg("truncated"), "corrupt"),
        bad("cat/empty.jpg", lambda: b"", "empty"),
        bad("cat/notes.jpg", lambda: b"shopping list: milk, eggs\n", "not an image"),
        bad("cat/.hidden.jpg", lambda: _rgb("hidden", "JPEG"), "hidden"),
        bad("cat/.DS_Store", lambda: b"\0\0\0\1Bud1" + bytes(64), "hidden"),
        bad("cat/scan.tiff", lambda: _tiff("tiff"), "unsupported image format"),
        bad("cat/bomb.png", lambda: zero_png(BOMB_SIDE, 1), "too large"),
        _Entry("cat/outside_link.png", _symlink(lambda f: f.outside / "outside.png"), REJECT, "outside"),
        _Entry("cat/linked_folder", _symlink(lambda f: f.root / "dog", directory=True), REJECT, "folder"),
        # dog: good images.
        *(good(f"dog/dog_{i:02d}.png", lambda i=i: _rgb(f"dog {i}")) for i in range(3)),
        *(good(f"dog/dog_{i:02d}.jpg", lambda i=i: _rgb(f"dog {i}", "JPEG")) for i in range(3, 5)),
        good("dog/Portrait.Jpeg", lambda: _rgb("mixed-case jpeg", "JPEG")),
        good("dog/palette.png", lambda: _palette("palette")),
        good("dog/cmyk.jpg", lambda: _cmyk("cmyk")),
        good("dog/bitmap.bmp", lambda: _rgb("bmp", "BMP")),
        good("dog/bilevel.png", lambda: _bilevel("bilevel")),
        good("dog/my dog ü 猫.png", lambda: _rgb("non-ascii name")),
        good("dog/a,b \"c\" 'd'.png", lambda: _rgb("csv-hostile name")),
        good("dog/dup_a.png", duplicate),
        good("dog/dup_b.png", duplicate),
        # dog: what must be refused.
        bad("dog/shared_copy.png", shared, "several labels"),
        bad("dog/error_page.jpeg", lambda: HTML_ERROR_PAGE, "not an image"),
        bad("dog/Thumbs.db", lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(56), "system file"),
        bad("dog/.thumbnails/thumb.png", lambda: _rgb("thumbnail"), "hidden"),
        bad("dog/medium_bomb.png", lambda: zero_png(PIXEL_LIMIT_BOMB_SIDE, 8), "too large"),
        _Entry("dog/broken_link.jpg", _symlink(lambda f: f.outside / "no-such-file.jpg"), REJECT, "broken"),
        # The verdict on the unreadable file depends on who runs the tests (see make_hostile_folder).
        _Entry("dog/locked.png", _unreadable(lambda: _rgb("locked")), ACCEPT),
        # Straight under the root: not in any class folder.
        bad(".DS_Store", lambda: b"\0\0\0\1Bud1" + bytes(64), "hidden"),
        bad("stray.jpg", lambda: _rgb("stray", "JPEG"), "class folder"),
        bad("notes.txt", lambda: b"these are my pets\n", "class folder"),
    ]
    return entries


def make_hostile_folder(root: Path, *, reverse: bool = False) -> HostileFolder:
    """Write the hostile folder at ``root`` (which must not exist); ``reverse`` writes it backwards.

    The image outside the source, the target of ``cat/outside_link.png``, goes in a sibling folder
    ``<root>.outside``. An empty folder ``cat/empty_dir`` is also made (nothing to report).
    """
    root = Path(root)
    root.mkdir(parents=True)
    outside = root.parent / f"{root.name}.outside"
    outside.mkdir()
    (outside / "outside.png").write_bytes(_rgb("outside the source"))
    folder = HostileFolder(root=root, outside=outside, expected_accepted={}, expected_rejected=set())

    entries = _entries()
    (root / "cat" / "empty_dir").mkdir(parents=True)
    for entry in (reversed(entries) if reverse else entries):
        entry.write(root / entry.relative, folder)

    for entry in entries:
        if entry.verdict == ACCEPT:
            folder.expected_accepted[entry.relative] = entry.relative.split("/", 1)[0]
        else:
            folder.expected_rejected.add(entry.relative)
            folder.reason_hints[entry.relative] = entry.hint
    # chmod 000 stops an ordinary user, not root (CI runs as root): the file is then a good image.
    folder.unreadable_is_readable = _can_read(root / folder.unreadable)
    if not folder.unreadable_is_readable:
        del folder.expected_accepted[folder.unreadable]
        folder.expected_rejected.add(folder.unreadable)
        folder.reason_hints[folder.unreadable] = "permission"
    return folder


def _can_read(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            stream.read(1)
    except PermissionError:
        return False
    return True


# --- a fingerprint of a folder -------------------------------------------------------------------

def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (root included) -> its kind, mode, mtime and content.

    Files: sha256 of the bytes; symbolic links: their target (never followed); folders: their mode.
    Never opens anything but regular files, so a FIFO cannot hang it.
    """
    root = Path(root)
    state: dict[str, str] = {".": _describe(root)}
    for directory, subdirs, files in os.walk(root, followlinks=False):
        for name in sorted(subdirs + files):
            path = Path(directory) / name
            state[path.relative_to(root).as_posix()] = _describe(path)
    return dict(sorted(state.items()))


def tree_checksum(root: Path) -> str:
    """One sha256 over :func:`tree_state`: names, bytes, link targets, modes and mtimes."""
    digest = hashlib.sha256()
    for key, value in tree_state(root).items():
        digest.update(key.encode("utf-8", "surrogateescape") + b"\0" + value.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _describe(path: Path) -> str:
    info = path.lstat()
    mode = f"{info.st_mode:o} mtime={info.st_mtime_ns}"
    if stat.S_ISLNK(info.st_mode):
        return f"link {mode} -> {os.readlink(path)}"
    if stat.S_ISDIR(info.st_mode):
        return f"dir {mode}"
    if stat.S_ISREG(info.st_mode):
        try:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        except PermissionError:
            content = "unreadable"
        return f"file {mode} size={info.st_size} sha256={content}"
    return f"other {mode}"
