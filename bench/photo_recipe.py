"""Row 7, recipe: time to accuracy on real photos, the pipeline's custom CNN against the keras-io recipe.

On the same photo folder, the same fold (the first of ``pipeline.crossval``'s five: its test part,
its early-stopping part, its training part, copies grouped as the ingest stage groups them) and
the same decoded pixels, each in its own process:

(a) the pipeline: params.yaml with ``presets/photos.yaml`` applied, trained by the stage's own code
    (``make_fit_data`` + ``train_custom``: the cached input pipeline, the builder, the fit loop with
    early stopping, the precision ``auto`` picks), without MLflow;
(b) the keras-io example "Image classification from scratch" (an Xception-like network with
    flip + rotation augmentation, Adam 3e-4, binary cross-entropy on logits) written in bare Keras
    here, fed from in-memory arrays, at the same image size, for a fixed number of epochs.

After every epoch each scores the fold's test part, so the row has accuracy against training wall
time (the scoring itself is not counted): the curve, the final test accuracy of each (with its
Wilson 95 % interval, pipeline.statistics), the training time of each and their ratio, and how long
each took to first reach the accuracy the other ends at. The pipeline's recipe is also trained for a
few epochs held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``: a CPU without AVX-512, emulated, where the
``auto`` precision is float32): its steady epoch against the one measured here gives the training
time on such a CPU. Target: the pipeline at least as accurate
as the recipe in no more time. Skipped when no photo folder is given (``--photos DIR`` or
``BENCH_PHOTOS``).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import REPO_ROOT, Line, RowResult, run_worker, worker_main
from bench.photos import photo_folder

PHOTO_PRESET = "photos"   # presets/photos.yaml, applied to params.yaml
# images per class (None: all), keras-io epochs, pipeline epochs (None: as the photo preset says)
SETTINGS = {
    "full": (None, 25, None),     # keras-io trains its example for 25 epochs
    "quick": (150, 3, 3),
}
HELD_TO_AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}   # a CPU without AVX-512, emulated: oneDNN and `auto` precision see AVX2
AVX2_EPOCHS = 4                                  # enough for three steady epochs after the first (which traces)


def run(mode: str) -> RowResult:
    photos = photo_folder()
    row = RowResult("recipe", "time to accuracy on photos: pipeline custom CNN vs keras-io recipe")
    if mode == "tiny" or photos is None or not photos.is_dir():
        row.status = "skipped"
        row.notes.append("skipped: --tiny (training on photos takes minutes)" if mode == "tiny" else
                         "skipped: no photo folder (python -m bench --photos DIR, or BENCH_PHOTOS=DIR)")
        return row
    per_class, keras_io_epochs, pipeline_epochs = SETTINGS[mode]
    spec = {"folder": str(photos.resolve()), "per_class": per_class, "preset": PHOTO_PRESET}
    ours = run_worker("bench.photo_recipe", {**spec, "recipe": "pipeline", "epochs": pipeline_epochs,
                                             "label": "pipeline"}, timeout=3600)
    theirs = run_worker("bench.photo_recipe", {**spec, "recipe": "keras_io", "epochs": keras_io_epochs,
                                               "label": "keras-io"}, timeout=3600)
    judged = mode == "full"
    for name, result, other in (("pipeline custom CNN (presets/photos.yaml)", ours, theirs),
                                ("keras-io recipe", theirs, ours)):
        low, high = result["test_accuracy_ci95"]
        reached = time_to_reach(result["curve"], other["test_accuracy"])
        when = (f"the other's final accuracy reached at {reached:.0f} s" if reached is not None
                else "the other's final accuracy never reached")
        row.lines.append(Line(name, f"acc {result['test_accuracy']:.3f} [{low:.3f}-{high:.3f}], "
                                    f"{result['fit_s']:.0f} s; {when}",
                              "-", None, "-", None, result))
    held = run_worker("bench.photo_recipe", {**spec, "recipe": "pipeline", "epochs": AVX2_EPOCHS,
                                             "label": "pipeline, AVX2"}, timeout=3600, env=HELD_TO_AVX2)
    avx2_ratio = steady_epoch_s(held["curve"]) / steady_epoch_s(ours["curve"])
    row.lines.append(Line("pipeline held to AVX2: steady epoch / as here",
                          f"{steady_epoch_s(held['curve']):.1f} s / {steady_epoch_s(ours['curve']):.1f} s "
                          f"({held['policy']}); training as here x ratio: {ours['fit_s'] * avx2_ratio:.0f} s",
                          "-", _single(avx2_ratio), "-", None, held))
    accuracy_gap = ours["test_accuracy"] - theirs["test_accuracy"]
    time_ratio = ours["fit_s"] / theirs["fit_s"]
    row.lines.append(Line("accuracy: pipeline - recipe", f"{accuracy_gap * 100:+.1f} points", "-", None, ">= 0",
                          accuracy_gap >= 0 if judged else None))
    row.lines.append(Line("training time: pipeline / recipe", f"{ours['fit_s']:.0f} s / {theirs['fit_s']:.0f} s",
                          "-", _single(time_ratio), "<= 1", time_ratio <= 1 if judged else None))
    row.notes.append(f"photos: {photos} ({ours['train_images']} train / {ours['test_images']} test images, "
                     f"{ours['image_size']} px); keras-io {theirs['epochs_run']} epochs, pipeline "
                     f"{ours['epochs_run']} epochs (early stopping as configured); the same split and pixels; "
                     "each model in its own process; precision as the pipeline's auto picks for the custom "
                     "CNN, float32 for keras-io (its example sets no policy)")
    return row


def preset_train_custom():
    """The photo preset's ``train_custom`` section, as presets/photos.yaml says it today."""
    from pipeline.crossval import recipe_params

    return recipe_params(REPO_ROOT / "params.yaml", [PHOTO_PRESET], [])[0].train_custom


def preset_cnn(shape: tuple[int, int, int], blocks: list[int] | None = None):
    """The photo preset's custom CNN for two classes (its blocks, or ``blocks`` instead; its dense layers,
    normalization and pooling), without dropout, uncompiled."""
    from pipeline.models import build_custom_cnn

    recipe = preset_train_custom()
    return build_custom_cnn(shape, 2, blocks=list(recipe.blocks if blocks is None else blocks),
                            dense_units=recipe.dense_units, dropout=0.0, batch_norm=recipe.batch_norm,
                            pooling=recipe.pooling)


def steady_epoch_s(curve: list[list[float]]) -> float:
    """The median seconds of an epoch after the first (which also traces and compiles the step)."""
    import statistics

    ends = [seconds for seconds, _ in curve]
    return statistics.median(later - earlier for earlier, later in zip(ends[1:], ends[2:]))


def time_to_reach(curve: list[list[float]], accuracy: float) -> float | None:
    """The training seconds after which a curve of ``[seconds, test accuracy]`` first reached ``accuracy``."""
    return next((seconds for seconds, reached in curve if reached >= accuracy), None)


def _single(value: float) -> dict:
    return {"median": value, "min": value, "max": value, "n": 1, "values": [value]}


def worker(spec: dict) -> dict:
    """One recipe in a fresh process: the first fold, decode, train (scoring the test part after every
    epoch), score the test part."""
    import time

    import numpy as np

    from pipeline import statistics
    from pipeline.crossval import assign_folds, fold_split, ingested, recipe_params
    from pipeline.dataset import load_images
    from pipeline.manifest import SplitImages
    from pipeline.seeding import seed_everything

    params, _ = recipe_params(REPO_ROOT / "params.yaml", [spec["preset"]],
                              [f"ingest.max_per_class={json.dumps(spec['per_class'])}"])
    base = params.base
    root = Path(spec["folder"])
    manifest = ingested(params, root)
    data = SplitImages(root, fold_split(manifest, assign_folds(manifest, FOLDS, base.seed), 0, FOLDS))
    seed_everything(base.seed, tensorflow=True)
    test = load_images(data.paths("test"), base.image_size, base.channels).astype(np.float32)
    actual = np.asarray(data.label_indices("test"))
    started = time.perf_counter()
    curve = test_curve(test, actual, spec["recipe"] == "keras_io", started)
    if spec["recipe"] == "pipeline":
        model, epochs_run = _train_pipeline(data, params, spec["epochs"], curve)
    else:
        model, epochs_run = _train_keras_io(data, base.image_size, base.channels, base.seed, spec["epochs"], curve)
    fit_s = time.perf_counter() - started - curve.scoring_s
    predicted = curve.predicted(model)
    interval = statistics.interval("accuracy", actual, predicted, confidence=0.95, seed=base.seed)   # Wilson
    return {"recipe": spec["recipe"], "test_accuracy": statistics.score("accuracy", actual, predicted),
            "test_accuracy_ci95": [float(interval.low), float(interval.high)], "fit_s": fit_s,
            "curve": curve.points, "epochs_run": epochs_run, "train_images": len(data.paths("train")),
            "test_images": len(test), "image_size": base.image_size, "policy": model.dtype_policy.name}


FOLDS = 5   # as pipeline.crossval's default; the row trains on the first fold


def test_curve(images, labels, logits: bool, started: float):
    """A Keras callback: after every epoch, the test part's accuracy against the seconds since
    ``started`` (a ``time.perf_counter()``), the time spent scoring kept apart (``scoring_s``) and
    left out; ``predicted(model)`` gives a model's answers on the test part."""
    import time

    import keras
    import numpy as np

    from pipeline.dataset import decode_predictions

    class TestCurve(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.points: list[list[float]] = []
            self.scoring_s = 0.0

        def predicted(self, model: keras.Model) -> np.ndarray:
            outputs = model.predict(images, batch_size=128, verbose=0)
            return decode_predictions(1.0 / (1.0 + np.exp(-outputs)) if logits else outputs)[0]

        def on_epoch_end(self, epoch, logs=None) -> None:
            now = time.perf_counter()
            accuracy = float(np.mean(self.predicted(self.model) == labels))
            self.points.append([now - started - self.scoring_s, accuracy])
            self.scoring_s += time.perf_counter() - now

    return TestCurve()


def _train_pipeline(data, params, epochs: int | None, curve):
    """The train_custom stage's own steps, without MLflow."""
    import dataclasses

    from pipeline.model_table import model_spec
    from pipeline.train_custom import train_custom
    from pipeline.training import History, make_fit_data, resolve_setup

    # A run shorter than the preset's (the quick mode, the AVX2 timing) watches from its first epoch.
    section = (params.train_custom if epochs is None
               else dataclasses.replace(params.train_custom, epochs=epochs, start_from_epoch=0))
    section.check("train_custom")
    placement, _ = resolve_setup(params.base, section, model_spec("custom"))
    fit_data = make_fit_data(data, params.base, section.batch_size, placement, augment=params.augment)
    history = History()
    model = train_custom(fit_data, section, params.augment, history, [curve])
    return model, len(history.rows)


def _train_keras_io(data, image_size: int, channels: int, seed: int, epochs: int, curve):
    """keras-io's "Image classification from scratch", as its example writes it, on our arrays."""
    import keras
    import numpy as np
    import tensorflow as tf
    from keras import layers

    from pipeline.dataset import load_images

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        images = load_images(data.paths(split), image_size, channels).astype(np.float32)
        return images, np.asarray(data.label_indices(split), dtype=np.float32).reshape(-1, 1)

    x_train, y_train = arrays("train")
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=seed).batch(32)
    validation = tf.data.Dataset.from_tensor_slices(arrays("validation")).batch(32)
    inputs = keras.Input(shape=(image_size, image_size, channels))
    x = layers.RandomRotation(0.1)(layers.RandomFlip("horizontal")(inputs))
    x = layers.Rescaling(1.0 / 255)(x)
    x = layers.Activation("relu")(layers.BatchNormalization()(layers.Conv2D(128, 3, strides=2, padding="same")(x)))
    previous = x
    for size in (256, 512, 728):
        x = layers.Activation("relu")(x)
        x = layers.BatchNormalization()(layers.SeparableConv2D(size, 3, padding="same")(x))
        x = layers.Activation("relu")(x)
        x = layers.BatchNormalization()(layers.SeparableConv2D(size, 3, padding="same")(x))
        x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
        x = layers.add([x, layers.Conv2D(size, 1, strides=2, padding="same")(previous)])
        previous = x
    x = layers.Activation("relu")(layers.BatchNormalization()(layers.SeparableConv2D(1024, 3, padding="same")(x)))
    x = layers.Dropout(0.25)(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, layers.Dense(1)(x))
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(name="acc", threshold=0.0)])
    history = model.fit(train, validation_data=validation, epochs=epochs, verbose=2, callbacks=[curve])
    return model, len(history.history["loss"])


if __name__ == "__main__":
    worker_main(worker)
