"""The README's sweep: queued DVC experiments, run on two workers, linked to MLflow runs.

The README sweeps the split ratios; here the queued settings are the custom CNN's learning rate, the
same mechanism (dvc exp run --queue -S, dvc queue start) without retraining ResNet50 in each
experiment, which costs the suite a minute per experiment and tests nothing more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.project import run

pytestmark = pytest.mark.slow

# Two settings the shared project has not trained with (one it has would be restored from DVC's run
# cache, rightly, and log no new run).
SWEEP = ("train_custom.learning_rate=0.003", "train_custom.learning_rate=0.0003")


def wait_for_queue(project: Path, timeout: float = 900) -> str:
    """Poll ``dvc queue status`` until nothing is queued or running; return the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(project, "dvc", "queue", "status").stdout
        busy = [line for line in status.splitlines() if " Queued " in f" {line} " or " Running " in f" {line} "]
        if not busy:
            return status
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(2)


def test_queued_sweep_runs_and_links_to_mlflow(reproduced_project_copy: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = reproduced_project_copy
    for setting in SWEEP:
        run(project, "dvc", "exp", "run", "--queue", "-S", setting)
    # Two workers, as on a 2-core machine: each experiment spends much of its time in one-threaded
    # start-up and I/O, and both write to the project's one MLflow store at once.
    run(project, "dvc", "queue", "start", "-j", "2")
    status = wait_for_queue(project)
    assert " Failed " not in f" {status} ", status

    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    experiments = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    assert len(experiments) == len(SWEEP), shown
    names = set()
    for experiment in experiments:
        (revision,) = experiment["revs"]
        data = revision["data"]
        gate = data["metrics"]["metrics/gate.json"]["data"]
        assert set(gate["candidates"]) == {"custom", "resnet50"}
        assert gate["candidates"]["custom"]["verdict"] in ("deploy", "overfit", "underfit")
        assert "test" in data["metrics"]["metrics/evaluate.json"]["data"]["custom"]
        names.add(experiment["name"])

    # Each experiment's runs land in the project's own store, tagged with the experiment's name.
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id])
    tagged = {r.data.tags.get("dvc.experiment") for r in runs}
    assert names <= tagged, (names, tagged)
    assert not list(project.glob(".dvc/tmp/exps/**/mlflow.db"))

    # Each experiment is one parent run named after it, holding what it trained and the gate's decision.
    # The sweep changes only the custom CNN, so ResNet50 came from DVC's run cache: its run stays a child
    # of the first repro's parent, and each experiment's parent names it among the models judged.
    parents = {r.info.run_name: r for r in runs if "pipeline.key" in r.data.tags}
    assert set(parents) == names | {parent for parent in parents if parent.startswith("repro@")}, set(parents)
    (resnet50,) = [r for r in runs if r.data.tags.get("dvc.stage") == "train_resnet50"]
    for name in names:
        parent = parents[name]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert [r.data.tags["dvc.stage"] for r in children] == ["train_custom"], name
        assert parent.info.status == "FINISHED" and parent.data.tags["dvc.experiment"] == name
        assert parent.data.tags["run.custom"] == children[0].info.run_id
        assert parent.data.tags["run.resnet50"] == resnet50.info.run_id
        assert parent.data.tags["gate.model"] in ("custom", "resnet50", "none")
