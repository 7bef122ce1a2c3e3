"""MLflow helpers that decide where runs go and what they are tagged with (the store itself is
exercised by the stage tests, a real server by test_mlflow_server)."""

from __future__ import annotations

import hashlib
import subprocess
import warnings
from pathlib import Path

import pytest

from bench.common import git_commit_all
from pipeline.tracking import (
    dvc_input_hashes,
    lineage_tags,
    location_prefixes,
    moved_from,
    pinned_requirements,
    project_root,
    tracking_uri,
)


def test_the_project_root_is_the_working_directory(tmp_path: Path) -> None:
    assert project_root(tmp_path) == tmp_path.resolve()


def test_a_dvc_temporary_experiment_workspace_belongs_to_the_project_that_queued_it(tmp_path: Path) -> None:
    workspace = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "run" / "tmpab12cd"
    workspace.mkdir(parents=True)
    assert project_root(workspace) == (tmp_path / "project").resolve()


def test_the_default_store_is_mlflow_db_at_the_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri() == "http://tracking.example:5000"


def test_a_relative_sqlite_store_is_the_projects_even_in_a_queued_experiments_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLFLOW_TRACKING_URI=sqlite:///mlflow.db, as the docs show it: in DVC's temporary copy it must not
    name a store inside the copy, which DVC deletes with it."""
    project = tmp_path / "project"
    workspace = project / ".dvc" / "tmp" / "exps" / "run" / "tmpab12cd"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/team.db")
    assert tracking_uri() == f"sqlite:///{project.resolve() / 'stores' / 'team.db'}"
    for kept in (f"sqlite:///{tmp_path / 'elsewhere.db'}", "sqlite:///:memory:", "http://tracking.example:5000"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", kept)
        assert tracking_uri() == kept
    monkeypatch.chdir(project)   # outside a copy, relative to the working directory as before
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert tracking_uri() == f"sqlite:///{project.resolve() / 'mlflow.db'}"


def test_an_artifact_folder_of_another_project_folder_is_seen_as_moved_from_there() -> None:
    here = Path("/work/new")
    assert moved_from("file:///work/old/mlartifacts", here) == Path("/work/old")
    assert moved_from(Path("/work/my project/mlartifacts").as_uri(), here) == Path("/work/my project")
    assert moved_from("file:///work/new/mlartifacts", here) is None          # this project's own
    assert moved_from("file:///work/old/elsewhere", here) is None            # not a project's artifact folder
    assert moved_from("s3://bucket/mlartifacts", here) is None               # a remote store is left alone
    assert moved_from("/work/old/mlruns/0", here) is None


def test_locations_are_rewritten_by_whole_folder_prefixes() -> None:
    assert location_prefixes(Path("/work/old"), Path("/b/new place")) == [
        ("file:///work/old/", "file:///b/new%20place/"), ("/work/old/", "/b/new place/")]


def test_input_hashes_come_from_dvc_lock_for_the_paths_asked(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text("""schema: '2.0'
stages:
  ingest:
    outs:
    - path: data/ingest
      md5: aaa111.dir
  split:
    outs:
    - path: data/split.csv
      md5: bbb222
    - path: metrics/split.json
      hash: md5
""")
    assert dvc_input_hashes(["data/ingest", "data/split.csv", "models/custom"], lock) == {
        "dvc.input.data/ingest": "aaa111.dir", "dvc.input.data/split.csv": "bbb222"}
    assert dvc_input_hashes(["data/ingest"], tmp_path / "missing.lock") == {}
    lock.write_text("stages: [unclosed")
    assert dvc_input_hashes(["data/ingest"], lock) == {}


def test_lineage_tags_tie_a_run_to_commit_data_and_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git_commit_all(tmp_path, "first")
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"path,label\n")
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-tern")

    tags = lineage_tags("train_custom", manifest)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert tags["dvc.stage"] == "train_custom"
    assert tags["git.commit"] == head and tags["git.dirty"] == "false"
    assert tags["dvc.experiment"] == "bushy-tern"
    assert tags["data.manifest_sha256"] == hashlib.sha256(b"path,label\n").hexdigest()
    assert tags["version.mlflow"] and tags["version.tensorflow"]

    (tmp_path / "params.yaml").write_text("a: 2\n")  # an uncommitted change to a tracked file
    assert lineage_tags("train_custom")["git.dirty"] == "true"


def test_lineage_tags_outside_git_say_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert lineage_tags("gate")["git.commit"] == "unknown"


def test_pinned_requirements_skip_what_is_not_installed() -> None:
    pins = pinned_requirements(("mlflow", "no-such-package-here"))
    assert len(pins) == 1 and pins[0].startswith("mlflow==")


def test_each_split_is_a_dataset_input_with_its_digest_source_and_class_counts() -> None:
    import pandas as pd

    from pipeline.manifest import SplitImages
    from pipeline.tracking import dataset_inputs

    frame = pd.DataFrame({"path": [f"{label}/{i}.png" for label in "ab" for i in range(5)],
                          "label": ["a"] * 5 + ["b"] * 5, "width": [8] * 10,
                          "split": ["train", "train", "train", "validation", "test"] * 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = dataset_inputs(SplitImages(Path("data/sources/shapes"), frame), "data/sources/shapes", "f" * 64,
                                (0.6, 0.2, 0.2))
        logged = [item.dataset.to_dict() for item in inputs]   # what log_inputs sends: schema and profile
    assert all("width" in entry["schema"] for entry in logged)
    # A stage's output carries no warning a user cannot act on (integer columns, an "ambiguous" source).
    assert [str(warning.message)[:80] for warning in caught] == []
    assert [item.context for item in inputs] == ["train", "validation", "test"]
    train = inputs[0]
    assert train.dataset.name == "shapes" and train.dataset.source.to_dict() == {"uri": "data/sources/shapes"}
    assert train.dataset.profile["num_rows"] == 6 and "label" in train.dataset.schema.input_names()
    assert train.tags == {"images": "6", "split.ratios": "[0.6, 0.2, 0.2]", "manifest.sha256": "f" * 64,
                          "class.a": "3", "class.b": "3"}
    assert len({item.dataset.digest for item in inputs}) == 3
    assert all(len(item.dataset.digest) <= 36 for item in inputs)   # MLflow's limit
    again = dataset_inputs(SplitImages(Path("data/sources/shapes"), frame), "data/sources/shapes", "f" * 64,
                           (0.6, 0.2, 0.2))
    assert [item.dataset.digest for item in again] == [item.dataset.digest for item in inputs]
    assert dataset_inputs(SplitImages(Path("x"), frame), "sklearn:digits", "", (0.6, 0.2, 0.2))[0].dataset.name \
        == "sklearn:digits"
