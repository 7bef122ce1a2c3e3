"""The MLflow parent run of one pipeline execution: both training runs as its children, the gate's
decision on it.

The stages run in separate processes, so they find the parent by a tag, not an in-memory run:
each training stage looks for an open parent with the execution's key (the DVC experiment when
DVC runs one, else the project and the split file) that has no finished run of its own stage yet,
joins it or starts one, and writes the parent's id into the model's ``run.json``, which DVC
tracks. The gate reads it from there, records its decision on the newest of those parents and
closes it, so a later ``dvc repro`` that trains starts a new parent, and a rerun of the gate alone
(``dvc repro gate``) records on the parent of the models it judges.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from pipeline import tracking
from pipeline.artifacts import RunRecord

log = logging.getLogger("pipeline.parent_run")

KEY_TAG = "pipeline.key"
PARENT_ID_TAG = "mlflow.parentRunId"
DECISION_ARTIFACT = "metrics/gate.json"
_PARENT_LINEAGE = ("git.commit", "git.dirty", "dvc.experiment")   # no dvc.stage: a parent is no stage's run
_RUNNING, _FINISHED = RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.FINISHED)
_KILLED = RunStatus.to_string(RunStatus.KILLED)
# Tag of a parent run closed because a later execution of the same split replaced it before its gate.
SUPERSEDED_TAG = "pipeline.superseded_by"


def execution_key(split_file: Path, environ: dict[str, str] | None = None) -> str:
    """What the training stages of one execution share: the machine and project, the DVC experiment
    (its baseline commit and name) when DVC runs one, and the split file's content."""
    environ = os.environ if environ is None else environ
    parts = [socket.gethostname(), str(tracking.project_root()), environ.get("DVC_EXP_BASELINE_REV", ""),
             environ.get("DVC_EXP_NAME", ""), hashlib.sha256(Path(split_file).read_bytes()).hexdigest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def parent_run_name(commit: str, environ: dict[str, str] | None = None) -> str:
    """The DVC experiment's name, or ``repro@<commit>`` for a plain ``dvc repro``."""
    environ = os.environ if environ is None else environ
    return environ.get("DVC_EXP_NAME") or f"repro@{commit[:7]}"


def join_or_start(experiment_id: str, key: str, stage: str) -> str:
    """The id of the open parent run with ``key`` that has no finished run of ``stage`` yet, newest
    first; else a new one (open parents of the key that it supersedes are closed). A store that refuses
    (a read-only user) or fails is one line."""
    try:
        return _join_or_start(experiment_id, key, stage)
    except Exception as error:
        raise tracking.refused(error, "start or join the parent run") from None


def _join_or_start(experiment_id: str, key: str, stage: str) -> str:
    client = MlflowClient()
    open_parents = client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{key}' and attributes.status = "
                                      f"'{_RUNNING}'", order_by=["attributes.start_time DESC"])
    for parent in open_parents:
        done = client.search_runs([experiment_id], f"tags.`{PARENT_ID_TAG}` = '{parent.info.run_id}' and "
                                  f"tags.`dvc.stage` = '{stage}' and attributes.status = '{_FINISHED}'",
                                  max_results=1)
        if not done:
            log.info("%s: joining MLflow parent run %s (%s)", stage, parent.info.run_name, parent.info.run_id)
            return parent.info.run_id
    lineage = tracking.lineage_tags(stage)
    tags = {KEY_TAG: key, **{name: lineage[name] for name in _PARENT_LINEAGE if name in lineage}}
    name = parent_run_name(lineage["git.commit"])
    run = client.create_run(experiment_id, tags=tags, run_name=name)
    log.info("%s: started MLflow parent run %s (%s)", stage, name, run.info.run_id)
    # Executions that stopped before their gate: closed as KILLED (they decided nothing, unlike a
    # finished one), each naming the run that replaced it.
    for parent in open_parents:
        client.set_tag(parent.info.run_id, SUPERSEDED_TAG, run.info.run_id)
        client.set_terminated(parent.info.run_id, _KILLED)
    return run.info.run_id


def _live_run(run_id: str):
    """The run, or None when it was deleted (or is gone from the store)."""
    try:
        run = MlflowClient().get_run(run_id)
    except Exception:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def decision_record(decision: dict[str, Any], run_ids: dict[str, str]) -> tuple[dict[str, str], dict[str, float]]:
    """The gate's decision (``metrics/gate.json``) as the parent's tags and metrics: deployed or not,
    the chosen model, each model's verdict, scores and training run id."""
    metric = decision["metric"]
    tags = {"gate.deploy": str(bool(decision["deploy"])).lower(),
            "gate.promoted": str(bool(decision.get("promoted", decision["deploy"]))).lower(),
            "gate.model": decision["model"] or "none",
            "gate.metric": metric, "gate.champion": decision["champion"]["outcome"]}
    metrics = {}
    for name, candidate in decision["candidates"].items():
        tags[f"gate.verdict.{name}"] = candidate["verdict"]
        metrics[f"{name}.train_{metric}"] = float(candidate["train_score"])
        metrics[f"{name}.test_{metric}"] = float(candidate["test_score"])
        if name in run_ids:
            tags[f"run.{name}"] = run_ids[name]
    return tags, metrics


def record_decision(decision: dict[str, Any], run_records: dict[str, RunRecord]) -> str | None:
    """Record the gate's decision on the newest of the models' parent runs and close it; return its id
    (None when the models were trained before there were parent runs, or those were deleted). A DVC
    experiment that trained neither model records it on a run of its own, named after it."""
    client = MlflowClient()
    parent_ids = dict.fromkeys(record.parent_run_id for record in run_records.values() if record.parent_run_id)
    parents = [run for run in map(_live_run, parent_ids) if run is not None]
    if not parents:
        log.warning("the training runs have no MLflow parent run (trained by an older pipeline, or the parent "
                    "was deleted): the gate's decision is on the training runs only")
        return None
    parent = max(parents, key=lambda run: run.info.start_time)
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment and parent.info.run_name != experiment:
        # A DVC experiment that only reran the gate (a pull request's compare-only check, say): its decision
        # is its own, not a new ending for the execution that trained the models.
        parent = client.create_run(parent.info.experiment_id, run_name=experiment,
                                   tags={"gate.models_trained_in": parent.info.run_name or ""})
    tags, metrics = decision_record(decision, {name: record.run_id for name, record in run_records.items()})
    now = get_current_time_millis()
    client.log_batch(parent.info.run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
                     tags=[RunTag(key, value) for key, value in tags.items()])
    client.log_dict(parent.info.run_id, decision, DECISION_ARTIFACT)
    client.set_terminated(parent.info.run_id, _FINISHED)
    return parent.info.run_id
