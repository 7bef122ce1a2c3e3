"""The files stages hand each other about a trained model, and the one class that reads each.

A training stage writes ``models/<folder>/model.keras`` and ``run.json`` (:class:`RunRecord`);
``evaluate`` writes each model's answers image by image (:class:`SplitPredictions`), which the
gate's statistics read; the gate copies the chosen model to ``deploy/model.keras`` with
``deploy/model.json`` (:class:`DeployedModel`), which ``predict`` and the MLflow serving model read
back.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.files import write_csv, write_json
from pipeline.images import DEFAULT_MAX_PIXELS

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
DEPLOY_INFO_FILE = "model.json"
PREDICTIONS_COLUMNS = ["split", "path", "actual", "predicted"]


@dataclass(frozen=True)
class RunRecord:
    """``models/<folder>/run.json``: the MLflow run that trained the model and what it expects."""

    run_id: str
    model_uri: str
    class_names: list[str]
    image_size: int
    channels: int
    parent_run_id: str = ""   # the pipeline execution's parent run ("" in files from before there were any)
    temperature: float = 1.0  # built into the model's output layer by temperature scaling (1 = none)

    def write(self, model_dir: Path) -> None:
        write_json(Path(model_dir) / RUN_FILE, asdict(self))

    @classmethod
    def read(cls, model_dir: Path) -> RunRecord:
        data = _read(Path(model_dir) / RUN_FILE, "run the training stages first (dvc repro)")
        return cls(str(data["run_id"]), str(data["model_uri"]), list(data["class_names"]),
                   int(data["image_size"]), int(data["channels"]), str(data.get("parent_run_id") or ""),
                   float(data.get("temperature", 1.0)))


@dataclass(frozen=True)
class DeployedModel:
    """``deploy/model.json``: what a client needs to feed the deployed model, and where it came from."""

    class_names: list[str]
    image_size: int
    channels: int
    model: str = ""
    mlflow_run_id: str = ""
    # The largest image (width x height) predict and serving decode: ingest.max_image_pixels when the
    # model was deployed, so a limit raised to train on large scans holds for serving them too.
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_run(cls, model_name: str, record: RunRecord, max_image_pixels: int) -> DeployedModel:
        return cls(record.class_names, record.image_size, record.channels, model_name, record.run_id,
                   max_image_pixels)

    def write(self, path: Path) -> None:
        data = {"model": self.model, "class_names": self.class_names, "image_size": self.image_size,
                "channels": self.channels, "mlflow_run_id": self.mlflow_run_id,
                "max_image_pixels": self.max_image_pixels}
        write_json(Path(path), data)

    @classmethod
    def read(cls, path: Path) -> DeployedModel:
        data = _read(Path(path), "run the pipeline first (make repro)")
        return cls(list(data["class_names"]), int(data["image_size"]), int(data["channels"]),
                   str(data.get("model", "")), str(data.get("mlflow_run_id", "")),
                   int(data.get("max_image_pixels", DEFAULT_MAX_PIXELS)))   # written before it was kept


@dataclass(frozen=True)
class SplitPredictions:
    """One model's answer for each image of one split, as class names, in manifest order."""

    paths: tuple[str, ...]
    actual: tuple[str, ...]
    predicted: tuple[str, ...]


def write_predictions(path: Path, by_split: dict[str, SplitPredictions]) -> None:
    """``<predictions>/<model>.csv``: split, path, actual and predicted label, one row per image."""
    rows = [(split, *row) for split, answers in by_split.items()
            for row in zip(answers.paths, answers.actual, answers.predicted)]
    write_csv(Path(path), PREDICTIONS_COLUMNS, rows)


def read_predictions(path: Path) -> dict[str, SplitPredictions]:
    """The file :func:`write_predictions` wrote, split by split."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} is missing: run the evaluate stage first (dvc repro evaluate)")
    columns: dict[str, tuple[list[str], list[str], list[str]]] = {}
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames != PREDICTIONS_COLUMNS:
            raise PipelineError(f"{path}: expected the columns {', '.join(PREDICTIONS_COLUMNS)}, got "
                                f"{', '.join(reader.fieldnames or [])}: rerun the evaluate stage (dvc repro -f evaluate)")
        for row in reader:
            paths, actual, predicted = columns.setdefault(row["split"], ([], [], []))
            paths.append(row["path"])
            actual.append(row["actual"])
            predicted.append(row["predicted"])
    missing = [split for split in ("train", "test") if split not in columns]
    if missing:
        raise PipelineError(f"{path} has no answers for the {' and '.join(missing)} split: rerun the evaluate "
                            "stage (dvc repro -f evaluate)")
    return {split: SplitPredictions(tuple(p), tuple(a), tuple(q)) for split, (p, a, q) in columns.items()}


def _read(path: Path, hint: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} is not valid JSON ({error})") from None
