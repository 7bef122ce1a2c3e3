"""The training loop for several machines: a custom step under ``MultiWorkerMirroredStrategy``.

Keras 3's ``model.fit`` fails on two or more workers (keras-team/keras#20585): it builds the model
from a batch averaged with ``strategy.reduce`` and averages each step's metrics the same way, which
the multi-worker strategy refuses. This loop follows TensorFlow's tutorial ``multi_worker_with_ctl``
instead: ``strategy.run`` of a step that computes the loss averaged over the global batch
(``tf.nn.compute_average_loss``) and calls the compiled optimizer's ``apply_gradients``, which
all-reduces the gradients across replicas and workers.

Everything it trains with comes from the compiled model (optimizer with its learning-rate schedule,
weight decay and EMA; loss with its label smoothing; the loss scale of mixed float16), so what
:func:`pipeline.models.compile_model` sets is honoured here as in ``fit``. What ``fit``'s callbacks
do is done here with the same rules: early stopping on the (global) validation loss with the best
weights restored, ``lr_schedule: plateau`` halving the rate when the validation loss stalls, and
with EMA the averaged weights validated, judged and kept (``SwapEMAWeights(swap_on_epoch=True)``).
Every worker takes the same decisions because every figure it decides on is all-reduced first.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.training_loop")

# The figures each step and each validation pass add up on every replica, then across all of them.
_SUMS = ("loss", "correct", "count")
# ReduceLROnPlateau as pipeline.training.fit sets it up for one process: factor 0.5, min_delta its default.
_PLATEAU_MIN_DELTA = 1e-4
_PLATEAU_FACTOR = 0.5


@dataclass
class EarlyStop:
    """Keras's EarlyStopping rules (patience, restore the best weights at the end, nothing watched
    before ``start_from_epoch``): an epoch improves when its validation loss is lower than the best so far."""

    patience: int
    start_from_epoch: int = 0
    best: float = math.inf
    best_epoch: int = 0
    stopped_epoch: int = 0
    wait: int = 0
    best_weights: list[np.ndarray] | None = None

    def update(self, epoch: int, val_loss: float, weights: Callable[[], list[np.ndarray]]) -> bool:
        """Record ``epoch``'s validation loss; True when training should stop. ``weights`` is called
        for the model's weights only when they are worth keeping."""
        if epoch < self.start_from_epoch:
            return False
        if self.best_weights is None:
            self.best_weights, self.best_epoch = weights(), epoch
        self.wait += 1
        if val_loss < self.best:
            self.best, self.best_epoch, self.best_weights, self.wait = val_loss, epoch, weights(), 0
            return False
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return True
        return False


@dataclass
class Plateau:
    """Keras's ReduceLROnPlateau as the single-process path uses it: the rate times 0.5 after
    ``patience`` epochs whose validation loss is not 1e-4 below the best."""

    patience: int
    best: float = math.inf
    wait: int = 0

    def update(self, val_loss: float, rate: float) -> float | None:
        """The new learning rate when it should change, else None."""
        if val_loss < self.best - _PLATEAU_MIN_DELTA:
            self.best, self.wait = val_loss, 0
            return None
        self.wait += 1
        if self.wait >= self.patience and rate > 0:
            self.wait = 0
            return rate * _PLATEAU_FACTOR
        return None


@dataclass
class LoopResult:
    """Per-epoch figures as ``keras.callbacks.History.history`` holds them, and where training stopped."""

    history: dict[str, list[float]] = field(default_factory=dict)
    stopped_epoch: int = 0
    best_epoch: int = 0

    def add(self, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)


def train_loop(model: keras.Model, train: tf.data.Dataset, validation: tf.data.Dataset, *, epochs: int,
               steps_per_epoch: int, global_batch_size: int, patience: int, start_from_epoch: int = 0,
               plateau: bool = False,
               class_weights: dict[int, float] | None = None, num_classes: int,
               callbacks: Sequence[keras.callbacks.Callback] = ()) -> LoopResult:
    """Train a compiled ``model`` under the current ``tf.distribute`` strategy for ``epochs`` epochs
    of ``steps_per_epoch`` steps each, with early stopping on the validation loss (best weights
    restored) and, with ``plateau``, a halved rate when it stalls.

    ``train`` is this worker's share, batched per replica (``distribute_datasets_from_function``
    hands each local replica one batch a step); every worker must be able to take
    ``steps_per_epoch`` batches from it. ``validation`` is this worker's share, read locally and
    summed across workers once per epoch. ``callbacks`` get ``on_epoch_end(epoch, logs)`` with
    ``loss, accuracy, val_loss, val_accuracy``: the global figures, the same on every worker.
    """
    strategy = tf.distribute.get_strategy()
    optimizer, loss_object = model.optimizer, model.loss
    # An optimizer that keeps a moving average of the weights (``use_ema``; inside the loss scaling
    # of mixed_float16): fit's SwapEMAWeights validates, judges and keeps the averaged weights.
    ema = bool(getattr(getattr(optimizer, "inner_optimizer", optimizer), "use_ema", False))
    weights_table = _class_weight_table(class_weights, num_classes)
    distributed = strategy.distribute_datasets_from_function(lambda _context: train)

    def replica_step(images: tf.Tensor, targets: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.GradientTape() as tape:
            predictions = model(images, training=True)
            per_example = _per_example_loss(loss_object, targets, predictions)
            if weights_table is not None:
                per_example = per_example * _weights_of(weights_table, targets, num_classes)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        # Keras 3's apply_gradients sums the gradients over every replica of every worker.
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return _batch_sums(per_example, targets, predictions, num_classes)

    @tf.function
    def train_epoch(iterator, steps: tf.Tensor) -> dict[str, tf.Tensor]:
        # All of an epoch's steps in one graph: no Python between steps (fit's steps_per_execution).
        totals = {name: tf.constant(0.0) for name in _SUMS}
        for _ in tf.range(steps):
            sums = strategy.run(replica_step, args=next(iterator))
            totals = {name: totals[name] + _local_total(strategy, sums[name]) for name in _SUMS}
        return totals

    @tf.function
    def validation_sums() -> dict[str, tf.Tensor]:
        totals = {name: tf.constant(0.0) for name in _SUMS}
        for images, targets in validation:
            predictions = model(images, training=False)
            per_example = _per_example_loss(loss_object, targets, predictions)
            if weights_table is not None:   # the validation loss weighs the classes as training does
                per_example = per_example * _weights_of(weights_table, targets, num_classes)
            sums = _batch_sums(per_example, targets, predictions, num_classes)
            totals = {name: totals[name] + sums[name] for name in _SUMS}
        return totals

    stopper = EarlyStop(patience, start_from_epoch)
    reducer = Plateau(max(1, patience // 2)) if plateau else None
    result = LoopResult()
    for epoch in range(epochs):
        train_totals = all_reduce_sums(strategy, train_epoch(iter(distributed), tf.constant(steps_per_epoch)))
        training_weights = model.get_weights() if ema else None
        if ema:
            optimizer.finalize_variable_values(model.trainable_variables)   # the averages, in place
        val_totals = all_reduce_sums(strategy, validation_sums())
        logs = {**_figures(train_totals, ""), **_figures(val_totals, "val_")}
        result.add(logs)
        log.info("epoch %d/%d: %s", epoch + 1, epochs,
                 " ".join(f"{key} {value:.4f}" for key, value in logs.items()))
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        stop = stopper.update(epoch, logs["val_loss"], model.get_weights)
        if training_weights is not None:
            model.set_weights(training_weights)   # training goes on from its own weights
        if stop:
            break
        if reducer is not None:
            rate = reducer.update(logs["val_loss"], float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
            if rate is not None:
                optimizer.learning_rate = rate
                log.info("epoch %d: validation loss stalled, learning rate halved to %g", epoch + 1, rate)
    # What model.fit does after its last epoch, in its order: the optimizer's final values (the
    # moving average of the weights when use_ema is set), then EarlyStopping's best weights (with
    # EMA, the averaged weights of the best epoch).
    if epochs > 0 and isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer.finalize_variable_values(model.trainable_variables)
    if stopper.best_weights is not None:
        model.set_weights(stopper.best_weights)
    result.stopped_epoch, result.best_epoch = stopper.stopped_epoch, stopper.best_epoch
    log.info("final weights sha256 %s (the same on every worker)", weights_digest(model.get_weights()))
    return result


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 of the weights' bytes: how the workers' logs show that they ended alike."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def all_reduce_sums(strategy: tf.distribute.Strategy, local: dict[str, tf.Tensor]) -> dict[str, float]:
    """Each worker's figures summed over all workers (one all-reduce), as Python floats."""
    reduced = _sum_over_workers(strategy, [local[name] for name in _SUMS], tf.float32)
    return dict(zip(_SUMS, reduced))


def wait_for_every_worker(strategy: tf.distribute.Strategy) -> None:
    """Return when every worker has called this (one all-reduce). The workers end together: one
    that leaves while the chief still saves makes the chief's TensorFlow report it as failed."""
    _sum_over_workers(strategy, [1.0], tf.float32)


def same_on_every_worker(strategy: tf.distribute.Strategy, text: str) -> bool:
    """Whether every worker passed the same ``text`` (one all-reduce of a 20-bit digest and its
    square: n * sum(d^2) == sum(d)^2 only when all are equal). Every worker gets the same answer."""
    digest = int(hashlib.sha256(text.encode()).hexdigest(), 16) % (1 << 20)
    total, squares = _sum_over_workers(strategy, [digest, digest * digest], tf.float64)
    workers = 1 if strategy.num_replicas_in_sync == 1 else \
        strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)
    return workers * squares == total * total


def _sum_over_workers(strategy: tf.distribute.Strategy, values: Sequence, dtype: tf.DType) -> list[float]:
    """This worker's ``values`` summed over all workers (each worker's local replicas count once)."""
    if strategy.num_replicas_in_sync == 1:
        return [float(value) for value in values]
    local_replicas = len(strategy.extended.worker_devices)
    stacked = tf.stack([tf.cast(value, dtype) for value in values]) / local_replicas
    per_replica = strategy.experimental_distribute_values_from_function(lambda _context: stacked)
    return [float(value) for value in strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()]


def peer_failure(error: BaseException, cluster: dict) -> PipelineError | None:
    """One line naming the worker that stopped answering, when ``error`` is TensorFlow saying a
    collective was aborted because a peer went away; None for any other error. ``cluster`` is
    ``TF_CONFIG``: it gives the worker's address, and which task is this one (never the one named)."""
    if not isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                              tf.errors.CancelledError, tf.errors.InternalError, tf.errors.AbortedError)):
        return None
    text = str(error)
    own = (cluster.get("task", {}).get("type", "worker"), int(cluster.get("task", {}).get("index", 0)))
    peers = [(job, int(index)) for job, index in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", text)
             if (job, int(index)) != own]
    reason = _reason(text)
    if not peers and reason is None:
        return None
    who = "a worker"
    if peers:
        job, index = peers[0]
        addresses = cluster.get("cluster", {}).get(job, [])
        who = f"{job} {index}" + (f" ({addresses[index]})" if index < len(addresses) else "")
    return PipelineError(f"multi-worker training stopped: {who} stopped answering "
                         f"({reason or 'a collective operation was aborted'}); every worker must be restarted together")


# What TensorFlow and gRPC say when a peer is gone, and how the one line says it.
_PEER_GONE = (("stopped sending heartbeats", "no heartbeat from it"), ("Connection reset", "connection reset"),
              ("Connection refused", "connection refused"), ("Socket closed", "connection closed"),
              ("failed to connect", "connection refused"), ("Deadline Exceeded", "no answer in time"))


def _reason(text: str) -> str | None:
    """What TensorFlow's abort says, in a few words; None when it does not speak of a lost peer."""
    for hint, reason in _PEER_GONE:
        if hint.lower() in text.lower():
            return reason
    return None


def _per_example_loss(loss_object: keras.losses.Loss, targets: tf.Tensor, predictions: tf.Tensor) -> tf.Tensor:
    """The compiled loss (label smoothing included) for each example, before any reduction."""
    predictions = tf.cast(predictions, tf.float32)
    return loss_object.call(tf.cast(targets, predictions.dtype), predictions)


def _class_indices(targets: tf.Tensor, num_classes: int) -> tf.Tensor:
    """The class of each target: the one-hot column, or the rounded 0/1 of a two-class head (as
    Keras turns ``class_weight`` into sample weights)."""
    if num_classes == 2:
        return tf.cast(tf.round(tf.reshape(targets, [-1])), tf.int32)
    return tf.cast(tf.argmax(targets, axis=-1), tf.int32)


def _class_weight_table(class_weights: dict[int, float] | None, num_classes: int) -> tf.Tensor | None:
    if not class_weights:
        return None
    return tf.constant([class_weights.get(index, 1.0) for index in range(num_classes)], tf.float32)


def _weights_of(table: tf.Tensor, targets: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Each example's class weight, looked up by its target's class."""
    return tf.gather(table, _class_indices(targets, num_classes))


def with_class_weights(dataset: tf.data.Dataset, class_weights: dict[int, float] | None,
                       num_classes: int) -> tf.data.Dataset:
    """``(images, targets)`` batches as ``(images, targets, weights)``, each example weighted by its
    class: what ``model.fit`` needs to weigh the validation loss as ``class_weight`` weighs training's
    (its ``class_weight`` applies to training only). Unchanged without class weights."""
    table = _class_weight_table(class_weights, num_classes)
    if table is None:
        return dataset
    return dataset.map(lambda images, targets: (images, targets, _weights_of(table, targets, num_classes)))


def _batch_sums(per_example: tf.Tensor, targets: tf.Tensor, predictions: tf.Tensor,
                num_classes: int) -> dict[str, tf.Tensor]:
    """Summed loss, correct predictions and examples of one batch (Keras's ``accuracy`` rules)."""
    if num_classes == 2:
        predicted = tf.cast(tf.reshape(predictions, [-1]) > 0.5, tf.int32)
    else:
        predicted = tf.cast(tf.argmax(predictions, axis=-1), tf.int32)
    correct = tf.cast(tf.equal(predicted, _class_indices(targets, num_classes)), tf.float32)
    return {"loss": tf.reduce_sum(tf.cast(per_example, tf.float32)), "correct": tf.reduce_sum(correct),
            "count": tf.cast(tf.size(correct), tf.float32)}


def _local_total(strategy: tf.distribute.Strategy, value) -> tf.Tensor:
    """The sum over this worker's replicas of a per-replica value."""
    return tf.add_n(list(strategy.experimental_local_results(value)))


def _figures(totals: dict[str, float], prefix: str) -> dict[str, float]:
    count = totals["count"] or math.nan
    return {f"{prefix}loss": totals["loss"] / count, f"{prefix}accuracy": totals["correct"] / count}
