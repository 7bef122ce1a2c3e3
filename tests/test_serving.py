"""The deployed model as clients use it: requests in, named predictions out, and the MLflow model."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

import pipeline.serving
from pipeline.artifacts import DeployedModel
from pipeline.serving import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES_PER_REQUEST,
    classify,
    log_serving_model,
    pixels_from_request,
    predictions_frame,
)
from tests.hostile import encode_image

INFO = DeployedModel(class_names=["cat", "dog"], image_size=8, channels=3)


def _png(size: tuple[int, int] = (20, 12), mode: str = "RGB") -> bytes:
    return encode_image(Image.new(mode, size, 128), "PNG")


# --- pixels_from_request ------------------------------------------------------------------------

def test_image_bytes_and_base64_text_become_pixels_of_the_model_s_size() -> None:
    frame = pd.DataFrame({"image": [_png(), base64.b64encode(_png(mode="L")).decode()]})
    pixels = pixels_from_request(frame, INFO)
    assert pixels.shape == (2, 8, 8, 3)


def test_arrays_of_pixels_pass_and_a_single_image_gets_a_batch_axis() -> None:
    assert pixels_from_request(np.zeros((4, 8, 8, 3)), INFO).shape == (4, 8, 8, 3)
    assert pixels_from_request(np.full((1, 8, 8, 3), 255, dtype=np.uint8), INFO).shape == (1, 8, 8, 3)
    assert pixels_from_request(np.full((1, 8, 8, 3), 0.5), INFO).shape == (1, 8, 8, 3)  # dark, not wrong
    assert pixels_from_request(np.zeros((8, 8, 3)).tolist(), INFO).shape == (1, 8, 8, 3)
    assert pixels_from_request(pd.DataFrame({"image": []}), INFO).shape == (0, 8, 8, 3)


@pytest.mark.parametrize(("request_body", "message"), [
    (pd.DataFrame({"picture": [b"x"]}), "expected a column named 'image'"),
    (pd.DataFrame({"image": ["not base64 !"]}), "row 0: not base64 text"),
    (pd.DataFrame({"image": [_png(), b"hello"]}), "row 1: not an image"),
    (pd.DataFrame({"image": [3]}), "row 0: expected image bytes or base64 text, got int"),
    (np.zeros((2, 16, 16, 3)), "expected images of shape (n, 8, 8, 3)"),
    (np.array([[["a"] * 3] * 8] * 8), "expected images of shape (n, 8, 8, 3)"),
    (np.zeros((1, 8, 8, 3), dtype=complex), "with pixel values 0-255, got shape (1, 8, 8, 3) of complex128"),
    (np.zeros((1, 8, 8, 3), dtype="m8[s]"), "with pixel values 0-255, got shape (1, 8, 8, 3) of timedelta64[s]"),
    (np.full((1, 8, 8, 3), np.nan), "pixel values must be numbers 0-255, got NaN or infinity"),
    (np.full((8, 8, 3), np.inf).tolist(), "pixel values must be numbers 0-255, got NaN or infinity"),
    (np.full((1, 8, 8, 3), -1.5), "pixel values must be 0-255, got values from -1.5 to -1.5"),
    (np.arange(192).reshape(1, 8, 8, 3) * 2, "pixel values must be 0-255, got values from 0 to 382"),
    (np.zeros((MAX_IMAGES_PER_REQUEST + 1, 8, 8, 3)), f"{MAX_IMAGES_PER_REQUEST + 1} images in one request is over"),
    (pd.DataFrame({"image": [_png()] * (MAX_IMAGES_PER_REQUEST + 1)}), "images in one request is over the limit"),
    (pd.DataFrame({"image": [b"\0" * (MAX_IMAGE_BYTES + 1)]}), "row 0: an image file of 20 MB is over the limit"),
    (pd.DataFrame({"image": ["A" * (MAX_IMAGE_BYTES * 4 // 3 + 8)]}), "row 0: an image file of 20 MB is over"),
])
def test_a_bad_request_says_what_is_wrong(request_body, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        pixels_from_request(request_body, INFO)
    assert message in str(raised.value)


def test_the_deployed_pixel_limit_holds_for_serving() -> None:
    """Twenty by twelve is 240 pixels: over a model deployed with ingest.max_image_pixels 239, not 240."""
    limited = DeployedModel(class_names=["cat", "dog"], image_size=8, channels=3, max_image_pixels=239)
    with pytest.raises(ValueError, match="row 0: too large: 20x12 pixels is over the limit of 239"):
        pixels_from_request(pd.DataFrame({"image": [_png()]}), limited)
    at_limit = DeployedModel(class_names=["cat", "dog"], image_size=8, channels=3, max_image_pixels=240)
    assert pixels_from_request(pd.DataFrame({"image": [_png()]}), at_limit).shape == (1, 8, 8, 3)


def test_a_row_the_decoder_fails_on_is_a_bad_request_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's decoders raise more than the types pipeline.images turns into reasons."""
    def failing(*args, **kwargs):
        raise struct.error("required argument is not an integer")

    monkeypatch.setattr(pipeline.serving, "load_pixels_from_bytes", failing)
    with pytest.raises(ValueError) as raised:
        pixels_from_request(pd.DataFrame({"image": [_png()]}), INFO)
    assert str(raised.value) == "row 0: corrupt image: required argument is not an integer"


# --- classify -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                             keras.layers.Dense(2, activation="softmax")])


def test_classify_names_each_class_and_its_probability(model: keras.Model) -> None:
    predictions = classify(model, np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)), INFO)
    assert len(predictions) == 3
    for prediction in predictions:
        assert set(prediction.probabilities) == {"cat", "dog"}
        assert prediction.probability == max(prediction.probabilities.values())
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert classify(model, np.zeros((0, 8, 8, 3)), INFO) == []
    frame = predictions_frame(predictions)
    assert list(frame.columns) == ["label", "probability", "probabilities"] and len(frame) == 3


def test_small_and_large_inputs_get_the_same_answers_by_either_path(model: keras.Model) -> None:
    """Up to batch_size images take the compiled one-batch call, more take predict in batches."""
    pixels = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3))
    at_once, batched = classify(model, pixels, INFO, batch_size=8), classify(model, pixels, INFO, batch_size=2)
    assert [p.label for p in at_once] == [p.label for p in batched]
    for one, other in zip(at_once, batched):
        assert one.probabilities == pytest.approx(other.probabilities, abs=1e-6)


def test_a_request_of_many_images_decodes_each_row_in_order() -> None:
    """Decoded side by side, answered in the client's order; a bad row still says which it is."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)] * 4
    encoded = []
    for colour in colours:
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), colour).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    pixels = pixels_from_request(pd.DataFrame({"image": encoded}), INFO)
    assert [tuple(int(c) for c in image[4, 4]) for image in pixels] == colours
    with pytest.raises(ValueError, match="row 7: not an image"):
        pixels_from_request(pd.DataFrame({"image": encoded[:7] + [b"junk"] + encoded[8:]}), INFO)


# --- the MLflow model ---------------------------------------------------------------------------

@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real SQLite tracking store in tmp_path, for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri exports it; monkeypatch restores it
    mlflow.set_tracking_uri(uri)
    yield mlflow.create_experiment("serving", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(None)


def test_logged_model_loads_from_code_and_answers_like_classify(model: keras.Model, tmp_path: Path,
                                                                tracking_store: str) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    model.save(deploy / "model.keras")
    (deploy / "model.json").write_text(json.dumps({"class_names": INFO.class_names, "image_size": 8, "channels": 3}))
    with mlflow.start_run(experiment_id=tracking_store):
        logged = log_serving_model(deploy)

    local = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "download")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "serving_model.py").exists() and not list(local.rglob("*.pkl"))
    # The environment it needs names pip's version (MLflow warns when the venv has no pip to ask).
    conda = yaml.safe_load((local / "conda.yaml").read_text())
    assert any(str(dependency).startswith("pip<=") for dependency in conda["dependencies"]), conda

    served = mlflow.pyfunc.load_model(logged.model_uri)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3))
    expected = [p.probability for p in classify(model, pixels, INFO)]
    answer = served.predict(pixels)
    assert answer["probability"].tolist() == pytest.approx(expected, abs=1e-6)
    assert served.predict(pd.DataFrame({"image": [_png()]}))["label"].iloc[0] in INFO.class_names
    with pytest.raises(MlflowException) as raised:
        served.predict(pd.DataFrame({"image": [b"hello"]}))
    assert "bad request: row 0: not an image" in str(raised.value)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
