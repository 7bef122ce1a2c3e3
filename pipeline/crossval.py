"""Cross-validation of a training recipe on an image folder: the mean, the spread and the worst fold.

One split of a few hundred photos is a noisy judge: a recipe tuned until its 200 test photos reach
0.80 may reach 0.74 on the next folder. ``python -m pipeline.crossval`` trains the recipe that
params.yaml (with a preset and ``--set`` overrides) describes on every fold of the folder, with the
training stage's own code (the same builder, input pipeline, early stopping and precision), and
reports each fold's test score (in ``gate.metric``: accuracy, or balanced accuracy for a folder with a
small class), their mean, spread and minimum, and the score over every image pooled, with its interval. Several recipes written to one results file are compared on the same
folds, image by image (exact McNemar test from :mod:`pipeline.statistics`). The results file is
written after every fold: a run stopped part-way keeps the folds it finished, and the same command
again goes on from the next one. Once a recipe is chosen,
``--holdout DIR`` trains it on the whole folder and scores a separate folder that no choice has seen,
once.

Folds: the images are dealt into ``2 x folds`` parts, stratified by class, with each group of copies
in one part (scikit-learn's ``StratifiedGroupKFold``). Fold k tests on parts 2k and 2k+1 (a fifth of
the images with 5 folds), stops early on the next part (a tenth) and trains on the rest. Every image is
tested exactly once. Nothing here touches the project's data/, models/, metrics/ or MLflow store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline import cli
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json
from pipeline.manifest import SplitImages
from pipeline.model_table import MODEL_NAMES, ModelSpec, model_spec
from pipeline.params import FitParams, GateParams, Params, load_params, params_from_dict, to_flat_dict

log = logging.getLogger("pipeline.crossval")

STAGE = "crossval"
# Gate thresholds for a folder: the score that one more run of the recipe reaches with this
# probability (a one-sided prediction bound from the folds' mean and spread), never above the worst fold.
THRESHOLD_CONFIDENCE = 0.95
PRESET_FOLDER = Path(__file__).resolve().parents[1] / "presets"
DEFAULT_MODEL = MODEL_NAMES[0]   # the custom CNN, the model table's first


def assign_folds(manifest: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """The part (0 to ``2 x folds - 1``) of each manifest row: stratified by label, groups whole."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise PipelineError(f"crossval: --folds must be at least 2, got {folds}")
    parts = 2 * folds
    # Each part needs a group of copies of every class (a group stays whole in one part): fewer and some
    # fold trains or tests without the class, or scikit-learn cannot deal the parts at all.
    counts = manifest.groupby("label")["group"].agg(["size", "nunique"])
    label, (images, groups) = min(counts.iterrows(), key=lambda row: (row[1]["nunique"], row[0]))
    if groups < parts and groups == images:
        raise PipelineError(f"crossval: {folds} folds deal each class into {parts} parts, but the smallest class "
                            f"has {images} images; use fewer folds or more images of '{label}'")
    if groups < parts:
        raise PipelineError(f"crossval: {folds} folds deal each class into {parts} parts, each group of copies whole "
                            f"in one, but class '{label}' has {images} images in only {groups} groups of copies; "
                            f"use fewer folds or more distinct images of '{label}'")
    assignment = np.full(len(manifest), -1)
    splitter = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=seed)
    for part, (_, held) in enumerate(splitter.split(np.zeros(len(manifest)), manifest["label"], manifest["group"])):
        assignment[held] = part
    return assignment


def fold_split(manifest: pd.DataFrame, parts: np.ndarray, fold: int, folds: int) -> pd.DataFrame:
    """The manifest with a ``split`` column for one fold: test, validation (early stopping) and train."""
    count = 2 * folds
    test_parts = {(2 * fold) % count, (2 * fold + 1) % count}
    validation_part = (2 * fold + 2) % count
    split = np.where(np.isin(parts, list(test_parts)), "test", np.where(parts == validation_part, "validation",
                                                                         "train"))
    return manifest.assign(split=split)


def summarise(folds: Sequence[dict], key: str = "test_accuracy") -> dict[str, float]:
    """Mean, sample standard deviation, worst and best fold of one figure."""
    values = np.array([fold[key] for fold in folds], dtype=float)
    spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": spread, "min": float(values.min()), "max": float(values.max()),
            "folds": len(values)}


def recipe_params(params_path: Path, presets: Sequence[str], overrides: Sequence[str]) -> tuple[Params, dict]:
    """params.yaml, with presets applied in order and ``key.path=value`` overrides (YAML values),
    checked as the stages check them; also returns the overrides as a flat mapping, for the record."""
    from pipeline.preset import apply_preset, layered, read_preset

    load_params(params_path)   # a missing or broken params file fails here, in one line
    raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    if presets:
        raw, _ = apply_preset(raw, layered([read_preset(PRESET_FOLDER, preset) for preset in presets]))
    changes: dict[str, Any] = {}
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or "." not in key:
            raise PipelineError(f"crossval: --set {override!r}: expected section.key=value, e.g. "
                                "train_custom.weight_decay=0.05")
        section, _, name = key.partition(".")
        if not isinstance(raw.get(section), dict) or name not in raw[section]:
            raise PipelineError(f"crossval: --set {key}: no such key in {params_path}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise PipelineError(f"crossval: --set {override!r}: the value is not YAML ({problem}); "
                                "quote it for the shell, e.g. --set 'augment.rotation=[0.1, 0.2]'") from None
        raw[section][name] = changes[key] = value
    with_presets = f" with preset {' and '.join(presets)}" if presets else ""
    return params_from_dict(raw, source=f"{params_path}{with_presets}"), changes


def run_fold(params: Params, model_name: str, root: Path, frame: pd.DataFrame,
             holdout: SplitImages | None = None) -> dict:
    """Train one fold with the training stage's code and score its test part, as trained and with
    the prediction averaged over the image and its mirror; plus the training part's accuracy.

    ``holdout`` (its rows all ``test``) replaces the test part: a folder kept out of every choice.
    """
    import keras

    spec = model_spec(model_name)
    section = getattr(params, spec.params_section)
    train_function = getattr(importlib.import_module(f"pipeline.{spec.stage}"), spec.stage)
    keras.backend.clear_session()
    policy = keras.mixed_precision.global_policy()     # resolve_setup sets the precision for the process
    try:
        return _train_and_score(params, spec, section, train_function, root, frame, holdout)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _train_and_score(params: Params, spec: ModelSpec, section: FitParams, train_function: Callable, root: Path,
                     frame: pd.DataFrame, holdout: SplitImages | None) -> dict:
    from pipeline import statistics
    from pipeline.dataset import decode_predictions, load_images
    from pipeline.models import for_inference, with_flip_averaging
    from pipeline.seeding import seed_everything
    from pipeline.training import History, make_fit_data, resolve_setup

    seed_everything(params.base.seed, tensorflow=True, deterministic=params.base.deterministic)
    data = SplitImages(root, frame)
    placement, setup = resolve_setup(params.base, section, spec, params.augment)
    fit_data = make_fit_data(data, params.base, section.batch_size, placement, one_batch_shape=setup.jit_compile,
                             augment=params.augment)
    history = History()
    started = time.perf_counter()
    with placement.strategy.scope():
        trained = train_function(fit_data, dataclasses.replace(section, jit_compile=setup.jit_compile),
                                 params.augment, history, [])
    fit_seconds = time.perf_counter() - started
    plain = for_inference(trained)
    averaged = with_flip_averaging(plain)
    answers: dict[str, Any] = {}
    index = {name: number for number, name in enumerate(data.class_names)}   # the trained model's outputs
    scored = {"test": holdout or data, "train": data}
    tested = {split: (images.paths(split), [index[label] for label in images.subset(split)["label"]])
              for split, images in scored.items()}
    for split, (paths, labels) in tested.items():
        images = load_images(paths, params.base.image_size, params.base.channels).astype(np.float32)
        actual = np.asarray(labels)
        for name, model in (("", plain), ("_flip", averaged)):
            predicted, _ = decode_predictions(model.predict(images, batch_size=256, verbose=0))
            answers[f"{split}_accuracy{name}"] = float(np.mean(predicted == actual))
            answers[f"{split}_score{name}"] = statistics.score(params.gate.metric, actual, predicted)
            if split == "test":
                answers[f"test_right{name}"] = (predicted == actual).astype(int).tolist()
                answers[f"test_predicted{name}"] = predicted.astype(int).tolist()
        if split == "test":
            answers["test_label"] = actual.astype(int).tolist()
    sizes = {split: int((frame["split"] == split).sum()) for split in ("train", "validation")}
    sizes["test"] = len(tested["test"][0])
    return {**answers, "sizes": sizes, "epochs_run": len(history.rows), "fit_s": fit_seconds,
            "test_paths": scored["test"].subset("test")["path"].tolist(), "precision": setup.precision}


def ingested(params: Params, root: Path, training: bool = True) -> pd.DataFrame:
    """The manifest the ingest stage would write for ``root`` (copies grouped, conflicts left out).

    A ``training`` folder is checked as the ingest stage checks its source (two classes or more, no
    class folder without images); a held-out folder may hold fewer classes than the training one."""
    from pipeline.ingest import check_classes, ingest_folder
    from pipeline.manifest import MANIFEST_COLUMNS

    ingest = params.ingest
    result = ingest_folder(root, ingest.max_image_pixels, ingest.max_per_class, params.base.seed,
                           near_duplicate_distance=ingest.near_duplicate_distance, image_size=params.base.image_size,
                           near_duplicate_similarity=ingest.near_duplicate_similarity)
    if training:
        check_classes(result, root)
    return pd.DataFrame(result.images, columns=MANIFEST_COLUMNS)


def score_on_holdout(params: Params, model_name: str, root: Path, holdout_root: Path, folds: int) -> dict:
    """Train once on all of ``root`` (a ``1 / (2 x folds)`` part for early stopping, as in every
    fold) and score the separate folder ``holdout_root``, which no choice has seen."""
    manifest, holdout = ingested(params, root), ingested(params, holdout_root, training=False)
    unknown = sorted(set(holdout["label"]) - set(manifest["label"]))
    if unknown:
        raise PipelineError(f"crossval: --holdout {holdout_root} has classes the training folder lacks: {unknown}")
    parts = assign_folds(manifest, folds, params.base.seed)
    frame = manifest.assign(split=np.where(parts == 0, "validation", "train"))
    warn_of_slow_widths(params, model_name)
    outcome = run_fold(params, model_name, root, frame, holdout=SplitImages(holdout_root, holdout.assign(split="test")))
    log.info("holdout %s: %s %.3f (%.3f with flip averaging), train %.3f, %d epochs, %.0f s", holdout_root,
             params.gate.metric, outcome["test_score"], outcome["test_score_flip"], outcome["train_score"],
             outcome["epochs_run"], outcome["fit_s"])
    return {"folder": str(holdout_root), **outcome}


def cross_validate(params: Params, model_name: str, root: Path, folds: int, done: Sequence[dict] = (),
                   on_fold: Callable[[dict], None] | None = None) -> dict:
    """Ingest ``root`` as the ingest stage would (copies grouped), then train and score every fold.

    ``done`` holds the outcomes of folds already trained (a run stopped part-way, read back from its
    results file): those folds are kept, not trained again. ``on_fold`` receives the result so far
    after each fold, for writing it down before the next one starts."""
    manifest = ingested(params, root)
    parts = assign_folds(manifest, folds, params.base.seed)
    require_same_deal(done, manifest, parts, folds, root)
    outcomes = list(done)
    if len(outcomes) < folds:
        warn_of_slow_widths(params, model_name)
    for fold in range(len(outcomes), folds):
        outcome = run_fold(params, model_name, root, fold_split(manifest, parts, fold, folds))
        log.info("fold %d/%d: test %s %.3f (%.3f with flip averaging), train %.3f, %d epochs, %.0f s",
                 fold + 1, folds, params.gate.metric, outcome["test_score"], outcome["test_score_flip"],
                 outcome["train_score"],
                 outcome["epochs_run"], outcome["fit_s"])
        outcomes.append({"fold": fold + 1, **outcome})
        if on_fold is not None:
            on_fold(_folds_result(manifest, outcomes))
    return _folds_result(manifest, outcomes)


def warn_of_slow_widths(params: Params, model_name: str) -> None:
    """The training stage's warning about slow block widths, once per command, not once per fold."""
    from pipeline import training
    from pipeline.devices import resolve_precision

    spec = model_spec(model_name)
    section = getattr(params, spec.params_section)
    training.warn_of_slow_widths(spec, section, resolve_precision(section.precision, spec.name))


def require_same_deal(done: Sequence[dict], manifest: pd.DataFrame, parts: np.ndarray, folds: int,
                      root: Path) -> None:
    """Refuse to go on from folds that tested other images than today's deal of the folder gives
    them (images added, removed or grouped otherwise since): images would be tested twice or never,
    and some tested images trained on."""
    for number, kept in enumerate(done):
        frame = fold_split(manifest, parts, number, folds)
        if set(kept["test_paths"]) != set(frame.loc[frame["split"] == "test", "path"]):
            raise PipelineError(f"crossval: the folder {root} changed since the stopped run: its fold {number + 1} "
                                "tested other images than that fold tests now, so going on would test some images "
                                "twice or never; cross-validate the recipe afresh under a new --name or --out")


def _folds_result(manifest: pd.DataFrame, outcomes: list[dict]) -> dict:
    return {"images": len(manifest), "classes": sorted(manifest["label"].unique().tolist()), "folds": list(outcomes)}


def stopped_early(result: dict) -> bool:
    """Whether a recipe's cross-validation was stopped before its last fold (its results file keeps
    the folds it finished; the same command again goes on from the next one)."""
    return len(result["folds"]) < result.get("folds_planned", len(result["folds"]))


# What a recipe's entry must share with a rerun for the rerun to go on from its last finished fold; its
# "params" (the resolved settings) too, key by key, where the entry has them (older entries do not).
RESUME_KEYS = ("preset", "overrides", "model", "source", "metric", "folds_planned")


def resolved_settings(params: Params, model_name: str) -> dict[str, Any]:
    """Every setting the folds train and score with, as flat ``section.key`` values: what the preset
    named in the results said when the recipe ran (a preset file changes over time; this does not)."""
    sections = ("base", "ingest", "augment", model_spec(model_name).params_section)
    flat = {key: value for name in sections for key, value in to_flat_dict(getattr(params, name), name).items()}
    flat.pop("ingest.source")      # the folder is the entry's "source"
    return flat


def default_name(presets: Sequence[str], model_name: str, overrides: dict[str, Any]) -> str:
    """A recipe's name when ``--name`` is not given: what sets it apart from params.yaml alone (its
    presets, a model other than the default, its overrides), so that different runs do not share one."""
    words = [f"preset={'+'.join(presets)}"] if presets else []
    words += [f"model={model_name}"] if model_name != DEFAULT_MODEL else []
    words += [f"{key}={value}" for key, value in overrides.items()]
    return ",".join(words) or "params.yaml"


def recorded_settings(entry: dict) -> dict[str, Any]:
    """A recipe entry's ``RESUME_KEYS`` as a run states them today; older entries name their preset as
    a string and lack the model, the metric or the planned folds (then all of their folds)."""
    preset = entry.get("preset") or []
    return {"preset": [preset] if isinstance(preset, str) else list(preset), "overrides": entry.get("overrides", {}),
            "model": entry.get("model", DEFAULT_MODEL), "source": entry.get("source"), "metric": metric_of(entry),
            "folds_planned": entry.get("folds_planned", len(entry["folds"]))}


def differing_settings(earlier: dict, settings: dict[str, Any]) -> list[str]:
    """The keys of ``RESUME_KEYS`` that differ between a recipe's entry and a rerun, then the params by name."""
    recorded = recorded_settings(earlier)
    differing = [key for key in RESUME_KEYS if recorded[key] != settings[key]]
    theirs, mine = earlier.get("params", settings["params"]), settings["params"]
    return differing + [key for key in sorted(set(theirs) | set(mine)) if theirs.get(key) != mine.get(key)]


def _differ(keys: list[str]) -> str:
    return f"{', '.join(keys)} {'differs' if len(keys) == 1 else 'differ'}"


def folds_to_keep(results: dict[str, dict], name: str, settings: dict[str, Any], out: Path) -> list[dict]:
    """The finished folds of recipe ``name`` to keep: none when it is new, its folds when it was stopped
    part-way or completed with the same settings (a completed one then trains nothing). Other settings
    under a recipe's name are an error, so no two recipes' folds mix and no finished recipe is lost."""
    earlier = results.get(name)
    if earlier is None:
        return []
    differing = differing_settings(earlier, settings)
    if differing and stopped_early(earlier):
        raise PipelineError(f"crossval: recipe '{name}' in {out} was stopped after {len(earlier['folds'])} of "
                            f"{earlier['folds_planned']} folds with other settings ({_differ(differing)}); "
                            "give this one another --name, or run the stopped one's command again to finish it")
    if differing:
        raise PipelineError(f"crossval: recipe '{name}' in {out} was cross-validated (every fold) with other settings "
                            f"({_differ(differing)}); give this one another --name, or another --out")
    if stopped_early(earlier):
        log.info("recipe '%s': going on from fold %d of %d (the folds before it are in %s)", name,
                 len(earlier["folds"]) + 1, earlier["folds_planned"], out)
    else:
        log.info("recipe '%s' in %s was cross-validated with these settings already (every fold): nothing to train",
                 name, out)
    return earlier["folds"]


def require_holdout_recipe(results: dict[str, dict], name: str, settings: dict[str, Any], out: Path) -> dict:
    """The entry of the cross-validated recipe ``name`` that ``--holdout`` is to score: every fold done,
    and trained with the settings given now, so the score is filed under the recipe that earned it."""
    earlier = results.get(name)
    if earlier is None or stopped_early(earlier):
        raise PipelineError(f"crossval: no cross-validated recipe '{name}' in {out}: cross-validate it (every "
                            "fold) before scoring it on the held-out folder")
    differing = differing_settings(earlier, settings)
    if differing:
        raise PipelineError(f"crossval: recipe '{name}' in {out} was cross-validated with other settings "
                            f"({_differ(differing)}); score it on --holdout with its own --source, --preset, --set, "
                            "--model and --folds")
    if "holdout" in earlier:   # scored again, the kept-apart folder would start to choose the recipe
        held = earlier["holdout"]
        raise PipelineError(f"crossval: recipe '{name}' in {out} was scored on its held-out folder {held['folder']} "
                            f"already ({metric_of(earlier)} {held[score_key(held)]:.3f}); a held-out folder is "
                            "scored once, so that no choice follows from it: keep that figure")
    return earlier


def read_results(out: Path) -> dict[str, dict]:
    """The recipes of the results file ``out`` (none before it exists); a file that is not one is one line."""
    if not out.exists():
        return {}
    try:
        data = read_json(out)
    except ValueError as error:        # not JSON (cut short, say), or not UTF-8
        raise PipelineError(f"crossval: {out} is not a crossval results file (not JSON: {error}); "
                            "give --out another file") from None
    if not isinstance(data, dict) or not isinstance(data.get("recipes"), dict):
        raise PipelineError(f"crossval: {out} is not a crossval results file (no \"recipes\" in it); "
                            "give --out another file")
    return data["recipes"]


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the results file ``out`` (``flock`` on a lock file beside it, since
    each write replaces the file itself): two runs writing to one file take turns."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_recipe(out: Path, name: str, change: Callable[[dict | None], dict]) -> dict[str, dict]:
    """Read the results file afresh, replace recipe ``name`` with ``change(its entry)`` and write it back
    atomically, all under the lock: the recipes another run wrote meanwhile are kept. Returns them all."""
    with locked(out):
        results = read_results(out)
        results[name] = change(results.get(name))
        write_json(out, {"recipes": results})
    return results


def metric_of(result: dict) -> str:
    """The metric a recipe was scored in (results written before scores were kept: accuracy)."""
    return result.get("metric", "accuracy")


def score_key(outcome: dict, split: str = "test", flip: bool = False) -> str:
    """The key of one trained model's score on ``split`` in a fold's (or the held-out folder's)
    outcome: ``test_score``, ``train_score_flip``, ... (``*_accuracy`` in files written before scores)."""
    kind = "score" if "test_score" in outcome else "accuracy"
    return f"{split}_{kind}{'_flip' if flip else ''}"


def figure(result: dict, split: str = "test", flip: bool = False) -> str:
    """The fold key of a recipe's score on ``split``: ``test_score``, ``train_score_flip``, ..."""
    return score_key(result["folds"][0], split, flip)


def pooled(result: dict, flip: bool = False) -> dict[str, Any]:
    """Every image's answer (right or not), keyed by path, and the score over every image pooled, in
    the recipe's metric, with its 95 % interval (Wilson for accuracy, bootstrap otherwise)."""
    from pipeline import statistics

    suffix = "_flip" if flip else ""
    folds = result["folds"]
    right = {path: value for fold in folds for path, value in zip(fold["test_paths"], fold[f"test_right{suffix}"])}
    metric = metric_of(result)
    if metric == "accuracy":
        actual = np.ones(len(right), dtype=int)
        predicted = np.array(list(right.values()))
    else:
        actual = np.concatenate([fold["test_label"] for fold in folds])
        predicted = np.concatenate([fold[f"test_predicted{suffix}"] for fold in folds])
    interval = statistics.interval(metric, actual, predicted, confidence=0.95, seed=0)
    return {"right": right, "score": statistics.score(metric, actual, predicted), "ci95": [interval.low, interval.high]}


def fold_scores(result: dict, flip: bool) -> dict[str, list[float]]:
    """A recipe's score on each fold's training and test photos, in its metric, with flip averaging or
    as trained."""
    return {split: [fold[figure(result, split, flip)] for fold in result["folds"]] for split in ("train", "test")}


def fold_shares(folds: int) -> list[float]:
    """``split.ratios`` that give the pipeline's one split the shares each fold had (train, validation,
    test): with 5 folds 0.7, 0.1 and 0.2. Thresholds measured on folds hold for a split like them."""
    parts = 2 * folds
    return [round((parts - 3) / parts, 6), round(1 / parts, 6), round(2 / parts, 6)]


def next_run(scores: Sequence[float]) -> Any:
    """What one more run of the recipe (another split, another start) may score, from the folds' scores:
    Student's t prediction distribution for a new observation, centred on their mean, scaled by
    sd * sqrt(1 + 1/n), with n - 1 degrees of freedom (``scipy.stats.t``, frozen). At least 2 folds
    (--folds is 2 or more); folds that all scored alike give None: one more run scores the same."""
    from scipy import stats

    values = np.asarray(scores, dtype=float)
    spread = values.std(ddof=1) * math.sqrt(1 + 1 / len(values))
    return stats.t(df=len(values) - 1, loc=values.mean(), scale=spread) if spread > 0 else None


def prediction_bound(scores: Sequence[float], confidence: float = THRESHOLD_CONFIDENCE) -> float:
    """The score that one more run of the recipe reaches with probability ``confidence``: the lower end
    of the one-sided prediction interval, mean - t(confidence, n - 1) * sd * sqrt(1 + 1/n)."""
    distribution = next_run(scores)
    return float(np.mean(scores)) if distribution is None else float(distribution.ppf(1 - confidence))


def chance_to_pass(scores: Sequence[float], threshold: float) -> float:
    """How often one more run of the recipe would score at least ``threshold`` (the gate's ``>=``)."""
    from pipeline.decision import at_least

    distribution = next_run(scores)
    if distribution is None:
        return float(at_least(float(np.mean(scores)), threshold))
    return float(distribution.sf(threshold))


def suggested_thresholds(scores: dict[str, Sequence[float]]) -> dict[str, float]:
    """``gate.min_train_score`` and ``gate.min_test_score`` for folders like the one cross-validated,
    from each split's fold scores: the :func:`prediction_bound` for one more run, or the worst fold
    where that is lower, rounded down to the hundredth. So a run as good as the recipe usually is
    passes (19 times in 20 by the bound), and so does one as good as its worst fold."""
    bound = {split: prediction_bound(values) for split, values in scores.items()}
    return _thresholds_under(bound, {split: min(values) for split, values in scores.items()})


def _thresholds_under(bound: dict[str, float], worst: dict[str, float]) -> dict[str, float]:
    def under(split: str) -> float:
        lowest = min(bound[split], worst[split])
        return max(0.0, math.floor(round(lowest * 100, 6)) / 100)     # 0.57 * 100 is 56.99999999999999

    return {"min_train_score": under("train"), "min_test_score": under("test")}


def worst_fold_verdict(worst: dict[str, float], gate: GateParams) -> str:
    """The gate's verdict (``deploy``, ``overfit``, ``underfit``) on a model as good as the worst fold,
    judged on the scores themselves: a fold's score has no interval for ``gate.confidence`` to use."""
    from pipeline import decision

    return decision.judge(decision.Estimate(worst["train"]), decision.Estimate(worst["test"]),
                          dataclasses.replace(gate, confidence=None)).verdict


@dataclasses.dataclass(frozen=True)
class GateEvidence:
    """What a recipe's folds say about a gate, by split (train, test): the worst fold, the score one more
    run reaches 19 times in 20, the thresholds that follow (:func:`suggested_thresholds`), how often one
    more run clears the gate's own thresholds, and the gate's verdict on a model as good as the worst fold."""

    worst: dict[str, float]
    bound: dict[str, float]
    suggested: dict[str, float]
    pass_rates: dict[str, float]
    verdict: str


def gate_evidence(scores: dict[str, Sequence[float]], gate: GateParams) -> GateEvidence:
    """:class:`GateEvidence` from each split's fold scores, for ``gate``."""
    worst = {split: min(values) for split, values in scores.items()}
    bound = {split: prediction_bound(values) for split, values in scores.items()}
    rates = {split: chance_to_pass(values, getattr(gate, f"min_{split}_score")) for split, values in scores.items()}
    return GateEvidence(worst, bound, _thresholds_under(bound, worst), rates, worst_fold_verdict(worst, gate))


def threshold_lines(name: str, result: dict, params: Params) -> list[str]:
    """What a recipe's worst fold says about the gate: the thresholds that would let a model as good
    as it deploy, and the verdict params.yaml's own gate would give such a model."""
    from pipeline import decision

    flip = params.augment.flip_average
    gate = params.gate
    evidence = gate_evidence(fold_scores(result, flip), gate)
    worst, bound, suggested = evidence.worst, evidence.bound, evidence.suggested
    metric = metric_of(result).replace("_", " ")
    shares = fold_shares(len(result["folds"]))
    lines = [f"{name}: worst fold {metric} train {worst['train']:.4f}, test {worst['test']:.4f}; "
             f"one more run scores at least train {bound['train']:.4f}, test {bound['test']:.4f} "
             f"{THRESHOLD_CONFIDENCE:.0%} of the time "
             f"({'with flip averaging, as the saved model answers' if flip else 'as trained'})",
             f"  gate thresholds for folders like this one (that bound or the worst fold, rounded down): "
             f"-S gate.min_train_score={suggested['min_train_score']:.2f} "
             f"-S gate.min_test_score={suggested['min_test_score']:.2f}"]
    if not all(math.isclose(mine, fold, abs_tol=1e-3) for mine, fold in zip(params.split.ratios, shares)):
        lines.append(f"  they hold for a split like the folds': -S 'split.ratios=[{','.join(map(str, shares))}]' "
                     f"(these params split {list(params.split.ratios)})")
    rates = evidence.pass_rates
    lines.append(f"  the gate of these params (train {gate.min_train_score:.2f}, test {gate.min_test_score:.2f}) "
                 f"would call a model as good as the worst fold: {evidence.verdict}; one more run clears its train "
                 f"threshold {as_percent(rates['train'])} of the time, its test threshold {as_percent(rates['test'])}")
    if evidence.verdict != decision.DEPLOY:
        lines.append("  lower thresholds would describe this recipe, not make its models good enough for your use: "
                     "more photos or pretrained weights do that (docs/choosing-a-recipe.md)")
    return lines


def as_percent(probability: float) -> str:
    """A probability as a percentage that does not round a small chance to never or always."""
    return "over 99%" if probability > 0.99 else "under 1%" if probability < 0.01 else f"{probability:.0%}"


def same_folds(first: dict, second: dict) -> bool:
    """Whether two recipes were tested on the same folds. Every image is tested once whatever the
    folds, so the same images are not enough: one folder, one seed and one ``--folds`` are what make
    two recipes' answers on an image a paired comparison."""
    return [set(fold["test_paths"]) for fold in first["folds"]] == [set(fold["test_paths"]) for fold in second["folds"]]


def require_same_folds(first: dict, second: dict) -> None:
    """Refuse to pair two recipes' answers unless they were tested on the same folds."""
    if not same_folds(first, second):
        raise PipelineError("crossval: the two recipes were not tested on the same folds (other folder, "
                            "seed or --folds); compare only results of one folder, one seed and one --folds")


def compare_recipes(first: dict, second: dict, flip: tuple[bool, bool] = (False, False)) -> dict[str, Any]:
    """Image-by-image comparison of two recipes cross-validated on the same folds (same paths)."""
    from pipeline import statistics

    require_same_folds(first, second)
    a, b = pooled(first, flip[0])["right"], pooled(second, flip[1])["right"]
    paths = sorted(a)
    first_right = np.array([a[p] for p in paths], dtype=bool)
    second_right = np.array([b[p] for p in paths], dtype=bool)
    first_only, second_only = int(np.sum(first_right & ~second_right)), int(np.sum(~first_right & second_right))
    return {"difference": float(first_right.mean() - second_right.mean()), "first_only_right": first_only,
            "second_only_right": second_only, "mcnemar_p_value": statistics.mcnemar_exact(first_only, second_only)}


def compare_repeated(pairs: list[tuple[dict, dict]], flip: tuple[bool, bool] = (False, False)) -> dict[str, Any]:
    """Two recipes over one or more repetitions of cross-validation (one results file per seed, both
    recipes on each repetition's folds): the mean of their fold-by-fold score differences and the
    corrected repeated k-fold t-test on them, which, unlike McNemar on one repetition's images, takes
    in how much the scores move when the photos are dealt into folds another way."""
    from pipeline import statistics

    differences, test_per_train = [], []
    for first, second in pairs:
        require_same_folds(first, second)
        first_key, second_key = figure(first, flip=flip[0]), figure(second, flip=flip[1])
        for mine, theirs in zip(first["folds"], second["folds"]):
            differences.append(mine[first_key] - theirs[second_key])
            sizes = mine["sizes"]
            test_per_train.append(sizes["test"] / (sizes["train"] + sizes["validation"]))
    return {"difference": float(np.mean(differences)), "folds": len(differences), "repetitions": len(pairs),
            "p_value": statistics.repeated_cv_p_value(np.array(differences), float(np.mean(test_per_train)))}


def report_lines(results: dict[str, dict], reference: str | None) -> list[str]:
    """One line per recipe: mean, spread, worst fold, pooled interval, train accuracy, time; with flip
    averaging; and against ``reference``, the difference and McNemar's p."""
    lines = [f"{'recipe':<28} {'mean':>6} {'std':>6} {'worst':>6} {'pooled 95% CI':>15} {'flip mean':>9} "
             f"{'worst':>6} {'train':>6} {'s/fold':>6}  vs {reference or '-'}"]
    for name, result in results.items():
        folds = result["folds"]
        test, flip = summarise(folds, figure(result)), summarise(folds, figure(result, flip=True))
        train = summarise(folds, figure(result, "train"))
        seconds = np.mean([fold["fit_s"] for fold in result["folds"]])
        low, high = pooled(result)["ci95"]
        against = ""
        if stopped_early(result):
            against = f"stopped after {len(folds)} of {result['folds_planned']} folds"
        elif reference and reference in results and reference != name and not stopped_early(results[reference]):
            if same_folds(result, results[reference]):
                comparison = compare_recipes(result, results[reference])
                # McNemar pairs right and wrong answers: a difference in accuracy, whatever the gate's metric.
                against = (f"{comparison['difference'] * 100:+.1f} pts"
                           f"{' of accuracy' if metric_of(result) != 'accuracy' else ''}, "
                           f"p={comparison['mcnemar_p_value']:.3f}")
            else:
                against = "other folds (folder, seed or --folds): not compared"
        if metric_of(result) != "accuracy":
            name = f"{name} ({metric_of(result)})"
        lines.append(f"{name:<28} {test['mean']:>6.3f} {test['std']:>6.3f} {test['min']:>6.3f} "
                     f"{f'{low:.3f}-{high:.3f}':>15} {flip['mean']:>9.3f} {flip['min']:>6.3f} {train['mean']:>6.3f} "
                     f"{seconds:>6.0f}  {against}")
        if "holdout" in result:
            held = result["holdout"]
            lines.append(f"{'':<28} held-out folder {held['folder']}: {metric_of(result)} {held[score_key(held)]:.3f} "
                         f"({held[score_key(held, flip=True)]:.3f} with flip averaging) on {held['sizes']['test']} images")
    return lines


def main(args: argparse.Namespace) -> None:
    params, overrides = recipe_params(Path(args.params), args.preset, args.set)
    root = Path(args.source or params.ingest.source).expanduser()
    if not root.is_dir() and not args.report_only:     # the table and the thresholds need only the results file
        raise PipelineError(f"crossval: {root} is not a folder (expected one subfolder per class)")
    out = Path(args.out)
    if args.report_only and not out.exists():
        raise PipelineError(f"crossval: --report-only: no results file {out} (cross-validate a recipe with "
                            f"--out {out} first)")
    results = read_results(out)
    name = args.name or default_name(args.preset, args.model, overrides)
    if args.against and args.against != name and args.against not in results:   # before hours of training
        raise PipelineError(f"crossval: --against {args.against!r}: no such recipe in {out} "
                            f"(it has: {', '.join(map(repr, results)) or 'none'})")
    settings = {"preset": args.preset, "overrides": overrides, "model": args.model, "source": str(root),
                "metric": params.gate.metric, "folds_planned": args.folds,
                "params": resolved_settings(params, args.model)}
    if args.report_only:       # whatever else is given: the table from the file, nothing trained
        pass
    elif args.holdout:
        holdout_root = Path(args.holdout).expanduser()
        if not holdout_root.is_dir():
            raise PipelineError(f"crossval: --holdout {holdout_root} is not a folder "
                                "(expected one subfolder per class)")
        recipe = require_holdout_recipe(results, name, settings, out)
        held = score_on_holdout(params, args.model, root, holdout_root, args.folds)
        results = update_recipe(out, name, lambda current: {**(current or recipe), "holdout": held})
    else:
        done = folds_to_keep(results, name, settings, out)
        if not done or stopped_early(results[name]):
            from pipeline.devices import machine_summary

            # Going on, the first start's time and machine describe the folds kept.
            first = results[name] if done else {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                                "machine": machine_summary()}
            entry = {**settings, "against": args.against, "started": first["started"], "machine": first["machine"]}

            def write_down(result: dict) -> None:   # after every fold: a stopped run loses only the fold it was in
                update_recipe(out, name, lambda _: {**entry, **result})

            cross_validate(params, args.model, root, args.folds, done=done, on_fold=write_down)
            results = read_results(out)
    for line in report_lines(results, args.against):
        log.info("%s", line)
    if name in results and not stopped_early(results[name]) and metric_of(results[name]) == params.gate.metric:
        for line in threshold_lines(name, results[name], params):
            log.info("%s", line)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.stage_parser(STAGE, __doc__.splitlines()[0])
    parser.add_argument("--source", help="image folder, one subfolder per class (default: ingest.source)")
    parser.add_argument("--preset", action="append", default=[], metavar="NAME",
                        help="apply presets/<NAME>.yaml to params.yaml first, e.g. photos; repeat to layer several")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one params key (YAML value); repeat for several")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=MODEL_NAMES, help="which model's recipe")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--name", help="the recipe's name in the results (default: its presets, model and overrides)")
    parser.add_argument("--out", default="crossval.json", help="results file; recipes accumulate in it")
    parser.add_argument("--against", help="compare every recipe with this one, image by image")
    parser.add_argument("--report-only", action="store_true",
                        help="print the results file's table, train nothing (whatever else is given)")
    parser.add_argument("--holdout", metavar="DIR",
                        help="once a recipe is chosen: train it on all of --source and score this separate folder")
    return parser


if __name__ == "__main__":
    cli.main_entry(STAGE, main, build_parser())
