"""Calibration: ECE and Brier score on hand-made answers, temperature scaling fitted and carried by the
saved model."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from scipy.special import expit, softmax

from pipeline.artifacts import DeployedModel
from pipeline.calibration import (
    apply_temperature,
    calibration,
    fit_temperature,
    negative_log_likelihood,
    output_logits,
)
from pipeline.errors import PipelineError
from pipeline.serving import classify


def test_ece_and_brier_of_one_sigmoid_unit_by_hand() -> None:
    # Four answers at confidence 0.85 (one of them "class 0" at p = 0.15), three right; two at 0.65, one right.
    outputs = np.array([[0.85], [0.85], [0.15], [0.85], [0.65], [0.65]])
    result = calibration([1, 1, 0, 0, 1, 0], outputs)
    # |0.75 - 0.85| * 4/6 + |0.5 - 0.65| * 2/6
    assert result.ece == pytest.approx(0.1 * 4 / 6 + 0.15 * 2 / 6)
    # the mean of (p - y)^2: three 0.15^2, then 0.85^2, 0.35^2, 0.65^2
    assert result.brier == pytest.approx((3 * 0.0225 + 0.7225 + 0.1225 + 0.4225) / 6)
    assert result.counts == [0, 0, 0, 0, 0, 0, 2, 0, 4, 0]
    assert result.accuracy[8] == pytest.approx(0.75) and result.confidence[8] == pytest.approx(0.85)
    assert result.accuracy[6] == pytest.approx(0.5) and result.accuracy[0] is None
    assert result.to_json()["bins"][8] == {"low": pytest.approx(0.8), "high": pytest.approx(0.9), "count": 4,
                                           "confidence": pytest.approx(0.85), "accuracy": pytest.approx(0.75)}


def test_ece_and_brier_of_a_softmax_by_hand() -> None:
    outputs = np.array([[0.75, 0.15, 0.10], [0.75, 0.15, 0.10], [0.20, 0.35, 0.45]])
    result = calibration([0, 1, 2], outputs)
    # Top label: two at 0.75, one right; one at 0.45, right.
    assert result.ece == pytest.approx(0.25 * 2 / 3 + 0.55 / 3)
    # Half the squared distance from the one-hot truth, averaged.
    squared = [0.25**2 + 0.15**2 + 0.1**2, 0.75**2 + 0.85**2 + 0.1**2, 0.2**2 + 0.35**2 + 0.55**2]
    assert result.brier == pytest.approx(np.mean(squared) / 2)
    assert result.counts[7] == 2 and result.counts[4] == 1 and sum(result.counts) == 3


def test_a_calibrated_model_has_a_small_ece_and_an_overconfident_one_a_large_one() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 20_000)
    right = rng.uniform(size=p.size) < p                     # right as often as it says
    outputs = np.where(right, p, 1 - p)[:, None]              # class 1 is the truth throughout
    assert calibration(np.ones(p.size, dtype=int), outputs).ece < 0.01
    overconfident = np.where(right, 0.99, 0.01)[:, None]      # says 0.99 when it is right 75 % of the time
    assert calibration(np.ones(p.size, dtype=int), overconfident).ece == pytest.approx(0.99 - right.mean(), abs=1e-9)


@pytest.mark.parametrize("classes, temperature", [(3, 2.5), (2, 0.5), (1, 1.7)])
def test_temperature_scaling_recovers_the_temperature_that_made_the_answers(classes: int,
                                                                            temperature: float) -> None:
    """Labels drawn from softmax(z / T) (one sigmoid unit when ``classes`` is 1): the fit finds T."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, (20_000, classes))
    if classes == 1:
        labels = (rng.uniform(size=len(logits)) < expit(logits[:, 0] / temperature)).astype(int)
    else:
        probabilities = softmax(logits / temperature, axis=1)
        labels = np.array([rng.choice(classes, p=row) for row in probabilities])
    assert fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.05)


def test_for_a_model_that_averages_two_views_the_temperature_of_the_average_is_found() -> None:
    """A flip-averaging model answers with the mean of sigmoid(z / T) on the image and its mirror:
    the fit on both views finds T, the fit on one view alone does not."""
    rng = np.random.default_rng(4)
    image = rng.normal(0.0, 3.0, (20_000, 1))
    mirror = image + rng.normal(0.0, 3.0, image.shape)       # the mirror's answer differs, not wholly
    answer = (expit(image / 0.7) + expit(mirror / 0.7)) / 2
    labels = (rng.uniform(size=len(image)) < answer[:, 0]).astype(int)
    assert fit_temperature([image, mirror], labels) == pytest.approx(0.7, rel=0.05)
    assert fit_temperature(image, labels) != pytest.approx(0.7, rel=0.1)
    assert negative_log_likelihood([image, image], labels) == pytest.approx(negative_log_likelihood(image, labels))


def test_no_temperature_is_fitted_when_every_validation_image_is_answered_right() -> None:
    """Then the log loss falls all the way to T -> 0: the bound would serve every answer as certain."""
    assert fit_temperature(np.array([[0.4], [0.9], [0.2]]), [1, 1, 1]) is None
    assert fit_temperature(np.array([[0.3], [-0.2]]), [1, 0]) is None
    assert fit_temperature(np.array([[2.0, 0.0], [0.0, 1.0]]), [0, 1]) is None
    # Every one wrong, or no better than chance: the loss falls towards T -> infinity (answers of one half).
    assert fit_temperature(np.array([[0.3], [-0.2], [0.5]]), [0, 1, 1]) is None
    # One sure mistake among right answers: a minimum inside the range.
    assert fit_temperature(np.array([[3.0], [-3.0], [2.0], [-1.0]]), [1, 0, 0, 0]) == pytest.approx(1.99, abs=0.01)


def test_an_empty_validation_split_cannot_fit_a_temperature() -> None:
    with pytest.raises(PipelineError, match="validation split is empty"):
        fit_temperature(np.zeros((0, 3)), [])


def tiny_classifier(units: int) -> keras.Model:
    inputs = keras.Input((4, 4, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    x = keras.layers.Flatten()(x)
    output = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax", name="output")(x)
    model = keras.Model(inputs, output)
    rng = np.random.default_rng(2)
    model.get_layer("output").set_weights([rng.normal(0, 3, (16, units)).astype(np.float32),
                                           rng.normal(0, 1, units).astype(np.float32)])
    return model


@pytest.mark.parametrize("units", [3, 1])
def test_the_saved_model_with_a_temperature_loads_safely_and_serves_probabilities(tmp_path: Path, units: int) -> None:
    model = tiny_classifier(units)
    pixels = np.random.default_rng(3).uniform(0, 255, (8, 4, 4, 1)).astype(np.float32)
    logits = output_logits(model, pixels, batch_size=4)
    apply_temperature(model, 2.0)
    model.save(tmp_path / "model.keras")

    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    served = loaded.predict(pixels, verbose=0)
    expected = expit(logits / 2.0) if units == 1 else softmax(logits / 2.0, axis=1)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    names = ["cat", "dog"] if units == 1 else ["cat", "dog", "fox"]
    for answer in classify(loaded, pixels, DeployedModel(names, 4, 1)):
        assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    apply_temperature(loaded, 0.5)   # 1 / T undoes it
    untempered = expit(logits) if units == 1 else softmax(logits, axis=1)
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), untempered, rtol=1e-5, atol=1e-6)


def test_the_temperature_reaches_a_classifier_nested_in_a_wrapper() -> None:
    classifier = tiny_classifier(3)
    inputs = keras.Input((4, 4, 1))
    wrapper = keras.Model(inputs, keras.layers.Average()([classifier(inputs), classifier(inputs)]))
    pixels = np.full((2, 4, 4, 1), 100.0, dtype=np.float32)
    logits = output_logits(wrapper, pixels, batch_size=2)
    apply_temperature(wrapper, 3.0)
    np.testing.assert_allclose(wrapper.predict(pixels, verbose=0), softmax(logits / 3.0, axis=1), rtol=1e-5)
    with pytest.raises(PipelineError, match="positive"):
        apply_temperature(wrapper, 0.0)


def test_the_training_stage_fits_a_flip_averaged_model_to_what_it_serves(tmp_path: Path) -> None:
    """``training.calibrate`` on a model that averages an image and its mirror: the temperature it
    builds in is the one that minimises the served model's own validation log loss."""
    import pandas as pd
    from PIL import Image

    from pipeline.manifest import SplitImages
    from pipeline.models import with_flip_averaging
    from pipeline.params import load_params
    from pipeline.training import calibrate

    rng = np.random.default_rng(4)
    pixels = (rng.integers(0, 2, (120, 4, 4, 1)) * 255).astype(np.uint8)
    model = with_flip_averaging(tiny_classifier(3))
    # Labels the model mostly gets right, a fifth of them wrong (all "cat", which it never answers):
    # the best temperature lies inside its range, and every class is present.
    labels = np.argmax(model.predict(pixels.astype(np.float32), verbose=0), axis=1)
    labels[::5] = 0
    assert np.bincount(labels, minlength=3).min() > 0
    rows = []
    for i, image in enumerate(pixels):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": ["cat", "dog", "fox"][labels[i]], "split": "validation"})
    data = SplitImages(tmp_path, pd.DataFrame(rows))
    base = load_params(Path(__file__).parents[1] / "params.yaml").base
    base = type(base)(**{**base.__dict__, "image_size": 4, "channels": 1})
    result = calibrate(model, data, base, batch_size=8, flip_averaged=True)
    pixels = pixels.astype(np.float32)

    def served_log_loss() -> float:
        answers = model.predict(pixels, verbose=0)
        return float(-np.mean(np.log(answers[np.arange(len(labels)), labels])))

    assert served_log_loss() == pytest.approx(result["val_loss_after_temperature"], rel=1e-4)
    for factor in (1.2, 1 / 1.2):      # a temperature a little off either way serves a worse log loss
        apply_temperature(model, factor)
        assert served_log_loss() > result["val_loss_after_temperature"]
        apply_temperature(model, 1 / factor)


def test_logits_of_many_models_in_a_row_print_no_retracing_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The training stage takes logits of a fresh extractor for every view and model; TensorFlow's
    "triggered tf.function retracing" warning is nothing a user can act on, and must not appear."""
    pixels = np.random.default_rng(5).uniform(0, 255, (6, 4, 4, 1)).astype(np.float32)
    with caplog.at_level("WARNING"):
        for _ in range(7):
            output_logits(tiny_classifier(3), pixels, batch_size=4)
    assert not [record for record in caplog.records if "retracing" in record.getMessage()]
