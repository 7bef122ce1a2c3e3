"""SIGKILL in the middle of training and of the gate, then ``dvc repro`` again: it finishes cleanly.

No half-written model in ``models/`` or ``deploy/``, and the ``champion`` alias always points at
the model that ``deploy/`` holds. Real subprocesses, real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.project import UP_TO_DATE, dvc_status, project_env, read_params, run, write_params

pytestmark = pytest.mark.slow


def repro_killed_at(project: Path, marker: str, delay: float = 0.0, timeout: float = 600) -> str:
    """Start ``dvc repro`` in its own process group; SIGKILL the whole group once ``marker`` is printed."""
    process = subprocess.Popen(["dvc", "repro"], cwd=project, env=project_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for line in process.stdout:
            seen.append(line)
            if marker in line:
                time.sleep(delay)
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker!r} not seen in {timeout} s:\n{''.join(seen)}")
        else:
            raise AssertionError(f"dvc repro ended before {marker!r}:\n{''.join(seen)}")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return "".join(seen)


def leftovers(project: Path) -> list[str]:
    """Temporary files a killed write could leave behind."""
    return [str(p.relative_to(project)) for folder in ("models", "deploy") if (project / folder).exists()
            for p in (project / folder).rglob("*") if ".tmp" in p.name]


def test_killed_training_and_gate_recover_with_dvc_repro(reproduced_project_copy: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = reproduced_project_copy
    params = read_params(project)
    params["train_custom"].update(epochs=200, patience=200)  # long enough to be killed in the middle
    write_params(project, params)

    repro_killed_at(project, "Epoch 2/")
    assert not (project / "models/custom/model.keras").exists()
    assert leftovers(project) == []

    params["train_custom"].update(epochs=1, patience=1)
    write_params(project, params)
    run(project, "dvc", "repro")
    assert dvc_status(project) == UP_TO_DATE

    # Kill the gate while it deploys and registers; the rerun must leave deploy/ and the alias agreeing.
    params["gate"]["min_test_score"] = 0.001
    params["gate"]["max_regression"] = 1.0   # this test is about the kill: the retrained model always deploys
    write_params(project, params)
    repro_killed_at(project, "stage gate: started", delay=0.5)
    assert leftovers(project) == []
    run(project, "dvc", "repro")
    assert dvc_status(project) == UP_TO_DATE

    # The promotion happened, in the killed run (the rerun then finds the same model) or in the rerun.
    decision = json.loads((project / "metrics/gate.json").read_text())
    assert decision["champion"]["outcome"] in ("replaced", "same model"), decision["champion"]
    deployed = json.loads((project / "deploy/model.json").read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("image-classifier", "champion")
    assert int(champion.version) > 1
    assert champion.tags["source.run_id"] == deployed["mlflow_run_id"]
    trained = {json.loads((project / "models" / name / "run.json").read_text())["run_id"]: name
               for name in ("custom", "resnet50")}
    assert trained.get(deployed["mlflow_run_id"]) == deployed["model"]
    import keras

    keras.models.load_model(project / "deploy/model.keras", safe_mode=True)
