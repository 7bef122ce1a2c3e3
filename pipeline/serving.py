"""The deployed model as clients use it: image bytes in, label and probabilities out.

:func:`classify` is the one prediction routine; ``python -m pipeline.predict`` and the MLflow
pyfunc model :class:`ImageClassifierModel` (what ``mlflow models serve`` runs) both call it, with
the same decode rules as training (:mod:`pipeline.images`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline.artifacts import DEPLOY_INFO_FILE, MODEL_FILE, DeployedModel
from pipeline.errors import first_line
from pipeline.images import ImageRejected, load_pixels_from_bytes

log = logging.getLogger("pipeline.serving")

IMAGE_COLUMN = "image"
# What one request may hold, checked before any decoding: enough for a batch of phone photos, not
# for a client that sends a disk image. A proxy in front should refuse larger bodies first
# (docs/walkthrough.md, Serving: the limits to put in front).
MAX_IMAGES_PER_REQUEST = 256
MAX_IMAGE_BYTES = 20 * 1024 * 1024
SERVING_PACKAGES = ("tensorflow", "keras", "mlflow", "pillow", "pandas", "numpy")


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the label, its probability, and every class's probability."""

    label: str
    probability: float
    probabilities: dict[str, float]


def classify(model: Any, pixels: np.ndarray, info: DeployedModel, batch_size: int = 64) -> list[Prediction]:
    """Run the model on ``(n, size, size, channels)`` raw pixels and name the classes.

    Up to ``batch_size`` images go through the model's compiled predict step in one call
    (``predict_on_batch``: a few milliseconds for one digit); ``predict``, which builds a data
    pipeline on every call (150 ms and more before the first image), only for larger inputs.
    """
    from pipeline.dataset import decode_predictions

    if len(pixels) == 0:
        return []
    inputs = np.asarray(pixels, dtype=np.float32)
    outputs = (model.predict_on_batch(inputs) if len(inputs) <= batch_size
               else model.predict(inputs, batch_size=batch_size, verbose=0))
    indices, probabilities = decode_predictions(np.asarray(outputs))
    return [Prediction(info.class_names[index], float(row[index]),
                       {name: float(p) for name, p in zip(info.class_names, row)})
            for index, row in zip(indices, probabilities)]


def pixels_from_request(model_input: Any, info: DeployedModel) -> np.ndarray:
    """Turn what a client sent into model input, or raise ``ValueError`` saying what is wrong.

    Accepted: a DataFrame with an ``image`` column of file bytes (or their base64 text, as in
    ``{"dataframe_records": [{"image": "<base64>"}]}``), or an array of raw pixels shaped
    ``(n, size, size, channels)`` (a single image without the batch axis is accepted too).
    """
    expected = (info.image_size, info.image_size, info.channels)
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"expected a column named '{IMAGE_COLUMN}' holding each image file's bytes "
                             f"in base64; got columns {list(model_input.columns)}")
        _check_count(len(model_input))
        values = list(model_input[IMAGE_COLUMN])
        decode = partial(_decode_row, info=info)
        # Pillow decodes without the GIL: a batch of many images decodes on every core.
        images = list(decoder_pool().map(decode, enumerate(values))) if len(values) > 1 else \
            [decode(row) for row in enumerate(values)]
        return np.stack(images) if images else np.zeros((0, *expected), dtype=np.uint8)
    array = np.asarray(model_input)
    if array.ndim == 3:
        array = array[np.newaxis]
    # Integers or floats only: complex numbers and timedelta64 (a NumPy integer) are not pixels.
    if array.ndim != 4 or array.shape[1:] != expected or array.dtype.kind not in "iuf":
        raise ValueError(f"expected images of shape (n, {', '.join(map(str, expected))}) with pixel values 0-255, "
                         f"got shape {array.shape} of {array.dtype}")
    _check_count(len(array))
    _check_pixel_values(array)
    return array


def _check_pixel_values(array: np.ndarray) -> None:
    """Refuse values no image holds: the model would answer them with made-up (or NaN) probabilities.

    Floats from 0 to 1 pass: that is a dark image, not a wrong one.
    """
    if not array.size:
        return
    if not np.isfinite(array).all():
        raise ValueError("pixel values must be numbers 0-255, got NaN or infinity")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise ValueError(f"pixel values must be 0-255, got values from {low:g} to {high:g}")


def _decode_row(row: tuple[int, Any], info: DeployedModel) -> np.ndarray:
    """One request row's image, decoded and resized by the training rules; ``ValueError`` names the row."""
    number, value = row
    try:
        return load_pixels_from_bytes(_as_bytes(value), info.image_size, info.channels, info.max_image_pixels)
    except ImageRejected as rejected:
        raise ValueError(f"row {number}: {rejected.reason}") from None
    except Exception as error:   # a decoder's own failure on a damaged file: the client's bad row, not a 500
        log.warning("row %d could not be decoded", number, exc_info=True)
        raise ValueError(f"row {number}: corrupt image: {first_line(error)}") from None


@cache
def decoder_pool() -> ThreadPoolExecutor:
    """One pool of decoding threads per process (Pillow decodes without the GIL), made on first use:
    a request of several images, or ``python -m pipeline.predict`` on several files."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode")


def predictions_frame(predictions: list[Prediction]) -> pd.DataFrame:
    """Predictions as the rows a JSON client gets back."""
    return pd.DataFrame([{"label": p.label, "probability": p.probability, "probabilities": p.probabilities}
                         for p in predictions], columns=["label", "probability", "probabilities"])


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """The deployed Keras model behind MLflow's pyfunc interface (``mlflow models serve``).

    MLflow logs it from code (:mod:`pipeline.serving_model`), not as a pickle.
    """

    # predict takes two kinds of input (see pixels_from_request), so it has no type hint: MLflow
    # would make one into a schema that forbids the other. Without one MLflow warns each time the
    # class is defined, in every stage and server, unless the class opts out of hint validation as
    # MLflow's own ChatModel does (an attribute MLflow reads; without it only the warning returns).
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import keras

        self.model = keras.models.load_model(context.artifacts["keras_model"], safe_mode=True)
        self.info = DeployedModel.read(Path(context.artifacts["model_info"]))

    def predict(self, context, model_input, params=None):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            pixels = pixels_from_request(model_input, self.info)
        except ValueError as error:
            # MLflow's scoring server answers INVALID_PARAMETER_VALUE with HTTP 400, not 500.
            raise MlflowException(f"bad request: {error}", error_code=INVALID_PARAMETER_VALUE) from None
        return predictions_frame(classify(self.model, pixels, self.info))


def log_serving_model(deploy_dir: Path):
    """Log the deployed model as a pyfunc to the active run; returns MLflow's ModelInfo."""
    from pipeline.tracking import pinned_requirements

    package_dir = Path(__file__).resolve().parent
    requirements = pinned_requirements(SERVING_PACKAGES)
    return mlflow.pyfunc.log_model(
        name="serving_model", python_model=str(package_dir / "serving_model.py"),
        artifacts={"keras_model": str(deploy_dir / MODEL_FILE), "model_info": str(deploy_dir / DEPLOY_INFO_FILE)},
        code_paths=[str(package_dir)], pip_requirements=requirements)


def read_logged_serving_model(model_dir: Path) -> tuple[Path, DeployedModel]:
    """The Keras file and the description inside a serving model that :func:`log_serving_model`
    logged and MLflow has since copied to ``model_dir`` (a registered version, downloaded)."""
    import yaml

    flavor = yaml.safe_load((Path(model_dir) / "MLmodel").read_text(encoding="utf-8"))["flavors"]["python_function"]
    artifacts = flavor["artifacts"]
    return (Path(model_dir) / artifacts["keras_model"]["path"],
            DeployedModel.read(Path(model_dir) / artifacts["model_info"]["path"]))


def _check_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"{count} images in one request is over the limit of {MAX_IMAGES_PER_REQUEST}; "
                         "send them in several requests")


def _as_bytes(value: Any) -> bytes:
    # base64 text is 4/3 of the bytes it holds: measure before decoding, not after.
    size = len(value) * 3 // 4 if isinstance(value, str) else len(value) if isinstance(value, (bytes, bytearray)) else 0
    if size > MAX_IMAGE_BYTES:
        raise ImageRejected(f"an image file of {size / 2**20:.0f} MB is over the limit of "
                            f"{MAX_IMAGE_BYTES // 2**20} MB per image")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageRejected("not base64 text (send each file's bytes base64-encoded)") from None
    raise ImageRejected(f"expected image bytes or base64 text, got {type(value).__name__}")
