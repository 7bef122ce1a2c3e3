"""What both trainers share: input pipelines, the fit loop, saving, and the stage's I/O.

A trainer module supplies one function that builds and fits its model (:data:`FitFunction`);
:func:`run_training_stage` does everything around it: params, seeding, MLflow, files.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline import cli, figures, tracking
from pipeline.dataset import load_images, training_dataset
from pipeline.devices import Placement, choose_placement, resolve_precision
from pipeline.files import atomic_write_text, write_json
from pipeline.manifest import MANIFEST_FILE, SplitImages, read_split
from pipeline.params import FitParams, Params, load_params, to_flat_dict
from pipeline.seeding import seed_everything

log = logging.getLogger("pipeline.training")

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
TRAINING_MODEL_PACKAGES = ("tensorflow", "keras", "numpy")
MODEL_NAMES = {"train_custom": "custom", "train_resnet50": "resnet50"}
HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy"]


@dataclass
class FitData:
    """The batched training and validation sets, with the sizes the deck talks about."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    train_size: int
    batch_size: int
    num_classes: int
    input_shape: tuple[int, int, int]
    replicas: int = 1

    @property
    def iterations_per_epoch(self) -> int:
        """The deck's definition: batches needed to see every training image once."""
        return iterations_per_epoch(self.train_size, self.batch_size)

    def scaled_learning_rate(self, learning_rate: float) -> float:
        """The Keras guides' linear scaling: a batch N times larger takes N times the step size."""
        return learning_rate * self.replicas


@dataclass
class History:
    """Per-epoch figures across every fit phase, numbered continuously from epoch 1."""

    rows: list[dict] = field(default_factory=list)

    def add(self, phase: str, keras_history: keras.callbacks.History) -> None:
        for values in _epochs(keras_history):
            self.rows.append({"epoch": len(self.rows) + 1, "phase": phase, **values})

    def frame(self) -> pd.DataFrame:
        """The curves as a table; a diverged loss (inf, NaN) becomes an empty cell, which DVC's
        plot renderer skips instead of failing on."""
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS).replace([np.inf, -np.inf], np.nan)


FitFunction = Callable[[FitData, Params, History], keras.Model]


def iterations_per_epoch(train_size: int, batch_size: int) -> int:
    """ceil(train size / batch size): 400 images in batches of 40 take 10 iterations."""
    return math.ceil(train_size / batch_size)


def make_fit_data(data: SplitImages, params: Params, batch_size: int, placement: Placement | None = None) -> FitData:
    """Training set shuffled with the seed, validation set in order; both decoded once and cached.

    ``batch_size`` is per replica: with several replicas each step takes ``batch_size * replicas``
    images. With several workers each reads only its own share of the files.
    """
    base = params.base
    replicas = placement.replicas if placement else 1
    shard = (placement.num_workers, placement.worker_index) if placement and placement.num_workers > 1 else None
    num_classes = len(data.class_names)
    common = {"image_size": base.image_size, "channels": base.channels, "batch_size": batch_size * replicas,
              "shard": shard}
    train = training_dataset(data.paths("train"), data.label_indices("train"), num_classes,
                             shuffle_seed=base.seed, **common)
    validation = training_dataset(data.paths("validation"), data.label_indices("validation"), num_classes,
                                  shuffle_seed=None, **common)
    return FitData(train, validation, len(data.subset("train")), batch_size * replicas, num_classes,
                   (base.image_size, base.image_size, base.channels), replicas)


def fit(model: keras.Model, data: FitData, fit_params: FitParams, history: History, *, phase: str,
        epochs: int) -> None:
    """One ``model.fit`` with early stopping on validation loss (best weights kept)."""
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=fit_params.patience,
                                            restore_best_weights=True)
    first_step = len(history.rows)
    result = model.fit(data.train, validation_data=data.validation, epochs=epochs, verbose=2, shuffle=False,
                       callbacks=[stopper, _MlflowEpochLogger(first_step)])
    history.add(phase, result)
    if stopper.stopped_epoch:
        log.info("%s: early stopping after epoch %d, weights of epoch %d kept", phase,
                 stopper.stopped_epoch + 1, (stopper.best_epoch or 0) + 1)


def save_model(model: keras.Model, path: Path) -> None:
    """Save a ``.keras`` file under a temporary name, then rename, so no half-written model exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".keras")
    os.close(handle)
    try:
        model.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run_training_stage(args: argparse.Namespace, stage: str, fit_function: FitFunction) -> None:
    """The whole stage around a trainer's fit function: params, seed, MLflow run, files."""
    params = load_params(args.params)
    section = getattr(params, stage)
    if hasattr(section, "check_paths"):
        section.check_paths(stage)
    seed_everything(params.base.seed, tensorflow=True, deterministic=params.base.deterministic)
    data = read_split(Path(args.ingest), Path(args.split))
    tracking.connect(params.base.experiment_name)
    placement = choose_placement(params.base.distribution)
    precision = resolve_precision(section.precision, MODEL_NAMES[stage])
    keras.mixed_precision.set_global_policy(precision)
    fit_data = make_fit_data(data, params, section.batch_size, placement)
    log.info("%s: %d training images, %d classes, batch size %d, %d iterations per epoch, %s, %s on %d replica(s)",
             stage, fit_data.train_size, fit_data.num_classes, fit_data.batch_size, fit_data.iterations_per_epoch,
             precision, placement.name, placement.replicas)

    out_dir = Path(args.out)
    tags = {**tracking.lineage_tags(stage, Path(args.ingest) / MANIFEST_FILE),
            **tracking.dvc_input_hashes([args.ingest, args.split])}
    with tracking.start_run(stage, tags) as run:
        tracking.log_params_flat({**to_flat_dict(params.base, "base"), **to_flat_dict(section, stage),
                                  "train_size": fit_data.train_size,
                                  "iterations_per_epoch": fit_data.iterations_per_epoch,
                                  "classes": ",".join(data.class_names),
                                  "precision.policy": precision,
                                  "distribution.strategy": placement.name, "distribution.replicas": placement.replicas,
                                  "distribution.global_batch_size": fit_data.batch_size})
        history = History()
        with placement.strategy.scope():
            model = fit_function(fit_data, params, history)
        save_model(model, out_dir / MODEL_FILE)
        frame = history.frame()
        atomic_write_text(Path(args.history), frame.to_csv(index=False, lineterminator="\n", na_rep=""))
        summary = _summary(frame, fit_data, data.class_names)
        write_json(Path(args.metrics), summary)
        mlflow.log_figure(figures.training_curves(frame, title=stage), "plots/training_curves.png")
        model_info = _log_model(model, data, params)
        write_json(out_dir / RUN_FILE, {"run_id": run.info.run_id, "model_uri": model_info.model_uri,
                                       "class_names": data.class_names, "image_size": params.base.image_size,
                                       "channels": params.base.channels})
    log.info("%s: %d epochs, best validation accuracy %.4f; model saved to %s", stage, summary["epochs_run"],
             summary["best_val_accuracy"] or 0.0, out_dir / MODEL_FILE)


def trainer_entry(stage: str, model_name: str, fit_function: FitFunction, description: str) -> None:
    """``python -m pipeline.<trainer>``: parse the paths dvc.yaml passes and run the stage."""
    parser = cli.stage_parser(stage, description)
    parser.add_argument("--ingest", default="data/ingest", help="ingest output folder")
    parser.add_argument("--split", default="data/split.csv", help="split manifest")
    parser.add_argument("--out", default=f"models/{model_name}", help="folder for the model and its run id")
    parser.add_argument("--metrics", default=f"metrics/{stage}.json", help="training summary (JSON)")
    parser.add_argument("--history", default=f"metrics/{stage}_history.csv", help="per-epoch curves (CSV)")
    cli.main_entry(stage, lambda args: run_training_stage(args, stage, fit_function), parser)


def _summary(frame: pd.DataFrame, fit_data: FitData, class_names: list[str]) -> dict:
    best = frame.loc[frame["val_loss"].idxmin()] if frame["val_loss"].notna().any() else None
    return {
        "epochs_run": int(len(frame)),
        "iterations_per_epoch": fit_data.iterations_per_epoch,
        "train_size": fit_data.train_size,
        "batch_size": fit_data.batch_size,
        "classes": len(class_names),
        "best_epoch": int(best["epoch"]) if best is not None else None,
        "best_val_loss": float(best["val_loss"]) if best is not None else None,
        "best_val_accuracy": float(best["val_accuracy"]) if best is not None else None,
    }


def _log_model(model: keras.Model, data: SplitImages, params: Params):
    """Log the Keras model with a signature inferred from a few real validation images."""
    from mlflow.models import infer_signature

    sample = load_images(data.paths("validation")[:4], params.base.image_size, params.base.channels)
    sample = sample.astype(np.float32)
    signature = infer_signature(sample, model.predict(sample, verbose=0))
    return mlflow.keras.log_model(model, name="model", signature=signature,
                                  pip_requirements=tracking.pinned_requirements(TRAINING_MODEL_PACKAGES))


def _epochs(keras_history: keras.callbacks.History) -> list[dict]:
    values = keras_history.history
    count = len(values.get("loss", []))
    return [{column: float(values[column][i]) if column in values else None
             for column in ("loss", "accuracy", "val_loss", "val_accuracy")} for i in range(count)]


class _MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run, numbered across fit phases.

    mlflow.keras.MlflowCallback restarts its step at 0 on every fit and re-logs the optimizer's
    settings as params, which MLflow refuses when fine-tuning changes the learning rate.
    """

    def __init__(self, first_step: int) -> None:
        super().__init__()
        self.first_step = first_step

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs:
            mlflow.log_metrics({key: float(value) for key, value in logs.items()}, step=self.first_step + epoch)
