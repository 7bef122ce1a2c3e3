"""A throw-away copy of this repository, as a fresh clone would have it, for the tests and benchmarks
that run ``dvc``; tiny params for a seconds-long run."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from bench.common import REPO_ROOT, git_commit_all

STAGES = ("ingest", "split", "train_custom", "train_resnet50", "evaluate", "gate")


def tiny_params(raw: dict, source: str) -> dict:
    """Params for a seconds-long run: small images, one small block, one epoch at a constant rate
    (a cosine schedule would spend half of the one epoch's steps at a small rate), and no XLA (with a
    handful of steps, compiling would cost more than it saves wherever jit_compile auto picks it).
    ResNet50 steps with plain SGD: tracing Adam's update of its 214 weight tensors takes longer than
    the rest of its one-epoch run (22 s against 9 s on the 2-core EPYC)."""
    raw = copy.deepcopy(raw)
    raw["ingest"]["source"] = source
    tiny_training = {"epochs": 1, "batch_size": 16, "lr_schedule": "constant", "jit_compile": False}
    raw["train_custom"].update(blocks=[8], dense_units=[16], **tiny_training)
    raw["train_resnet50"].update(weights=None, optimizer="sgd", **tiny_training)
    raw["gate"].update(min_train_score=0.0, min_test_score=0.0)
    return raw
_OUTPUTS = ("data/ingest/", "models/", "metrics/", "deploy/")


def project_files() -> list[str]:
    """What a fresh clone holds: tracked files plus new files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in listed.split("\0") if name and (REPO_ROOT / name).is_file()]


def copy_project(root: Path, max_per_class: int = 10) -> Path:
    """Copy the project into ``root`` as a new git repository with tiny params; no earlier outputs."""
    for name in project_files():
        if name.startswith(_OUTPUTS) or name == "dvc.lock":
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    params = tiny_params(raw, "sklearn:digits")
    params["ingest"]["max_per_class"] = max_per_class
    write_params(root, params)
    git_commit_all(root, "copy")
    return root


def read_params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def project_env() -> dict[str, str]:
    """This interpreter's environment first on PATH (so stages run ``python`` from it), no MLflow
    settings leaking in, and unbuffered output so a test can watch a stage's progress."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(root: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the project and return its output; fail with all of it if ``check``."""
    result = subprocess.run(list(command), cwd=root, env=project_env(), capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


# What ``dvc status --json`` says of a project whose every stage is up to date: the gate, whose champion
# lives in the MLflow registry outside DVC, is ``always_changed`` and decides again on every repro.
UP_TO_DATE = {"gate": ["always changed"]}


def dvc_status(root: Path) -> dict[str, list]:
    """``dvc status --json`` of the project: each stage that would rerun, and why."""
    return json.loads(run(root, "dvc", "status", "--json").stdout)


def stages_run(output: str) -> list[str]:
    """The stages ``dvc repro`` says it ran, in pipeline order."""
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def copy_reproduced(source: Path, target: Path) -> Path:
    """A private copy of a reproduced project (git, DVC cache, outputs, MLflow store) for a test that
    changes it. The MLflow store's artifact locations are moved to the copy, as a stage run there would
    (:func:`pipeline.tracking.repoint_store`), so what the test logs or reads lands in the copy, never in
    the shared project, even before a stage runs."""
    from pipeline.tracking import repoint_store

    shutil.copytree(source, target, symlinks=True)
    store = target / "mlflow.db"
    if store.exists():
        repoint_store(store, target.resolve())
    return target
