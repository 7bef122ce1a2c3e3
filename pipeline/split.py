"""Stage ``split``: a stratified train / validation / test split of the manifest.

Each class is cut in the same ratios (the deck's 8:1:1, 7:1.5:1.5, 6:2:2, or any three that sum
to 1). Every group of copies that ingest found (exact copies, same SHA-256, and near copies, close
perceptual hashes: the manifest's ``group`` column) lands in one split, so no picture is both
trained on and tested on; the split checks that and counts the leaks a byte-hash split would have let through.
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
    """Return the manifest with a ``split`` column, stratified by label, each group of copies kept together.

    Within a class, the groups (the manifest's ``group`` column) are shuffled with ``seed`` and dealt
    out in order until each split holds its share of images (rounded to the nearest image).
    """
    if "group" not in manifest.columns:
        raise PipelineError("split: the manifest has no group column (it was written by an older ingest); "
                            "run ingest again: dvc repro ingest")
    result = _deal(manifest, ratios, seed, "group")
    straddling = straddling_groups(result, "group")
    if straddling:   # cannot happen by construction; checked, because a leak would inflate test accuracy
        raise PipelineError(f"split: {straddling} groups of copies straddle two splits (a bug in split)")
    return result


def straddling_groups(split_frame: pd.DataFrame, key: str = "group") -> int:
    """How many groups (by ``key``) have members in more than one split."""
    return int((split_frame.groupby(key)["split"].nunique() > 1).sum())


def leak_check(split_frame: pd.DataFrame, ratios: tuple[float, float, float], seed: int) -> dict:
    """For ``metrics/split.json``: the groups of copies, how many straddle two splits (0, checked),
    and how many groups of near copies a split by exact hash alone, same seed, would have cut (the
    leaks that grouping prevented)."""
    sizes = split_frame.groupby("group")["sha256"].agg(["size", "nunique"])
    by_bytes = _deal(split_frame.drop(columns="split"), ratios, seed, "sha256")
    near = sizes.index[sizes["nunique"] > 1]
    cut = by_bytes[by_bytes["group"].isin(near)].groupby("group")["split"].nunique()
    return {
        "groups_of_copies": int((sizes["size"] > 1).sum()),
        "near_duplicate_groups": int(len(near)),
        "straddling_groups": straddling_groups(split_frame),
        "leaks_prevented": int((cut > 1).sum()),
    }


def _deal(manifest: pd.DataFrame, ratios: tuple[float, float, float], seed: int, key: str) -> pd.DataFrame:
    """Shuffle the groups (by ``key``) of each class with ``seed`` and deal them out in the ratios."""
    minimum = minimum_class_size(ratios)
    rng = np.random.RandomState(seed)
    assigned = []
    for label, rows in manifest.sort_values("path", kind="stable").groupby("label", sort=True):
        count = len(rows)
        if count < minimum:
            raise PipelineError(
                f"split: class '{label}' has {count} images; ratios {_ratio_text(ratios)} need at least "
                f"{minimum} per class (one in each split). Add images or change split.ratios")
        groups = rows.groupby(key, sort=True).size()
        order = groups.index.to_numpy()[rng.permutation(len(groups))]
        targets = _targets(count, ratios)
        boundaries = np.cumsum(targets)[:-1]
        split_of_group = {}
        filled = 0
        for group in order:
            split_index = int(np.searchsorted(boundaries, filled, side="right"))
            split_of_group[group] = SPLITS[split_index]
            filled += int(groups[group])
        labelled = rows.assign(split=rows[key].map(split_of_group))
        missing = set(SPLITS) - set(labelled["split"])
        if missing:
            raise PipelineError(
                f"split: class '{label}' has {count} images in only {len(groups)} distinct pictures (copies "
                f"and near copies count once), too few to put one in each split "
                f"({_ratio_text(ratios)}); add images or change split.ratios")
        assigned.append(labelled)
    return pd.concat(assigned).sort_values("path", kind="stable").reset_index(drop=True)


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
    leaks = leak_check(result, ratios, params.base.seed)
    write_json(Path(args.metrics), {"ratios": list(ratios), **counts, "leaks": leaks})
    log.info("split %d images %s: train %d, validation %d, test %d", len(result), _ratio_text(ratios),
             counts["train"]["total"], counts["validation"]["total"], counts["test"]["total"])
    log.info("leaks: %d groups of copies (%d with near copies), %d straddle two splits; a split by exact hash "
             "alone would have cut %d groups of near copies", leaks["groups_of_copies"], leaks["near_duplicate_groups"],
             leaks["straddling_groups"], leaks["leaks_prevented"])


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
