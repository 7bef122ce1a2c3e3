"""A training stage's MLflow run when the tracking store goes away: fail fast, leave no run RUNNING.

A store that stops answering in the middle of a stage fails it with one line naming the store.
The run is marked FAILED on the way out when the store still answers; when it does not, the next
start of the same stage on the same machine marks it FAILED (its process is gone), so no run is
left RUNNING for good.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import mlflow
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.errors import PipelineError, first_line

log = logging.getLogger("pipeline.stage_runs")

HOST_TAG = "pipeline.host"
PID_TAG = "pipeline.pid"
_UNREACHABLE_HINTS = ("Max retries exceeded", "Connection refused", "NewConnectionError", "Connection aborted",
                      "RemoteDisconnected", "Read timed out")


def owner_tags() -> dict[str, str]:
    """Which machine and process hold a run: how a later start tells an abandoned run from a live one."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def fail_abandoned_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark FAILED the runs of ``stage`` that a process of this machine left RUNNING and that is
    gone (killed, or its store went away before it could say); returns their ids.

    Runs of other machines, and of processes still alive (parallel experiments), are left alone.
    """
    host = socket.gethostname()
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=(
        f"attributes.status = 'RUNNING' and tags.`dvc.stage` = '{stage}' and tags.`{HOST_TAG}` = '{host}'"))
    failed = []
    for run in found:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            failed.append(run.info.run_id)
            log.info("%s: run %s of a stopped process (pid %s) was still RUNNING; marked FAILED",
                     stage, run.info.run_id, pid)
    return failed


@contextlib.contextmanager
def stage_run(stage: str, experiment_id: str, tags: dict[str, str],
              parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """:func:`tracking.start_run` for a stage: first mark this stage's abandoned runs FAILED; on
    any error end the run FAILED (one quick try), and turn a store that stopped answering into
    one line naming it."""
    try:
        fail_abandoned_runs(experiment_id, stage)
    except Exception as error:  # MLflow raises many types
        _raise_if_unreachable(error, stage, "no run was started")
        raise
    run = tracking.start_run(stage, {**tags, **owner_tags()}, parent_run_id=parent_run_id)
    run_id = run.info.run_id
    try:
        yield run
    except BaseException as error:
        ended = _end_quickly(RunStatus.FAILED)
        if isinstance(error, Exception):
            _raise_if_unreachable(error, stage, f"its run {run_id} is marked FAILED" if ended else
                                  _left_running(run_id, stage))
        raise
    try:
        mlflow.end_run()
    except Exception as error:
        _raise_if_unreachable(error, stage, _left_running(run_id, stage))
        raise


def is_unreachable(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) says no tracking server answered."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if any(hint in str(seen) for hint in _UNREACHABLE_HINTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _left_running(run_id: str, stage: str) -> str:
    return f"its run {run_id} is marked FAILED when {stage} next starts here"


def _raise_if_unreachable(error: Exception, stage: str, run: str) -> None:
    """Raise the one-line error when ``error`` is a store that stopped answering; ``run`` says
    what became of the stage's run."""
    if not is_unreachable(error):
        return
    raise PipelineError(f"MLflow tracking server {tracking.tracking_uri()} stopped answering during {stage} "
                        f"({_reason(error)}); {run}. Start the server again and rerun dvc repro") from None


def _reason(error: BaseException) -> str:
    """What the connection said, in a few words rather than urllib3's paragraph."""
    text = str(error)
    for hint, reason in (("Connection refused", "connection refused"), ("Connection reset", "connection reset"),
                         ("Read timed out", "no answer within MLFLOW_HTTP_REQUEST_TIMEOUT"),
                         ("RemoteDisconnected", "connection closed")):
        if hint in text:
            return f"{reason}, after MLFLOW_HTTP_REQUEST_MAX_RETRIES retries"
    return first_line(error)


def _end_quickly(status: RunStatus) -> bool:
    """End the active run with ``status`` asking the store once, briefly; False if it did not answer.

    ``mlflow.end_run`` drops the run from the active stack before it calls the store, so a
    failure here leaves nothing for MLflow's own exit hook to retry.
    """
    with tracking._quick_http_probe():
        try:
            mlflow.end_run(RunStatus.to_string(status))
            return True
        except Exception as error:
            log.debug("could not end the run: %s", first_line(error))
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
