"""A project copied or moved to another folder keeps its runs' files there: connecting from the new
place points the project's own SQLite store at the new ``mlartifacts``; a store elsewhere is left alone."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.artifacts import RunRecord
from pipeline.serving import read_logged_serving_model
from tests.test_gate_registry import NAME, ONE_RIGHT, PERFECT, GateProject

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_copied_or_moved_project_keeps_its_own_runs(tmp_path: Path, raw_params: dict, how: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    original, there = (tmp_path / "original").resolve(), (tmp_path / "there").resolve()
    original.mkdir()
    monkeypatch.chdir(original)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)     # the project's own mlflow.db
    project = GateProject(original, raw_params)
    project.train(custom=PERFECT, resnet50=ONE_RIGHT)
    assert project.gate()["deploy"] is True
    stored_at = MlflowClient(tracking.tracking_uri()).get_model_version_download_uri
    assert stored_at(NAME, "1").startswith(f"{original.as_uri()}/mlartifacts/")

    if how == "copy":
        shutil.copytree(original, there, symlinks=True)
    else:
        original.rename(there)
    monkeypatch.chdir(there)
    # mlflow.set_tracking_uri exported the old store's URI in this process; a stage started here has none.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with caplog.at_level(logging.INFO, logger="pipeline.tracking"):
        tracking.connect(raw_params["base"]["experiment_name"])
    assert (f"MLflow store: artifact locations moved from {original} to {there} (the project was moved or copied)"
            in caplog.messages)
    shutil.rmtree(original, ignore_errors=True)     # the copy must not need the original

    # A new run's files land in the new folder.
    with tracking.start_run("after-the-move", {}) as run:
        mlflow.log_text("here", "note.txt")
    assert (there / "mlartifacts" / run.info.run_id / "artifacts/note.txt").read_text() == "here"
    # The registered champion's files, and an old run's, come from the new folder.
    client = MlflowClient(tracking.tracking_uri())
    version = project.champion()
    assert client.get_model_version_download_uri(NAME, str(version.version)).startswith(
        f"{there.as_uri()}/mlartifacts/")
    _, info = read_logged_serving_model(tracking.download_model_version(NAME, str(version.version),
                                                                        tmp_path / "download"))
    assert info.mlflow_run_id == version.tags["source.run_id"]
    old_run = client.get_run(RunRecord.read(there / "models/custom").run_id)
    assert old_run.info.artifact_uri.startswith(f"{there.as_uri()}/mlartifacts/")
    assert not original.exists()

    # Connecting again changes nothing and says nothing.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.tracking"):
        tracking.connect(raw_params["base"]["experiment_name"])
    assert not [message for message in caplog.messages if message.startswith("MLflow store:")]


def test_a_store_that_is_not_the_projects_own_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    elsewhere = (tmp_path / "elsewhere" / "mlartifacts").as_uri()
    MlflowClient(shared).create_experiment("team", artifact_location=elsewhere)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)
    tracking.connect("team")
    assert MlflowClient(shared).get_experiment_by_name("team").artifact_location == elsewhere
