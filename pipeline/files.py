"""Writing files so that a killed stage never leaves half of one behind."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """The one atomic writer: yield a temporary path beside ``path`` (same suffix, so libraries
    that look at it write the right format); when the block ends, rename it into place. If the
    block fails, the temporary file goes and any old ``path`` stays as it was.

    The new file gets the old one's permissions, or those a plain ``open`` would give (mkstemp's
    are owner-only); a symbolic link stays a link, and the file it points at is the one replaced."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, _mode_for(path))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permission bits a rewritten ``path`` keeps: its own, or a new file's under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="\n")


def write_json(path: Path, data: Any) -> None:
    """Write JSON that every renderer accepts: sorted nothing, NaN and infinities refused."""
    atomic_write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """The one CSV writer: as ``pandas.DataFrame.to_csv(index=False)`` would, "\\n" line ends,
    NaN and infinities as empty cells (which DVC's plot renderer skips), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # With "\n" line ends, the csv module quotes a field holding "\n" but not one holding "\r" (a file
    # named "Icon\r", as macOS makes): readers would split the row there. Such rows are quoted whole.
    quoted = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(header)
    for row in rows:
        cells = [None if isinstance(value, float) and not math.isfinite(value) else value for value in row]
        (quoted if any(isinstance(cell, str) and "\r" in cell for cell in cells) else writer).writerow(cells)
    atomic_write_text(path, buffer.getvalue())


def write_frame_csv(path: Path, frame: Any) -> None:
    """A pandas DataFrame through :func:`write_csv` (index left out)."""
    write_csv(path, [str(column) for column in frame.columns], frame.itertuples(index=False, name=None))


def printable(name: str | Path) -> str:
    """A file name safe to print or write in a UTF-8 report: bytes that are not UTF-8 (names from old
    zip archives, Windows code pages) shown as \\xNN instead of raising UnicodeEncodeError."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_json(path: Path) -> Any:
    """Read a JSON file written by an earlier stage."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _finite(value: Any) -> Any:
    """Replace NaN and infinities (which break JSON and DVC's plot renderer) with null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
