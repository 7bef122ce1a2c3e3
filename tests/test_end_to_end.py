"""The whole pipeline through the real ``dvc repro``, in a temporary copy of the repository.

Tiny params (20 digits per class, one epoch, ResNet50 from scratch at 32x32) keep it to a
minute or two. One test walks the life of a project: a first run deploys, a second changes
nothing, a stricter gate reruns only the gate and deploys nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, tiny_params

pytestmark = pytest.mark.slow

STAGES = ("ingest", "split", "train_custom", "train_resnet50", "evaluate", "gate")


def project_files() -> list[str]:
    """What a fresh clone holds: tracked files plus new files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (REPO_ROOT / name).is_file()]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git repository holding a copy of this project, with tiny params."""
    root = tmp_path_factory.mktemp("project")
    for name in project_files():
        if name.startswith(("data/ingest/", "models/", "metrics/", "deploy/")) or name == "dvc.lock":
            continue  # outputs of an earlier run: the copy starts clean, like a fresh clone
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    params = tiny_params(raw, "sklearn:digits")
    params["ingest"]["max_per_class"] = 20
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=root, check=True)
    return root


def run(project: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the project with this interpreter's environment first on PATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(list(command), cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def test_dvc_repro_end_to_end(project: Path) -> None:
    first = run(project, "dvc", "repro")
    assert stages_run(first.stdout) == list(STAGES)

    gate = json.loads((project / "metrics/gate.json").read_text())
    assert set(gate) == {"deploy", "model", "thresholds", "candidates"}
    assert gate["deploy"] is True and gate["model"] in ("custom", "resnet50")
    assert set(gate["candidates"]) == {"custom", "resnet50"}
    for candidate in gate["candidates"].values():
        assert set(candidate) == {"train_accuracy", "test_accuracy", "verdict", "reasons"}
        assert candidate["verdict"] == "deploy"

    # The deployed model is a plain Keras model that takes raw pixels.
    import keras
    import numpy as np

    info = json.loads((project / "deploy/model.json").read_text())
    model = keras.models.load_model(project / "deploy/model.keras", safe_mode=True)
    pixels = np.zeros((2, info["image_size"], info["image_size"], info["channels"]), dtype=np.float32)
    assert model.predict(pixels, verbose=0).shape == (2, len(info["class_names"]))

    # MLflow: one run per model, with the evaluation metrics and the gate's verdict.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["dvc.stage"] for r in runs) == ["train_custom", "train_resnet50"]
    for r in runs:
        assert {"train_accuracy", "validation_accuracy", "test_accuracy", "loss", "val_loss"} <= set(r.data.metrics)
        assert r.data.tags["gate.verdict"] == "deploy"
        assert len(r.data.tags["git.commit"]) == 40
        assert r.data.params["train_size"]
    champion = client.get_model_version_by_alias("image-classifier", "champion")
    assert str(champion.version) == "1"
    assert run(project, sys.executable, "-m", "pipeline.gate", "--check").returncode == 0

    # Nothing changed: nothing reruns.
    second = run(project, "dvc", "repro")
    assert stages_run(second.stdout) == []

    # A stricter gate reruns only the gate: no training, nothing deployed, registry untouched.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"].update(min_train_accuracy=1.0, min_test_accuracy=1.0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(project, "dvc", "repro")
    assert stages_run(third.stdout) == ["gate"]
    gate = json.loads((project / "metrics/gate.json").read_text())
    assert gate["deploy"] is False and gate["model"] is None
    assert not (project / "deploy/model.keras").exists()
    assert str(client.get_model_version_by_alias("image-classifier", "champion").version) == "1"
    assert len(client.search_model_versions("name='image-classifier'")) == 1
    refused = run(project, sys.executable, "-m", "pipeline.gate", "--check", check=False)
    assert refused.returncode == 1 and "NOT allowed" in refused.stderr


def test_misspelt_param_stops_repro_with_one_line(project: Path) -> None:
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["split"]["ratio"] = params["split"].pop("ratios")
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run(project, "dvc", "repro", "split", check=False)
    finally:
        params_file.write_text(original)
    assert result.returncode != 0
    assert "split.ratio: unknown key (did you mean 'ratios'?)" in result.stderr
    assert "Traceback" not in result.stderr
