"""What both trainers share: input pipelines, the fit loop, saving, and the stage's steps.

A trainer module supplies one function that builds and fits its model (:data:`FitFunction`);
:func:`run_training_stage` runs the named steps around it: params, seeding, placement, the MLflow
run, and the files DVC tracks. :func:`fit` knows nothing of MLflow: the stage passes its logger in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from pipeline import calibration, cli, figures, parent_run, stage_runs, tracking, training_loop
from pipeline.artifacts import MODEL_FILE, RunRecord
from pipeline.dataset import load_images, training_dataset
from pipeline.devices import (BFLOAT16_CHANNEL_GROUP, Placement, choose_placement, machine_summary,
                              resolve_jit_compile, resolve_precision, slow_bfloat16_widths, tf_config)
from pipeline.errors import PipelineError, first_line
from pipeline.files import atomic_path, write_frame_csv, write_json
from pipeline.manifest import MANIFEST_FILE, SplitImages, read_split, source_setting
from pipeline.model_table import ModelSpec, model_spec
from pipeline.models import augmentation_layers, compile_model, for_inference, with_flip_averaging
from pipeline.params import AugmentParams, BaseParams, FitParams, Params, SplitParams, load_params, to_flat_dict
from pipeline.seeding import seed_everything

log = logging.getLogger("pipeline.training")

TRAINING_MODEL_PACKAGES = ("tensorflow", "keras", "numpy")
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
    train_label_counts: tuple[int, ...] = ()
    drop_remainder: bool = False
    num_workers: int = 1

    @property
    def iterations_per_epoch(self) -> int:
        """The deck's definition: batches needed to see every training image once (one fewer when
        the last, smaller batch is left out). With several workers, the steps every worker can take
        from its own share: global batches of ``batch_size / workers`` images from each."""
        if self.num_workers > 1:
            return (self.train_size // self.num_workers) // (self.batch_size // self.num_workers)
        if self.drop_remainder:
            return self.train_size // self.batch_size
        return iterations_per_epoch(self.train_size, self.batch_size)

    def balanced_class_weights(self) -> dict[int, float]:
        """scikit-learn's "balanced" weights: n_images / (n_classes * images of the class)."""
        from sklearn.utils.class_weight import compute_class_weight

        present = [index for index, count in enumerate(self.train_label_counts) if count]
        labels = np.repeat(np.arange(len(self.train_label_counts)), self.train_label_counts)
        weights = compute_class_weight("balanced", classes=np.array(present), y=labels)
        return {int(index): float(weight) for index, weight in zip(present, weights)}

    def scaled_learning_rate(self, learning_rate: float) -> float:
        """The Keras guides' linear scaling: a batch N times larger takes N times the step size."""
        return learning_rate * self.replicas


@dataclass
class History:
    """Per-epoch figures across every fit phase, numbered continuously from epoch 1."""

    rows: list[dict] = field(default_factory=list)

    def add(self, phase: str, keras_history: keras.callbacks.History | training_loop.LoopResult) -> None:
        for values in _epochs(keras_history):
            self.rows.append({"epoch": len(self.rows) + 1, "phase": phase, **values})

    def frame(self) -> pd.DataFrame:
        """The curves as a table; a diverged loss (inf, NaN) becomes an empty cell, which DVC's
        plot renderer skips instead of failing on."""
        return pd.DataFrame(self.rows, columns=HISTORY_COLUMNS).replace([np.inf, -np.inf], np.nan)


# A trainer: build and fit one model from its params section and the augmentation section, adding
# to the history, with the stage's callbacks (the MLflow epoch logger) passed to every ``model.fit``.
FitFunction = Callable[[FitData, Any, AugmentParams, History, Sequence[keras.callbacks.Callback]], keras.Model]


@dataclass(frozen=True)
class RunSetup:
    """What ``precision``, ``jit_compile`` and ``distribution: auto`` resolved to, and on what machine:
    recorded in the training metrics and the MLflow run, so runs on different CPUs are told apart."""

    precision: str
    jit_compile: bool
    distribution: str
    replicas: int
    global_batch_size: int
    machine: dict[str, Any]

    def as_params(self) -> dict[str, Any]:
        """The same facts as flat MLflow params."""
        return {"precision.policy": self.precision, "jit_compile.in_effect": self.jit_compile,
                "distribution.strategy": self.distribution,
                "distribution.replicas": self.replicas, "distribution.global_batch_size": self.global_batch_size,
                **{f"machine.{key}": value for key, value in self.machine.items()}}


def iterations_per_epoch(train_size: int, batch_size: int) -> int:
    """ceil(train size / batch size): 400 images in batches of 40 take 10 iterations."""
    return math.ceil(train_size / batch_size)


def make_fit_data(data: SplitImages, base: BaseParams, batch_size: int, placement: Placement | None = None,
                  one_batch_shape: bool = False, augment: AugmentParams | None = None) -> FitData:
    """Training set shuffled with the seed, validation set in order; both decoded once and cached.

    ``batch_size`` is per replica: with several replicas each step takes ``batch_size * replicas``
    images. With several workers each reads only its own share of the files, batched per replica
    for :mod:`pipeline.training_loop`, without the last, smaller batch (every worker takes the
    same number of steps); a share smaller than one step is refused here. ``one_batch_shape`` (for
    XLA, which compiles the step again for every new shape) leaves out the last, smaller training
    batch of each epoch. ``augment``'s ``mixup`` and ``cutmix`` mix the training batches, never the
    validation ones.
    """
    replicas = placement.replicas if placement else 1
    workers = placement.num_workers if placement else 1
    shard = (workers, placement.worker_index) if placement and workers > 1 else None
    num_classes = len(data.class_names)
    # One process batches globally (model.fit splits each batch over the replicas); the loop hands
    # each replica its own batch.
    read_batch = batch_size if shard else batch_size * replicas
    common = {"image_size": base.image_size, "channels": base.channels, "batch_size": read_batch, "shard": shard}
    train_size = len(data.subset("train"))
    if shard and (train_size // workers) < batch_size * (replicas // workers):
        raise PipelineError(f"{workers} workers with batch_size {batch_size}: each worker's share of the "
                            f"{train_size} training images is smaller than one batch; lower batch_size")
    drop_remainder = bool(shard) or (one_batch_shape and train_size > batch_size * replicas)
    train = training_dataset(data.paths("train"), data.label_indices("train"), num_classes,
                             shuffle_seed=base.seed, drop_remainder=drop_remainder,
                             **(augment.batch_mixing if augment else {}), **common)
    validation = training_dataset(data.paths("validation"), data.label_indices("validation"), num_classes,
                                  shuffle_seed=None, **common)
    counts = np.bincount(data.label_indices("train"), minlength=num_classes)
    return FitData(train, validation, train_size, batch_size * replicas, num_classes,
                   (base.image_size, base.image_size, base.channels), replicas, tuple(int(c) for c in counts),
                   drop_remainder, workers)


def compile_for_fit(model: keras.Model, data: FitData, section: FitParams, learning_rate: float,
                    epochs: int) -> None:
    """Compile with the section's optimizer, loss, label smoothing and (cosine) learning-rate schedule
    for a phase of ``epochs`` epochs; the rate is scaled to the number of replicas."""
    decay_steps = epochs * data.iterations_per_epoch if section.lr_schedule == "cosine" else 0
    compile_model(model, section.optimizer, data.scaled_learning_rate(learning_rate), section.loss, data.num_classes,
                  section.jit_compile, label_smoothing=section.label_smoothing, cosine_decay_steps=decay_steps,
                  weight_decay=section.weight_decay, ema=section.ema, momentum=section.momentum)


def fit(model: keras.Model, data: FitData, section: FitParams, history: History, *, phase: str, epochs: int,
        callbacks: Sequence[keras.callbacks.Callback] = ()) -> None:
    """One ``model.fit`` with early stopping on validation loss (best weights kept), the section's
    class weights and, for ``lr_schedule: plateau``, a halved rate when validation loss stalls.
    With ``class_weight: balanced`` the validation loss is weighted by class too, so early stopping
    and the weights kept follow the balanced criterion, not the larger class.
    With several workers, :func:`pipeline.training_loop.train_loop` does the same (``model.fit``
    fails there, keras-team/keras#20585).

    ``callbacks`` come from the caller; a callback with a ``first_step`` attribute is told where
    this phase's epochs start, so curves run on across phases.
    """
    for callback in callbacks:
        if hasattr(callback, "first_step"):
            callback.first_step = len(history.rows)
    class_weight = data.balanced_class_weights() if section.class_weight == "balanced" else None
    if data.num_workers > 1:
        result = training_loop.train_loop(
            model, data.train, data.validation, epochs=epochs, steps_per_epoch=data.iterations_per_epoch,
            global_batch_size=data.batch_size, patience=section.patience, start_from_epoch=section.start_from_epoch,
            plateau=section.lr_schedule == "plateau",
            class_weights=class_weight, num_classes=data.num_classes, callbacks=callbacks)
        history.add(phase, result)
        stopped_epoch, best_epoch = result.stopped_epoch, result.best_epoch
    else:
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=section.patience,
                                                restore_best_weights=True, start_from_epoch=section.start_from_epoch)
        # With ``ema`` the averaged weights are swapped in before each validation and at each epoch's
        # end, ahead of the stopper, so early stopping judges, keeps and restores the averaged weights.
        own: list[keras.callbacks.Callback] = [stopper]
        if section.ema:
            own.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
        if section.lr_schedule == "plateau":
            own.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5,
                                                         patience=max(1, section.patience // 2), verbose=1))
        # The validation loss that early stopping follows weighs the classes as the training loss does.
        validation = training_loop.with_class_weights(data.validation, class_weight, data.num_classes)
        result = model.fit(data.train, validation_data=validation, epochs=epochs, verbose=2, shuffle=False,
                           class_weight=class_weight, callbacks=[*own, *callbacks])
        history.add(phase, result)
        stopped_epoch, best_epoch = stopper.stopped_epoch, stopper.best_epoch or 0
    if stopped_epoch:
        log.info("%s: early stopping after epoch %d, weights of epoch %d kept", phase, stopped_epoch + 1,
                 best_epoch + 1)


def save_model(model: keras.Model, path: Path) -> None:
    """Save a ``.keras`` file under a temporary name, then rename, so no half-written model exists."""
    with atomic_path(path) as temporary:
        model.save(temporary)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics to the active MLflow run, numbered across fit phases.

    mlflow.keras.MlflowCallback restarts its step at 0 on every fit and re-logs the optimizer's
    settings as params, which MLflow refuses when fine-tuning changes the learning rate.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first_step = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs:
            mlflow.log_metrics({key: float(value) for key, value in logs.items()}, step=self.first_step + epoch)


def run_training_stage(args: argparse.Namespace, spec: ModelSpec, fit_function: FitFunction) -> None:
    """The stage around a trainer's fit function, as named steps. With several workers only the
    chief (worker 0) records: the MLflow run, the model and the metrics; the others train with it
    and write nothing (:func:`train_as_worker`)."""
    params = load_params(args.params)
    section: FitParams = getattr(params, spec.params_section)
    if hasattr(section, "check_paths"):
        section.check_paths(spec.params_section)
    seed_everything(params.base.seed, tensorflow=True, deterministic=params.base.deterministic)
    data = read_split(Path(args.ingest), Path(args.split))
    # The placement first: a multi-worker strategy must be made before TensorFlow's runtime starts,
    # and it tells a worker that records nothing from the chief.
    placement, setup = resolve_setup(params.base, section, spec, params.augment)
    fit_data = make_fit_data(data, params.base, section.batch_size, placement, one_batch_shape=setup.jit_compile,
                             augment=params.augment)
    log.info("%s: %d training images, %d classes, batch size %d, %d iterations per epoch, %s, XLA %s, %s on %d "
             "replica(s)", spec.stage, fit_data.train_size, fit_data.num_classes, fit_data.batch_size,
             fit_data.iterations_per_epoch, setup.precision, "on" if setup.jit_compile else "off", setup.distribution,
             setup.replicas)
    warn_of_slow_widths(spec, section, setup.precision)
    trained_section = dataclasses.replace(section, jit_compile=setup.jit_compile)
    if placement.num_workers > 1:
        check_same_inputs(placement, params, spec, Path(args.split))
    if placement.worker_index > 0:
        train_as_worker(fit_function, fit_data, trained_section, params.augment, placement, spec.stage)
        return
    experiment_id = tracking.connect(params.base.experiment_name)
    tags = {**tracking.lineage_tags(spec.stage, Path(args.ingest) / MANIFEST_FILE),
            **tracking.dvc_input_hashes([args.ingest, args.split])}
    parent_id = parent_run.join_or_start(experiment_id, parent_run.execution_key(Path(args.split)), spec.stage)
    with stage_runs.stage_run(spec.stage, experiment_id, tags, parent_run_id=parent_id) as run:
        tracking.log_params_flat(run_params(params.base, params.augment, params.split, section, spec, fit_data,
                                            data.class_names, setup))
        tracking.log_dataset_inputs(tracking.dataset_inputs(data, source_setting(Path(args.ingest)),
                                                            tags.get("data.manifest_sha256", ""),
                                                            params.split.ratios))
        tracking.log_seen_images(data)
        history = History()
        trained = _train(fit_function, fit_data, trained_section, params.augment, history, [MlflowEpochLogger()],
                         placement)
        model = for_inference(trained)
        if params.augment.flip_average:
            model = with_flip_averaging(model)
        scaling = (calibrate(model, data, params.base, section.batch_size, params.augment.flip_average)
                   if section.temperature_scaling else {"temperature": 1.0})
        mlflow.log_metrics(scaling)
        summary = _write_training_outputs(args, model, history, fit_data, data.class_names, setup, spec.stage,
                                          scaling, section.start_from_epoch)
        model_info = _log_model(model, data, params.base)
        RunRecord(run.info.run_id, model_info.model_uri, data.class_names, params.base.image_size,
                  params.base.channels, parent_id, scaling["temperature"]).write(Path(args.out))
    if placement.num_workers > 1:
        _end_with_the_workers(placement, spec.stage)
    log.info("%s: %d epochs, best validation accuracy %.4f; model saved to %s", spec.stage, summary["epochs_run"],
             summary["best_val_accuracy"] or 0.0, Path(args.out) / MODEL_FILE)


def _end_with_the_workers(placement: Placement, stage: str) -> None:
    """The chief, its record written, lets the workers go; one that already went only costs a warning."""
    try:
        training_loop.wait_for_every_worker(placement.strategy)
    except tf.errors.OpError as error:
        log.warning("%s: the model and its run are complete; a worker left before the chief had saved them (%s)",
                    stage, first_line(error))


def check_same_inputs(placement: Placement, params: Params, spec: ModelSpec, split_file: Path) -> None:
    """Every worker must train with the same settings on the same split: one all-reduce compares them
    (a worker with other params would build another model, or read another share of the images)."""
    settings = {**to_flat_dict(params.base), **to_flat_dict(params.augment, "augment"),
                **to_flat_dict(getattr(params, spec.params_section))}
    text = f"{sorted(settings.items())}\n{split_file.read_text()}"
    with naming_a_lost_worker():
        same = training_loop.same_on_every_worker(placement.strategy, text)
    if not same:
        raise PipelineError(f"the {placement.num_workers} workers do not have the same params ({spec.params_section}, "
                            "base, augment) and data/split.csv: every machine needs the same ones "
                            "(docs/multi-worker.md)")


def train_as_worker(fit_function: FitFunction, fit_data: FitData, section: FitParams, augment: AugmentParams,
                    placement: Placement, stage: str) -> None:
    """A worker other than the chief: train in step with the others, record nothing (no MLflow,
    no files); the chief's model holds the same weights."""
    log.info("%s: worker %d of %d, training with the chief, which records the run", stage,
             placement.worker_index, placement.num_workers)
    _train(fit_function, fit_data, section, augment, History(), [], placement)
    log.info("%s: worker %d finished training; waiting while the chief saves the model", stage,
             placement.worker_index)
    with naming_a_lost_worker():
        training_loop.wait_for_every_worker(placement.strategy)


def _train(fit_function: FitFunction, fit_data: FitData, section: FitParams, augment: AugmentParams,
           history: History, callbacks: Sequence[keras.callbacks.Callback], placement: Placement) -> keras.Model:
    """The trainer under the placement's strategy."""
    with placement.strategy.scope():
        if placement.num_workers == 1:
            return fit_function(fit_data, section, augment, history, callbacks)
        with naming_a_lost_worker():
            return fit_function(fit_data, section, augment, history, callbacks)


@contextlib.contextmanager
def naming_a_lost_worker() -> Iterator[None]:
    """TensorFlow's error for a collective aborted because a worker went away, as one line naming it."""
    try:
        yield
    except tf.errors.OpError as error:
        failure = training_loop.peer_failure(error, tf_config())
        if failure is None:
            raise
        sys.unraisablehook = _quiet_about_aborted_pools(sys.unraisablehook)
        raise failure from None


def _quiet_about_aborted_pools(previous: Callable) -> Callable:
    """After a worker is lost, TensorFlow's all-reduce leaves a thread pool that fails to close when
    the process exits ("Exception ignored in Pool.__del__ ... Bad file descriptor"): a traceback after
    the one line that says what happened, and nothing a user can act on. Only that one is dropped."""
    import multiprocessing.pool

    def hook(unraisable) -> None:
        if isinstance(unraisable.object, multiprocessing.pool.Pool) or getattr(
                unraisable.object, "__qualname__", "") == "Pool.__del__":
            return
        previous(unraisable)
    return hook


def calibrate(model: keras.Model, data: SplitImages, base: BaseParams, batch_size: int,
              flip_averaged: bool = False) -> dict[str, float]:
    """Fit the temperature on the validation split and build it into ``model``'s output layer.

    For a flip-averaged model the temperature is fitted to the mean of both views' answers, which
    is what the saved model serves. Returns the temperature and the validation log loss before and
    after it.
    """
    images = load_images(data.paths("validation"), base.image_size, base.channels)
    views = [images, images[:, :, ::-1]] if flip_averaged else [images]
    logits = [calibration.output_logits(model, view, batch_size) for view in views]
    labels = np.asarray(data.label_indices("validation"))
    temperature = calibration.fit_temperature(logits, labels)
    if temperature is None:
        log.warning("temperature scaling: no temperature fits the %d validation images (their log loss only "
                    "falls as T nears a bound of %g-%g: all or nearly all answered right), so the model keeps "
                    "T = 1; more validation images would let it be fitted", len(labels), *calibration.TEMPERATURE_RANGE)
        temperature = 1.0
    before = calibration.negative_log_likelihood(logits, labels)
    after = calibration.negative_log_likelihood([view / temperature for view in logits], labels)
    calibration.apply_temperature(model, temperature)
    log.info("temperature scaling: T = %.3f fitted on %d validation images (their log loss %.4f -> %.4f)",
             temperature, len(labels), before, after)
    return {"temperature": temperature, "val_loss_before_temperature": before, "val_loss_after_temperature": after}


def warn_of_slow_widths(spec: ModelSpec, section: FitParams, precision: str) -> None:
    """One warning, before training, for block widths that leave the CPU's fast bfloat16 path
    (:func:`pipeline.devices.slow_bfloat16_widths`)."""
    slow = slow_bfloat16_widths(getattr(section, "blocks", ()), precision)
    if slow:
        log.warning("%s.blocks: %s filters are not a multiple of %d: in %s on this CPU a training step can "
                    "take up to three times as long as with the next multiple of %d (oneDNN works on channels in "
                    "groups of %d; docs/performance.md, row 14 filters)", spec.params_section,
                    ", ".join(map(str, slow)), BFLOAT16_CHANNEL_GROUP, precision, BFLOAT16_CHANNEL_GROUP,
                    BFLOAT16_CHANNEL_GROUP)


def resolve_setup(base: BaseParams, section: FitParams, spec: ModelSpec,
                  augment: AugmentParams | None = None) -> tuple[Placement, RunSetup]:
    """Choose the devices, the dtype policy (and set it) and XLA, and record what was chosen.
    Several workers train without XLA (the multi-worker loop's step is not compiled with it), and so
    does a model that Keras compiles without it (``augment``'s layers, op determinism): the record
    says what is in effect, not what was asked."""
    placement = choose_placement(base.distribution)
    precision = resolve_precision(section.precision, spec.name)
    keras.mixed_precision.set_global_policy(precision)
    jit_compile = resolve_jit_compile(section.jit_compile, spec.name)
    if placement.num_workers > 1 and jit_compile:
        if section.jit_compile is True:
            raise PipelineError(f"{spec.params_section}.jit_compile: true does not apply with several workers "
                                "(their training loop runs without XLA); set it to auto or false")
        jit_compile = False
    if jit_compile:
        # Keras's own rule (keras.src.trainers.trainer.model_supports_jit): every layer must support
        # XLA, and TensorFlow's op determinism turns it off. It would switch XLA off with a warning.
        unsupported = [layer.name for layer in augmentation_layers(augment) if not layer.supports_jit]
        if unsupported or base.deterministic:
            why = f"the layers {', '.join(unsupported)}" if unsupported else "base.deterministic: true"
            log.info("%s: XLA off: Keras compiles without it with %s", spec.stage, why)
            jit_compile = False
    setup = RunSetup(precision, jit_compile, placement.name, placement.replicas,
                     section.batch_size * placement.replicas, machine_summary())
    return placement, setup


def run_params(base: BaseParams, augment: AugmentParams, split: SplitParams, section: FitParams, spec: ModelSpec,
               fit_data: FitData, class_names: list[str], setup: RunSetup) -> dict[str, Any]:
    """A training run's params, named alike in every model's run so that MLflow's compare view lines
    them up: the model, the hyperparameters under their own names (``epochs``, ``learning_rate``; a
    model's own ones such as ``blocks`` or ``weights`` only in its run), the base settings without a
    prefix, ``split.ratios``, ``augment.*``, and what the data and the machine made of them."""
    settings = {key: value for key, value in to_flat_dict(base).items() if key != "experiment_name"}
    return {"model": spec.name, **settings, "split.ratios": list(split.ratios), **to_flat_dict(augment, "augment"),
            **to_flat_dict(section), "train_size": fit_data.train_size,
            "iterations_per_epoch": fit_data.iterations_per_epoch, "classes": ",".join(class_names),
            **setup.as_params()}


def _write_training_outputs(args: argparse.Namespace, model: keras.Model, history: History, fit_data: FitData,
                            class_names: list[str], setup: RunSetup, stage: str, scaling: dict[str, float],
                            start_from_epoch: int = 0) -> dict:
    """The model, the curves (CSV and MLflow figure) and the summary DVC shows as metrics."""
    save_model(model, Path(args.out) / MODEL_FILE)
    frame = history.frame()
    write_frame_csv(Path(args.history), frame)
    summary = {**_summary(frame, fit_data, class_names, start_from_epoch), "precision": setup.precision,
               "jit_compile": setup.jit_compile, **scaling,
               "distribution": setup.distribution, "replicas": setup.replicas, "machine": setup.machine}
    write_json(Path(args.metrics), summary)
    curves = figures.training_curves(frame, title=stage)
    figures.save_png(curves, Path(args.curves))
    tracking.log_saved_file(Path(args.curves), "plots/training_curves.png")
    return summary


def trainer_entry(stage: str, fit_function: FitFunction, description: str) -> None:
    """``python -m pipeline.<trainer>``: parse the paths dvc.yaml passes and run the stage."""
    spec = model_spec(stage)
    parser = cli.stage_parser(stage, description)
    parser.add_argument("--ingest", default="data/ingest", help="ingest output folder")
    parser.add_argument("--split", default="data/split.csv", help="split manifest")
    parser.add_argument("--out", default=f"models/{spec.folder}", help="folder for the model and its run record")
    parser.add_argument("--metrics", default=f"metrics/{stage}.json", help="training summary (JSON)")
    parser.add_argument("--history", default=f"metrics/{stage}_history.csv", help="per-epoch curves (CSV)")
    parser.add_argument("--curves", default=f"metrics/plots/{stage}_curves.png", help="per-epoch curves (PNG)")
    cli.main_entry(stage, lambda args: run_training_stage(args, spec, fit_function), parser)


def _summary(frame: pd.DataFrame, fit_data: FitData, class_names: list[str], start_from_epoch: int = 0) -> dict:
    """The run's figures; its "best" epoch is the one whose weights were kept: early stopping keeps the
    lowest validation loss of the last fit phase, from that phase's ``start_from_epoch`` on."""
    last_phase = frame[frame["phase"] == frame["phase"].iloc[-1]] if len(frame) else frame
    watched = last_phase.iloc[start_from_epoch:]
    best = watched.loc[watched["val_loss"].idxmin()] if watched["val_loss"].notna().any() else None
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


def _log_model(model: keras.Model, data: SplitImages, base: BaseParams):
    """Log the Keras model with a signature inferred from a few real validation images."""
    from mlflow.models import infer_signature

    sample = load_images(data.paths("validation")[:4], base.image_size, base.channels).astype(np.float32)
    signature = infer_signature(sample, model.predict(sample, verbose=0))
    return mlflow.keras.log_model(model, name="model", signature=signature,
                                  pip_requirements=tracking.pinned_requirements(TRAINING_MODEL_PACKAGES))


def _epochs(keras_history: keras.callbacks.History | training_loop.LoopResult) -> list[dict]:
    values = keras_history.history
    count = len(values.get("loss", []))
    return [{column: float(values[column][i]) if column in values else None
             for column in ("loss", "accuracy", "val_loss", "val_accuracy")} for i in range(count)]
