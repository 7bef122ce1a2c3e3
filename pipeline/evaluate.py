"""Stage ``evaluate``: both models on all three splits, with scikit-learn's metrics.

Writes the headline numbers (accuracy, balanced accuracy, macro F1 and loss per model and split) as
a DVC metric, a full report (per-class precision / recall / F1, confusion matrices), every model's
answer for every image (what the gate's statistics read), the test-set predictions DVC draws as
confusion matrices, and adds the same numbers and pictures to each model's MLflow run.
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
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

from pipeline import cli, figures, statistics, tracking
from pipeline.artifacts import MODEL_FILE, RunRecord, SplitPredictions, write_predictions
from pipeline.dataset import decode_predictions, load_images
from pipeline.errors import PipelineError
from pipeline.files import write_csv, write_json
from pipeline.manifest import SPLITS, SplitImages, read_split
from pipeline.model_table import MODELS
from pipeline.params import load_params
from pipeline.seeding import seed_everything

log = logging.getLogger("pipeline.evaluate")


@dataclass(frozen=True)
class SplitScores:
    """How one model did on one split."""

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    loss: float
    per_class: dict
    confusion_matrix: list[list[int]]
    predicted: list[int]
    confidence: list[float]   # the probability the model gave its predicted class, per image


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
    return SplitScores(statistics.score("accuracy", true, predicted),
                       statistics.score("balanced_accuracy", true, predicted),
                       statistics.score("macro_f1", true, predicted), loss, per_class,
                       confusion_matrix(true, predicted, labels=labels).tolist(), predicted.tolist(),
                       full[np.arange(len(predicted)), predicted].tolist())


def most_confident_mistakes(true_indices: Sequence[int], scores: SplitScores, per_class: int = 3) -> list[int]:
    """Indices of the wrongly predicted images the model was surest of, up to ``per_class`` for each
    true class (class order, surest first): a wrong label in the data shows up here first."""
    true = np.asarray(true_indices)
    predicted, confidence = np.asarray(scores.predicted), np.asarray(scores.confidence)
    chosen: list[int] = []
    for label in sorted(set(true.tolist())):
        wrong = np.flatnonzero((true == label) & (predicted != label))
        chosen.extend(wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class].tolist())
    return chosen


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


def load_trained_model(model_dir: Path) -> tuple[keras.Model, RunRecord]:
    """A model saved by a training stage (safe mode: no code from the file runs), with its run record."""
    model_path = model_dir / MODEL_FILE
    if not model_path.exists():
        raise PipelineError(f"{model_path} is missing: run the training stages first (dvc repro)")
    return keras.models.load_model(model_path, safe_mode=True), RunRecord.read(model_dir)


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    seed_everything(params.base.seed, tensorflow=True)
    data = read_split(Path(args.ingest), Path(args.split))
    tracking.connect(params.base.experiment_name)
    headline: dict = {}
    report: dict = {"class_names": data.class_names}
    for spec in MODELS:
        name = spec.name
        model, run_record = load_trained_model(Path(args.models) / spec.folder)
        scores, test_images = evaluate_model(model, data, params.base.image_size, params.base.channels,
                                             params.evaluate.batch_size)
        headline[name] = {split: {"accuracy": s.accuracy, "balanced_accuracy": s.balanced_accuracy,
                                  "macro_f1": s.macro_f1, "loss": s.loss} for split, s in scores.items()}
        report[name] = {split: {"accuracy": s.accuracy, "loss": s.loss, "per_class": s.per_class,
                                "confusion_matrix": s.confusion_matrix} for split, s in scores.items()}
        write_predictions(Path(args.predictions) / f"{name}.csv", answers(data, scores))
        _write_test_predictions(Path(args.plots_dir) / f"confusion_{name}.csv", data, scores["test"])
        _log_to_run(run_record.run_id, scores, data, test_images, name, Path(args.plots_dir))
        log.info("%-9s accuracy  train %.4f  validation %.4f  test %.4f", name, scores["train"].accuracy,
                 scores["validation"].accuracy, scores["test"].accuracy)
    write_json(Path(args.metrics), headline)
    write_json(Path(args.report), report)


def answers(data: SplitImages, scores: dict[str, SplitScores]) -> dict[str, SplitPredictions]:
    """Each split's images with their true and predicted class names, for the gate's statistics."""
    names = data.class_names
    return {split: SplitPredictions(tuple(data.subset(split)["path"]),
                                    tuple(names[i] for i in data.label_indices(split)),
                                    tuple(names[i] for i in split_scores.predicted))
            for split, split_scores in scores.items()}


def _write_test_predictions(path: Path, data: SplitImages, scores: SplitScores) -> None:
    """One row per test image, actual and predicted label: DVC's confusion template reads this."""
    names = data.class_names
    write_csv(path, ["path", "actual", "predicted"],
              zip(data.subset("test")["path"], [names[i] for i in data.label_indices("test")],
                  [names[i] for i in scores.predicted]))


def _log_to_run(run_id: str, scores: dict[str, SplitScores], data: SplitImages, test_images: np.ndarray,
                name: str, plots_dir: Path) -> None:
    """The same numbers in the model's MLflow run, with the confusion matrix and the mistakes as pictures
    (those two also as PNG files in ``plots_dir``, for DVC)."""
    names = data.class_names
    actual = np.asarray(data.label_indices("test"))
    predicted = np.asarray(scores["test"].predicted)
    wrong = np.flatnonzero(actual != predicted)
    confusion = figures.confusion_matrix(np.array(scores["test"].confusion_matrix), names, f"{name}: test set")
    mistakes = figures.misclassified_grid(test_images[wrong], [names[i] for i in actual[wrong]],
                                          [names[i] for i in predicted[wrong]],
                                          f"{name}: misclassified test images (true -> predicted)")
    figures.save_png(confusion, plots_dir / f"confusion_{name}.png")
    figures.save_png(mistakes, plots_dir / f"misclassified_{name}.png")
    with tracking.resume_run(run_id):
        for split, s in scores.items():
            mlflow.log_metrics({f"{split}_accuracy": s.accuracy, f"{split}_balanced_accuracy": s.balanced_accuracy,
                                f"{split}_macro_f1": s.macro_f1, f"{split}_loss": s.loss})
        mlflow.log_figure(confusion, "plots/confusion_matrix_test.png")
        mlflow.log_figure(mistakes, "plots/misclassified_test.png")
        surest = most_confident_mistakes(actual, scores["test"])
        confidence = np.asarray(scores["test"].confidence)
        mlflow.log_figure(figures.misclassified_grid(test_images[surest], [names[i] for i in actual[surest]],
                                                     [f"{names[i]} {p:.2f}" for i, p in
                                                      zip(predicted[surest], confidence[surest])],
                                                     f"{name}: most confidently wrong test images per class "
                                                     "(true -> predicted probability)"),
                          "plots/most_confident_mistakes_test.png")


if __name__ == "__main__":
    parser = cli.stage_parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--ingest", default="data/ingest", help="ingest output folder")
    parser.add_argument("--split", default="data/split.csv", help="split manifest")
    parser.add_argument("--models", default="models", help="folder holding one folder per trained model")
    parser.add_argument("--metrics", default="metrics/evaluate.json", help="accuracy and loss per model and split")
    parser.add_argument("--report", default="metrics/evaluate_report.json", help="per-class scores, confusion matrices")
    parser.add_argument("--predictions", default="data/predictions",
                        help="folder for each model's answer on every image (<model>.csv)")
    parser.add_argument("--plots-dir", default="metrics/plots",
                        help="folder for the test-set prediction tables and pictures")
    cli.main_entry("evaluate", main, parser)
