"""Run a real stage as a subprocess in a scratch folder, as DVC would (``python -m pipeline.<stage>``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from bench.project import project_env
from pipeline.ingest import ingest_folder
from pipeline.manifest import MANIFEST_FILE, SOURCE_FILE
from pipeline.split import split_dataset
from tests.conftest import REPO_ROOT


def stage_env(**overrides: str) -> dict[str, str]:
    """:func:`tests.project.project_env`, with this repository importable from any working directory."""
    env = project_env()
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(overrides)
    return env


def run_stage(workdir: Path, module: str, *arguments: str, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m pipeline.<module> ARGS`` with ``workdir`` as the working directory."""
    return subprocess.run([sys.executable, "-m", f"pipeline.{module}", *arguments], cwd=workdir,
                          env=env or stage_env(), capture_output=True, text=True, timeout=timeout)


def prepare_split(workdir: Path, image_root: Path, params: dict, seed: int = 0) -> None:
    """Write params.yaml, data/ingest (manifest, source) and data/split.csv for a training stage."""
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ingest_dir = workdir / "data" / "ingest"
    ingest_dir.mkdir(parents=True)
    result = ingest_folder(image_root, max_pixels=10_000_000)
    result.manifest.to_csv(ingest_dir / MANIFEST_FILE, index=False)
    (ingest_dir / SOURCE_FILE).write_text(f'{{"source": "test", "root": "{image_root.as_posix()}"}}')
    split = split_dataset(result.manifest, tuple(params["split"]["ratios"]), seed)
    split.to_csv(workdir / "data" / "split.csv", index=False)


def train_arguments(model: str, stage: str) -> list[str]:
    """The paths dvc.yaml gives a training stage, relative to the working directory."""
    return ["--ingest", "data/ingest", "--split", "data/split.csv", "--out", f"models/{model}",
            "--metrics", f"metrics/{stage}.json", "--history", f"metrics/{stage}_history.csv"]
