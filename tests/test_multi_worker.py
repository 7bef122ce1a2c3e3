"""Two real worker processes on 127.0.0.1 training the custom CNN with MultiWorkerMirroredStrategy.

Each worker has its own copy of the project (as two machines would); the chief records, the other
writes nothing. A one-worker TF_CONFIG would not count: Keras's broken code path only runs with two.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bench.project import free_port, tiny_params
from tests.conftest import REPO_ROOT, make_image_folder
from tests.stage_runner import prepare_split, stage_env, train_arguments

pytestmark = pytest.mark.slow

WORKERS = 2
# Plain float32 kernels (no oneDNN) and SGD: the two runs below agree to rounding only.
QUIET = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}

# The same global batches in one process, through model.fit: worker 0's batch, then worker 1's, read
# as each worker reads its share (pipeline.training.make_fit_data with that worker's placement), epoch
# after epoch. They are taken out first because fit opens a new iterator between epochs (Keras's
# EpochIterator), so a reshuffled dataset would give it other batches than the workers saw.
REFERENCE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import keras
    import numpy as np
    import tensorflow as tf
    from pipeline.devices import Placement
    from pipeline.manifest import read_split
    from pipeline.models import build_custom_cnn
    from pipeline.params import load_params
    from pipeline.seeding import seed_everything
    from pipeline.training import compile_for_fit, make_fit_data

    work, out = Path(sys.argv[1]), sys.argv[2]
    params = load_params(work / "params.yaml")
    section = params.train_custom
    seed_everything(params.base.seed, tensorflow=True)
    data = read_split(work / "data/ingest", work / "data/split.csv")
    shares = [make_fit_data(data, params.base, section.batch_size,
                            Placement(tf.distribute.get_strategy(), "multi_worker", 2, 2, index)) for index in (0, 1)]
    steps = shares[0].iterations_per_epoch
    zipped = tf.data.Dataset.zip(tuple(share.train.take(steps) for share in shares))
    batches = [(tf.concat([first[0], second[0]], 0), tf.concat([first[1], second[1]], 0))
               for _ in range(section.epochs) for first, second in zipped]
    train = tf.data.Dataset.from_tensor_slices(tuple(tf.stack(parts) for parts in zip(*batches)))
    model = build_custom_cnn(shares[0].input_shape, shares[0].num_classes, section.blocks, section.dense_units,
                             section.dropout, batch_norm=section.batch_norm, pooling=section.pooling)
    compile_for_fit(model, shares[0], section, section.learning_rate, section.epochs)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=section.patience, restore_best_weights=True)
    model.fit(train, steps_per_epoch=steps, epochs=section.epochs, callbacks=[stopper], verbose=2,
              validation_data=make_fit_data(data, params.base, section.batch_size).validation)
    np.savez(out, *model.get_weights())
    from pipeline.cli import end_process
    end_process(0)   # as a stage ends: without the interpreter's seconds of teardown
""")


def project(root: Path, images: Path, raw_params: dict, **train_custom) -> Path:
    """One machine's copy of a tiny project (params, manifest, split) training with multi_worker."""
    params = tiny_params(raw_params, str(images))
    params["base"]["distribution"] = "multi_worker"
    params["split"]["ratios"] = [0.6, 0.2, 0.2]
    params["train_custom"].update({"optimizer": "sgd", "learning_rate": 0.05, "batch_size": 4, "dropout": 0.0,
                                   "precision": "float32", "patience": 5, **train_custom})
    root.mkdir(parents=True)
    prepare_split(root, images, params)
    return root


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen]]:
    """The worker processes a test starts; any still running at its end are killed (by their pid)."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def start_workers(roots: list[Path], logs: Path, launched: list[subprocess.Popen], env: dict[str, str]) -> list[str]:
    """The stage on every machine at once, each with its TF_CONFIG and log file; returns the addresses."""
    addresses = [f"127.0.0.1:{free_port()}" for _ in roots]
    for index, root in enumerate(roots):
        config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        with (logs / f"worker{index}.log").open("w") as log_file:
            launched.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline.train_custom", *train_arguments("custom", "train_custom")],
                cwd=root, env=stage_env(TF_CONFIG=json.dumps(config), **env), stdout=log_file,
                stderr=subprocess.STDOUT))
    return addresses


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]


def digest(log: str) -> str:
    return re.search(r"final weights sha256 (\w+)", log).group(1)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", {"red": 14, "green": 14, "blue": 14}, size=16, seed=1)


def test_two_workers_train_as_one_process_would(tmp_path: Path, images: Path, raw_params: dict,
                                                launched: list[subprocess.Popen]) -> None:
    roots = [project(tmp_path / f"machine{index}", images, raw_params, epochs=2) for index in range(WORKERS)]
    before = {path.relative_to(roots[1]) for path in roots[1].rglob("*")}
    start_workers(roots, tmp_path, launched, QUIET)
    reference = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, str(tmp_path / "machine0"),
                                str(tmp_path / "reference.npz")], cwd=REPO_ROOT, env=stage_env(**QUIET),
                               capture_output=True, text=True, timeout=300)
    codes = wait_all(launched, timeout=300)
    logs = [(tmp_path / f"worker{index}.log").read_text() for index in range(WORKERS)]
    assert codes == [0, 0], logs
    assert reference.returncode == 0, reference.stderr

    # Both workers hold the same weights; the chief's saved model is them, and loads safely.
    assert digest(logs[0]) == digest(logs[1])
    chief = roots[0]
    model = keras.models.load_model(chief / "models/custom/model.keras", safe_mode=True)
    assert model.predict(np.zeros((2, 32, 32, 1), np.uint8), verbose=0).shape == (2, 3)
    expected = np.load(tmp_path / "reference.npz")
    for index, weights in enumerate(model.get_weights()):
        np.testing.assert_allclose(weights, expected[f"arr_{index}"], rtol=0, atol=1e-5)

    # One record: the chief's one FINISHED run with its curves; nothing new on the other machine.
    client = MlflowClient(f"sqlite:///{chief / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id],
                              "tags.`dvc.stage` = 'train_custom'")
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert runs[0].data.params["distribution.strategy"] == "multi_worker"
    assert runs[0].data.params["distribution.replicas"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "val_loss")) == 2
    summary = json.loads((chief / "metrics/train_custom.json").read_text())
    assert len(pd.read_csv(chief / "metrics/train_custom_history.csv")) == 2 == summary["epochs_run"]
    assert summary["replicas"] == 2 and summary["batch_size"] == 8
    assert {path.relative_to(roots[1]) for path in roots[1].rglob("*")} == before


def test_a_worker_that_dies_stops_the_other_with_one_line(tmp_path: Path, images: Path, raw_params: dict,
                                                          launched: list[subprocess.Popen]) -> None:
    # With the options fit's callbacks and compile provide, and oneDNN on (precision auto is mixed
    # bfloat16 on a CPU with bfloat16 instructions): the loop runs them on two workers until one dies.
    options = {"precision": "auto", "class_weight": "balanced", "lr_schedule": "plateau", "batch_norm": True,
               "label_smoothing": 0.1, "optimizer": "adam", "learning_rate": 0.001, "ema": True,
               "weight_decay": 0.01}
    roots = [project(tmp_path / f"machine{index}", images, raw_params, epochs=500, patience=500, **options)
             for index in range(WORKERS)]
    addresses = start_workers(roots, tmp_path, launched, {"TF_CPP_MIN_LOG_LEVEL": "2"})
    chief, other = launched
    chief_log = tmp_path / "worker0.log"
    deadline = time.monotonic() + 180
    while "epoch 1/500" not in chief_log.read_text():   # killed during epoch 2
        assert time.monotonic() < deadline and chief.poll() is None, chief_log.read_text()
        time.sleep(0.2)
    os.kill(other.pid, signal.SIGKILL)
    killed = time.monotonic()
    code = chief.wait(timeout=90)
    waited = time.monotonic() - killed
    log = chief_log.read_text()
    assert code == 2 and waited < 60, (waited, log)
    assert f"multi-worker training stopped: worker 1 ({addresses[1]}) stopped answering" in log
    assert "Traceback" not in log
    client = MlflowClient(f"sqlite:///{roots[0] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("image-classification").experiment_id])
    assert "RUNNING" not in {run.info.status for run in runs if run.data.tags.get("dvc.stage") == "train_custom"}


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_one_process_loop_takes_the_same_steps_as_fit(policy: str) -> None:
    """The loop's step is fit's step: the compiled SGD with weight decay and EMA (the averaged weights
    validated and kept), label smoothing in the compiled loss, balanced class weights per example,
    early stopping with the best weights kept, and under mixed_float16 the loss scaling compile adds;
    in one process, on the same batches, the weights and curves agree to rounding."""
    import dataclasses

    import tensorflow as tf

    from pipeline.models import build_custom_cnn
    from pipeline.params import load_params
    from pipeline.training import FitData, History, compile_for_fit, fit
    from pipeline.training_loop import train_loop

    rng = np.random.default_rng(0)
    labels = np.array([0] * 12 + [1] * 8 + [2] * 4)
    images = (rng.integers(0, 60, (24, 12, 12, 1)) + 60 * labels[:, None, None, None]).astype(np.uint8)
    targets = np.eye(3, dtype=np.float32)[labels]
    order = rng.permutation(24)
    train = tf.data.Dataset.from_tensor_slices((images[order], targets[order])).batch(8)
    validation = tf.data.Dataset.from_tensor_slices((images, targets)).batch(8)
    data = FitData(train, validation, 24, 8, 3, (12, 12, 1), train_label_counts=(12, 8, 4))
    section = dataclasses.replace(load_params(REPO_ROOT / "params.yaml").train_custom, optimizer="sgd",
                                  learning_rate=0.05, lr_schedule="constant", label_smoothing=0.1,
                                  class_weight="balanced", patience=2, start_from_epoch=1, dropout=0.0, epochs=4,
                                  ema=True,
                                  weight_decay=0.01)

    def compiled() -> keras.Model:
        keras.utils.set_random_seed(5)
        model = build_custom_cnn(data.input_shape, 3, (4,), (8,), 0.0)
        compile_for_fit(model, data, section, section.learning_rate, section.epochs)
        return model

    keras.mixed_precision.set_global_policy(policy)
    try:
        with_fit, with_loop = compiled(), compiled()
        history = History()
        fit(with_fit, data, section, history, phase="train", epochs=section.epochs)
        result = train_loop(with_loop, train, validation, epochs=section.epochs, steps_per_epoch=3,
                            global_batch_size=8, patience=section.patience, start_from_epoch=section.start_from_epoch,
                            class_weights=data.balanced_class_weights(), num_classes=3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(with_loop.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    for from_fit, from_loop in zip(with_fit.get_weights(), with_loop.get_weights()):
        np.testing.assert_allclose(from_loop, from_fit, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.history["val_loss"], [row["val_loss"] for row in history.rows], rtol=1e-5)
    np.testing.assert_allclose(result.history["loss"], [row["loss"] for row in history.rows], rtol=1e-5)


def test_the_lost_worker_is_named_from_tensorflows_error_never_this_one() -> None:
    import tensorflow as tf

    from pipeline.training_loop import peer_failure

    cluster = {"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}, "task": {"type": "worker", "index": 1}}
    # What the second worker saw when the chief was killed (the abort names both ends of the link).
    reset = tf.errors.UnavailableError(None, None, "Graph execution error:\n\nDetected at node x:\nCollective ops is "
                                       "aborted by: recvmsg:Connection reset by peer /job:worker/replica:0/task:1 "
                                       "/job:worker/replica:0/task:0")
    assert str(peer_failure(reset, cluster)) == (
        "multi-worker training stopped: worker 0 (10.0.0.1:2222) stopped answering (connection reset); "
        "every worker must be restarted together")
    heartbeats = tf.errors.UnavailableError(None, None, "The following tasks are unhealthy (stopped sending "
                                            "heartbeats):\n/job:worker/replica:0/task:0")
    assert "worker 0 (10.0.0.1:2222) stopped answering (no heartbeat from it)" in str(peer_failure(heartbeats, cluster))
    assert peer_failure(tf.errors.InternalError(None, None, "a kernel failed"), cluster) is None
    assert peer_failure(ValueError("Connection reset"), cluster) is None
