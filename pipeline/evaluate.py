"""Stage ``evaluate``: both models on all three splits, with scikit-learn's metrics.

Writes the headline numbers (accuracy, balanced accuracy, macro F1, loss, expected calibration error
and Brier score per model and split; the temperature and the test figures without it) as a DVC
metric, a full report (per-class precision / recall / F1, confusion matrices, reliability bins),
every model's answer for every image (what the gate's statistics read), the test-set predictions DVC
draws as confusion matrices, and adds the same numbers and pictures (confusion matrix, mistakes,
Grad-CAM of the surest mistakes and successes, reliability diagram) to each model's MLflow run.
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

from pipeline import calibration, cli, figures, statistics, tracking
from pipeline.artifacts import MODEL_FILE, RunRecord, SplitPredictions, write_predictions
from pipeline.dataset import decode_predictions, load_images
from pipeline.errors import PipelineError
from pipeline.files import write_csv, write_json
from pipeline.gradcam import gradcam
from pipeline.manifest import SPLITS, SplitImages, read_split
from pipeline.model_table import MODELS
from pipeline.params import load_params
from pipeline.seeding import seed_everything

log = logging.getLogger("pipeline.evaluate")

GRADCAM_PER_CLASS = 3      # photos on each side of a class's row in the Grad-CAM picture
GRADCAM_MAX_CLASSES = 10   # rows: the first classes (by name) of data sets with more


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
    calibration: calibration.Calibration


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
                       full[np.arange(len(predicted)), predicted].tolist(), calibration.calibration(true, full))


def most_confident_mistakes(true_indices: Sequence[int], scores: SplitScores, per_class: int = 3) -> list[int]:
    """Indices of the wrongly predicted images the model was surest of, up to ``per_class`` for each
    true class (class order, surest first): a wrong label in the data shows up here first."""
    return [index for chosen in surest_answers(true_indices, scores, False, per_class).values() for index in chosen]


def surest_answers(true_indices: Sequence[int], scores: SplitScores, right: bool,
                   per_class: int = 3) -> dict[int, list[int]]:
    """For each true class (in class order), the indices of up to ``per_class`` images the model
    answered wrongly (``right`` false) or rightly, surest first."""
    true = np.asarray(true_indices)
    predicted, confidence = np.asarray(scores.predicted), np.asarray(scores.confidence)
    chosen: dict[int, list[int]] = {}
    for label in sorted(set(true.tolist())):
        found = np.flatnonzero((true == label) & ((predicted == label) == right))
        chosen[label] = found[np.argsort(-confidence[found], kind="stable")][:per_class].tolist()
    return chosen


def calibration_without_temperature(model: keras.Model, images: np.ndarray, true_indices: Sequence[int],
                                    temperature: float, batch_size: int) -> calibration.Calibration | None:
    """The calibration the model had before temperature scaling (None when it has none): its output
    layer multiplied back by the temperature in memory, for one prediction, then restored."""
    if temperature == 1.0:
        return None
    calibration.apply_temperature(model, 1.0 / temperature)
    try:
        raw = model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)
    finally:
        calibration.apply_temperature(model, temperature)
    return calibration.calibration(true_indices, raw)


def gradcam_panels(model: keras.Model, images: np.ndarray, true_indices: Sequence[int], scores: SplitScores,
                   class_names: Sequence[str], per_class: int = GRADCAM_PER_CLASS,
                   max_classes: int = GRADCAM_MAX_CLASSES) -> list[tuple[list[figures.HeatmapPanel],
                                                                          list[figures.HeatmapPanel]]]:
    """Per class, its surest mistakes and its surest right answers, each with the Grad-CAM heatmap of
    the class the model answered."""
    wrong = surest_answers(true_indices, scores, False, per_class)
    right = surest_answers(true_indices, scores, True, per_class)
    labels = sorted(wrong)[:max_classes]
    chosen = [index for label in labels for index in (*wrong[label], *right[label])]
    predicted = np.asarray(scores.predicted)
    heatmaps = dict(zip(chosen, gradcam(model, images[chosen], predicted[chosen]))) if chosen else {}

    def panel(index: int, is_right: bool) -> figures.HeatmapPanel:
        caption = (f"{class_names[true_indices[index]]} -> {class_names[predicted[index]]} "
                   f"{scores.confidence[index]:.2f}")
        return figures.HeatmapPanel(images[index], heatmaps[index], caption, is_right)

    return [([panel(i, False) for i in wrong[label]], [panel(i, True) for i in right[label]]) for label in labels]


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
    plots_dir = Path(args.plots_dir)
    for spec in MODELS:
        name = spec.name
        model, run_record = load_trained_model(Path(args.models) / spec.folder)
        scores, test_images = evaluate_model(model, data, params.base.image_size, params.base.channels,
                                             params.evaluate.batch_size)
        temperature = run_record.temperature
        before = calibration_without_temperature(model, test_images, data.label_indices("test"), temperature,
                                                 params.evaluate.batch_size)
        headline[name] = {split: {"accuracy": s.accuracy, "balanced_accuracy": s.balanced_accuracy,
                                  "macro_f1": s.macro_f1, "loss": s.loss, "ece": s.calibration.ece,
                                  "brier": s.calibration.brier} for split, s in scores.items()}
        headline[name]["temperature"] = temperature
        if before is not None:
            headline[name]["test_without_temperature"] = {"ece": before.ece, "brier": before.brier}
        pictures = {"gradcam": plots_dir / f"gradcam_{name}.png", "reliability": plots_dir / f"reliability_{name}.png"}
        report[name] = {split: {"accuracy": s.accuracy, "loss": s.loss, "per_class": s.per_class,
                                "confusion_matrix": s.confusion_matrix} for split, s in scores.items()}
        report[name]["calibration"] = {
            "temperature": temperature, "test": scores["test"].calibration.to_json(),
            "test_without_temperature": before.to_json() if before else None,
            "pictures": {kind: path.as_posix() for kind, path in pictures.items()}}
        write_predictions(Path(args.predictions) / f"{name}.csv", answers(data, scores))
        _write_test_predictions(plots_dir / f"confusion_{name}.csv", data, scores["test"])
        _log_to_run(run_record.run_id, scores, data, test_images, name, plots_dir)
        _log_calibration(run_record.run_id, model, scores["test"], before, temperature, data, test_images, name,
                         pictures)
        log.info("%-9s accuracy  train %.4f  validation %.4f  test %.4f; test ECE %.4f, Brier %.4f%s", name,
                 scores["train"].accuracy, scores["validation"].accuracy, scores["test"].accuracy,
                 scores["test"].calibration.ece, scores["test"].calibration.brier,
                 f" (temperature {temperature:.3f}; without it ECE {before.ece:.4f}, Brier {before.brier:.4f})"
                 if before else "")
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
    figures.save_png(mistakes, plots_dir / f"misclassified_{name}.png", colours=256)   # photos: 780 KB -> 250 KB
    with tracking.resume_run(run_id):
        for split, s in scores.items():
            mlflow.log_metrics({f"{split}_accuracy": s.accuracy, f"{split}_balanced_accuracy": s.balanced_accuracy,
                                f"{split}_macro_f1": s.macro_f1, f"{split}_loss": s.loss,
                                f"{split}_ece": s.calibration.ece, f"{split}_brier": s.calibration.brier})
        tracking.log_saved_file(plots_dir / f"confusion_{name}.png", "plots/confusion_matrix_test.png")
        tracking.log_saved_file(plots_dir / f"misclassified_{name}.png", "plots/misclassified_test.png")
        surest = most_confident_mistakes(actual, scores["test"])
        confidence = np.asarray(scores["test"].confidence)
        mlflow.log_figure(figures.misclassified_grid(test_images[surest], [names[i] for i in actual[surest]],
                                                     [f"{names[i]} {p:.2f}" for i, p in
                                                      zip(predicted[surest], confidence[surest])],
                                                     f"{name}: most confidently wrong test images per class "
                                                     "(true -> predicted probability)"),
                          "plots/most_confident_mistakes_test.png")



def _log_calibration(run_id: str, model: keras.Model, test: SplitScores, before: calibration.Calibration | None,
                     temperature: float, data: SplitImages, test_images: np.ndarray, name: str,
                     pictures: dict[str, Path]) -> None:
    """The Grad-CAM picture and the reliability diagram: PNG files for DVC and figures in the MLflow run,
    with the test figures without the temperature when the model has one."""
    true = data.label_indices("test")
    heat = figures.gradcam_grid(gradcam_panels(model, test_images, true, test, data.class_names),
                                GRADCAM_PER_CLASS, f"{name}: test set")
    reliability = figures.reliability_diagram(test.calibration, f"{name}: reliability on the test set", before,
                                              temperature)
    figures.save_png(heat, pictures["gradcam"], colours=256)
    figures.save_png(reliability, pictures["reliability"])
    with tracking.resume_run(run_id):
        tracking.log_saved_file(pictures["gradcam"], "plots/gradcam_test.png")
        tracking.log_saved_file(pictures["reliability"], "plots/reliability_test.png")
        if before is not None:
            mlflow.log_metrics({"test_ece_without_temperature": before.ece,
                                "test_brier_without_temperature": before.brier})


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
