"""Stage ingest: a class-per-folder source becomes a manifest; every unusable file is reported, none is changed."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.images import ImageRejected
from pipeline.ingest import (
    IngestResult,
    check_classes,
    export_digits,
    find_candidates,
    ingest_folder,
    summarise,
)
from pipeline.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    QUALITY_COLUMNS,
    QUALITY_FILE,
    REJECTED_FILE,
    SOURCE_FILE,
)
from tests.conftest import REPO_ROOT, make_image_folder, project_params

MAX_PIXELS = 89_478_485
CLASSES = ("circle", "square", "triangle")
SIMILARITY = project_params()["ingest"]["near_duplicate_similarity"]


def _ingest(root: Path, **kwargs) -> IngestResult:
    kwargs.setdefault("near_duplicate_similarity", SIMILARITY)
    return ingest_folder(root, MAX_PIXELS, workers=1, **kwargs)


def _reasons(result: IngestResult) -> dict[str, str]:
    return dict(zip(result.rejected["path"], result.rejected["reason"]))


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's content hash, a link's target, a folder's existence."""
    state: dict[str, str] = {}
    for directory, subdirs, files in os.walk(root, followlinks=False):
        for name in subdirs + files:
            path = Path(directory) / name
            key = path.relative_to(root).as_posix()
            if path.is_symlink():
                state[key] = "link -> " + os.readlink(path)
            elif path.is_dir():
                state[key] = "dir"
            else:
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest() + f" {path.stat().st_mode:o}"
    return state


# --- the happy path ------------------------------------------------------------------------------

def test_manifest_lists_every_image_with_its_label(image_folder: Path) -> None:
    result = _ingest(image_folder)
    manifest = result.manifest

    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 36
    assert result.rejected.empty
    assert list(result.rejected.columns) == ["path", "reason"]
    assert result.duplicate_files == 0
    assert manifest["path"].tolist() == sorted(manifest["path"])
    assert manifest.index.tolist() == list(range(36))
    for label in CLASSES:
        rows = manifest[manifest["label"] == label]
        assert len(rows) == 12
        assert all(path.startswith(f"{label}/") for path in rows["path"])
    # Paths are relative to the source, in POSIX form, and point at the real files.
    for row in manifest.itertuples():
        file = image_folder / row.path
        assert file.is_file()
        assert row.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
        assert (row.width, row.height, row.channels) == (12, 12, 3)


def test_ingest_is_deterministic(image_folder: Path) -> None:
    pd.testing.assert_frame_equal(_ingest(image_folder).manifest, _ingest(image_folder).manifest)


def test_nested_folders_take_the_class_of_their_top_folder(image_folder: Path) -> None:
    nested = image_folder / "circle" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(nested / "n.png")
    manifest = _ingest(image_folder).manifest
    row = manifest[manifest["path"] == "circle/more/deeper/n.png"]
    assert row["label"].tolist() == ["circle"]


def test_summarise_counts(image_folder: Path) -> None:
    (image_folder / "square" / "bad.jpg").write_text("nope")
    (image_folder / "stray.png").write_bytes(b"")
    summary = summarise(_ingest(image_folder))
    assert summary == {
        "accepted": 36,
        "rejected": 2,
        "classes": 3,
        "duplicate_files": 0,
        "accepted_per_class": {"circle": 12, "square": 12, "triangle": 12},
        "rejected_per_class": {"(root)": 1, "square": 1},
        "near_duplicate_distance": 0,
        "near_duplicate_similarity": SIMILARITY,
        "near_duplicate_candidates": 0,
        "near_duplicate_pairs": 0,
        "exact_duplicate_groups": 0,
        "near_duplicate_groups": 0,
        "images_in_duplicate_groups": 0,
        "largest_duplicate_group": 0,
        "label_conflict_groups": 0,
        "label_conflict_images": 0,
        "class_balance": 1.0,
        "almost_uniform_images": 0,
        "small_images": 0,
    }
    json.dumps(summary)  # plain types only


# --- what is rejected, and why ---------------------------------------------------------------------

def test_unusable_files_are_rejected_with_a_reason(image_folder: Path, tmp_path: Path) -> None:
    circle = image_folder / "circle"
    good = (circle / "circle_000.png").read_bytes()
    (circle / "corrupt.png").write_bytes(good[: len(good) // 2])
    (circle / "notes.jpg").write_text("not a picture")
    (circle / "empty.png").write_bytes(b"")
    (image_folder / "loose.png").write_bytes(good)
    (circle / ".hidden.png").write_bytes((circle / "circle_001.jpg").read_bytes())
    (image_folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (image_folder / "square" / ".thumbnails").mkdir()
    (image_folder / "square" / ".thumbnails" / "t.png").write_bytes(good)
    (image_folder / "square" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (image_folder / "triangle" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (6, 6), (9, 9, 9)).save(outside)
    (image_folder / "triangle" / "outside.png").symlink_to(outside)

    result = _ingest(image_folder)
    reasons = _reasons(result)

    assert reasons.pop("circle/corrupt.png").startswith("corrupt image:")
    assert reasons.pop("circle/notes.jpg") == "not an image (no known image format)"
    assert reasons.pop("circle/empty.png") == "empty file (0 bytes)"
    assert reasons.pop("loose.png") == "not inside a class folder (expected <source>/<class>/<image>)"
    assert reasons.pop("circle/.hidden.png") == "hidden file or folder"
    assert reasons.pop(".DS_Store") == "hidden file or folder"
    assert reasons.pop("square/.thumbnails/t.png") == "hidden file or folder"
    assert reasons.pop("square/Thumbs.db") == "not an image (system file)"
    assert reasons.pop("triangle/broken.png") == "broken symbolic link"
    assert reasons.pop("triangle/outside.png") == "symbolic link to a file outside the source folder"
    assert reasons == {}
    # Nothing rejected reaches the manifest; the 36 good images all do.
    assert len(result.manifest) == 36
    assert not set(result.manifest["path"]) & set(result.rejected["path"])
    assert result.rejected["path"].tolist() == sorted(result.rejected["path"])


def test_symlink_to_a_folder_is_rejected(image_folder: Path) -> None:
    (image_folder / "circle" / "linked").symlink_to(image_folder / "square", target_is_directory=True)
    result = _ingest(image_folder)
    assert _reasons(result) == {"circle/linked": "symbolic link to a folder"}
    assert len(result.manifest) == 36


def test_a_loop_of_symbolic_links_is_a_broken_link_not_a_crash(image_folder: Path) -> None:
    (image_folder / "circle" / "loop_a.png").symlink_to(image_folder / "circle" / "loop_b.png")
    (image_folder / "circle" / "loop_b.png").symlink_to(image_folder / "circle" / "loop_a.png")
    result = _ingest(image_folder)
    assert _reasons(result) == {"circle/loop_a.png": "broken symbolic link (it loops)",
                                "circle/loop_b.png": "broken symbolic link (it loops)"}
    assert len(result.manifest) == 36


def test_a_folder_that_cannot_be_listed_is_reported_not_dropped(image_folder: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Its files are named in the report as missing, as a file that cannot be read is. (As root, which
    reads every folder whatever its mode, the refusal is the one the kernel gives a user without rights.)"""
    locked = image_folder / "circle" / "locked"
    locked.mkdir()
    for index in range(3):
        shutil.copyfile(image_folder / "circle" / "circle_000.png", locked / f"copy_{index}.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("pipeline.ingest.os.scandir", scandir)
    result = _ingest(image_folder)
    assert _reasons(result) == {"circle/locked": "folder cannot be read (Permission denied); its files are left out"}
    assert len(result.manifest) == 36
    # The source folder itself: one line, not a traceback.
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == image_folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(PipelineError, match=r"^ingest.source: .* cannot be read \(Permission denied\)$"):
        _ingest(image_folder)


def test_symlink_to_a_file_inside_the_source_is_accepted(image_folder: Path) -> None:
    (image_folder / "circle" / "alias.png").symlink_to(image_folder / "circle" / "circle_000.png")
    result = _ingest(image_folder)
    assert result.rejected.empty
    assert "circle/alias.png" in set(result.manifest["path"])
    assert result.duplicate_files == 1


def test_image_over_max_pixels_is_rejected(image_folder: Path) -> None:
    Image.new("RGB", (40, 40), (0, 0, 0)).save(image_folder / "square" / "huge.png")
    result = ingest_folder(image_folder, max_pixels=1000, workers=1)
    assert _reasons(result)["square/huge.png"].startswith("too large")
    assert len(result.manifest) == 36


def test_same_picture_in_two_classes_is_left_out_and_reported(image_folder: Path) -> None:
    shutil.copyfile(image_folder / "circle" / "circle_000.png", image_folder / "square" / "from_circle.png")
    result = _ingest(image_folder)
    paths = set(result.manifest["path"])
    assert "circle/circle_000.png" not in paths
    assert "square/from_circle.png" not in paths
    assert len(result.manifest) == 35
    reasons = _reasons(result)
    assert reasons == {
        "circle/circle_000.png": "same picture under several labels (circle, square): identical bytes to "
                                 "square/from_circle.png (square)",
        "square/from_circle.png": "same picture under several labels (circle, square): identical bytes to "
                                  "circle/circle_000.png (circle)",
    }
    assert result.duplicate_files == 0


def test_exact_duplicate_within_one_class_is_kept_and_counted(image_folder: Path) -> None:
    shutil.copyfile(image_folder / "circle" / "circle_001.jpg", image_folder / "circle" / "copy_a.jpg")
    shutil.copyfile(image_folder / "circle" / "circle_001.jpg", image_folder / "circle" / "copy_b.jpg")
    result = _ingest(image_folder)
    assert result.rejected.empty
    assert len(result.manifest) == 38
    assert {"circle/copy_a.jpg", "circle/copy_b.jpg", "circle/circle_001.jpg"} <= set(result.manifest["path"])
    assert result.duplicate_files == 2
    assert summarise(result)["duplicate_files"] == 2


def test_source_folder_is_left_byte_for_byte_unchanged(image_folder: Path, tmp_path: Path) -> None:
    good = (image_folder / "circle" / "circle_000.png").read_bytes()
    (image_folder / "circle" / "corrupt.png").write_bytes(good[:40])
    (image_folder / "loose.txt").write_text("x")
    (image_folder / "square" / "Thumbs.db").write_bytes(b"\xd0\xcf")
    (image_folder / "triangle" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    shutil.copyfile(image_folder / "circle" / "circle_002.png", image_folder / "square" / "dup.png")
    # An EXIF-rotated JPEG: decoding it rotates pixels in memory, never on disk.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4), (200, 10, 10)).save(image_folder / "circle" / "phone.jpg", exif=exif.tobytes())
    before = _snapshot(image_folder)
    mtimes = {p: p.lstat().st_mtime_ns for p in image_folder.rglob("*")}

    _ingest(image_folder)

    assert _snapshot(image_folder) == before
    assert {p: p.lstat().st_mtime_ns for p in image_folder.rglob("*")} == mtimes


# --- near duplicates and the health report ----------------------------------------------------------

def _scene(path: Path, seed: int, size: tuple[int, int] = (160, 120)) -> Path:
    """A photo-like picture (smooth colour blobs) saved as JPEG."""
    rng = np.random.default_rng(seed)
    blobs = Image.fromarray(rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs.resize(size, Image.Resampling.BICUBIC).save(path, quality=95)
    return path


def _resaved(source: Path, target: Path, quality: int = 50) -> None:
    Image.open(source).save(target, quality=quality)


def _scene_folder(root: Path, per_class: int = 6) -> Path:
    for index in range(per_class):
        _scene(root / "cat" / f"c{index}.jpg", seed=index)
        _scene(root / "dog" / f"d{index}.jpg", seed=100 + index)
    return root


def test_near_copies_share_a_group_and_are_reported(tmp_path: Path) -> None:
    root = _scene_folder(tmp_path / "photos")
    _resaved(root / "cat" / "c0.jpg", root / "cat" / "c0_q50.jpg")
    shutil.copyfile(root / "dog" / "d1.jpg", root / "dog" / "d1_copy.jpg")
    result = _ingest(root, near_duplicate_distance=10, image_size=64)
    manifest = result.manifest.set_index("path")

    assert list(result.manifest.columns) == MANIFEST_COLUMNS
    assert result.rejected.empty
    assert manifest.loc["cat/c0_q50.jpg", "sha256"] != manifest.loc["cat/c0.jpg", "sha256"]
    assert manifest.loc["cat/c0_q50.jpg", "group"] == manifest.loc["cat/c0.jpg", "group"] == \
        manifest.loc["cat/c0.jpg", "sha256"]     # the group's id: the SHA-256 of its first path
    assert manifest.loc["dog/d1_copy.jpg", "group"] == manifest.loc["dog/d1.jpg", "group"]
    assert manifest["group"].nunique() == 12                  # the distinct scenes stay apart
    assert all(len(value) == 16 for value in manifest["phash"])
    health = summarise(result)
    assert (health["exact_duplicate_groups"], health["near_duplicate_groups"]) == (1, 1)
    assert (health["images_in_duplicate_groups"], health["largest_duplicate_group"]) == (4, 2)
    report = {(row.check, row.path): row for row in result.quality}
    assert set(report) == {("near_duplicate", "cat/c0.jpg"), ("near_duplicate", "cat/c0_q50.jpg"),
                           ("exact_duplicate", "dog/d1.jpg"), ("exact_duplicate", "dog/d1_copy.jpg")}
    assert re.fullmatch(r"group of 2 \(2 distinct files\); near copy of cat/c0_q50\.jpg: hashes \d+ bits apart, "
                        r"SSIM (0\.9\d|1\.00)", report["near_duplicate", "cat/c0.jpg"].detail)
    assert report["exact_duplicate", "dog/d1.jpg"].detail == "2 identical files"


def test_near_copy_under_another_label_is_left_out_with_its_original(tmp_path: Path) -> None:
    root = _scene_folder(tmp_path / "photos")
    _resaved(root / "cat" / "c2.jpg", root / "dog" / "from_cat.jpg")
    result = _ingest(root, near_duplicate_distance=10)
    reasons = _reasons(result)

    assert set(reasons) == {"cat/c2.jpg", "dog/from_cat.jpg"}
    assert re.fullmatch(r"near copy of cat/c2\.jpg \(cat\): hashes \d+ bits apart, SSIM (0\.\d\d|1\.00): one "
                        r"picture under several labels \(cat, dog\)", reasons["dog/from_cat.jpg"])
    assert reasons["cat/c2.jpg"].startswith("near copy of dog/from_cat.jpg (dog): ")
    assert not {"cat/c2.jpg", "dog/from_cat.jpg"} & set(result.manifest["path"])
    conflicts = [row for row in result.quality if row.check == "label_conflict"]
    assert [row.path for row in conflicts] == ["cat/c2.jpg", "dog/from_cat.jpg"]
    assert summarise(result)["label_conflict_groups"] == 1 and summarise(result)["label_conflict_images"] == 2


def test_a_chain_through_a_look_alike_of_another_label_leaves_out_only_the_two_alike(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cat a-e-b and dog c-d are linked a-e, a-b, b-c, c-d: one group under two labels. Only b and c
    are alike across the labels, so only they are left out; a-e and d stay, as two groups."""
    from pipeline import ingest
    from pipeline.near_duplicates import NearPairs

    root = tmp_path / "photos"
    names = ["cat/a.jpg", "cat/b.jpg", "cat/e.jpg", "dog/c.jpg", "dog/d.jpg"]    # rows in path order
    for seed, name in enumerate(names):
        _scene(root / name, seed=seed)
    row = {name: index for index, name in enumerate(names)}
    links = np.array(sorted(sorted((row[x], row[y])) for x, y in
                            [("cat/a.jpg", "cat/e.jpg"), ("cat/a.jpg", "cat/b.jpg"), ("cat/b.jpg", "dog/c.jpg"),
                             ("dog/c.jpg", "dog/d.jpg")]))
    alike = {(row["cat/b.jpg"], row["dog/c.jpg"])}

    def measured(phashes, pixels, pairs):
        close = np.array([tuple(pair) in alike or tuple(pair) in {tuple(link) for link in links.tolist()}
                          for pair in np.asarray(pairs).tolist()], dtype=bool)
        return np.where(close, 6, 30), np.where(close, 0.9, 0.2)

    monkeypatch.setattr(ingest, "near_pairs", lambda *args: NearPairs(links, np.full(4, 6), np.full(4, 0.9),
                                                                       np.ones(4, dtype=bool)))
    monkeypatch.setattr(ingest, "measure_pairs", measured)
    result = _ingest(root, near_duplicate_distance=10)

    assert _reasons(result) == {
        "cat/b.jpg": "near copy of dog/c.jpg (dog): hashes 6 bits apart, SSIM 0.90: one picture under several "
                     "labels (cat, dog)",
        "dog/c.jpg": "near copy of cat/b.jpg (cat): hashes 6 bits apart, SSIM 0.90: one picture under several "
                     "labels (cat, dog)"}
    groups = result.manifest.set_index("path")["group"]
    assert groups["cat/a.jpg"] == groups["cat/e.jpg"] != groups["dog/d.jpg"]
    health = summarise(result)
    assert (health["label_conflict_images"], health["label_conflict_groups"]) == (2, 1)
    assert (health["near_duplicate_groups"], health["images_in_duplicate_groups"]) == (1, 2)


def test_the_largest_group_of_near_copies_is_drawn(tmp_path: Path) -> None:
    from pipeline.ingest import LARGEST_GROUP_FILE, SHEET_COLUMNS, SHEET_TILE, draw_largest_group, largest_near_group

    root = _scene_folder(tmp_path / "photos")
    for quality in (40, 60, 80):
        _resaved(root / "cat" / "c0.jpg", root / "cat" / f"c0_q{quality}.jpg", quality)
    _resaved(root / "dog" / "d3.jpg", root / "dog" / "d3_q50.jpg")
    for copy in range(4):      # a larger group, but of identical files: nothing to look at
        shutil.copyfile(root / "dog" / "d1.jpg", root / "dog" / f"d1_copy{copy}.jpg")
    result = _ingest(root, near_duplicate_distance=10)
    assert [row.path for row in largest_near_group(result.images)] == [
        "cat/c0.jpg", "cat/c0_q40.jpg", "cat/c0_q60.jpg", "cat/c0_q80.jpg"]
    target = tmp_path / "ingest" / LARGEST_GROUP_FILE
    assert draw_largest_group(result.images, root, target) == target
    with Image.open(target) as sheet:
        assert sheet.size == (SHEET_COLUMNS * SHEET_TILE, 18 + SHEET_TILE + 14)
        tile = np.asarray(sheet.convert("RGB"))[18:18 + SHEET_TILE, SHEET_TILE:2 * SHEET_TILE].astype(int)
    # The second tile is cat/c0_q40.jpg itself, shrunk: not a blank square.
    expected = Image.open(root / "cat" / "c0_q40.jpg").convert("RGB")
    expected.thumbnail((SHEET_TILE, SHEET_TILE))
    top = (SHEET_TILE - expected.height) // 2
    assert np.abs(tile[top:top + expected.height, :expected.width] - np.asarray(expected, dtype=int)).mean() < 2
    # Drawing decodes with the stage's own pixel limit (ingest.max_image_pixels), not Pillow's default.
    with pytest.raises(ImageRejected, match="too large"):
        draw_largest_group(result.images, root, target, max_pixels=100)
    # Without near copies there is nothing to draw, and an old drawing goes.
    plain = _ingest(_scene_folder(tmp_path / "plain"), near_duplicate_distance=10)
    assert draw_largest_group(plain.images, tmp_path / "plain", target) is None and not target.exists()


def test_distance_0_turns_the_near_search_off(tmp_path: Path) -> None:
    root = _scene_folder(tmp_path / "photos")
    _resaved(root / "cat" / "c2.jpg", root / "dog" / "from_cat.jpg")
    result = _ingest(root, near_duplicate_distance=0)
    assert result.rejected.empty
    assert result.manifest["group"].tolist() == result.manifest["sha256"].tolist()
    assert summarise(result)["near_duplicate_groups"] == 0


def test_a_hash_that_cannot_be_computed_rejects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import ingest

    root = _scene_folder(tmp_path / "photos")
    real = ingest.fingerprint

    def failing(image: Image.Image):
        if image.size == (161, 121):
            raise ValueError("no hash for you")
        return real(image)

    _scene(root / "cat" / "odd.jpg", seed=55, size=(161, 121))
    monkeypatch.setattr(ingest, "fingerprint", failing)
    result = _ingest(root, near_duplicate_distance=10)
    assert _reasons(result) == {"cat/odd.jpg": "perceptual hash cannot be computed (ValueError: no hash for you)"}
    assert len(result.manifest) == 12


def test_blank_and_tiny_images_are_warnings_in_the_report(tmp_path: Path) -> None:
    root = _scene_folder(tmp_path / "photos")
    Image.new("RGB", (120, 90), (30, 31, 30)).save(root / "cat" / "blank.png")
    _scene(root / "dog" / "tiny.jpg", seed=7, size=(20, 16))
    result = _ingest(root, near_duplicate_distance=10, image_size=64)
    report = {(row.check, row.path) for row in result.quality}
    assert report == {("almost_uniform", "cat/blank.png"), ("small_image", "dog/tiny.jpg")}
    assert len(result.manifest) == 14       # warnings: nothing is left out
    assert result.manifest.set_index("path").loc["dog/tiny.jpg", "phash"] == ""   # too small to hash
    health = summarise(result)
    assert (health["almost_uniform_images"], health["small_images"]) == (1, 1)
    assert health["class_balance"] == 1.0


def test_class_balance_is_smallest_over_largest(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "unbalanced", {"few": 3, "many": 12})
    assert summarise(_ingest(root))["class_balance"] == 0.25


# --- max_per_class ---------------------------------------------------------------------------------

def test_max_per_class_keeps_that_many_per_class(image_folder: Path) -> None:
    result = _ingest(image_folder, max_per_class=5, seed=3)
    manifest = result.manifest
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["label"].value_counts().to_dict() == {"circle": 5, "square": 5, "triangle": 5}
    assert manifest["path"].tolist() == sorted(manifest["path"])
    again = _ingest(image_folder, max_per_class=5, seed=3).manifest
    pd.testing.assert_frame_equal(manifest, again)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_max_per_class_picks_what_pandas_sample_picked(image_folder: Path, seed: int) -> None:
    # Earlier versions sampled with DataFrame.sample(frac=1, random_state=seed) then took the first
    # rows per class; a seed must keep picking the same images, or a dvc.lock would change for nothing.
    everything = _ingest(image_folder).manifest
    shuffled = everything.sort_values("path", kind="stable").sample(frac=1.0, random_state=seed)
    expected = shuffled.groupby("label", sort=False).head(4)["path"].sort_values().tolist()
    assert _ingest(image_folder, max_per_class=4, seed=seed).manifest["path"].tolist() == expected


def test_max_per_class_keeps_that_many_rows_per_class_folder(image_folder: Path) -> None:
    # Counted by path, so this holds whether or not the label column survives.
    manifest = _ingest(image_folder, max_per_class=5, seed=3).manifest
    assert len(manifest) == 15
    folders = manifest["path"].str.split("/").str[0].value_counts().to_dict()
    assert folders == {"circle": 5, "square": 5, "triangle": 5}
    assert manifest["path"].tolist() == sorted(manifest["path"])
    # Above the class size, nothing is dropped.
    assert len(_ingest(image_folder, max_per_class=100).manifest) == 36


# --- check_classes -------------------------------------------------------------------------------

def test_check_classes_accepts_the_fixture(image_folder: Path) -> None:
    # Beside the three classes: a hidden folder, a link to a folder and a loose file are not class
    # folders, so none of them counts as an empty class.
    (image_folder / ".ipynb_checkpoints").mkdir()
    (image_folder / "linked").symlink_to(image_folder / "square", target_is_directory=True)
    (image_folder / "README.txt").write_text("three classes")
    result = _ingest(image_folder)
    assert sorted({row.label for row in result.images}) == list(CLASSES)
    assert check_classes(result, image_folder) is None


def test_check_classes_rejects_an_empty_class_folder(image_folder: Path) -> None:
    (image_folder / "hexagon").mkdir()
    result = _ingest(image_folder)
    with pytest.raises(PipelineError, match="hexagon has no usable image \\(no image file in it\\)"):
        check_classes(result, image_folder)


def test_check_classes_rejects_a_class_folder_of_only_bad_files(image_folder: Path) -> None:
    (image_folder / "hexagon").mkdir()
    (image_folder / "hexagon" / "bad.png").write_text("no")
    result = _ingest(image_folder)
    assert _reasons(result) == {"hexagon/bad.png": "not an image (no known image format)"}
    (image_folder / "hexagon" / "worse.jpg").write_bytes(b"")
    result = _ingest(image_folder)
    # The reason is in the message: crossval runs this check too, and writes no rejected-files report.
    with pytest.raises(PipelineError, match=r"hexagon has no usable image \(hexagon/bad.png: not an image "
                                            r"\(no known image format\), and 1 more rejected\)"):
        check_classes(result, image_folder)


@pytest.mark.parametrize(("first", "second"), [("Dog", "dog"), ("caf\u00e9", "cafe\u0301")])
def test_check_classes_rejects_class_folders_that_read_the_same(tmp_path: Path, first: str, second: str) -> None:
    """"café" typed on two systems (one code point or e + accent) or "Dog" and "dog": one class to a
    reader, two to the model."""
    root = make_image_folder(tmp_path / "photos", {first: 4, second: 4, "cat": 4})
    result = _ingest(root)
    assert len(result.manifest) == 12
    with pytest.raises(PipelineError, match=r"class folders .* differ only in letter case or Unicode form"):
        check_classes(result, root)
    assert check_classes(_ingest(make_image_folder(tmp_path / "fine", {first: 4, "cat": 4})),
                         tmp_path / "fine") is None


def test_check_classes_rejects_a_single_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "one", {"only": 4})
    result = _ingest(root)
    assert len(result.manifest) == 4
    with pytest.raises(PipelineError, match=r"only one class \(only\)"):
        check_classes(result, root)


def test_check_classes_rejects_no_images_at_all(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jpg").write_text("no")
    result = _ingest(root)
    assert result.manifest.empty and list(result.manifest.columns) == MANIFEST_COLUMNS
    with pytest.raises(PipelineError, match="no usable image"):
        check_classes(result, root)


def test_ingest_folder_requires_a_folder(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="is not a folder"):
        _ingest(tmp_path / "missing")


def test_find_candidates_is_sorted(image_folder: Path) -> None:
    candidates, rejected = find_candidates(image_folder)
    assert [rel for rel, _ in candidates] == sorted(rel for rel, _ in candidates)
    assert len(candidates) == 36 and rejected == []


# --- the built-in digits -------------------------------------------------------------------------

def test_export_digits_writes_1797_pngs_in_10_folders(tmp_path: Path) -> None:
    export_digits(tmp_path / "digits")
    folders = sorted(p.name for p in (tmp_path / "digits").iterdir())
    assert folders == [str(d) for d in range(10)]
    files = sorted((tmp_path / "digits").rglob("*.png"))
    assert len(files) == 1797
    sample = Image.open(files[0])
    assert sample.size == (8, 8) and sample.mode == "L"
    values = np.concatenate([np.asarray(Image.open(f)).ravel() for f in files[:50]])
    assert values.min() == 0 and values.max() == 255
    # Each digit folder holds roughly a tenth.
    counts = [len(list((tmp_path / "digits" / d).iterdir())) for d in folders]
    assert sum(counts) == 1797 and min(counts) >= 170


# --- the stage's main, as DVC runs it --------------------------------------------------------------

def _run_stage(tmp_path: Path, raw_params: dict, source: str) -> subprocess.CompletedProcess:
    raw = copy.deepcopy(raw_params)
    raw["ingest"]["source"] = source
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.ingest", "--params", str(params_file),
         "--out", str(tmp_path / "ingest"), "--metrics", str(tmp_path / "ingest.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_stage_main_writes_manifest_and_metrics(tmp_path: Path, image_folder: Path, raw_params: dict) -> None:
    # 25 more images per class puts it over the threshold where files are inspected on several cores.
    for seed, label in enumerate(CLASSES, start=7):
        extra = make_image_folder(image_folder.parent / "extra", {label: 25}, seed=seed)
        for path in (extra / label).iterdir():
            shutil.move(str(path), image_folder / label / f"x_{path.name}")
    (image_folder / "circle" / "bad.jpg").write_text("not an image")
    before = _snapshot(image_folder)

    completed = _run_stage(tmp_path, raw_params, str(image_folder))

    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    out = tmp_path / "ingest"
    manifest = pd.read_csv(out / MANIFEST_FILE, dtype=str)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 3 * 37
    assert manifest["path"].tolist() == sorted(manifest["path"])
    assert manifest["label"].value_counts().to_dict() == {"circle": 37, "square": 37, "triangle": 37}
    rejected = pd.read_csv(out / REJECTED_FILE)
    assert rejected.to_dict("records") == [{"path": "circle/bad.jpg",
                                            "reason": "not an image (no known image format)"}]
    assert json.loads((out / SOURCE_FILE).read_text()) == {"source": str(image_folder), "root": str(image_folder)}
    metrics = json.loads((tmp_path / "ingest.json").read_text())
    assert metrics["accepted"] == 111 and metrics["rejected"] == 1 and metrics["classes"] == 3
    assert metrics["near_duplicate_distance"] == raw_params["ingest"]["near_duplicate_distance"]
    assert metrics["small_images"] == 111            # 12 px against base.image_size 32: a warning
    quality = pd.read_csv(out / QUALITY_FILE, dtype=str, keep_default_na=False)
    assert list(quality.columns) == QUALITY_COLUMNS
    assert set(quality["check"]) == {"small_image"} and len(quality) == 111
    assert "health: 0 groups of exact copies, 0 groups of near copies" in completed.stderr
    assert "health: 111 images under half of base.image_size on a side" in completed.stderr
    assert _snapshot(image_folder) == before


def test_stage_main_missing_source_is_one_clean_line(tmp_path: Path, raw_params: dict) -> None:
    missing = tmp_path / "no-such-folder"
    completed = _run_stage(tmp_path, raw_params, str(missing))

    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    naming = [line for line in completed.stderr.splitlines() if str(missing) in line]
    assert len(naming) == 1, completed.stderr
    assert "does not exist" in naming[0]
    assert not (tmp_path / "ingest.json").exists()


def test_stage_main_bad_params_is_one_clean_line(tmp_path: Path, raw_params: dict, image_folder: Path) -> None:
    raw_params["ingest"]["max_per_clas"] = 3
    completed = _run_stage(tmp_path, raw_params, str(image_folder))
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "ingest.max_per_clas: unknown key (did you mean 'max_per_class'?)" in completed.stderr
