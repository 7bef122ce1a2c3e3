"""The README's sweep: queued DVC experiments, run on two workers, linked to MLflow runs.

The README sweeps the split ratios; here the queued settings are the custom CNN's learning rate, the
same mechanism (dvc exp run --queue -S, dvc queue start) without retraining ResNet50 in each
experiment, which costs the suite a minute per experiment and tests nothing more. Two experiments
on two workers: they run at once, both writing to the project's one SQLite MLflow store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.project import run
from bench.sweep import queue_experiments, queue_logs, queue_status, run_queue, stop_workers, store_errors

pytestmark = pytest.mark.slow

# Two settings the shared project has not trained with (one it has would be restored from DVC's
# run cache, rightly, and log no new run).
SWEEP = ("train_custom.learning_rate=0.003", "train_custom.learning_rate=0.0003")


def test_queued_sweep_runs_and_links_to_mlflow(reproduced_project_copy: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = reproduced_project_copy
    queue_experiments(project, SWEEP)
    # Two workers, as on a 2-core machine: each experiment spends much of its time in one-threaded
    # start-up and I/O, and both write to the project's one MLflow store at once.
    try:
        run_queue(project, workers=2, timeout=900)
    finally:
        stop_workers(project)   # none outlives the test, even where DVC's own shutdown fails
    statuses = queue_status(project)
    assert sorted(statuses.values()) == ["Success"] * len(SWEEP), statuses

    # No experiment met a locked SQLite store: not in its stages' output, not as a retry MLflow logged.
    logs = queue_logs(project, sorted(statuses))
    for name, log in logs.items():
        assert "Running stage 'train_custom'" in log, (name, log[-3000:])
        assert not store_errors(log), (name, store_errors(log))

    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    experiments = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    assert len(experiments) == len(SWEEP), shown
    learning_rates = {}
    for experiment in experiments:
        (revision,) = experiment["revs"]
        data = revision["data"]
        gate = data["metrics"]["metrics/gate.json"]["data"]
        assert set(gate["candidates"]) == {"custom", "resnet50"}
        assert gate["candidates"]["custom"]["verdict"] in ("deploy", "overfit", "underfit")
        assert "test" in data["metrics"]["metrics/evaluate.json"]["data"]["custom"]
        learning_rates[experiment["name"]] = data["params"]["params.yaml"]["data"]["train_custom"]["learning_rate"]
    names = set(learning_rates)
    assert names == set(statuses)

    # Each experiment's runs land in the project's own store, tagged with the experiment's name: one
    # finished train_custom run each, with its own experiment's setting (none lost, none merged).
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("image-classification")
    runs = client.search_runs([experiment.experiment_id])
    assert not list(project.glob(".dvc/tmp/exps/**/mlflow.db"))
    trained = {name: [r for r in runs if r.data.tags.get("dvc.stage") == "train_custom"
                      and r.data.tags.get("dvc.experiment") == name] for name in names}
    assert all(len(found) == 1 for found in trained.values()), trained
    custom = {name: found for name, (found,) in trained.items()}
    assert len({r.info.run_id for r in custom.values()}) == len(SWEEP)
    for name, found in custom.items():
        assert found.info.status == "FINISHED", (name, found.info.status)
        assert float(found.data.params["learning_rate"]) == learning_rates[name], name
    assert [r.data.tags.get("dvc.experiment") for r in runs if r.data.tags.get("dvc.stage") == "train_custom"
            and r.info.run_id not in {found.info.run_id for found in custom.values()}] == [None]

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
        assert parent.data.tags["run.custom"] == children[0].info.run_id == custom[name].info.run_id
        assert parent.data.tags["run.resnet50"] == resnet50.info.run_id
        assert parent.data.tags["gate.model"] in ("custom", "resnet50", "none")
    # Two workers really ran two experiments at once: some two parents' lifetimes overlap.
    spans = sorted((parents[name].info.start_time, parents[name].info.end_time) for name in names)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_the_queue_starts_without_waiting_for_its_workers_and_a_worker_left_running_is_stopped(tmp_path: Path) -> None:
    """``dvc queue start`` forks a process per worker that keeps its output open until the worker
    exits: read through a pipe, the call would last as long as the workers do, forever where DVC's
    own shutdown fails (a worker whose monitor thread died idles on). Here a real worker on an empty
    queue, which stops by itself 10 s after it starts: the start returns while it runs, and
    stop_workers stops it by its pid."""
    from bench.sweep import live_workers, start_workers

    project = tmp_path / "project"
    project.mkdir()
    run(project, "git", "init", "-q")
    run(project, "dvc", "init", "-q")
    start_workers(project, 1)
    returned = time.monotonic()
    while not live_workers(project) and time.monotonic() < returned + 5:   # its process file comes just after
        time.sleep(0.1)
    assert list(live_workers(project)) == ["dvc-exp-worker-1"]

    assert stop_workers(project, grace=0) == ["dvc-exp-worker-1"]
    assert live_workers(project) == {}
