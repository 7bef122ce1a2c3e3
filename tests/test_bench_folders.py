"""bench.folders: the unbalanced and five-class folders the photo presets are cross-validated on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import folders
from tests.conftest import make_image_folder


@pytest.fixture
def two_classes(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "source", {"cats": 20, "dogs": 25}, size=16, formats=("png",))


def _digests(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in root.rglob("*.*")}


def test_unbalanced_keeps_a_share_of_one_class_and_all_of_the_others(two_classes: Path, tmp_path: Path) -> None:
    before = _digests(two_classes)
    counts = folders.unbalanced(two_classes, tmp_path / "out", keep=0.6)
    assert counts == {"cats": 12, "dogs": 25}
    kept = {path.name for path in (tmp_path / "out/cats").iterdir()}
    assert kept <= {path.name for path in (two_classes / "cats").iterdir()}
    assert _digests(two_classes) == before                                     # the source is only read
    again = tmp_path / "again"
    folders.unbalanced(two_classes, again, keep=0.6)
    assert {path.name for path in (again / "cats").iterdir()} == kept          # the same seed, the same photos


def test_fewer_keeps_a_share_of_every_class_each_smaller_share_inside_every_larger(two_classes: Path,
                                                                                  tmp_path: Path) -> None:
    before = _digests(two_classes)
    shares = {keep: folders.fewer(two_classes, tmp_path / str(keep), keep=keep) for keep in (0.25, 0.5, 1.0)}
    assert shares == {0.25: {"cats": 5, "dogs": 6}, 0.5: {"cats": 10, "dogs": 12}, 1.0: {"cats": 20, "dogs": 25}}
    kept = {keep: _digests(tmp_path / str(keep)) for keep in shares}
    assert kept[1.0] == before and _digests(two_classes) == before       # copies byte for byte; the source only read
    assert kept[0.25].items() <= kept[0.5].items() <= kept[1.0].items()   # a learning curve's points are nested
    with pytest.raises(SystemExit):
        folders.main(["fewer", "--keep", "1.5", "--source", str(two_classes), "--out", str(tmp_path / "too_many")])
    assert not (tmp_path / "too_many").exists()


def test_five_classes_use_every_photo_once_and_differ_visibly(two_classes: Path, tmp_path: Path) -> None:
    out = tmp_path / "five"
    counts = folders.five_classes(two_classes, out)
    assert counts == {"cats": 8, "cats_grey": 8, "upside_down": 4 + 5, "dogs": 10, "dogs_grey": 10}
    assert sorted(path.name for path in out.iterdir()) == sorted(counts)
    # Each source photo appears once, under one class: no copy of a photo under two labels.
    # (A changed photo is named <source class>_<source name>.)
    sources = [path.stem if path.parent.name in ("cats", "dogs") else path.stem.partition("_")[2]
               for path in out.rglob("*.*")]
    assert sorted(sources) == sorted(path.stem for path in two_classes.rglob("*.png"))
    for path in (out / "cats_grey").iterdir():
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    for path in (out / "upside_down").iterdir():
        label, _, stem = path.stem.partition("_")
        original = np.asarray(Image.open(two_classes / label / f"{stem}.png").convert("RGB"))
        assert (np.asarray(Image.open(path)) == original[::-1, ::-1]).all()


def test_the_command_will_not_write_into_an_existing_folder(two_classes: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        folders.main(["unbalanced", "--source", str(two_classes), "--out", str(tmp_path / "taken")])
    assert folders.main(["five-classes", "--source", str(two_classes), "--out", str(tmp_path / "new")]) == 0
