"""What the page generators share: a block between two markers, rewritten or checked."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.files import atomic_write_text

BEGIN_PREFIX = "<!-- begin:"   # how every generated block's first marker starts


def replaced(page: str, block: str, begin: str, end: str) -> str:
    """``page`` with the text from ``begin`` to ``end`` (markers included) replaced by ``block``.
    Refused when the next begin marker comes first: blocks share one end marker, so a block whose own
    end was deleted would otherwise take the hand-written text and the next block with it."""
    start = page.index(begin)
    stop = page.index(end, start)
    if BEGIN_PREFIX in page[start + len(begin):stop]:
        raise ValueError(f"the generated block {begin!r} has lost its end marker {end!r}: put it back before "
                         "the next block begins")
    return page[:start] + block + page[stop + len(end):]


def write_or_check(page_path: Path, rewrite: Callable[[str], str], command: str, check: bool) -> int:
    """Write the page as ``rewrite`` makes it, or (``check``) return 1 when the page is not that."""
    page = page_path.read_text(encoding="utf-8")
    wanted = rewrite(page)
    if check:
        if wanted != page:
            print(f"{page_path} is stale: run {command}", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(page_path, wanted)   # a page cut short by Ctrl-C would lose hand-written text
    print(f"written: {page_path}")
    return 0


def one_block(render: Callable[[], str], begin: str, end: str) -> Callable[[str], str]:
    """The rewrite of a page with one generated block: the block ``render`` makes, between the markers."""
    return lambda page: replaced(page, render(), begin, end)


def main(module: str, description: str, page_path: Path, rewrite: Callable[[str], str],
         argv: list[str] | None = None) -> int:
    """``python -m docs.<module> [--check]``: write the generated blocks, or check they are current."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is not what this writes")
    args = parser.parse_args(argv)
    return write_or_check(page_path, rewrite, f"python -m {module}", args.check)
