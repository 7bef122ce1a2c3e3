"""How sure a model should be: calibration figures and temperature scaling.

A model is calibrated when, of the images it answers with confidence 0.9, nine in ten are right.
:func:`calibration` bins the test answers by confidence (the probability of the predicted class)
and gives the reliability diagram's points, the expected calibration error (ECE: the gap between
confidence and accuracy, averaged over the bins, weighted by their counts) and the Brier score,
from scikit-learn's ``calibration_curve`` and ``brier_score_loss``.

Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted on the validation
split: T > 1 softens an overconfident model, T < 1 sharpens an underconfident one; the predicted class
never changes. Dividing the kernel and bias of the final Dense layer (named ``output``) by T gives
``sigmoid(z / T)`` or ``softmax(z / T)`` exactly, so the saved model needs no custom layer, loads in
safe mode and serves calibrated probabilities as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_expit, log_softmax, logsumexp
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from pipeline.dataset import decode_predictions
from pipeline.errors import PipelineError

OUTPUT_LAYER = "output"    # the final Dense layer of every classifier (models._classifier_head)
BINS = 10                  # equal-width bins of confidence: the usual choice for the ECE
# The temperatures searched: far beyond any a trained network needs (typical: 0.5 to 5).
TEMPERATURE_RANGE = (0.01, 100.0)

Logits = np.ndarray | Sequence[np.ndarray]   # one array, or one per view of the same images


@dataclass(frozen=True)
class Calibration:
    """A reliability diagram's points and the two summary figures, for one model on one split."""

    ece: float                      # expected calibration error: 0 = calibrated
    brier: float                    # half the squared distance of the probabilities from the one-hot truth
    bin_edges: list[float]          # BINS + 1 edges of confidence, from 0 to 1
    counts: list[int]               # images per bin
    confidence: list[float | None]  # mean confidence per bin (None for an empty bin)
    accuracy: list[float | None]    # share right per bin (None for an empty bin)

    def to_json(self) -> dict:
        return {"ece": self.ece, "brier": self.brier, "bins": [
            {"low": low, "high": high, "count": count, "confidence": conf, "accuracy": acc}
            for low, high, count, conf, acc in zip(self.bin_edges[:-1], self.bin_edges[1:], self.counts,
                                                   self.confidence, self.accuracy)]}


def calibration(true_indices, probabilities: np.ndarray, bins: int = BINS) -> Calibration:
    """Reliability diagram, ECE and Brier score of a model's outputs (one sigmoid unit or a softmax).

    For more than two classes the diagram is the top-label one: confidence is the highest
    probability, and an answer is right when that class is the true one.
    """
    true = np.asarray(true_indices)
    predicted, full = decode_predictions(probabilities)
    # float32 softmax rows sum to 1 within a few ulps only, which scikit-learn warns about.
    full = full / np.maximum(full.sum(axis=1, keepdims=True), np.finfo(float).tiny)
    confidence = full[np.arange(len(true)), predicted]
    correct = (predicted == true).astype(int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # calibration_curve leaves out empty bins; its bin of a value: searchsorted on the inner edges.
    bin_of = np.searchsorted(edges[1:-1], confidence)
    counts = np.bincount(bin_of, minlength=bins)
    accuracy, mean_confidence = _curve(correct, confidence, bins)
    filled = np.flatnonzero(counts)
    per_bin_accuracy: list[float | None] = [None] * bins
    per_bin_confidence: list[float | None] = [None] * bins
    for position, index in enumerate(filled):
        per_bin_accuracy[index] = float(accuracy[position])
        per_bin_confidence[index] = float(mean_confidence[position])
    ece = float(np.sum(counts[filled] / len(true) * np.abs(accuracy - mean_confidence))) if len(true) else 0.0
    brier = float(brier_score_loss(true, full, labels=list(range(full.shape[1])), scale_by_half=True)) \
        if len(true) else 0.0
    return Calibration(ece, brier, edges.tolist(), counts.tolist(), per_bin_confidence, per_bin_accuracy)


def _curve(correct: np.ndarray, confidence: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean confidence of each non-empty bin (scikit-learn's ``calibration_curve``)."""
    if len(correct) == 0:
        return np.zeros(0), np.zeros(0)
    return calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")


def fit_temperature(logits: Logits, true_indices) -> float | None:
    """The temperature T that minimises the negative log-likelihood of ``logits / T``; None when the
    likelihood has no minimum inside :data:`TEMPERATURE_RANGE` (every validation image answered right
    drives T towards 0, which would serve every answer as certain).

    ``logits`` are the output layer's inputs to its activation: ``(n, 1)`` or ``(n,)`` for one
    sigmoid unit (two classes), ``(n, classes)`` for a softmax; or a list of such arrays, one per view
    of the same images, for a model that answers with the mean of its views' probabilities (an image
    and its mirror, say).
    """
    views = _views(logits)
    true = np.asarray(true_indices)
    if len(true) == 0:
        raise PipelineError("temperature scaling needs validation images, and the validation split is empty")
    low, high = np.log(TEMPERATURE_RANGE)
    def loss(log_t: float) -> float:
        return negative_log_likelihood([view / np.exp(log_t) for view in views], true)

    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    # No lower loss than at a bound (where the answers may be saturated to 0 and 1): no minimum inside.
    if min(loss(low), loss(high)) <= result.fun + 1e-12:
        return None
    return float(np.exp(result.x))


def negative_log_likelihood(logits: Logits, true_indices) -> float:
    """Mean cross-entropy of the answers ``logits`` stand for (sigmoid for one column, else softmax;
    for a list of views, the mean of their probabilities)."""
    true = np.asarray(true_indices)
    truth = np.stack([_log_probability_of(true, view) for view in _views(logits)])
    return float(-np.mean(logsumexp(truth, axis=0) - np.log(len(truth))))


def _log_probability_of(true: np.ndarray, logits: np.ndarray) -> np.ndarray:
    if logits.shape[-1] == 1:
        z = logits[:, 0]
        return np.where(true == 1, log_expit(z), log_expit(-z))
    return log_softmax(logits, axis=1)[np.arange(len(true)), true]


def _views(logits: Logits) -> list[np.ndarray]:
    views = logits if isinstance(logits, (list, tuple)) else [logits]
    arrays = [np.asarray(view, dtype=np.float64) for view in views]
    return [array if array.ndim == 2 else array.reshape(-1, 1) for array in arrays]   # (n,): one sigmoid unit


def classifier_of(model: keras.Model) -> keras.Model:
    """The model that holds the final Dense layer named ``output``: the model itself, or the
    innermost model nested in it that does (a wrapper that averages its classifier's answers, say)."""
    if any(layer.name == OUTPUT_LAYER and not isinstance(layer, keras.Model) for layer in model.layers):
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            try:
                return classifier_of(layer)
            except PipelineError:
                continue
    raise PipelineError(f"model {model.name} has no layer named {OUTPUT_LAYER!r}: not built by pipeline.models")


def output_logits(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The classifier's logits (its output layer's inputs to the sigmoid or softmax) for raw images,
    at inference (augmentation off)."""
    classifier = classifier_of(model)
    head = classifier.get_layer(OUTPUT_LAYER)
    # Called eagerly, batch by batch: ``predict`` would trace a new function for each such
    # throw-away model, and TensorFlow warns about the retracing.
    extractor = keras.Model(classifier.input, head.input)
    pixels = np.asarray(images, dtype=np.float32)
    features = np.concatenate([keras.ops.convert_to_numpy(extractor(pixels[start:start + batch_size], training=False))
                               for start in range(0, len(pixels), batch_size)]) if len(pixels) else \
        np.zeros((0, head.input.shape[-1]), dtype=np.float32)
    kernel, bias = head.get_weights()
    return np.asarray(features, dtype=np.float64) @ kernel + bias


def apply_temperature(model: keras.Model, temperature: float) -> None:
    """Divide the output layer's kernel and bias by ``temperature``, in place: the model then answers
    ``sigmoid(z / T)`` or ``softmax(z / T)``. ``1 / T`` undoes it."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise PipelineError(f"a temperature must be a positive number, got {temperature}")
    head = classifier_of(model).get_layer(OUTPUT_LAYER)
    head.set_weights([weight / temperature for weight in head.get_weights()])
