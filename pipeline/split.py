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
    out so that each split holds its share of images (rounded to the nearest image), or as close to
    it as the groups' sizes allow (:func:`_deal_class`).
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
    leaks that grouping prevented; None, not measured, when that split cannot be dealt)."""
    sizes = split_frame.groupby("group")["sha256"].agg(["size", "nunique"])
    near = sizes.index[sizes["nunique"] > 1]
    try:
        by_bytes = _deal(split_frame.drop(columns="split"), ratios, seed, "sha256")
    except PipelineError:
        # A what-if for the metrics only: the real split is dealt and written, so this must not fail the stage.
        prevented = None
    else:
        cut = by_bytes[by_bytes["group"].isin(near)].groupby("group")["split"].nunique()
        prevented = int((cut > 1).sum())
    return {
        "groups_of_copies": int((sizes["size"] > 1).sum()),
        "near_duplicate_groups": int(len(near)),
        "straddling_groups": straddling_groups(split_frame),
        "leaks_prevented": prevented,
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
        if len(groups) < len(SPLITS):
            raise PipelineError(
                f"split: class '{label}' has {count} images in only {len(groups)} distinct pictures (copies "
                f"and near copies count once), too few to put one in each split "
                f"({_ratio_text(ratios)}); add images or change split.ratios")
        dealt = _deal_class(groups[order].to_numpy(), _targets(count, ratios))
        split_of_group = {group: SPLITS[index] for group, index in zip(order, dealt.tolist())}
        assigned.append(rows.assign(split=rows[key].map(split_of_group)))
    return pd.concat(assigned).sort_values("path", kind="stable").reset_index(drop=True)


def _deal_class(sizes: np.ndarray, targets: list[int]) -> np.ndarray:
    """The split (an index into SPLITS) of each group of one class, given the groups' sizes in shuffled order.

    Groups of several images are placed first, the largest first (a big group is hard to fit once
    the splits fill up): each in the split its place in the shuffled order falls in, or, if it would
    overfill that split, in the split with the most room left. The single images then fill each
    split up to its share, in shuffled order; so a class of single images is dealt as before (the
    first ``targets[0]`` to train, and so on), and a big group never pushes the single images past a
    small split. Needs at least as many groups as splits; each split gets one.
    """
    dealt = np.empty(len(sizes), dtype=np.int64)
    room = np.array(targets, dtype=np.int64)
    holds = np.zeros(len(targets), dtype=bool)      # the splits that already hold a group of several
    boundaries = np.cumsum(targets)[:-1]
    places = np.cumsum(sizes) - sizes               # images before each group in the shuffled order
    several = np.flatnonzero(sizes > 1)[np.argsort(-sizes[sizes > 1], kind="stable")]
    singles = np.flatnonzero(sizes == 1)
    for position, group in enumerate(several):
        choices = np.arange(len(targets))
        if (~holds).sum() - len(singles) >= len(several) - position:
            # Too few single images and groups are left to reach every split unless this group takes an empty one.
            choices = choices[~holds]
        split = int(np.searchsorted(boundaries, places[group], side="right"))
        if split not in choices or sizes[group] > room[split]:
            split = int(choices[np.argmax(room[choices])])
        dealt[group] = split
        room[split] -= sizes[group]
        holds[split] = True
    # What a group took beyond its split's share is missing from the others: take it from the largest
    # room, keeping one single image for each split that holds no group.
    quotas = np.maximum(room, 0)
    floor = (~holds).astype(np.int64)
    for _ in range(int(quotas.sum()) - len(singles)):
        quotas[np.argmax(quotas - floor)] -= 1
    dealt[singles] = np.repeat(np.arange(len(targets)), quotas)
    return dealt


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
    if leaks["leaks_prevented"] is None:
        prevented = "could not be dealt: how many groups of near copies it would have cut is not measured"
    else:
        prevented = f"would have cut {leaks['leaks_prevented']} groups of near copies"
    log.info("leaks: %d groups of copies (%d with near copies), %d straddle two splits; a split by exact hash "
             "alone %s", leaks["groups_of_copies"], leaks["near_duplicate_groups"], leaks["straddling_groups"],
             prevented)


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
