"""MLflow: the store, runs that span stages, lineage tags, the registry alias.

Nothing here runs at import time; every stage calls :func:`connect` first, which fails fast with
the URI in the message if the store cannot be used, and points the project's own SQLite store at
this folder's ``mlartifacts/`` when the project was moved or copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

from pipeline import lineage
from pipeline.errors import PipelineError, first_line
from pipeline.manifest import SPLITS, SplitImages

log = logging.getLogger("pipeline.tracking")

DEFAULT_STORE_FILE = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
# `dvc exp run --queue` / `--temp` runs each experiment in a copy under .dvc/tmp/exps/; its runs
# belong in the project's store, not in a copy that DVC deletes afterwards.
_DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")
CHAMPION_ALIAS = "champion"
_SQLITE_PREFIX = "sqlite:///"   # then the path: relative, or absolute with a fourth slash
# MLflow 3's UI opens an experiment in its GenAI view unless this tag says it holds model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
_PROBE_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_STAGE_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
DATASET_DIGEST_LENGTH = 16   # MLflow keeps at most 36 characters of a dataset digest
RECORDED_PACKAGES = ("tensorflow", "keras", "mlflow", "dvc", "scikit-learn", "pandas", "numpy", "pillow")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store at the repository root. A relative
    SQLite path (``sqlite:///mlflow.db``) is taken from the project root too: in a queued DVC
    experiment's temporary copy it would name a store that DVC deletes with the copy."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{project_root() / DEFAULT_STORE_FILE}"
    relative = uri.removeprefix(_SQLITE_PREFIX)
    if uri.startswith(_SQLITE_PREFIX) and relative and not relative.startswith(("/", ":memory:")):
        return f"{_SQLITE_PREFIX}{project_root() / relative}"
    return uri


def project_root(start: Path | None = None) -> Path:
    """The repository DVC runs in (the working directory), or, inside a DVC temporary experiment
    workspace, the project that queued it."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - len(_DVC_TEMP_WORKSPACE)):
        if parts[i:i + len(_DVC_TEMP_WORKSPACE)] == _DVC_TEMP_WORKSPACE:
            return Path(*parts[:i])
    return here


def connect(experiment_name: str) -> str:
    """Point MLflow at the store, check that it answers, and select the experiment.

    Returns the experiment id. Raises :class:`PipelineError` naming the URI if the store cannot
    be reached or written.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # A stage's output is a log, not a terminal: no progress bars for artifacts (a user's setting wins).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        _follow_the_project(uri)
        client = MlflowClient(uri)
        with _quick_http_probe():
            experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            artifact_location = None
            if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
                # A local store keeps artifacts beside it, not in whatever folder MLflow guesses.
                artifact_location = (project_root() / DEFAULT_ARTIFACT_DIR).as_uri()
            experiment_id = client.create_experiment(experiment_name, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        elif experiment.lifecycle_stage == "deleted":   # in the UI's trash: MLflow refuses to use it
            raise PipelineError(f"MLflow experiment '{experiment_name}' in {uri} was deleted: restore it "
                                f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                                "base.experiment_name to another name")
        else:
            experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version of the pipeline
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except PipelineError:
        raise
    except Exception as error:  # MLflow raises many types (MlflowException, OperationalError, ConnectionError)
        raise PipelineError(f"MLflow tracking store {uri} cannot be used ({_store_problem(error)}). "
                            "Check MLFLOW_TRACKING_URI (unset it to use the project's mlflow.db)") from None
    mlflow.set_experiment(experiment_id=experiment_id)
    if uri.startswith(("http://", "https://")):
        # For the rest of the stage: a server that goes away fails it within minutes, not after
        # MLflow's default 7 retries with back-off; a user's own settings win.
        for name, value in _STAGE_HTTP_SETTINGS.items():
            os.environ.setdefault(name, value)
    return experiment_id


# The columns of MLflow's SQL store that hold where artifacts live (those absent in a store are skipped).
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def moved_from(artifact_location: str, root: Path) -> Path | None:
    """The project folder an experiment's artifact location points into, when that is a local
    ``mlartifacts`` folder of another folder than ``root`` (the project was moved or copied); else None."""
    parsed = urlparse(artifact_location)
    if parsed.scheme != "file":
        return None
    location = Path(url2pathname(parsed.path))
    if location.name != DEFAULT_ARTIFACT_DIR or location.parent == root:
        return None
    return location.parent


def location_prefixes(old_root: Path, new_root: Path) -> list[tuple[str, str]]:
    """``(old, new)`` prefixes to rewrite: the folder as a file URI and as a plain path, with a
    trailing slash so that ``/a/project`` does not match ``/a/project2``."""
    return [(f"{old_root.as_uri()}/", f"{new_root.as_uri()}/"), (f"{old_root}/", f"{new_root}/")]


def _own_store_file(uri: str) -> Path | None:
    """The SQLite file of ``uri`` when it is this project's own ``mlflow.db``, else None."""
    own = project_root() / DEFAULT_STORE_FILE
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).resolve() != own.resolve():
        return None
    return own if own.exists() else None


def _follow_the_project(uri: str) -> None:
    """When the project's own SQLite store names artifact folders of the place the project was moved
    or copied from, point them at this folder (a copy would write into, and read from, the original)."""
    store = _own_store_file(uri)
    if store is None:
        return
    root = project_root()
    for old_root in repoint_store(store, root):
        log.info("MLflow store: artifact locations moved from %s to %s (the project was moved or copied)",
                 old_root, root)


def repoint_store(store: Path, root: Path) -> list[Path]:
    """Point the artifact locations of the SQLite store ``store`` that lie in another folder's
    ``mlartifacts/`` at ``root``'s, in one transaction; returns the folders they pointed into."""
    with contextlib.closing(sqlite3.connect(store)) as database, database:
        try:
            locations = [row[0] for row in database.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.OperationalError:    # not an MLflow store yet: MLflow creates its tables
            return []
        old_roots = sorted({old for old in (moved_from(location or "", root) for location in locations) if old})
        for old_root in old_roots:
            for table, column in _LOCATION_COLUMNS:
                if column not in {row[1] for row in database.execute(f"PRAGMA table_info({table})")}:
                    continue
                for old, new in location_prefixes(old_root, root):
                    database.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                     f"WHERE substr({column}, 1, ?) = ?", (new, len(old) + 1, len(old), old))
    return old_roots


def start_run(run_name: str, tags: dict[str, str], parent_run_id: str | None = None):
    """``mlflow.start_run`` (under ``parent_run_id`` if given) that turns a refused write (read-only
    user) into one clear line."""
    try:
        return mlflow.start_run(run_name=run_name, tags=tags, parent_run_id=parent_run_id)
    except Exception as error:
        raise refused(error, "start a run") from None


def refused(error: BaseException, doing: str) -> PipelineError:
    """One line for a store that refused (a read-only user) or failed while ``doing`` something."""
    return PipelineError(_access_problem(error) or f"MLflow could not {doing} in {tracking_uri()} "
                         f"({first_line(error)})")


@contextlib.contextmanager
def _quick_http_probe() -> Iterator[None]:
    """Ask a tracking server once, briefly: a server that is down should fail the stage in
    seconds, not after MLflow's default of several retries with growing back-off."""
    saved = {name: os.environ.get(name) for name in _PROBE_SETTINGS}
    os.environ.update(_PROBE_SETTINGS)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def dvc_input_hashes(paths: list[str], lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """The hashes dvc.lock recorded for ``paths`` (outputs of earlier stages), as run tags."""
    if not lock_file.exists():
        return {}
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    wanted = {Path(p).as_posix() for p in paths}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") in wanted and out.get("md5"):
                hashes[f"dvc.input.{out['path']}"] = out["md5"]
    return hashes


def lineage_tags(stage: str, manifest_path: Path | None = None) -> dict[str, str]:
    """Tags that tie a run to the code and data that made it."""
    tags = {"dvc.stage": stage, "git.commit": _git(["rev-parse", "HEAD"]) or "unknown",
            "git.dirty": str(bool(_git(["status", "--porcelain", "--untracked-files=no"]))).lower()}
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        tags["dvc.experiment"] = experiment
    if manifest_path is not None and Path(manifest_path).exists():
        tags["data.manifest_sha256"] = hashlib.sha256(Path(manifest_path).read_bytes()).hexdigest()
    for package in RECORDED_PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return tags


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[Any]:
    """Reopen a run that an earlier stage started (evaluate and gate add to the training runs), and leave
    it as it was found: a training run stays FINISHED with its own end time, whatever later stages do
    (MLflow would mark it FAILED when one of them fails, and stretch its duration on every gate)."""
    try:
        found = MlflowClient().get_run(run_id).info
        active = mlflow.start_run(run_id=run_id)
    except Exception as error:
        access = _access_problem(error)
        if access:
            raise PipelineError(access) from None
        raise PipelineError(f"MLflow run {run_id} was not found in {tracking_uri()} ({first_line(error)}); "
                            "was the store changed since training? Rerun training: dvc repro -f train_custom "
                            "train_resnet50") from None
    try:
        with active:
            yield active
    finally:
        if found.end_time is not None and found.status != "RUNNING":
            MlflowClient().set_terminated(run_id, found.status, end_time=found.end_time)


def register_version(model_uri: str, name: str, tags: dict[str, str], description: str = "") -> str:
    """Register ``model_uri`` as a new version of ``name`` (with why, in its description); the alias
    stays where it is until :func:`move_champion_alias`."""
    version = mlflow.register_model(model_uri, name, tags=tags)
    if description:
        MlflowClient().update_model_version(name, version.version, description=description)
    return str(version.version)


def move_champion_alias(name: str, version: str) -> None:
    """Point the ``champion`` alias of ``name`` at ``version``: the one move of the alias."""
    MlflowClient().set_registered_model_alias(name, CHAMPION_ALIAS, version)


def find_champion(name: str):
    """The model version the ``champion`` alias of ``name`` points at, or None when there is none yet.

    Raises :class:`PipelineError` when the registry cannot answer.
    """
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as error:
        # No registered model of that name, or one without the alias: MLflow's two answers for "none".
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise PipelineError(f"MLflow registry {tracking_uri()} could not say which version of {name} is "
                            f"the {CHAMPION_ALIAS} ({first_line(error)})") from None
    except Exception as error:      # the store went away after connect (connection, database errors)
        raise PipelineError(f"MLflow registry {tracking_uri()} could not say which version of {name} is "
                            f"the {CHAMPION_ALIAS} ({_store_problem(error)})") from None


def download_model_version(name: str, version: str, destination: Path) -> Path:
    """Every file of a registered model version, copied into ``destination``; returns its folder."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                    dst_path=str(destination)))


def pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """``name==version`` of the installed packages, for a logged model's requirements.

    Given explicitly, so MLflow does not load the model in a subprocess to guess them (seconds
    per model, for a list we already know).
    """
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def log_saved_file(path: Path, artifact_file: str) -> None:
    """Log a file a stage has already written (a picture DVC tracks) as ``artifact_file`` in the active
    run: the same bytes, without drawing the figure a second time as ``mlflow.log_figure`` would."""
    artifact = Path(artifact_file)
    with tempfile.TemporaryDirectory() as folder:
        named = Path(folder) / artifact.name
        shutil.copyfile(path, named)
        mlflow.log_artifact(str(named), artifact_path=artifact.parent.as_posix() if artifact.parent.parts else None)


def log_params_flat(params: dict[str, Any]) -> None:
    """Log params, lists written as text (MLflow params are strings)."""
    mlflow.log_params({key: ("null" if value is None else str(value)) for key, value in params.items()})


def class_tag(label: str) -> str:
    """``class.<label>``, within MLflow's limit on a tag key's length: a longer label is cut, with a
    short hash of the whole so two long labels alike at the start stay two tags."""
    key = f"class.{label}"
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    return f"{key[:MAX_ENTITY_KEY_LENGTH - 13]}...{hashlib.sha256(label.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class DatasetInput:
    """One split of the training data as an MLflow dataset input: the dataset, its context, its tags."""

    dataset: Any
    context: str
    tags: dict[str, str]


def dataset_inputs(data: SplitImages, source: str, manifest_sha256: str,
                   ratios: tuple[float, ...]) -> list[DatasetInput]:
    """Each split (train, validation, test) as an ``mlflow.data`` dataset named after the image source,
    with the folder its files are in as the source, the split's rows as schema and row count, and its
    class counts, the split ratios and the manifest's SHA-256 as input tags."""
    from mlflow.data.pandas_dataset import from_pandas

    name = Path(source).name or source   # "PetImages" for a folder, "sklearn:digits" as it is
    inputs = []
    for split in SPLITS:
        rows = data.subset(split)
        digest = hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:DATASET_DIGEST_LENGTH]
        counts = rows["label"].astype(str).value_counts().reindex(data.class_names, fill_value=0)
        tags = {"images": str(len(rows)), "split.ratios": str(list(ratios)), "manifest.sha256": manifest_sha256,
                **{class_tag(label): str(int(count)) for label, count in counts.items()}}
        # MLflow warns of integer columns (they cannot hold a missing value): the sizes are logged as
        # floats, as its hint says. It also registers its local-file source twice and warns that a
        # folder path is ambiguous between the two, a warning no user can act on: that one is ignored.
        shown = rows.astype({column: "float64" for column in rows.select_dtypes("integer").columns})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            dataset = from_pandas(shown, source=data.root.as_posix(), name=name, digest=digest)
        inputs.append(DatasetInput(dataset, split, tags))
    return inputs


def log_dataset_inputs(inputs: list[DatasetInput]) -> None:
    """Log the datasets to the active run (the run page's Datasets, the runs table's Dataset column)."""
    mlflow.log_inputs([item.dataset for item in inputs], [item.context for item in inputs],
                      [item.tags for item in inputs])


def log_seen_images(data: SplitImages) -> None:
    """Record on the active run the content hashes of the images it learns from (train and validation)."""
    hashes = [digest for split in lineage.SEEN_SPLITS for digest in data.subset(split)["sha256"]]
    mlflow.log_text(lineage.seen_images_text(hashes), lineage.SEEN_IMAGES_ARTIFACT)


def seen_images(run_id: str) -> set[str] | None:
    """The image hashes run ``run_id`` recorded with :func:`log_seen_images`; None when it recorded none
    (trained before lineage was recorded).

    Raises :class:`PipelineError` when the store cannot answer.
    """
    folder = lineage.SEEN_IMAGES_ARTIFACT.rpartition("/")[0]
    try:
        listed = MlflowClient().list_artifacts(run_id, folder)
        if not any(item.path == lineage.SEEN_IMAGES_ARTIFACT for item in listed):
            return None
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{lineage.SEEN_IMAGES_ARTIFACT}")
    except Exception as error:   # MlflowException, OSError, a server gone: one line
        raise PipelineError(f"the images run {run_id} learned from cannot be read from {tracking_uri()} "
                            f"({_store_problem(error)})") from None
    return lineage.read_seen_images(text)


def _git(arguments: list[str]) -> str:
    try:
        result = subprocess.run(["git", *arguments], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()


def _access_problem(error: BaseException) -> str | None:
    """A message for a server that refused the user, or None for any other error."""
    code = getattr(error, "error_code", "")
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no MLFLOW_TRACKING_USERNAME set)")
        return (f"MLflow server {tracking_uri()} refused user {user} ({code}): training needs EDIT permission on "
                "the experiment, and the gate on the registered model too")
    return None


def _store_problem(error: BaseException) -> str:
    text = str(error)
    if "Max retries exceeded" in text or "Connection refused" in text or "NewConnectionError" in text:
        return "no server answers there"
    if isinstance(error, OSError):
        return f"{error.strerror or type(error).__name__}: {error.filename or ''}".strip()
    return first_line(error)
