"""Stage ``evaluate``: the scores it computes from a model's outputs, and its failure case."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.calibration import apply_temperature, calibration
from pipeline.dataset import load_images
from pipeline.errors import PipelineError
from pipeline.evaluate import (
    calibration_without_temperature,
    evaluate_model,
    gradcam_panels,
    load_trained_model,
    most_confident_mistakes,
    score_predictions,
    surest_answers,
)
from pipeline.manifest import SPLITS, read_split
from tests.stage_runner import prepare_split
from tests.test_calibration import tiny_classifier
from tests.test_gradcam import corner_classifier, corner_image


def test_scores_from_softmax_outputs() -> None:
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]])
    scores = score_predictions([0, 1, 2, 2], probabilities, ["cat", "dog", "fox"])
    assert scores.predicted == [0, 1, 1, 2]
    assert scores.accuracy == 0.75
    assert scores.confusion_matrix == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert scores.per_class["fox"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores.per_class["dog"]["precision"] == 0.5
    assert scores.loss == pytest.approx(-np.mean(np.log([0.8, 0.7, 0.3, 0.7])))


def test_scores_from_one_sigmoid_unit_for_two_classes() -> None:
    scores = score_predictions([1, 0, 1], np.array([[0.9], [0.2], [0.4]]), ["cat", "dog"])
    assert scores.predicted == [1, 0, 0]
    assert scores.accuracy == pytest.approx(2 / 3)
    assert scores.loss == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4])))


def test_a_class_that_is_never_predicted_scores_zero_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = score_predictions([0, 0, 1], np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]]), ["cat", "dog"])
    assert scores.per_class["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert math.isfinite(scores.loss)


def test_a_missing_model_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"model.keras is missing: run the training stages first \(dvc repro\)"):
        load_trained_model(tmp_path / "models/custom")


def test_every_split_is_scored_on_its_own_images(tmp_path: Path, image_folder: Path, raw_params: dict) -> None:
    """Each class of the fixture is one dominant colour, so a model that answers "the strongest
    channel" is right on every image: any mix-up of a split's images and labels shows as a miss."""
    prepare_split(tmp_path, image_folder, raw_params)
    data = read_split(tmp_path / "data/ingest", tmp_path / "data/split.csv")
    assert len(data.class_names) == 3
    dominant_channel = keras.layers.Dense(3, activation="softmax")
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(), dominant_channel])
    dominant_channel.set_weights([np.eye(3, dtype=np.float32) * 0.5, np.zeros(3, dtype=np.float32)])

    scores, test_images = evaluate_model(model, data, image_size=16, channels=3, batch_size=8)

    assert list(scores) == list(SPLITS)
    for split in SPLITS:
        labels = data.label_indices(split)
        matrix = np.array(scores[split].confusion_matrix)
        assert matrix.sum(axis=1).tolist() == np.bincount(labels, minlength=3).tolist(), split
        assert scores[split].accuracy == 1.0 and scores[split].predicted == labels, split
    assert np.array_equal(test_images, load_images(data.paths("test"), 16, 3))


def test_the_most_confident_mistakes_come_first_for_each_class() -> None:
    probabilities = np.array([[0.9, 0.1],    # cat, right
                              [0.3, 0.7],    # cat, wrong at 0.7
                              [0.05, 0.95],  # cat, wrong at 0.95
                              [0.4, 0.6],    # cat, wrong at 0.6
                              [0.45, 0.55],  # cat, wrong at 0.55: fourth, left out
                              [0.8, 0.2],    # dog, wrong at 0.8
                              [0.1, 0.9]])   # dog, right
    true = [0, 0, 0, 0, 0, 1, 1]
    scores = score_predictions(true, probabilities, ["cat", "dog"])
    assert scores.confidence == pytest.approx([0.9, 0.7, 0.95, 0.6, 0.55, 0.8, 0.9])
    assert most_confident_mistakes(true, scores) == [2, 1, 3, 5]
    assert most_confident_mistakes([0, 1], score_predictions([0, 1], np.eye(2), ["a", "b"])) == []


def test_each_split_carries_its_calibration() -> None:
    scores = score_predictions([1, 1, 0, 0, 1, 0], np.array([[0.85], [0.85], [0.15], [0.85], [0.65], [0.65]]),
                               ["cat", "dog"])
    assert scores.calibration.ece == pytest.approx(0.1 * 4 / 6 + 0.15 * 2 / 6)


def test_the_surest_right_and_wrong_answers_of_each_class() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.4, 0.6]])
    true = [0, 0, 0, 1, 1, 1]
    scores = score_predictions(true, probabilities, ["cat", "dog"])
    assert surest_answers(true, scores, right=True, per_class=1) == {0: [0], 1: [3]}
    assert surest_answers(true, scores, right=True) == {0: [0, 2], 1: [3, 5, 4]}
    assert surest_answers(true, scores, right=False) == {0: [1], 1: []}


def test_each_panel_shows_its_own_photo_and_heatmap() -> None:
    """The corner model (class 1: a red top-right corner) on a photo it gets right and one with a
    faint red corner it gets wrong: each panel's heatmap is that photo's, for the class answered."""
    red_corner = corner_image()
    faint = corner_image()
    faint[..., 0] = 0
    faint[0, -1, 0] = 200.0     # one reddish pixel: evidence for "red", too little to outweigh the bias
    images = np.stack([red_corner, faint])
    model = corner_classifier()
    scores = score_predictions([1, 1], model.predict(images, verbose=0), ["plain", "red"])
    assert scores.predicted == [1, 0]

    ((wrong, right),) = gradcam_panels(model, images, [1, 1], scores, ["plain", "red"])
    assert [panel.caption.rsplit(" ", 1)[0] for panel in (*wrong, *right)] == ["red -> plain", "red -> red"]
    assert wrong[0].right is False and right[0].right is True
    assert np.array_equal(right[0].image, red_corner) and np.array_equal(wrong[0].image, faint)
    assert right[0].heatmap[:4, -4:].min() > 0.9 and right[0].heatmap[-4:, :4].max() < 0.05
    assert right[0].caption.endswith(f"{scores.confidence[0]:.2f}")
    # The heatmap of the answer "plain": the reddish pixel is evidence against it, so there is none
    # (the true class's heatmap would light that pixel).
    assert wrong[0].heatmap.max() == 0.0


def test_the_calibration_without_temperature_is_measured_and_the_model_restored() -> None:
    model = tiny_classifier(3)
    pixels = np.random.default_rng(5).uniform(0, 255, (40, 4, 4, 1)).astype(np.float32)
    true = np.random.default_rng(6).integers(0, 3, 40)
    untempered = model.predict(pixels, verbose=0)
    apply_temperature(model, 2.0)
    tempered = model.predict(pixels, verbose=0)

    before = calibration_without_temperature(model, pixels, true, 2.0, batch_size=16)
    assert before.ece == pytest.approx(calibration(true, untempered).ece, abs=1e-6)
    assert before.brier == pytest.approx(calibration(true, untempered).brier, abs=1e-6)
    assert before.ece != pytest.approx(calibration(true, tempered).ece, abs=1e-3)
    np.testing.assert_allclose(model.predict(pixels, verbose=0), tempered, rtol=1e-5)
    assert calibration_without_temperature(model, pixels, true, 1.0, batch_size=16) is None
