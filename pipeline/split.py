"""Stage ``split``: a stratified train / validation / test split of the manifest.

Each class is cut in the same ratios (the deck's 8:1:1, 7:1.5:1.5, 6:2:2, or any three that sum
to 1). Exact duplicates (same content hash) always land in the same split, so no picture is both
trained on and tested on.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.files import write_frame_csv, write_json
from pipeline.manifest import SPLITS, read_manifest
from pipeline.params import load_params
from pipeline.seeding import seed_everything

log = logging.getLogger("pipeline.split")


def minimum_class_size(ratios: tuple[float, float, float]) -> int:
    """The fewest images a class needs so that each split gets at least one."""
    return max(len(SPLITS), math.ceil(0.5 / min(ratios) - 1e-9))


def split_dataset(manifest: pd.DataFrame, ratios: tuple[float, float, float], seed: int) -> pd.DataFrame:
    """Return the manifest with a ``split`` column, stratified by label, duplicates kept together.

    Within a class, groups of identical files are shuffled with ``seed`` and dealt out in order
    until each split holds its share of images (rounded to the nearest image).
    """
    minimum = minimum_class_size(ratios)
    rng = np.random.RandomState(seed)
    assigned = []
    for label, rows in manifest.sort_values("path", kind="stable").groupby("label", sort=True):
        count = len(rows)
        if count < minimum:
            raise PipelineError(
                f"split: class '{label}' has {count} images; ratios {_ratio_text(ratios)} need at least "
                f"{minimum} per class (one in each split). Add images or change split.ratios")
        groups = rows.groupby("sha256", sort=True).size()
        order = groups.index.to_numpy()[rng.permutation(len(groups))]
        targets = _targets(count, ratios)
        boundaries = np.cumsum(targets)[:-1]
        split_of_group = {}
        filled = 0
        for sha in order:
            split_index = int(np.searchsorted(boundaries, filled, side="right"))
            split_of_group[sha] = SPLITS[split_index]
            filled += int(groups[sha])
        labelled = rows.assign(split=rows["sha256"].map(split_of_group))
        missing = set(SPLITS) - set(labelled["split"])
        if missing:
            raise PipelineError(
                f"split: class '{label}' has {count} images in only {len(groups)} distinct pictures, too few "
                f"to put one in each split ({_ratio_text(ratios)}); add images or change split.ratios")
        assigned.append(labelled)
    result = pd.concat(assigned).sort_values("path", kind="stable").reset_index(drop=True)
    return result


def split_counts(split_frame: pd.DataFrame) -> dict:
    """Per-class image counts of each split, for ``metrics/split.json``."""
    counts: dict = {}
    for split in SPLITS:
        rows = split_frame[split_frame["split"] == split]
        per_class = rows["label"].value_counts().sort_index()
        counts[split] = {"total": int(len(rows)),
                         "per_class": {str(label): int(n) for label, n in per_class.items()}}
    return counts


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    seed_everything(params.base.seed)
    manifest = read_manifest(Path(args.ingest))
    ratios = params.split.ratios
    result = split_dataset(manifest, ratios, params.base.seed)
    write_frame_csv(Path(args.out), result)
    counts = split_counts(result)
    write_json(Path(args.metrics), {"ratios": list(ratios), **counts})
    log.info("split %d images %s: train %d, validation %d, test %d", len(result), _ratio_text(ratios),
             counts["train"]["total"], counts["validation"]["total"], counts["test"]["total"])


def _targets(count: int, ratios: tuple[float, ...]) -> list[int]:
    """Images per split: validation and test rounded, at least one each; train takes the rest."""
    validation = max(1, round(count * ratios[1]))
    test = max(1, round(count * ratios[2]))
    if count - validation - test < 1:
        # A small train ratio can round to nothing: take one image from the larger other split.
        if validation >= test:
            validation -= 1
        else:
            test -= 1
    return [count - validation - test, validation, test]


def _ratio_text(ratios: tuple[float, ...]) -> str:
    return ":".join(f"{r:g}" for r in ratios)


if __name__ == "__main__":
    parser = cli.stage_parser("split", __doc__.splitlines()[0])
    parser.add_argument("--ingest", default="data/ingest", help="ingest output folder")
    parser.add_argument("--out", default="data/split.csv", help="the manifest with a split column")
    parser.add_argument("--metrics", default="metrics/split.json", help="per-class counts per split")
    cli.main_entry("split", main, parser)
