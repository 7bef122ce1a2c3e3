"""A training run whose store went away: abandoned runs are marked FAILED, live ones are left alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.stage_runs import HOST_TAG, PID_TAG, fail_abandoned_runs, is_unreachable, owner_tags


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield mlflow.create_experiment("runs", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(None)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_only_runs_of_stopped_processes_of_this_machine_are_marked_failed(store: str) -> None:
    client = MlflowClient()
    mine = owner_tags()
    dead = {**mine, PID_TAG: str(_dead_pid())}
    cases = {"abandoned": ({"dvc.stage": "train_custom", **dead}, "FAILED"),
             "alive": ({"dvc.stage": "train_custom", **mine}, "RUNNING"),
             "other machine": ({"dvc.stage": "train_custom", **dead, HOST_TAG: "elsewhere"}, "RUNNING"),
             "other stage": ({"dvc.stage": "train_resnet50", **dead}, "RUNNING")}
    ids = {name: client.create_run(store, tags=tags).info.run_id for name, (tags, _) in cases.items()}

    assert fail_abandoned_runs(store, "train_custom") == [ids["abandoned"]]
    for name, (_, status) in cases.items():
        assert client.get_run(ids[name]).info.status == status, name


def test_a_connection_failure_is_told_from_other_errors() -> None:
    try:
        try:
            raise requests.ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch")
        except requests.ConnectionError as error:
            raise MlflowException(f"API request failed with exception {error}") from error
    except MlflowException as wrapped:
        assert is_unreachable(wrapped)
    assert not is_unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST: no run"))


def test_a_lost_server_is_one_line_naming_it_and_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import PipelineError
    from pipeline.stage_runs import _left_running, _raise_if_unreachable

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    lost = requests.ConnectionError("Max retries exceeded ([Errno 111] Connection refused)")
    with pytest.raises(PipelineError) as raised:
        _raise_if_unreachable(lost, "train_custom", _left_running("abc123", "train_custom"))
    assert str(raised.value) == (
        "MLflow tracking server http://mlflow.example:5000 stopped answering during train_custom (connection "
        "refused, after MLFLOW_HTTP_REQUEST_MAX_RETRIES retries); its run abc123 is marked FAILED when "
        "train_custom next starts here. Start the server again and rerun dvc repro")
    _raise_if_unreachable(ValueError("a bug, not the server"), "train_custom", "")  # not ours to reword
