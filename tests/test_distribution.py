"""MirroredStrategy really training across two replicas, on this machine's CPU split in two.

Logical devices must be configured before TensorFlow starts, so each run is its own process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.project import tiny_params
from tests.conftest import REPO_ROOT, make_image_folder, project_params
from tests.stage_runner import prepare_split, stage_env

pytestmark = pytest.mark.slow

TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf

    cpus = int(sys.argv[2])
    if cpus > 1:
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpus)

    from pathlib import Path
    from pipeline.devices import choose_placement
    from pipeline.manifest import read_split
    from pipeline.params import load_params
    from pipeline.seeding import seed_everything
    from pipeline.train_custom import train_custom
    from pipeline.training import History, make_fit_data

    work = Path(sys.argv[1])
    params = load_params(work / "params.yaml")
    seed_everything(params.base.seed, tensorflow=True)
    placement = choose_placement(params.base.distribution)
    data = read_split(work / "data/ingest", work / "data/split.csv")
    fit_data = make_fit_data(data, params.base, params.train_custom.batch_size, placement)
    history = History()
    with placement.strategy.scope():
        model = train_custom(fit_data, params.train_custom, params.augment, history)
    last = history.rows[-1]
    print(json.dumps({"strategy": placement.name, "replicas": placement.replicas,
                      "global_batch": fit_data.batch_size, "val_accuracy": last["val_accuracy"]}))
    from pipeline.cli import end_process
    end_process(0)   # as a stage ends: without the interpreter's seconds of teardown
""")


def train(tmp_path: Path, raw_params: dict, distribution: str, cpus: int) -> dict:
    images = make_image_folder(tmp_path / "images", {"red": 30, "green": 30, "blue": 30}, size=16, seed=1)
    work = tmp_path / "work"
    work.mkdir()
    params = tiny_params(raw_params, str(images))
    params["base"]["distribution"] = distribution
    params["split"]["ratios"] = [0.6, 0.2, 0.2]
    params["train_custom"].update(epochs=10, batch_size=8, patience=10, learning_rate=0.003)
    prepare_split(work, images, params)
    store_before = _store_state()
    result = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(work), str(cpus)], cwd=REPO_ROOT,
                            env=stage_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # Training outside a stage logs nothing: the project's MLflow store is exactly as it was.
    assert _store_state() == store_before
    return json.loads(result.stdout.strip().splitlines()[-1])


def _store_state() -> dict[str, tuple[int, int] | None]:
    """Size and modification time of the project's MLflow store files (None where absent)."""
    state = {}
    for name in ("mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlruns", "mlartifacts"):
        path = REPO_ROOT / name
        state[name] = (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else None
    return state


@pytest.fixture(scope="module")
def one_replica(tmp_path_factory) -> dict:
    """``distribution: auto`` on two logical CPUs and no GPU: what the mirrored run is held against."""
    return train(tmp_path_factory.mktemp("auto"), project_params(), "auto", cpus=2)


def test_auto_uses_one_device_without_gpus(one_replica: dict) -> None:
    assert one_replica["strategy"] == "none" and one_replica["replicas"] == 1


def test_mirrored_strategy_trains_across_two_cpu_replicas(tmp_path: Path, raw_params: dict, one_replica: dict) -> None:
    mirrored = train(tmp_path, raw_params, "mirrored", cpus=2)
    assert mirrored["replicas"] == 2 and mirrored["strategy"] == "mirrored"
    assert mirrored["global_batch"] == 2 * one_replica["global_batch"]
    # Three colours are easy: both reach the same band of validation accuracy.
    assert one_replica["val_accuracy"] >= 0.8 and mirrored["val_accuracy"] >= 0.8, (one_replica, mirrored)


def test_files_are_sharded_across_workers_before_reading() -> None:
    from pipeline.dataset import training_dataset

    paths = [f"missing-{i}.png" for i in range(10)]
    # Sharding happens on the file list itself: worker 1 of 2 holds the odd files only.
    dataset = training_dataset(paths, list(range(10)), 10, image_size=32, channels=1, batch_size=2,
                               shuffle_seed=None, shard=(2, 1))
    assert dataset.cardinality().numpy() == 3  # 5 files in batches of 2


def _split_of(tmp_path: Path, raw_params: dict, train_images: int):
    from pipeline.manifest import read_split
    from pipeline.params import load_params

    images = make_image_folder(tmp_path / "images", {"red": train_images, "green": train_images}, size=8, seed=2)
    params = tiny_params(raw_params, str(images))
    params["split"]["ratios"] = [0.5, 0.25, 0.25]
    prepare_split(tmp_path, images, params)
    return read_split(tmp_path / "data/ingest", tmp_path / "data/split.csv"), load_params(tmp_path / "params.yaml")


def test_each_worker_reads_its_share_in_whole_batches_per_replica(tmp_path: Path, raw_params: dict) -> None:
    import tensorflow as tf

    from pipeline.devices import Placement
    from pipeline.training import make_fit_data

    data, params = _split_of(tmp_path, raw_params, 11)
    train_size = len(data.subset("train"))
    shares = [make_fit_data(data, params.base, 3, Placement(tf.distribute.get_strategy(), "multi_worker", 2, 2, index))
              for index in (0, 1)]
    # The global batch is per-replica batch x replicas; every worker can take the same whole steps.
    assert {share.batch_size for share in shares} == {6}
    steps = (train_size // 2) // 3
    assert {share.iterations_per_epoch for share in shares} == {steps}
    for share in shares:
        sizes = [int(images.shape[0]) for images, _ in share.train]
        assert set(sizes) == {3} and len(sizes) >= steps


def test_a_worker_share_smaller_than_one_batch_is_refused(tmp_path: Path, raw_params: dict) -> None:
    import tensorflow as tf

    from pipeline.devices import Placement
    from pipeline.errors import PipelineError
    from pipeline.training import make_fit_data

    data, params = _split_of(tmp_path, raw_params, 4)
    with pytest.raises(PipelineError, match="each worker's share of the 4 training images is smaller than one batch"):
        make_fit_data(data, params.base, 8, Placement(tf.distribute.get_strategy(), "multi_worker", 2, 2, 0))


def test_auto_trains_on_several_machines_only_when_tf_config_names_two(monkeypatch) -> None:
    from pipeline.devices import choose_placement, worker_share

    one = {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(one))
    assert choose_placement("auto").name == "none"
    # A chief trains too: it is worker 0, the workers follow it.
    two = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}
    assert worker_share(two) == (2, 1)
