"""Fixtures: tiny real image folders made on the fly, and params built from the project's own file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bench.common import REPO_ROOT


def make_image_folder(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0,
                      formats: tuple[str, ...] = ("png", "jpg")) -> Path:
    """Write ``count`` distinct images per class: each class a different colour, noise on top.

    The classes are easy to tell apart, so a tiny model learns them in an epoch or two.
    """
    rng = np.random.default_rng(seed)
    for class_index, (label, count) in enumerate(sorted(classes.items())):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        base_colour = np.zeros(3)
        base_colour[class_index % 3] = 200
        for i in range(count):
            noise = rng.integers(0, 50, size=(size, size, 3))
            pixels = np.clip(base_colour + noise, 0, 255).astype(np.uint8)
            extension = formats[i % len(formats)]
            path = folder / f"{label}_{i:03d}.{extension}"
            Image.fromarray(pixels).save(path, quality=95) if extension == "jpg" else Image.fromarray(pixels).save(path)
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest test files first, for ``make test``'s two workers (``--dist loadfile
    --no-loadscope-reorder``): a file is one unit (its module fixtures are built once), handed to
    whichever worker is free, in this order. Long units first and short ones filling in at the end
    keep both workers busy to the last minute instead of leaving one alone on a long file."""
    rank = {stem: position for position, stem in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(LONGEST_FIRST)))


# The test files that take longest, longest first, as `pytest --durations=0` adds them up on two cores:
# the server and its pipeline 115-140 s; the sweep 80-110 s after the shared reproduced project
# (75-85 s, built by whichever test asks first); then 20-100 s each. Only the order of the run
# depends on it.
# (pytest-xdist's --dist loadgroup, which could split a file, does not group under pytest 9.)
LONGEST_FIRST = ["test_mlflow_server", "test_sweep", "test_gate_registry", "test_training", "test_bench_smoke",
                 "test_faults", "test_multi_worker", "test_end_to_end", "test_distribution", "test_models",
                 "test_dvc_remote", "test_predict"]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of twelve small images each, PNG and JPEG mixed."""
    return make_image_folder(tmp_path / "images", {"circle": 12, "square": 12, "triangle": 12})


def project_params() -> dict:
    """The project's params.yaml as a dict, read afresh (a new dict each call, safe to edit)."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def raw_params() -> dict:
    """The project's params.yaml as a dict, to copy and edit in a test."""
    return project_params()


@dataclass(frozen=True)
class ReproducedProject:
    """A tiny copy of this project after one real ``dvc repro``, and what that repro printed."""

    root: Path
    output: str


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory, pytestconfig) -> ReproducedProject:
    """One tiny project reproduced once for the whole session (ResNet50 is trained here and only
    here among the shared tests). Tests only read it; a test that changes it takes
    ``reproduced_project_copy``. Under ``make test``'s two workers the first to need it builds it
    in their common temporary folder while the other waits for it (pytest-xdist's recipe)."""
    from filelock import FileLock

    from bench.common import git_commit_all
    from bench.project import copy_project, read_params, run, write_params

    # Under pytest-xdist a worker's config has ``workerinput`` (its ``worker_id`` fixture reads the
    # same); without xdist (``-p no:xdist``) the one process's own folder is the common one.
    distributed = hasattr(pytestconfig, "workerinput")
    shared = tmp_path_factory.getbasetemp().parent if distributed else tmp_path_factory.getbasetemp()
    root, output_file = shared / "reproduced" / "project", shared / "reproduced" / "repro.out"
    with FileLock(str(shared / "reproduced.lock")):
        if not output_file.exists():
            copy_project(root)
            # One model with a temperature built in and one without: evaluate's figures of both kinds.
            params = read_params(root)
            params["train_resnet50"]["temperature_scaling"] = True
            write_params(root, params)
            output = run(root, "dvc", "repro").stdout
            # As a user would: commit dvc.lock and the metrics, so experiments start from a clean workspace.
            git_commit_all(root, "dvc repro")
            output_file.write_text(output)
    return ReproducedProject(root, output_file.read_text())


@pytest.fixture
def reproduced_project_copy(reproduced_project: ReproducedProject, tmp_path: Path) -> Path:
    """A private copy of the shared reproduced project, for a test that changes it."""
    from bench.project import copy_reproduced

    return copy_reproduced(reproduced_project.root, tmp_path / "project")
