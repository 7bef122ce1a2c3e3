"""Stage ``evaluate``: both models on all three splits, with scikit-learn's metrics.

Writes the headline numbers (accuracy and loss per model and split) as a DVC metric, a full
report (per-class precision / recall / F1, confusion matrices), the test-set predictions DVC
draws as confusion matrices, and adds the same numbers and pictures to each model's MLflow run.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

from pipeline import cli, figures, tracking
from pipeline.dataset import decode_predictions, load_images
from pipeline.errors import PipelineError
from pipeline.files import read_json, write_json
from pipeline.manifest import SPLITS, SplitImages, read_split
from pipeline.params import load_params
from pipeline.seeding import seed_everything
from pipeline.training import MODEL_FILE, RUN_FILE

log = logging.getLogger("pipeline.evaluate")

MODEL_NAMES = ("custom", "resnet50")


@dataclass(frozen=True)
class SplitScores:
    """How one model did on one split."""

    accuracy: float
    loss: float
    per_class: dict
    confusion_matrix: list[list[int]]
    predicted: list[int]


def score_predictions(true_indices: Sequence[int], probabilities: np.ndarray,
                      class_names: Sequence[str]) -> SplitScores:
    """Accuracy, cross-entropy, per-class precision / recall / F1 and the confusion matrix."""
    true = np.asarray(true_indices)
    predicted, full = decode_predictions(probabilities)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=labels,
                                                                     zero_division=0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(class_names)}
    clipped = np.clip(full, 1e-7, 1.0)
    loss = float(log_loss(true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels))
    return SplitScores(float(accuracy_score(true, predicted)), loss, per_class,
                       confusion_matrix(true, predicted, labels=labels).tolist(), predicted.tolist())


def evaluate_model(model: keras.Model, data: SplitImages, image_size: int, channels: int,
                   batch_size: int) -> tuple[dict[str, SplitScores], np.ndarray]:
    """Score one model on train, validation and test; also return the test images (for pictures)."""
    scores = {}
    images = np.zeros((0, image_size, image_size, channels), dtype=np.uint8)
    for split in SPLITS:
        images = load_images(data.paths(split), image_size, channels)
        probabilities = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
        scores[split] = score_predictions(data.label_indices(split), probabilities, data.class_names)
    return scores, images


def load_trained_model(model_dir: Path) -> tuple[keras.Model, dict]:
    """A model saved by a training stage (safe mode: no code from the file runs), with its run record."""
    model_path = model_dir / MODEL_FILE
    if not model_path.exists():
        raise PipelineError(f"{model_path} is missing: run the training stages first (dvc repro)")
    return keras.models.load_model(model_path, safe_mode=True), read_json(model_dir / RUN_FILE)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    seed_everything(params.base.seed, tensorflow=True)
    data = read_split(Path(args.ingest), Path(args.split))
    tracking.connect(params.base.experiment_name)
    headline: dict = {}
    report: dict = {"class_names": data.class_names}
    for name, model_dir in zip(MODEL_NAMES, (args.custom, args.resnet50)):
        model, run_record = load_trained_model(Path(model_dir))
        scores, test_images = evaluate_model(model, data, params.base.image_size, params.base.channels,
                                             params.evaluate.batch_size)
        headline[name] = {split: {"accuracy": s.accuracy, "loss": s.loss} for split, s in scores.items()}
        report[name] = {split: {"accuracy": s.accuracy, "loss": s.loss, "per_class": s.per_class,
                                "confusion_matrix": s.confusion_matrix} for split, s in scores.items()}
        _write_test_predictions(Path(args.plots_dir) / f"confusion_{name}.csv", data, scores["test"])
        _log_to_run(run_record["run_id"], scores, data, test_images, name)
        log.info("%-9s accuracy  train %.4f  validation %.4f  test %.4f", name, scores["train"].accuracy,
                 scores["validation"].accuracy, scores["test"].accuracy)
    write_json(Path(args.metrics), headline)
    write_json(Path(args.report), report)


def _write_test_predictions(path: Path, data: SplitImages, scores: SplitScores) -> None:
    """One row per test image, actual and predicted label: DVC's confusion template reads this."""
    names = data.class_names
    frame = pd.DataFrame({"path": data.subset("test")["path"],
                          "actual": [names[i] for i in data.label_indices("test")],
                          "predicted": [names[i] for i in scores.predicted]})
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, lineterminator="\n")


def _log_to_run(run_id: str, scores: dict[str, SplitScores], data: SplitImages, test_images: np.ndarray,
                name: str) -> None:
    """The same numbers in the model's MLflow run, with the confusion matrix and the mistakes as pictures."""
    names = data.class_names
    actual = np.asarray(data.label_indices("test"))
    predicted = np.asarray(scores["test"].predicted)
    wrong = np.flatnonzero(actual != predicted)
    with tracking.resume_run(run_id):
        for split, s in scores.items():
            mlflow.log_metrics({f"{split}_accuracy": s.accuracy, f"{split}_loss": s.loss})
        mlflow.log_figure(figures.confusion_matrix(np.array(scores["test"].confusion_matrix), names,
                                                   f"{name}: test set"), "plots/confusion_matrix_test.png")
        mlflow.log_figure(figures.misclassified_grid(test_images[wrong], [names[i] for i in actual[wrong]],
                                                     [names[i] for i in predicted[wrong]],
                                                     f"{name}: misclassified test images (true -> predicted)"),
                          "plots/misclassified_test.png")


if __name__ == "__main__":
    parser = cli.stage_parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--ingest", default="data/ingest", help="ingest output folder")
    parser.add_argument("--split", default="data/split.csv", help="split manifest")
    parser.add_argument("--custom", default="models/custom", help="folder of the custom CNN")
    parser.add_argument("--resnet50", default="models/resnet50", help="folder of the ResNet50 model")
    parser.add_argument("--metrics", default="metrics/evaluate.json", help="accuracy and loss per model and split")
    parser.add_argument("--report", default="metrics/evaluate_report.json", help="per-class scores, confusion matrices")
    parser.add_argument("--plots-dir", default="metrics/plots", help="folder for the test-set prediction tables")
    cli.main_entry("evaluate", main, parser)
