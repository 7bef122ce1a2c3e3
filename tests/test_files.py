"""Files written whole or not at all, in formats every reader accepts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline.files import atomic_write_text, read_json, write_csv, write_json


def test_json_has_null_for_nan_and_infinity_at_any_depth(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "scores.json"
    write_json(path, {"loss": math.nan, "nested": {"values": [1.5, math.inf, -math.inf]}, "ok": 0.9})
    assert read_json(path) == {"loss": None, "nested": {"values": [1.5, None, None]}, "ok": 0.9}
    assert "NaN" not in path.read_text() and path.read_text().endswith("}\n")


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "gate.json"
    write_json(path, {"deploy": True})
    with pytest.raises(TypeError):
        write_json(path, {"deploy": object()})
    assert json.loads(path.read_text()) == {"deploy": True}
    assert [p.name for p in tmp_path.iterdir()] == ["gate.json"]


def test_text_replaces_the_file_in_one_step(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.txt"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]


def test_csv_is_what_pandas_writes(tmp_path: Path) -> None:
    rows = [("cat/a b.png", "cat", 3, 0.5), ('dog/"quoted",name.jpg', "dog", 10, None)]
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    write_csv(ours, ["path", "label", "width", "score"], rows)
    pd.DataFrame(rows, columns=["path", "label", "width", "score"]).to_csv(theirs, index=False, lineterminator="\n")
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_file_name_with_a_carriage_return_stays_one_row(tmp_path: Path) -> None:
    """macOS makes files named "Icon\\r"; a line break in a name must not split its row either."""
    rows = [("cats/Icon\r", "cats", 1.5), ("cats/two\nlines.png", "cats", 2.0), ("dogs/plain.png", "dogs", 3.0)]
    path = tmp_path / "manifest.csv"
    write_csv(path, ["path", "label", "size"], rows)
    read = pd.read_csv(path, dtype={"path": str, "label": str}, keep_default_na=False)
    assert list(read.itertuples(index=False, name=None)) == rows


def test_a_rewritten_file_keeps_its_permissions_and_a_link_stays_a_link(tmp_path: Path) -> None:
    """Applying a preset rewrites params.yaml: it must not become owner-only, nor a link a copy."""
    kept = tmp_path / "params.yaml"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "fresh.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "fresh.json").stat().st_mode & 0o777 == 0o644
    target, link = tmp_path / "shared" / "params.yaml", tmp_path / "linked.yaml"
    target.parent.mkdir()
    target.write_text("old")
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(path.name for path in target.parent.iterdir()) == ["params.yaml"]
