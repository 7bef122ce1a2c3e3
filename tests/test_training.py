"""The training stages run for real on tiny images: outputs, MLflow records, fast failures, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bench.project import free_port, tiny_params
from pipeline.errors import PipelineError
from pipeline.models import build_resnet50
from tests.stage_runner import prepare_split, run_stage, stage_env, train_arguments

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path: Path, image_folder: Path, raw_params: dict) -> Path:
    """A scratch project with params, a manifest and a split of the 3-class fixture images."""
    work = tmp_path / "work"
    work.mkdir()
    params = tiny_params(raw_params, str(image_folder))
    params["split"]["ratios"] = [0.6, 0.2, 0.2]
    params["train_custom"]["epochs"] = 2
    prepare_split(work, image_folder, params)
    return work


def set_params(workdir: Path, section: str, **values) -> None:
    import yaml

    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_with_ema_early_stopping_judges_keeps_and_restores_the_averaged_weights() -> None:
    """Each epoch ends with the averaged weights in the model (what validation scored); the weights kept
    are those of the epoch with the lowest validation loss."""
    import dataclasses

    import tensorflow as tf

    from pipeline.models import build_custom_cnn
    from pipeline.params import load_params
    from pipeline.training import FitData, History, compile_for_fit, fit

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (48, 12, 12, 1)).astype("float32")
    labels = rng.integers(0, 2, (48, 1)).astype("float32")     # two classes: one sigmoid output
    train = tf.data.Dataset.from_tensor_slices((images[:32], labels[:32])).batch(8)
    validation = tf.data.Dataset.from_tensor_slices((images[32:], labels[32:])).batch(8)
    data = FitData(train, validation, 32, 8, 2, (12, 12, 1))
    section = dataclasses.replace(load_params(Path(__file__).parents[1] / "params.yaml").train_custom, ema=True,
                                  epochs=4, patience=10, lr_schedule="constant", learning_rate=0.01)
    model = build_custom_cnn((12, 12, 1), 2, [4], [], 0.0)
    compile_for_fit(model, data, section, section.learning_rate, section.epochs)

    class Recorder(keras.callbacks.Callback):
        """Keeps its own moving average (Keras's rule: the first step copies, then momentum 0.99) of
        the weights after each step, and what the model holds when each epoch ends."""

        def __init__(self) -> None:
            super().__init__()
            self.average: list[np.ndarray] | None = None
            self.seen: list[tuple[float, list[np.ndarray], list[np.ndarray]]] = []

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            weights = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]
            self.average = weights if self.average is None else [
                0.99 * average + 0.01 * weight for average, weight in zip(self.average, weights)]

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            held = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]
            self.seen.append((logs["val_loss"], held, list(self.average)))

    recorder = Recorder()
    fit(model, data, section, History(), phase="train", epochs=section.epochs, callbacks=[recorder])
    for _, held, average in recorder.seen:
        for weights, expected in zip(held, average):
            np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)
    best = min(recorder.seen, key=lambda entry: entry[0])
    for kept, weights in zip(model.trainable_variables, best[1]):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(kept), weights, rtol=1e-6)


@pytest.mark.parametrize("trainer", ["fit", "loop"])
def test_balanced_class_weights_weigh_the_validation_loss_too(trainer: str) -> None:
    """With ``class_weight: balanced`` the validation loss that early stopping follows is each example's
    loss times its class's weight, averaged over the examples (as the training loss is), in fit and in
    the multi-worker loop alike; the validation accuracy stays the plain share of correct answers."""
    import dataclasses

    import tensorflow as tf

    from pipeline.models import build_custom_cnn
    from pipeline.params import load_params
    from pipeline.training import FitData, History, compile_for_fit, fit
    from pipeline.training_loop import train_loop

    rng = np.random.default_rng(1)
    labels = np.array([0] * 12 + [1] * 8 + [2] * 4)
    images = (rng.integers(0, 60, (24, 12, 12, 1)) + 60 * labels[:, None, None, None]).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[labels]
    train = tf.data.Dataset.from_tensor_slices((images, targets)).batch(8)
    validation = tf.data.Dataset.from_tensor_slices((images, targets)).batch(8)
    data = FitData(train, validation, 24, 8, 3, (12, 12, 1), train_label_counts=(12, 8, 4))
    section = dataclasses.replace(load_params(Path(__file__).parents[1] / "params.yaml").train_custom,
                                  class_weight="balanced", epochs=1, patience=5, lr_schedule="constant")
    keras.utils.set_random_seed(2)
    model = build_custom_cnn((12, 12, 1), 3, [4], [], 0.0)
    compile_for_fit(model, data, section, section.learning_rate, section.epochs)
    if trainer == "fit":
        history = History()
        fit(model, data, section, history, phase="train", epochs=1)
        val_loss, val_accuracy = history.rows[0]["val_loss"], history.rows[0]["val_accuracy"]
    else:
        result = train_loop(model, train, validation, epochs=1, steps_per_epoch=3, global_batch_size=8, patience=5,
                            class_weights=data.balanced_class_weights(), num_classes=3)
        val_loss, val_accuracy = result.history["val_loss"][0], result.history["val_accuracy"][0]
    predictions = keras.ops.convert_to_numpy(model(images, training=False))
    per_example = keras.losses.CategoricalCrossentropy(reduction=None)(targets, predictions).numpy()
    weights = np.array([24 / (3 * 12), 24 / (3 * 8), 24 / (3 * 4)])[labels]
    assert abs(np.mean(per_example * weights) - np.mean(per_example)) > 1e-3   # the weights change the figure
    assert val_loss == pytest.approx(np.mean(per_example * weights), rel=1e-4)
    assert val_accuracy == pytest.approx(np.mean(predictions.argmax(axis=1) == labels))


@pytest.mark.parametrize("trainer", ["fit", "loop"])
def test_early_stopping_watches_nothing_before_start_from_epoch(trainer: str) -> None:
    """A run whose validation loss is lowest in its first epoch (a learning rate far too high) keeps,
    with ``start_from_epoch: 2``, the weights of the best epoch from the third on, in fit and in the
    multi-worker loop alike."""
    import dataclasses

    import tensorflow as tf

    from pipeline.models import build_custom_cnn
    from pipeline.params import load_params
    from pipeline.training import FitData, History, compile_for_fit, fit
    from pipeline.training_loop import train_loop

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, (32, 1)).astype("float32")
    images = (rng.uniform(0, 120, (32, 12, 12, 1)) + 120 * labels[:, :, None, None]).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    data = FitData(train, train, 32, 8, 2, (12, 12, 1))
    section = dataclasses.replace(load_params(Path(__file__).parents[1] / "params.yaml").train_custom, epochs=5,
                                  patience=10, start_from_epoch=2, lr_schedule="constant", optimizer="sgd",
                                  learning_rate=3.0)
    keras.utils.set_random_seed(4)
    model = build_custom_cnn((12, 12, 1), 2, [4], [], 0.0)
    compile_for_fit(model, data, section, section.learning_rate, section.epochs)

    class Recorder(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[float, list[np.ndarray]]] = []

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seen.append((logs["val_loss"], [np.array(w) for w in self.model.get_weights()]))

    recorder = Recorder()
    if trainer == "fit":
        fit(model, data, section, History(), phase="train", epochs=section.epochs, callbacks=[recorder])
    else:
        recorder.set_model(model)
        train_loop(model, train, train, epochs=section.epochs, steps_per_epoch=4, global_batch_size=8, patience=10,
                   start_from_epoch=2, num_classes=2, callbacks=[recorder])
    losses = [loss for loss, _ in recorder.seen]
    assert len(losses) == 5 and int(np.argmin(losses)) < 2, losses      # the first epochs look best
    watched = 2 + int(np.argmin(losses[2:]))
    for kept, expected in zip(model.get_weights(), recorder.seen[watched][1]):
        np.testing.assert_array_equal(kept, expected)


def test_train_custom_writes_model_curves_and_one_mlflow_run(workdir: Path) -> None:
    result = run_stage(workdir, "train_custom", *train_arguments("custom", "train_custom"))
    assert result.returncode == 0, result.stderr

    summary = json.loads((workdir / "metrics/train_custom.json").read_text())
    assert summary["iterations_per_epoch"] == math.ceil(summary["train_size"] / summary["batch_size"])
    history = pd.read_csv(workdir / "metrics/train_custom_history.csv")
    assert list(history.columns) == ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert len(history) == summary["epochs_run"] and history["epoch"].tolist() == list(range(1, len(history) + 1))
    assert f"{summary['iterations_per_epoch']} iterations per epoch" in result.stderr

    model = keras.models.load_model(workdir / "models/custom/model.keras", safe_mode=True)
    assert model.input_shape == (None, 32, 32, 1)
    record = json.loads((workdir / "models/custom/run.json").read_text())
    assert record["class_names"] == ["circle", "square", "triangle"]

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert run.data.tags["dvc.stage"] == "train_custom"
    assert len(run.data.tags["data.manifest_sha256"]) == 64
    assert run.data.tags["version.tensorflow"]
    assert run.data.params["epochs"] == "2" and run.data.params["model"] == "custom"
    assert run.data.params["seed"] == "42" and run.data.params["blocks"] == "[8]"
    # 8 filters, not a multiple of oneDNN's channel group: said once where the run trains in bfloat16 on a CPU.
    warned = "train_custom.blocks: 8 filters are not a multiple of 16: in mixed_bfloat16 on this CPU"
    in_bfloat16 = run.data.params["precision.policy"] == "mixed_bfloat16"
    assert result.stderr.count(warned) == in_bfloat16, result.stderr[-3000:]
    assert run.data.tags["mlflow.parentRunId"] == record["parent_run_id"]
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["test"] * 3   # source.json says "test"
    assert run.data.params["iterations_per_epoch"] == str(summary["iterations_per_epoch"])
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == summary["epochs_run"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/training_curves.png" in artifacts
    assert record["model_uri"].startswith("models:/")
    # The images it learned from, by content hash: train and validation, not test; sorted, one a line.
    split = pd.read_csv(workdir / "data/split.csv", dtype=str)
    seen = client.download_artifacts(run.info.run_id, "lineage/seen_images.txt", str(workdir))
    learned = sorted(set(split.loc[split["split"] != "test", "sha256"]))
    assert Path(seen).read_text() == "".join(f"{digest}\n" for digest in learned)
    assert not set(split.loc[split["split"] == "test", "sha256"]) & set(learned)


def test_deterministic_training_repeats_bit_for_bit(tmp_path: Path, image_folder: Path, raw_params: dict) -> None:
    weights = []
    for attempt in ("first", "second"):
        work = tmp_path / attempt
        work.mkdir()
        params = tiny_params(raw_params, str(image_folder))
        params["base"]["deterministic"] = True
        params["split"]["ratios"] = [0.6, 0.2, 0.2]
        prepare_split(work, image_folder, params)
        result = run_stage(work, "train_custom", *train_arguments("custom", "train_custom"))
        assert result.returncode == 0, result.stderr
        model = keras.models.load_model(work / "models/custom/model.keras", safe_mode=True)
        weights.append(model.get_weights())
        metrics = pd.read_csv(work / "metrics/train_custom_history.csv")
        weights[-1].append(metrics[["loss", "val_loss"]].to_numpy())
    for first, second in zip(*weights):
        np.testing.assert_array_equal(first, second)


def test_unreachable_tracking_server_fails_before_training(workdir: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_stage(workdir, "train_custom", *train_arguments("custom", "train_custom"),
                       env=stage_env(MLFLOW_TRACKING_URI=uri))
    assert result.returncode == 2
    assert f"MLflow tracking store {uri} cannot be used (no server answers there)" in result.stderr
    assert "Epoch 1/" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "models/custom/model.keras").exists()


def test_missing_weights_file_fails_at_stage_start(workdir: Path) -> None:
    set_params(workdir, "train_resnet50", weights="weights/nope.weights.h5")
    result = run_stage(workdir, "train_resnet50", *train_arguments("resnet50", "train_resnet50"))
    assert result.returncode == 2
    assert "train_resnet50.weights: weights/nope.weights.h5 is not a file" in result.stderr
    assert "Traceback" not in result.stderr and "Epoch 1/" not in result.stdout


def test_imagenet_weights_that_cannot_be_fetched_name_the_alternatives(tmp_path: Path, monkeypatch) -> None:
    # Keras' real download path, pointed at a port where nothing listens and an empty cache:
    # exactly what an offline machine sees.
    from keras.src.applications import resnet
    from keras.src.backend import config

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras-home"))
    monkeypatch.setattr(resnet, "BASE_WEIGHTS_PATH", f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(PipelineError) as error:
        build_resnet50((32, 32, 3), 2, "imagenet", (), 0.0)
    message = str(error.value)
    assert "imagenet weights could not be downloaded" in message
    assert "path of a local" in message and "null to train from scratch" in message
