"""The whole pipeline against a real, shared MLflow tracking server instead of the local SQLite file.

A ``mlflow server`` subprocess (SQLite backend and proxied artifact store, both in a temporary
folder, as a team would run it with PostgreSQL and S3) is started on a free port; ``dvc repro``
runs in a copy of the project with only ``MLFLOW_TRACKING_URI`` pointing at it. The server is
stopped during the first repro's ``train_custom`` and started again, and a second repro completes
(one pipeline run pays for both checks). Everything is then checked through the server's REST API,
the way a teammate on another machine would see it, and the project copy must hold no local store
(``mlflow.db``, ``mlartifacts/``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from bench.project import STAGES, copy_project, free_port, project_env, read_params, stages_run, write_params
from tests.gate_verdicts import check_verdicts

pytestmark = pytest.mark.slow

EXPERIMENT = "image-classification"
REGISTERED_MODEL = "image-classifier"
SERVER_START_TIMEOUT = 120  # seconds: the first start creates the database and runs its migrations


class Server:
    """A ``mlflow server`` on a fixed port over one database and artifact folder: its URL, its log
    file, and :meth:`start` to run it (again, after :func:`stop`, as a team's server comes back)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.url = root, f"http://127.0.0.1:{port}"
        self.database, self.artifacts, self.log = root / "mlflow.db", root / "artifacts", root / "server.log"
        self.command = [sys.executable, "-m", "mlflow", "server",
                        "--backend-store-uri", f"sqlite:///{self.database}",
                        "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
                        "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait until it answers ``/health``."""
        env = project_env()  # no MLFLOW_* settings from the caller leak into the server
        # Without the job runner (GenAI evaluation jobs, two more processes): tracking and the
        # registry are all the pipeline uses, and the server answers 3-4 s sooner.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.log, "ab") as log_file:
            # Its own session, so stop() can signal the whole group (the server and its workers).
            self.process = subprocess.Popen(self.command, cwd=self.root, env=env, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server not healthy after {SERVER_START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def get(self, endpoint: str, **params) -> dict:
        response = requests.get(f"{self.url}{endpoint}", params=params, timeout=30)
        assert response.status_code == 200, f"GET {endpoint} {params}: {response.status_code} {response.text}"
        return response.json()

    def post(self, endpoint: str, body: dict) -> dict:
        response = requests.post(f"{self.url}{endpoint}", json=body, timeout=30)
        assert response.status_code == 200, f"POST {endpoint} {body}: {response.status_code} {response.text}"
        return response.json()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def state(self) -> str:
        code = self.process.poll()
        return f"mlflow server pid {self.process.pid}: " + ("running" if code is None else f"exited {code}")


def stop(process: subprocess.Popen, graceful: bool = True) -> None:
    """Terminate the server's process group (mlflow forks uvicorn workers), then kill what is left;
    with ``graceful`` False, kill it at once (the tests are over: nothing to shut down cleanly)."""
    if graceful and process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stray workers, even if the main process already exited
    except ProcessLookupError:
        pass
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    """``mlflow server`` with a SQLite backend and ``--serve-artifacts`` into a local folder."""
    started = Server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    try:
        started.start()
        yield started
    finally:
        if started.process is not None:
            stop(started.process, graceful=False)


@dataclass(frozen=True)
class Outage:
    """What the server's death during ``train_custom`` did: the failed repro's output, how long the
    stage took to fail after the server died, and the run it left behind (status as the restarted
    server first saw it)."""

    output: str
    returncode: int
    seconds_to_fail: float
    left_running: str
    model_written: bool
    status_after_restart: str


@dataclass(frozen=True)
class Pipeline:
    """A project copy whose pipeline ran against the server: once into an outage, once to the end."""

    project: Path
    outage: Outage
    recovery: subprocess.CompletedProcess


STOP_BOUND = 60  # seconds from the server's death to the stage's failure (MLflow's defaults take minutes)


@pytest.fixture(scope="module")
def pipeline(server: Server, tmp_path_factory) -> Pipeline:
    """A team's first week with a server, in one project copy tracking to it and nowhere else:
    ``dvc repro`` starts, the server dies during ``train_custom``, the server comes back, and
    ``dvc repro`` runs again to the end. Only the URI is the set-up (the stages' own retry settings)."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    env = {**project_env(), "MLFLOW_TRACKING_URI": server.url}
    params = read_params(project)
    long_training = copy.deepcopy(params)
    long_training["train_custom"].update(epochs=200, patience=200)  # long enough to lose the server in the middle
    write_params(project, long_training)
    outage = _repro_until_the_server_dies(project, env, server)

    server.start()
    status = server.get("/api/2.0/mlflow/runs/get", run_id=outage.left_running)["run"]["info"]["status"]
    outage = dataclasses.replace(outage, status_after_restart=status)
    write_params(project, params)
    recovery = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=900,
                              check=False)
    assert recovery.returncode == 0, (f"dvc repro exited {recovery.returncode}\n{recovery.stdout}\n"
                                      f"{recovery.stderr}\n--- {server.state()}, log ---\n{server.log_tail()}")
    return Pipeline(project, outage, recovery)


def _repro_until_the_server_dies(project: Path, env: dict[str, str], server: Server) -> Outage:
    """``dvc repro``, the server stopped at train_custom's second epoch, and what the stage then did."""
    process = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # Whatever happens, nothing outlives this fixture's bound.
    watchdog = threading.Timer(600, lambda: os.killpg(process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "Epoch 2/" in line:
                break
        assert process.poll() is None, f"dvc repro ended before training:\n{''.join(seen)}"
        stop(server.process)  # SIGTERM to the server's group, then SIGKILL to what is left
        died = time.monotonic()
        seen.append(process.stdout.read())
        process.wait()
        took = time.monotonic() - died
    finally:
        watchdog.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    output = "".join(seen)
    messages = [line for line in output.splitlines() if "stopped answering" in line]
    assert len(messages) == 1, output
    left_running = messages[0].split("its run ")[1].split()[0]
    model_written = (project / "models/custom/model.keras").exists()
    return Outage(output, process.returncode, took, left_running, model_written, status_after_restart="")


def experiment_id(server: Server) -> str:
    found = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)
    return found["experiment"]["experiment_id"]


def training_runs(server: Server) -> dict[str, dict]:
    """The experiment's finished training runs, by their ``dvc.stage`` tag, as the REST API returns
    them (the pipeline's parent run, which has no stage, and the run the outage failed are left out)."""
    found = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id(server)],
                                                        "max_results": 100})
    runs = {}
    for run in found.get("runs", []):
        tags = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
        if "dvc.stage" not in tags or run["info"]["status"] == "FAILED":
            continue
        runs[tags["dvc.stage"]] = {
            "info": run["info"], "tags": tags,
            "metrics": {metric["key"]: metric["value"] for metric in run["data"].get("metrics", [])},
            "params": {param["key"]: param["value"] for param in run["data"].get("params", [])}}
    return runs


def test_pipeline_runs_every_stage_against_the_server(pipeline: Pipeline) -> None:
    # The outage's repro completed ingest and split (DVC keeps finished stages), the recovery the rest.
    assert stages_run(pipeline.outage.output)[:2] == ["ingest", "split"]
    assert stages_run(pipeline.recovery.stdout) == [stage for stage in STAGES if stage not in ("ingest", "split")]


def test_experiment_and_runs_are_on_the_server(server: Server, pipeline: Pipeline) -> None:
    project = pipeline.project
    experiment = server.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert experiment["name"] == EXPERIMENT
    assert experiment["lifecycle_stage"] == "active"
    # The server chose where artifacts go (its proxy), not a path on the machine that ran the pipeline.
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment["artifact_location"]

    runs = training_runs(server)
    assert sorted(runs) == ["train_custom", "train_resnet50"]
    gate = json.loads((project / "metrics/gate.json").read_text())
    # The verdicts follow from the models' answers and the thresholds; the server holds the same ones.
    check_verdicts(project, gate)
    for stage, run in runs.items():
        assert run["info"]["status"] == "FINISHED"
        assert {"train_accuracy", "validation_accuracy", "test_accuracy", "loss", "val_loss"} <= set(run["metrics"])
        model = stage.removeprefix("train_")
        assert run["metrics"]["test_accuracy"] == pytest.approx(gate["candidates"][model]["test_score"])
        assert run["tags"]["gate.verdict"] == gate["candidates"][model]["verdict"]
        assert run["tags"]["gate.deployed"] == str(gate["model"] == model).lower()
        assert len(run["tags"]["git.commit"]) == 40
        assert run["params"]["train_size"]
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:"), run["info"]["artifact_uri"]

    # Both training stages found one parent run through the server, and the gate closed it with its decision.
    tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    found = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                        "filter": "tags.`pipeline.key` != ''"})
    (parent,) = found["runs"]
    parent_id = parent["info"]["run_id"]
    assert {run["tags"]["mlflow.parentRunId"] for run in runs.values()} == {parent_id}
    assert parent["info"]["status"] == "FINISHED"
    parent_tags = {tag["key"]: tag["value"] for tag in parent["data"]["tags"]}
    assert parent_tags["gate.deploy"] == str(gate["deploy"]).lower()
    assert parent_tags["gate.model"] == (gate["model"] or "none")
    for model, candidate in gate["candidates"].items():
        assert parent_tags[f"gate.verdict.{model}"] == candidate["verdict"]
        assert parent_tags[f"run.{model}"] == runs[f"train_{model}"]["info"]["run_id"]
    listed = server.get("/api/2.0/mlflow/artifacts/list", run_id=parent_id, path="metrics")
    assert [Path(entry["path"]).name for entry in listed.get("files", [])] == ["gate.json"]


def test_champion_alias_is_on_the_server(server: Server, pipeline: Pipeline) -> None:
    project = pipeline.project
    version = server.get("/api/2.0/mlflow/registered-models/alias", name=REGISTERED_MODEL,
                         alias="champion")["model_version"]
    assert version["name"] == REGISTERED_MODEL
    assert str(version["version"]) == "1"
    deployed = json.loads((project / "deploy/model.json").read_text())
    assert version["run_id"] == deployed["mlflow_run_id"]
    tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}
    assert tags["source.run_id"] == deployed["mlflow_run_id"]
    # The first promotion into an empty registry: the gate deployed its best passing model (tiny thresholds).
    gate = json.loads((project / "metrics/gate.json").read_text())
    assert gate["deploy"] is True and gate["champion"]["outcome"] == "none"
    assert tags["gate.verdict"] == gate["candidates"][gate["model"]]["verdict"] == "deploy"
    model = server.get("/api/2.0/mlflow/registered-models/get", name=REGISTERED_MODEL)["registered_model"]
    assert {alias["alias"]: alias["version"] for alias in model.get("aliases", [])} == {"champion": "1"}

    # The champion's files are in the server's artifact store, and they hold the deployed model itself.
    source = version["source"]
    if source.startswith("models:/"):  # MLflow 3: a logged model, whose files have their own artifact URI
        source = server.get(f"/api/2.0/mlflow/logged-models/{source.removeprefix('models:/')}")["model"]["info"][
            "artifact_uri"]
    assert source.startswith("mlflow-artifacts:"), source
    relative = source.removeprefix("mlflow-artifacts:").lstrip("/")
    listed = server.get("/api/2.0/mlflow-artifacts/artifacts", path=relative)
    assert "MLmodel" in {entry["path"] for entry in listed.get("files", [])}, listed
    deployed_bytes = (project / "deploy/model.keras").read_bytes()
    stored = [path for path in (server.artifacts / relative).rglob("*.keras") if path.read_bytes() == deployed_bytes]
    assert stored, sorted(str(path) for path in (server.artifacts / relative).rglob("*"))
    inside = stored[0].relative_to(server.artifacts).as_posix()
    response = requests.get(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{inside}", timeout=60)
    assert response.status_code == 200 and response.content == deployed_bytes


def test_artifacts_live_in_the_servers_artifact_store(server: Server, pipeline: Pipeline) -> None:
    project = pipeline.project
    runs = training_runs(server)
    for stage, run in runs.items():
        run_id = run["info"]["run_id"]
        # Listed through the tracking API ...
        listed = server.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="plots")
        names = sorted(Path(entry["path"]).name for entry in listed.get("files", []))
        assert {"training_curves.png", "confusion_matrix_test.png"} <= set(names), (stage, listed)
        # ... and downloaded through the artifact proxy, byte for byte what lies in --artifacts-destination.
        relative = run["info"]["artifact_uri"].removeprefix("mlflow-artifacts:").lstrip("/")
        proxied = server.get("/api/2.0/mlflow-artifacts/artifacts", path=f"{relative}/plots")
        assert sorted(Path(entry["path"]).name for entry in proxied.get("files", [])) == names
        for name in ("training_curves.png", "confusion_matrix_test.png"):
            response = requests.get(f"{server.url}/api/2.0/mlflow-artifacts/artifacts/{relative}/plots/{name}",
                                    timeout=30)
            assert response.status_code == 200, (stage, name, response.text[:300])
            assert response.content.startswith(b"\x89PNG")
            assert (server.artifacts / relative / "plots" / name).read_bytes() == response.content

    # The logged Keras models went to the server's store too (MLflow 3 keeps them under <experiment>/models/).
    assert list(server.artifacts.rglob("MLmodel")), sorted(str(p) for p in server.artifacts.rglob("*"))[:50]
    # Nothing was written to a local store in the project.
    assert not (project / "mlflow.db").exists()
    assert not (project / "mlartifacts").exists()
    assert not (project / "mlruns").exists()


# --- the server went away during the first repro ---

def test_a_server_that_dies_during_training_fails_the_stage_fast_and_repro_recovers(server: Server,
                                                                                   pipeline: Pipeline) -> None:
    outage, project = pipeline.outage, pipeline.project
    assert outage.returncode != 0, outage.output
    assert outage.seconds_to_fail < STOP_BOUND, f"{outage.seconds_to_fail:.0f} s after the server died:\n{outage.output}"
    (message,) = [line for line in outage.output.splitlines() if "stopped answering" in line]
    assert f"stage train_custom failed: MLflow tracking server {server.url} stopped answering" in message
    assert "Traceback" not in outage.output
    # The stage left no model, not even a half-written one.
    assert not outage.model_written
    assert not [path for path in (project / "models").rglob("*") if ".tmp" in path.name]

    # The run the dead server could not close was still RUNNING when it came back; the next repro
    # marked it FAILED and trained a clean one, and nothing is left RUNNING.
    assert outage.status_after_restart == "RUNNING"
    assert server.get("/api/2.0/mlflow/runs/get", run_id=outage.left_running)["run"]["info"]["status"] == "FAILED"
    new_run = json.loads((project / "models/custom/run.json").read_text())["run_id"]
    assert new_run != outage.left_running
    found = server.post("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id(server)],
                                                        "max_results": 100})["runs"]
    statuses = {run["info"]["run_id"]: run["info"]["status"] for run in found}
    assert statuses[new_run] == "FINISHED"
    assert sorted(statuses.values()).count("FAILED") == 1
    assert "RUNNING" not in statuses.values(), statuses
