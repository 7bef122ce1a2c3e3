"""The files ``ingest`` and ``split`` hand on, and the one place that reads them back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pipeline.errors import PipelineError
from pipeline.files import read_json

if TYPE_CHECKING:    # pandas is imported where a frame is read: ingest writes its files without it
    import pandas as pd


class ManifestRow(NamedTuple):
    """One accepted image: a row of ``manifest.csv``."""

    path: str        # relative to the source root, POSIX form
    label: str
    sha256: str
    width: int
    height: int
    channels: int
    phash: str       # perceptual hash, 16 hex digits (empty: too small to hash)
    group: str       # the SHA-256 of the first file (by path) of its group of exact and near copies


class RejectedRow(NamedTuple):
    """One file that is not a usable image: a row of ``rejected.csv``."""

    path: str
    reason: str


class QualityRow(NamedTuple):
    """One finding of the data health report, a row of ``quality.csv`` (warnings, except the
    label conflicts, which are left out of the manifest)."""

    check: str       # exact_duplicate | near_duplicate | label_conflict | almost_uniform | small_image
    path: str
    label: str
    group: str       # the group's id (as in the manifest) for the group checks, else empty
    detail: str


MANIFEST_COLUMNS = list(ManifestRow._fields)
REJECTED_COLUMNS = list(RejectedRow._fields)
QUALITY_COLUMNS = list(QualityRow._fields)
MANIFEST_FILE = "manifest.csv"
REJECTED_FILE = "rejected.csv"
QUALITY_FILE = "quality.csv"
SOURCE_FILE = "source.json"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitImages:
    """The split manifest with the folder its relative paths start from."""

    root: Path
    frame: pd.DataFrame

    @property
    def class_names(self) -> list[str]:
        """Labels in a fixed order: index i of a model's output is ``class_names[i]``."""
        return sorted(self.frame["label"].astype(str).unique())

    def subset(self, split: str) -> pd.DataFrame:
        """Rows of one split, in manifest order."""
        return self.frame[self.frame["split"] == split].reset_index(drop=True)

    def paths(self, split: str) -> list[str]:
        """Absolute-or-cwd-relative file paths of one split."""
        return [str(self.root / rel) for rel in self.subset(split)["path"]]

    def label_indices(self, split: str) -> list[int]:
        """Class indices of one split, aligned with :meth:`paths`."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[label] for label in self.subset(split)["label"].astype(str)]


def read_manifest(ingest_dir: Path) -> pd.DataFrame:
    """The manifest written by ``ingest``."""
    return _read_csv(Path(ingest_dir) / MANIFEST_FILE)


def source_root(ingest_dir: Path) -> Path:
    """The folder the manifest's relative paths start from."""
    return Path(_read_source(ingest_dir)["root"])


def source_setting(ingest_dir: Path) -> str:
    """The ``ingest.source`` the manifest was made from: ``sklearn:digits`` or a folder."""
    return str(_read_source(ingest_dir)["source"])


def _read_source(ingest_dir: Path) -> dict:
    path = Path(ingest_dir) / SOURCE_FILE
    if not path.exists():
        raise PipelineError(f"{path} is missing: run the ingest stage first (dvc repro ingest)")
    return read_json(path)


def read_split(ingest_dir: Path, split_file: Path) -> SplitImages:
    """The split manifest and its image root, as the training and evaluation stages need them."""
    return SplitImages(source_root(ingest_dir), _read_csv(Path(split_file)))


def _read_csv(path: Path) -> pd.DataFrame:
    import pandas as pd

    if not path.exists():
        raise PipelineError(f"{path} is missing: run the earlier stages first (dvc repro)")
    return pd.read_csv(path, dtype={"label": str, "path": str, "sha256": str, "phash": str, "group": str}, keep_default_na=False)
