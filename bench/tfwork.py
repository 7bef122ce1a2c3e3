"""What the TensorFlow workers share (imported in worker processes only): the models from the
pipeline's own builders, and a callback that times every epoch."""

from __future__ import annotations

import inspect
import time

import keras

from pipeline.models import build_custom_cnn, build_resnet50, compile_model


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch, from ``on_epoch_begin`` to ``on_epoch_end``."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def set_policy(spec: dict) -> str:
    """Set the global dtype policy before any layer is built: ``spec["policy"]`` when given, else
    the stage's own choice for ``spec["precision"]`` (``pipeline.devices.resolve_precision``)."""
    policy = spec.get("policy")
    if policy is None:
        precision = spec.get("precision", "float32")
        try:
            from pipeline.devices import resolve_precision
        except ImportError:           # a pipeline without precision settings trains in float32
            policy = "float32" if precision == "auto" else precision
        else:
            policy = resolve_precision(precision, spec["model"])
    keras.mixed_precision.set_global_policy(policy)
    return policy


def build_model(spec: dict, num_classes: int) -> keras.Model:
    """The stage's model with the spec's sizes, compiled as the stage compiles it (with XLA when
    ``spec["jit"]`` is true, or is ``"auto"`` and the stage's auto picks it). Call :func:`set_policy` first."""
    shape = (spec["image_size"], spec["image_size"], spec["channels"])
    if spec["model"] == "custom":
        model = build_custom_cnn(shape, num_classes, spec["blocks"], spec["dense_units"], spec["dropout"])
    else:
        model, _ = build_resnet50(shape, num_classes, None, spec["dense_units"], spec["dropout"])
    jit = spec.get("jit", False)
    if jit == "auto":
        from pipeline.devices import resolve_jit_compile
        jit = resolve_jit_compile("auto", spec["model"])
    if "jit_compile" in inspect.signature(compile_model).parameters:
        compile_model(model, spec["optimizer"], spec["learning_rate"], spec["loss"], num_classes, jit_compile=jit)
    else:
        compile_model(model, spec["optimizer"], spec["learning_rate"], spec["loss"], num_classes)
        if jit:   # an older compile_model without the argument: compile again, same optimizer and loss
            model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"], jit_compile=True)
    return model


def dtype_counts(model: keras.Model) -> dict[str, int]:
    """How many layers with weights (nested ones included) compute in each dtype."""
    counts: dict[str, int] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.weights:
            counts[layer.compute_dtype] = counts.get(layer.compute_dtype, 0) + 1
    return counts


def steady(seconds: list[float], images: int) -> list[float]:
    """Images per second of every epoch after the first (the warm-up epoch)."""
    return [images / s for s in seconds[1:]]
