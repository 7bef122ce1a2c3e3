"""A teammate's machine: ``git clone`` + ``dvc pull`` gives the same pipeline state, nothing to rerun.

One copy of the project runs ``dvc repro``, pushes its outputs to a DVC remote (a local folder
here; S3 or any other remote works the same) and commits ``dvc.lock`` and the metrics with git.
A fresh ``git clone`` of it then pulls from the remote: DVC reports every stage up to date but the
gate (always changed: its champion is in the registry), ``dvc repro`` against the team's store reruns
only the gate, which keeps the champion, and the deployed model is the same file, byte for byte. A change
the teammate then makes (a gate threshold) reruns only the gate, against the team's tracking store.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.common import git_commit_all
from bench.project import UP_TO_DATE, dvc_status, project_env, read_params, run, stages_run, write_params

pytestmark = pytest.mark.slow

# Outputs DVC caches (not git): a clone has none of them until ``dvc pull``.
CACHED_OUTPUTS = ("deploy/model.keras", "deploy/model.json", "models/custom/model.keras",
                  "models/resnet50/model.keras", "data/split.csv", "data/ingest/manifest.csv")


def test_clone_and_pull_restores_every_output_without_rerunning(reproduced_project_copy: Path,
                                                                 tmp_path: Path) -> None:
    project = reproduced_project_copy
    assert dvc_status(project) == UP_TO_DATE

    remote = tmp_path / "remote"
    run(project, "dvc", "remote", "add", "-d", "local", str(remote))
    pushed = run(project, "dvc", "push")
    assert remote.is_dir() and any(path.is_file() for path in remote.rglob("*")), pushed.stdout

    # What git keeps: the lock file, the metrics and plots tables, the remote's config; DVC's
    # .gitignore files keep its outputs (data, models, deploy) out of git.
    git_commit_all(project, "pipeline outputs: dvc.lock, metrics, remote")
    tracked = set(run(project, "git", "ls-files").stdout.split())
    assert {"dvc.lock", ".dvc/config", "metrics/gate.json", "metrics/evaluate.json"} <= tracked
    assert not [name for name in tracked if name.startswith(("models/", "deploy/", "data/ingest/"))
                and not name.endswith(".gitignore")]
    assert run(project, "git", "status", "--porcelain").stdout == ""

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, capture_output=True)
    assert [output for output in CACHED_OUTPUTS if (clone / output).exists()] == []

    run(clone, "dvc", "pull")
    assert dvc_status(clone) == UP_TO_DATE
    for output in CACHED_OUTPUTS:
        assert (clone / output).read_bytes() == (project / output).read_bytes(), output
    # Git brought the metrics: the gate's decision is the one the first machine made.
    assert (clone / "metrics/gate.json").read_bytes() == (project / "metrics/gate.json").read_bytes()

    # With the team's tracking store (here the first machine's, standing in for a shared server),
    # dvc repro trains nothing: only the gate decides again, finds this same model as the champion,
    # and leaves deploy/ as it is.
    shared = {**project_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    again = subprocess.run(["dvc", "repro"], cwd=clone, env=shared, capture_output=True, text=True, timeout=900,
                           check=False)
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"
    assert stages_run(again.stdout) == ["gate"], again.stdout
    assert json.loads((clone / "metrics/gate.json").read_text())["champion"]["outcome"] == "same model"
    for output in CACHED_OUTPUTS:
        assert (clone / output).read_bytes() == (project / output).read_bytes(), output

    # The teammate changes a gate threshold: only the gate reruns, and it tags the training runs that
    # models/*/run.json name, so it needs the team's tracking store (here the first machine's, standing
    # in for a shared server); with a private, empty store it stops with "MLflow run ... was not found".
    params = read_params(clone)
    params["gate"]["min_train_score"] = 0.001
    write_params(clone, params)
    gate = subprocess.run(["dvc", "repro"], cwd=clone, env=shared, capture_output=True, text=True, timeout=900,
                          check=False)
    assert gate.returncode == 0, f"{gate.stdout}\n{gate.stderr}"
    assert stages_run(gate.stdout) == ["gate"]
    assert not (clone / "mlflow.db").exists()
    from mlflow.tracking import MlflowClient

    champion = MlflowClient(shared["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("image-classifier", "champion")
    deployed = json.loads((clone / "deploy/model.json").read_text())
    assert champion.tags["source.run_id"] == deployed["mlflow_run_id"]
