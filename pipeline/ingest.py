"""Stage ``ingest``: turn an image source into a manifest of decodable, labelled images.

A source is either ``sklearn:digits`` (the handwritten digits that ship with scikit-learn,
written out as PNG files) or a folder with one subfolder per class. Every file is decoded for
real; the unusable ones go to a rejected-files report with the reason. Exact copies and near
copies (close perceptual hashes, confirmed by the SSIM of small thumbnails:
:mod:`pipeline.near_duplicates`) form groups that ``split`` keeps together; the files that are one
picture under two labels are left out, the rest of their group kept. A data health report lists
the groups, the conflicts, class balance, blank frames and small images, and draws the largest
group of near copies. The user's files are only ever read.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import stat
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tqdm import tqdm

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.files import printable, write_csv, write_json
from pipeline.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_file, describe
from pipeline.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    QUALITY_COLUMNS,
    QUALITY_FILE,
    REJECTED_COLUMNS,
    REJECTED_FILE,
    SOURCE_FILE,
    ManifestRow,
    QualityRow,
    RejectedRow,
)
from pipeline.near_duplicates import NearPairs, fingerprint, group_rows, measure_pairs, near_pairs
from pipeline.params import load_params
from pipeline.seeding import seed_everything

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("pipeline.ingest")

DIGITS_SOURCE = "sklearn:digits"
BUILTIN_IMAGES_DIR = "images"
ALMOST_UNIFORM_SPREAD = 4.0   # grayscale standard deviation (0-255) below which a frame is nearly one colour
SMALL_FRACTION = 0.5          # an image less than this share of base.image_size on its shorter side is small
LARGEST_GROUP_FILE = "largest_group.png"   # the largest group of near copies, drawn: is it one scene?
SHEET_TILE = 96               # pixels a side of each photo on that drawing
SHEET_COLUMNS = 8
SHEET_MAX = 64                # members drawn at most (the title says how many there are)


class Inspected(NamedTuple):
    """What one worker learns about an accepted file (a tuple: it crosses from the pool's workers)."""

    sha256: str
    width: int
    height: int
    channels: int
    phash: str
    spread: float
    pixels: bytes     # the 16x16 thumbnail that confirms a near copy (256 bytes)


class Link(NamedTuple):
    """A confirmed near copy of a row: the other file and the two measures that agreed."""

    path: str
    bits: int          # between the perceptual hashes
    similarity: float  # SSIM of the 16x16 thumbnails


@dataclass(frozen=True)
class IngestResult:
    """The accepted images (sorted by path), the rejected files (sorted by path), how many accepted
    files repeat an earlier one's content, and the data health report (``quality``, sorted by check
    and path, and its counts in ``health``).

    The stage works on plain rows, without pandas: its import alone is a quarter of a second of
    serial start-up, and ingest runs on every core. ``manifest`` and ``rejected`` give the same
    rows as data frames, for code that wants one.
    """

    images: list[ManifestRow]
    rejected_files: list[RejectedRow]
    duplicate_files: int
    quality: list[QualityRow] = field(default_factory=list)
    health: dict = field(default_factory=dict)

    @cached_property
    def manifest(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.images, columns=MANIFEST_COLUMNS)

    @cached_property
    def rejected(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.rejected_files, columns=REJECTED_COLUMNS)


def export_digits(destination: Path) -> None:
    """Write scikit-learn's 1,797 digits as 8x8 grayscale PNGs in ``destination/<digit>/``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values run 0..16; stretch them to the 0..255 of an ordinary 8-bit image.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, target) in enumerate(zip(pixels, digits.target)):
        folder = destination / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png", optimize=False)


def find_candidates(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Walk a class-per-folder tree in sorted order.

    Returns ``(candidates, rejected)``: ``(relative path, label)`` pairs to decode, and
    ``(relative path, reason)`` pairs for entries that are not candidates at all.
    """
    root_real = root.resolve()
    candidates: list[tuple[str, str]] = []
    rejected: list[tuple[str, str]] = []
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as error:
        raise PipelineError(f"ingest.source: {root} cannot be read ({error.strerror or error})") from None
    for entry in entries:
        relative = printable(entry.name)
        if entry.name.startswith("."):
            rejected.append((relative, "hidden file or folder"))
        elif not _is_utf8(entry.name):
            rejected.append((relative, "name is not valid UTF-8 (rename it)"))
        elif entry.is_dir() and entry.is_symlink():
            rejected.append((relative, "symbolic link to a folder (class folders must be real folders)"))
        elif entry.is_dir():
            label = entry.name
            for rel, file_entry in _walk_files(str(entry), entry.name):
                if isinstance(file_entry, OSError):
                    rejected.append((printable(rel), f"folder cannot be read ({file_entry.strerror or file_entry}); "
                                                      "its files are left out"))
                    continue
                if not _is_utf8(rel):
                    rejected.append((printable(rel), "name is not valid UTF-8 (rename it)"))
                    continue
                reason = _path_problem(file_entry, rel, root_real)
                if reason:
                    rejected.append((rel, reason))
                else:
                    candidates.append((rel, label))
        else:
            rejected.append((relative, "not inside a class folder (expected <source>/<class>/<image>)"))
    return candidates, rejected


def ingest_folder(root: Path, max_pixels: int, max_per_class: int | None = None, seed: int = 0,
                  workers: int | None = None, near_duplicate_distance: int = 0, image_size: int = 0,
                  near_duplicate_similarity: float = 0.0) -> IngestResult:
    """Decode every candidate image under ``root`` and build the manifest, the rejected report and
    the health report.

    Exact copies (same SHA-256) and near copies (perceptual hashes at most
    ``near_duplicate_distance`` bits apart, 0: off, and thumbnails' SSIM at least
    ``near_duplicate_similarity``) form groups; the files that are one picture under several labels
    are left out. ``image_size`` (base.image_size) is what "far smaller" is measured against.
    """
    if not root.is_dir():
        raise PipelineError(f"ingest.source: {root} is not a folder (expected one subfolder per class)")
    candidates, rejected = find_candidates(root)
    class_folders = sorted({label for _, label in candidates})
    log.info("found %d candidate files in %d class folders under %s", len(candidates), len(class_folders), root)

    inspected: list[tuple[str, str, Inspected]] = []
    for (rel, label), outcome in zip(candidates, _inspect_all(root, [rel for rel, _ in candidates],
                                                               max_pixels, workers)):
        if isinstance(outcome, str):
            rejected.append((rel, outcome))
        else:
            inspected.append((rel, label, outcome))
    inspected.sort(key=lambda item: item[0])
    images, spreads, conflicts, links, pair_counts = _group(inspected, near_duplicate_distance,
                                                            near_duplicate_similarity)
    rejected.extend((row.path, row.detail) for row in conflicts)
    if max_per_class is not None:
        images = _sample_per_class(images, max_per_class, seed)
    images.sort(key=lambda row: row.path)
    rejected_files = sorted((RejectedRow(*row) for row in rejected), key=lambda row: row.path)
    seen: set[str] = set()
    duplicate_files = 0
    for row in images:
        duplicate_files += row.sha256 in seen
        seen.add(row.sha256)
    quality, health = health_report(images, spreads, conflicts, image_size, links)
    health = {"near_duplicate_distance": near_duplicate_distance,
              "near_duplicate_similarity": near_duplicate_similarity, **pair_counts, **health}
    return IngestResult(images, rejected_files, duplicate_files, quality, health)


def inspect_file(path: Path, max_pixels: int) -> Inspected:
    """Decode one file, hash its bytes, fingerprint its pixels: what each ingest worker does per file.

    Raises :class:`ImageRejected` with the reason for an unusable file, a perceptual hash that
    cannot be computed included.
    """
    decoded = decode_file(path, max_pixels)
    try:
        marks = fingerprint(decoded.image)
    except Exception as error:  # noqa: BLE001 - any failure of the hash rejects this one file, never the run
        raise ImageRejected(f"perceptual hash cannot be computed ({type(error).__name__}: {error})") from None
    return Inspected(*describe(decoded), marks.phash, marks.spread, marks.pixels)


def health_report(images: list[ManifestRow], spreads: dict[str, float], conflicts: list[QualityRow],
                  image_size: int, links: dict[str, Link] | None = None) -> tuple[list[QualityRow], dict]:
    """The data health report: groups of exact and near copies, label conflicts (already left out),
    class balance, nearly one-colour frames and images far smaller than ``image_size``.

    ``links`` gives, for a row in a group of near copies, the confirmed near copy most like it
    (its path and both measures).

    Returns the report's rows (sorted by check, then path) and its counts for ``metrics/ingest.json``.
    """
    rows: list[QualityRow] = list(conflicts)
    members: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in images:
        members[row.group].append(row)
    exact_groups = near_groups = largest = 0
    for group, in_group in members.items():
        if len(in_group) < 2:
            continue
        largest = max(largest, len(in_group))
        distinct = len({row.sha256 for row in in_group})
        if distinct == 1:
            exact_groups += 1
            for row in in_group:
                rows.append(QualityRow("exact_duplicate", row.path, row.label, group,
                                       f"{len(in_group)} identical files"))
            continue
        near_groups += 1
        for row in in_group:
            link = (links or {}).get(row.path)
            how = (f"near copy of {link.path}: hashes {link.bits} bits apart, SSIM {link.similarity:.2f}" if link
                   else "identical bytes to another member")
            rows.append(QualityRow("near_duplicate", row.path, row.label, group,
                                   f"group of {len(in_group)} ({distinct} distinct files); {how}"))
    small_side = SMALL_FRACTION * image_size
    uniform = small = 0
    for row in images:
        spread = spreads.get(row.path)
        if spread is not None and spread < ALMOST_UNIFORM_SPREAD:
            uniform += 1
            rows.append(QualityRow("almost_uniform", row.path, row.label, "",
                                   f"grayscale spread {spread:g} of 255: a blank or nearly one-colour frame"))
        if min(row.width, row.height) < small_side:
            small += 1
            rows.append(QualityRow("small_image", row.path, row.label, "",
                                   f"{row.width}x{row.height}, under half of base.image_size {image_size}: "
                                   "enlarged more than twice for training"))
    per_class = Counter(row.label for row in images)
    conflict_groups = len({row.group for row in conflicts})
    rows.sort(key=lambda row: (CHECKS.index(row.check), row.path))
    return rows, {
        "exact_duplicate_groups": exact_groups,
        "near_duplicate_groups": near_groups,
        "images_in_duplicate_groups": sum(len(m) for m in members.values() if len(m) > 1),
        "largest_duplicate_group": largest,
        "label_conflict_groups": conflict_groups,
        "label_conflict_images": len(conflicts),
        "class_balance": round(min(per_class.values()) / max(per_class.values()), 4) if per_class else None,
        "almost_uniform_images": uniform,
        "small_images": small,
    }


CHECKS = ("label_conflict", "near_duplicate", "exact_duplicate", "almost_uniform", "small_image")


def summarise(result: IngestResult) -> dict:
    """Counts for ``metrics/ingest.json``: accepted and rejected, per class and in total."""
    per_class = Counter(row.label for row in result.images)
    rejected_per_class = Counter(row.path.split("/", 1)[0] if "/" in row.path else "(root)"
                                 for row in result.rejected_files)
    return {
        "accepted": len(result.images),
        "rejected": len(result.rejected_files),
        "classes": len(per_class),
        "duplicate_files": result.duplicate_files,
        "accepted_per_class": dict(sorted(per_class.items())),
        "rejected_per_class": dict(sorted(rejected_per_class.items())),
        **result.health,
    }


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    seed_everything(params.base.seed)
    out = Path(args.out)
    source = params.ingest.source
    if source == DIGITS_SOURCE:
        root = out / BUILTIN_IMAGES_DIR
        log.info("writing the built-in %s images to %s", source, root)
        export_digits(root)
        stored_root = root.as_posix()
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise PipelineError(f"ingest.source: {source} does not exist (use {DIGITS_SOURCE} or a folder "
                                "with one subfolder per class)")
        stored_root = root.as_posix() if not root.is_absolute() else str(root)
    out.mkdir(parents=True, exist_ok=True)
    result = ingest_folder(root, params.ingest.max_image_pixels, params.ingest.max_per_class,
                           params.base.seed, near_duplicate_distance=params.ingest.near_duplicate_distance,
                           image_size=params.base.image_size,
                           near_duplicate_similarity=params.ingest.near_duplicate_similarity)
    write_csv(out / MANIFEST_FILE, MANIFEST_COLUMNS, result.images)
    write_csv(out / REJECTED_FILE, REJECTED_COLUMNS, result.rejected_files)
    write_csv(out / QUALITY_FILE, QUALITY_COLUMNS, result.quality)
    write_json(out / SOURCE_FILE, {"source": source, "root": stored_root})
    drawn = draw_largest_group(result.images, root, out / LARGEST_GROUP_FILE, params.ingest.max_image_pixels)
    summary = summarise(result)
    write_json(Path(args.metrics), summary)
    check_classes(result, root)
    log.info("accepted %d images in %d classes, rejected %d files (see %s)", summary["accepted"],
             summary["classes"], summary["rejected"], out / REJECTED_FILE)
    for label, count in summary["accepted_per_class"].items():
        log.info("  %-20s accepted %6d  rejected %6d", label, count, summary["rejected_per_class"].get(label, 0))
    log_health(summary, out / QUALITY_FILE, drawn)


def log_health(summary: dict, report: Path, drawing: Path | None = None) -> None:
    """The health report's counts as log lines: warnings, except the conflicts already left out."""
    distance = summary["near_duplicate_distance"]
    near = (f"{summary['near_duplicate_groups']} groups of near copies (perceptual hashes within {distance} bits, "
            f"thumbnails' SSIM at least {summary['near_duplicate_similarity']:g})"
            if distance else "near copies not searched (ingest.near_duplicate_distance: 0)")
    log.info("health: %d groups of exact copies, %s; %d images in groups, the largest %d (split keeps each "
             "group in one split)", summary["exact_duplicate_groups"], near, summary["images_in_duplicate_groups"],
             summary["largest_duplicate_group"])
    if distance:
        log.info("health: %d pairs of close hashes, %d confirmed as near copies, %d look-alikes not linked",
                 summary["near_duplicate_candidates"], summary["near_duplicate_pairs"],
                 summary["near_duplicate_candidates"] - summary["near_duplicate_pairs"])
    if drawing is not None:
        log.info("health: the largest group of near copies is drawn in %s: check that it is one scene", drawing)
    if summary["label_conflict_images"]:
        log.warning("health: %d images, one picture under several labels, were left out (%d groups; see %s)",
                    summary["label_conflict_images"], summary["label_conflict_groups"], report)
    if summary["class_balance"] is not None and summary["class_balance"] < 0.5:
        log.warning("health: class balance %.2f (smallest / largest class): consider train_custom.class_weight: "
                    "balanced", summary["class_balance"])
    else:
        log.info("health: class balance %.2f (smallest / largest class)", summary["class_balance"] or 0)
    for key, what in (("almost_uniform_images", "nearly one-colour (blank) frames"),
                      ("small_images", "images under half of base.image_size on a side")):
        if summary[key]:
            log.warning("health: %d %s (see %s)", summary[key], what, report)


def _walk_files(folder: str, relative: str) -> Iterable[tuple[str, os.DirEntry | OSError]]:
    """Every entry under a class folder that is not a real folder (files, links, pipes), nested
    folders included, as ``(path relative to the source root, entry)`` in a stable order; a folder
    that cannot be listed comes as ``(its path, the error)``, so the report says which files are missing.

    ``os.scandir`` entries carry the file type from the directory listing, so a regular file
    costs no ``stat`` call here: the walk stays a small part of ingest on large folders.
    """
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as error:
        yield relative, error
        return
    subfolders = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subfolders.append(entry)
        else:
            yield f"{relative}/{entry.name}", entry
    for entry in subfolders:
        yield from _walk_files(entry.path, f"{relative}/{entry.name}")


def _path_problem(entry: os.DirEntry, relative: str, root_real: Path) -> str | None:
    """Why an entry (at ``relative`` under the source root) is not a candidate image, or None."""
    if any(part.startswith(".") for part in relative.split("/")):
        return "hidden file or folder"
    if entry.name.lower() in ("thumbs.db", "desktop.ini"):
        return "not an image (system file)"
    if entry.is_file(follow_symlinks=False):
        return None
    path = Path(entry.path)
    if path.is_symlink():
        try:
            target = path.resolve()
        except (OSError, RuntimeError):   # a loop of links: RuntimeError before Python 3.13, OSError after
            return "broken symbolic link (it loops)"
        if not target.exists():
            return "broken symbolic link"
        if not target.is_relative_to(root_real):
            return "symbolic link to a file outside the source folder"
        if target.is_dir():
            return "symbolic link to a folder"
    try:
        mode = path.stat().st_mode
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if not stat.S_ISREG(mode):
        # A named pipe or device would block or never end when read.
        return "not a regular file (pipe, socket or device)"
    return None


def _is_utf8(name: str) -> bool:
    """False for names the file system gave as undecodable bytes (old zip archives, Windows code pages)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _inspect_one(root: Path, max_pixels: int, relative: str) -> Inspected | str:
    try:
        return inspect_file(root / relative, max_pixels)
    except ImageRejected as rejected:
        return rejected.reason


def _inspect_all(root: Path, relatives: list[str], max_pixels: int, workers: int | None):
    """Inspect files on every core, results in input order, with a progress bar on stderr."""
    workers = workers or os.cpu_count() or 1
    task = partial(_inspect_one, root, max_pixels)
    progress = tqdm(total=len(relatives), desc="decoding", unit="img", file=sys.stderr, mininterval=0.5,
                    disable=len(relatives) < 500 or None)  # None: on only when stderr is a terminal
    with progress:
        if workers == 1 or len(relatives) < 64:
            results = []
            for rel in relatives:
                results.append(task(rel))
                progress.update()
            return results
        chunk = max(1, min(64, len(relatives) // (workers * 8)))   # small: no worker idles long at the end
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            for outcome in pool.map(task, relatives, chunksize=chunk):
                results.append(outcome)
                progress.update()
            return results


def _group(inspected: list[tuple[str, str, Inspected]], max_distance: int, min_similarity: float,
           ) -> tuple[list[ManifestRow], dict[str, float], list[QualityRow], dict[str, Link], dict[str, int]]:
    """Group exact and confirmed near copies; leave out the files that are one picture under several labels.

    ``inspected`` is in path order. In a group under several labels, a file is left out when it is
    alike, by both measures (or by its bytes), to a file of another label in the group; the rest
    of the group stays, regrouped without them, so a chain through a look-alike of another label
    does not take a whole group with it.

    Returns the manifest rows, the grayscale spread per path, a report row per file left out (its
    ``detail`` is the rejected-files reason: the other file and both measures), each kept row's
    most alike confirmed near copy, and the counts of candidate and confirmed pairs.
    """
    paths = [path for path, _, _ in inspected]
    labels = [label for _, label, _ in inspected]
    sha = [info.sha256 for _, _, info in inspected]
    phashes = [info.phash for _, _, info in inspected]
    pixels = [info.pixels for _, _, info in inspected]
    near = near_pairs(phashes, pixels, max_distance, min_similarity)
    links = near.pairs[near.confirmed]
    found = group_rows(sha, links)          # the groups before anything is left out: a conflict's id
    reasons = _label_conflicts(found, paths, labels, sha, phashes, pixels, max_distance, min_similarity)
    kept_rows = np.array([index for index, path in enumerate(paths) if path not in reasons], dtype=np.int64)
    position = np.full(len(paths), -1, dtype=np.int64)
    position[kept_rows] = np.arange(len(kept_rows))
    both_kept = (position[links] >= 0).all(axis=1)
    first = group_rows([sha[row] for row in kept_rows], position[links[both_kept]])
    kept = []
    for index, row in enumerate(kept_rows):
        path, label, info = inspected[row]
        kept.append(ManifestRow(path, label, info.sha256, info.width, info.height, info.channels, info.phash,
                                sha[kept_rows[first[index]]]))
    conflicts = [QualityRow("label_conflict", path, labels[index], sha[found[index]], reasons[path])
                 for index, path in enumerate(paths) if path in reasons]
    closest = _closest_links(near, np.flatnonzero(near.confirmed)[both_kept], paths, sha)
    spreads = {path: info.spread for path, _, info in inspected}
    counts = {"near_duplicate_candidates": int(len(near.pairs)), "near_duplicate_pairs": int(len(links))}
    return kept, spreads, conflicts, closest, counts


def _closest_links(near: NearPairs, kept_pairs: np.ndarray, paths: list[str], sha: list[str]) -> dict[str, Link]:
    """For each path in a kept confirmed pair (and each file with its bytes), the most alike other file."""
    rows_of_sha: dict[str, list[int]] = defaultdict(list)
    for index, value in enumerate(sha):
        rows_of_sha[value].append(index)
    closest: dict[str, Link] = {}
    for pair in sorted(kept_pairs, key=lambda k: -near.similarity[k]):
        left, right = (int(row) for row in near.pairs[pair])
        if sha[left] == sha[right]:
            continue
        for this, other in ((left, right), (right, left)):
            for twin in rows_of_sha[sha[this]]:
                closest.setdefault(paths[twin], Link(paths[other], int(near.bits[pair]), float(near.similarity[pair])))
    return closest


def _label_conflicts(found: np.ndarray, paths: list[str], labels: list[str], sha: list[str], phashes: list[str],
                     pixels: list[bytes], max_distance: int, min_similarity: float) -> dict[str, str]:
    """The files to leave out, with the reason: in each group under several labels, every file that
    is the same picture as a file of another label (the same bytes, or within ``max_distance`` bits
    and at least ``min_similarity`` SSIM, measured on every such pair of the group). The reason
    names the most alike file of another label."""
    members: dict[int, list[int]] = defaultdict(list)
    for index, head in enumerate(found.tolist()):
        members[head].append(index)
    # Every pair across labels of a mixed group: such groups are few and small (a thousand blank frames
    # under two labels would be 250,000 pairs, seconds of work), and the candidates alone miss pairs.
    pairs = []
    for rows in members.values():
        if len({labels[row] for row in rows}) > 1:
            pairs.extend((i, j) for i, j in itertools.combinations(rows, 2) if labels[i] != labels[j])
    pairs_array = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    bits, scores = measure_pairs(phashes, pixels, pairs_array)
    same_bytes = np.array([sha[i] == sha[j] for i, j in pairs], dtype=bool)
    alike = same_bytes | ((max_distance > 0) & (bits <= max_distance) & (scores >= min_similarity))
    reasons: dict[str, str] = {}
    # Identical bytes first, then the most alike pair: each file's reason names its closest match.
    for pair in sorted(np.flatnonzero(alike), key=lambda k: (not same_bytes[k], -scores[k])):
        left, right = (int(row) for row in pairs_array[pair])
        names = ", ".join(sorted({labels[left], labels[right]}))
        for this, other in ((left, right), (right, left)):
            if same_bytes[pair]:
                reason = (f"same picture under several labels ({names}): identical bytes to {paths[other]} "
                          f"({labels[other]})")
            else:
                reason = (f"near copy of {paths[other]} ({labels[other]}): hashes {int(bits[pair])} bits apart, "
                          f"SSIM {scores[pair]:.2f}: one picture under several labels ({names})")
            reasons.setdefault(paths[this], reason)
    return reasons


def largest_near_group(images: list[ManifestRow]) -> list[ManifestRow]:
    """The members (in path order) of the largest group that holds more than one distinct file (the
    first by group id on a tie); empty when there is none."""
    members: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in sorted(images, key=lambda row: row.path):
        members[row.group].append(row)
    near = [rows for _, rows in sorted(members.items()) if len({row.sha256 for row in rows}) > 1]
    return max(near, key=len, default=[])


def draw_largest_group(images: list[ManifestRow], root: Path, target: Path,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> Path | None:
    """Draw the members of the largest group of near copies (:func:`largest_near_group`) side by
    side at ``target`` (PNG), each under its file name, so a user can see whether it is one scene.

    Returns ``target``, or None (and no file) when no group holds near copies.
    """
    target.unlink(missing_ok=True)
    members = largest_near_group(images)
    if not members:
        return None
    from PIL import Image, ImageDraw

    shown = members[:SHEET_MAX]
    title, caption = 18, 14
    rows = -(-len(shown) // SHEET_COLUMNS)
    sheet = Image.new("RGB", (SHEET_COLUMNS * SHEET_TILE, title + rows * (SHEET_TILE + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    drawn = f", the first {len(shown)} drawn" if len(members) > len(shown) else ""
    draw.text((4, 3), f"largest group of near copies: {len(members)} files{drawn} (group {members[0].group[:12]})",
              fill="black")
    for index, row in enumerate(shown):
        tile = decode_file(root / row.path, max_pixels).image.convert("RGB")
        tile.thumbnail((SHEET_TILE, SHEET_TILE))
        left = (index % SHEET_COLUMNS) * SHEET_TILE
        top = title + (index // SHEET_COLUMNS) * (SHEET_TILE + caption)
        sheet.paste(tile, (left + (SHEET_TILE - tile.width) // 2, top + (SHEET_TILE - tile.height) // 2))
        draw.text((left + 2, top + SHEET_TILE), row.path.rsplit("/", 1)[-1][-16:], fill="black")
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target)
    return target


def _sample_per_class(images: list[ManifestRow], max_per_class: int, seed: int) -> list[ManifestRow]:
    """A seeded shuffle, then the first ``max_per_class`` of each class: a random sample per class.

    The shuffle is ``numpy.random.RandomState(seed).permutation`` of the rows in path order, the
    one ``DataFrame.sample(frac=1, random_state=seed)`` makes, so a seed picks the same images as
    in earlier versions of the pipeline.
    """
    by_path = sorted(images, key=lambda row: row.path)
    taken: Counter[str] = Counter()
    sample = []
    for index in np.random.RandomState(seed).permutation(len(by_path)):
        row = by_path[index]
        if taken[row.label] < max_per_class:
            taken[row.label] += 1
            sample.append(row)
    return sample


def check_classes(result: IngestResult, root: Path) -> None:
    """Fail unless at least two classes have images and no class folder came out empty."""
    if not result.images:
        raise PipelineError(f"ingest.source: no usable image under {root} ({len(result.rejected_files)} files "
                            "rejected; expected <source>/<class>/<image>)")
    labels = sorted({row.label for row in result.images})
    if len(labels) < 2:
        raise PipelineError(f"ingest.source: only one class ({labels[0]}) has usable images under {root}; "
                            "a classifier needs at least two class folders")
    class_dirs = sorted(p.name for p in root.iterdir()
                        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and _is_utf8(p.name))
    empty = [name for name in class_dirs if name not in set(labels)]
    if empty:
        raise PipelineError(f"ingest.source: class folder {root / empty[0]} has no usable image "
                            f"({_why_empty(result, empty[0])}): remove it or add images")
    alike = _alike_names(labels)
    if alike:
        raise PipelineError(f"ingest.source: class folders {' and '.join(repr(name) for name in alike)} under {root} "
                            "differ only in letter case or Unicode form, so they look like one class but would "
                            "train as two: merge them or rename one")


def _why_empty(result: IngestResult, folder: str) -> str:
    """What became of a class folder's files, said in the error itself: the check runs in the ingest
    stage and in crossval, and only the stage writes a rejected-files report to look things up in."""
    rejected = [row for row in result.rejected_files if row.path.startswith(f"{folder}/")]
    if not rejected:
        return "no image file in it"
    first = rejected[0]
    more = f", and {len(rejected) - 1} more rejected" if len(rejected) > 1 else ""
    return f"{first.path}: {first.reason}{more}"


def _alike_names(labels: list[str]) -> list[str]:
    """The first class names that read the same (``Dog`` and ``dog``; ``café`` written with one code point
    or two), or an empty list."""
    seen: dict[str, str] = {}
    for label in labels:
        key = unicodedata.normalize("NFC", label).casefold()
        if key in seen:
            return [seen[key], label]
        seen[key] = label
    return []


if __name__ == "__main__":
    parser = cli.stage_parser("ingest", __doc__.splitlines()[0])
    parser.add_argument("--out", default="data/ingest", help="output folder (manifest, rejected report)")
    parser.add_argument("--metrics", default="metrics/ingest.json", help="summary counts (JSON)")
    cli.main_entry("ingest", main, parser)
