"""params.yaml, read once and typed at the door.

Each section becomes a frozen dataclass. A misspelt or unknown key, a wrong type or a value out
of range raises :class:`ParamsError` with a message that names the key and says what is allowed,
before any stage does real work. Core code only ever sees these dataclasses, never raw dicts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from pipeline.errors import PipelineError

RESNET50_MIN_IMAGE_SIZE = 32
OPTIMIZERS = ("adam", "sgd", "rmsprop")
LOSSES = ("crossentropy", "mse")
MAX_NEAR_DUPLICATE_DISTANCE = 32  # of 64 bits: two unrelated pictures' hashes differ in about 32
MAX_ROTATION = 0.5  # a fraction of a full turn: 0.5 turns either way covers every angle


class ParamsError(PipelineError):
    """params.yaml is missing, malformed or holds a value the pipeline cannot use."""


@dataclass(frozen=True)
class BaseParams:
    """Settings every stage shares."""

    seed: int
    image_size: int
    channels: Literal[1, 3]
    deterministic: bool
    distribution: Literal["auto", "none", "mirrored", "multi_worker"]
    experiment_name: str

    def check(self, where: str) -> None:
        # NumPy's and TensorFlow's seeds are unsigned 32-bit numbers.
        _require(0 <= self.seed <= 2**32 - 1, f"{where}.seed", f"must be from 0 to 4294967295, got {self.seed}")
        _require(self.image_size >= RESNET50_MIN_IMAGE_SIZE, f"{where}.image_size",
                 f"must be at least {RESNET50_MIN_IMAGE_SIZE} (the smallest input ResNet50 accepts), "
                 f"got {self.image_size}")
        _require(bool(self.experiment_name.strip()), f"{where}.experiment_name", "must not be empty")


@dataclass(frozen=True)
class IngestParams:
    """Where the images come from."""

    source: str
    max_per_class: int | None
    max_image_pixels: int
    near_duplicate_distance: int
    near_duplicate_similarity: float

    def check(self, where: str) -> None:
        _require(bool(self.source.strip()), f"{where}.source",
                 "must be 'sklearn:digits' or the path of a folder with one subfolder per class")
        if self.max_per_class is not None:
            _require(self.max_per_class >= 1, f"{where}.max_per_class", "must be null or at least 1")
        _require(self.max_image_pixels >= 1, f"{where}.max_image_pixels", "must be at least 1")
        _require(0 <= self.near_duplicate_distance <= MAX_NEAR_DUPLICATE_DISTANCE, f"{where}.near_duplicate_distance",
                 f"must be between 0 (off) and {MAX_NEAR_DUPLICATE_DISTANCE} bits of the 64-bit perceptual hash "
                 f"(beyond half the bits, hashes are as unlike as random ones), got {self.near_duplicate_distance}")
        _require(0 <= self.near_duplicate_similarity <= 1, f"{where}.near_duplicate_similarity",
                 "must be between 0 and 1 (the least SSIM of two thumbnails that confirms a pair of close hashes "
                 f"as near copies; 1 = only identical thumbnails), got {self.near_duplicate_similarity}")


@dataclass(frozen=True)
class SplitParams:
    """How the manifest is cut into train, validation and test."""

    ratios: tuple[float, ...]

    def check(self, where: str) -> None:
        key = f"{where}.ratios"
        _require(len(self.ratios) == 3, key,
                 f"needs three numbers (train, validation, test), e.g. [0.8, 0.1, 0.1]; got {list(self.ratios)}")
        _require(all(r > 0 for r in self.ratios), key,
                 f"every ratio must be greater than 0; got {list(self.ratios)}")
        _require(math.isclose(sum(self.ratios), 1.0, abs_tol=1e-6), key,
                 f"must sum to 1 (e.g. [0.8, 0.1, 0.1] or [0.7, 0.15, 0.15]); "
                 f"{list(self.ratios)} sums to {sum(self.ratios):g}")


@dataclass(frozen=True)
class AugmentParams:
    """Random changes to each training image (Keras preprocessing layers inside both models, active
    only while training). Every factor 0 / false turns that change off. ``mixup`` and ``cutmix`` are
    made in the training input pipeline instead, since they mix the targets too. ``flip_average`` is
    the one change at prediction time: the saved model averages its answers for the image and its
    mirror."""

    horizontal_flip: bool
    rotation: float
    zoom: float
    translation: float
    contrast: float
    hue: float
    rand_augment: float
    mixup: float
    cutmix: float
    flip_average: bool

    FACTORS = ("rotation", "zoom", "translation", "contrast", "hue", "rand_augment")  # a class constant, not a key

    @property
    def batch_mixing(self) -> dict[str, float]:
        """The changes made to whole training batches, as ``training_dataset``'s keyword arguments."""
        return {"mixup": self.mixup, "cutmix": self.cutmix}

    @property
    def active(self) -> bool:
        """Whether any change made by a layer inside the model is switched on."""
        return self.horizontal_flip or any(getattr(self, key) > 0 for key in self.FACTORS)

    def check(self, where: str) -> None:
        for key in self.FACTORS:
            value = getattr(self, key)
            _require(value >= 0, f"{where}.{key}", f"must be 0 (off) or more, got {value}")
        _require(self.rotation <= MAX_ROTATION, f"{where}.rotation",
                 f"is a fraction of a full turn and must be at most {MAX_ROTATION} (half a turn either way), "
                 f"got {self.rotation}")
        for key in ("zoom", "translation", "contrast", "hue"):
            value = getattr(self, key)
            _require(value < 1, f"{where}.{key}", f"must be below 1 (a fraction of the image), got {value}")
        _require(self.rand_augment <= 1, f"{where}.rand_augment",
                 f"is RandAugment's strength, a fraction of each change's largest, and must be 0 (off) to 1, "
                 f"got {self.rand_augment}")
        _require(0 <= self.mixup <= 1, f"{where}.mixup",
                 f"is the alpha of MixUp's Beta(alpha, alpha) and must be 0 (off) to 1, got {self.mixup}")
        _require(0 <= self.cutmix <= 1, f"{where}.cutmix",
                 f"is the largest alpha of CutMix's Beta(alpha, alpha) and must be 0 (off) to 1, got {self.cutmix}")


@dataclass(frozen=True)
class FitParams:
    """What both trainers share: the deck's batch, epoch, loss and optimizer, and the training options
    of the from-scratch recipes (learning-rate schedule, SGD's momentum, label smoothing, class weights,
    decoupled weight decay, a moving average of the weights)."""

    epochs: int
    batch_size: int
    learning_rate: float
    lr_schedule: Literal["constant", "cosine", "plateau"]
    optimizer: Literal["adam", "sgd", "rmsprop"]
    momentum: float
    loss: Literal["crossentropy", "mse"]
    label_smoothing: float
    class_weight: Literal["balanced"] | None
    patience: int
    start_from_epoch: int
    dense_units: tuple[int, ...]
    dropout: float
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    jit_compile: Literal["auto", True, False]
    weight_decay: float
    ema: bool
    temperature_scaling: bool    # fit one temperature on validation, inside the saved model (calibration.py)

    def check(self, where: str) -> None:
        _require(0 <= self.weight_decay < 1, f"{where}.weight_decay",
                 f"must be in [0, 1) (0 = off; a fraction of each weight taken off per unit of learning rate), "
                 f"got {self.weight_decay}")
        _require(0 <= self.momentum < 1, f"{where}.momentum", f"must be in [0, 1) (0 = plain SGD), got {self.momentum}")
        _require(self.momentum == 0 or self.optimizer == "sgd", f"{where}.momentum",
                 f"applies to optimizer sgd only (adam and rmsprop keep their own averages); set it to 0 with "
                 f"optimizer: {self.optimizer}")
        _require(0 <= self.label_smoothing < 1, f"{where}.label_smoothing",
                 f"must be in [0, 1), got {self.label_smoothing}")
        _require(self.label_smoothing == 0 or self.loss == "crossentropy", f"{where}.label_smoothing",
                 "applies to the crossentropy loss only; set it to 0 with loss: mse")
        _require(self.epochs >= 1, f"{where}.epochs", f"must be at least 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"{where}.batch_size", f"must be at least 1, got {self.batch_size}")
        _require(self.learning_rate > 0, f"{where}.learning_rate", f"must be greater than 0, got {self.learning_rate}")
        _require(self.patience >= 1, f"{where}.patience", f"must be at least 1, got {self.patience}")
        _require(0 <= self.start_from_epoch < self.epochs, f"{where}.start_from_epoch",
                 f"must be from 0 up to (not including) epochs ({self.epochs}), got {self.start_from_epoch}")
        _require(all(u >= 1 for u in self.dense_units), f"{where}.dense_units", "every layer needs at least 1 unit")
        _require(0 <= self.dropout < 1, f"{where}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class TrainCustomParams(FitParams):
    """The deck's VGG-style CNN."""

    blocks: tuple[int, ...]
    batch_norm: bool
    residual: bool
    separable: bool
    pooling: Literal["flatten", "global_average"]

    def check(self, where: str) -> None:
        super().check(where)
        _require(len(self.blocks) >= 1 and all(f >= 1 for f in self.blocks), f"{where}.blocks",
                 "needs at least one block, each a positive number of filters, e.g. [64, 128]")


@dataclass(frozen=True)
class TrainResnet50Params(FitParams):
    """Keras ResNet50 with a new head, pretrained or from scratch."""

    weights: str | None
    fine_tune_layers: int
    fine_tune_epochs: int
    fine_tune_learning_rate: float

    def check(self, where: str) -> None:
        super().check(where)
        _require(self.weights is None or bool(self.weights.strip()), f"{where}.weights",
                 "must be null (from scratch), imagenet, or the path of a weights file")
        _require(self.fine_tune_layers >= 0, f"{where}.fine_tune_layers", "must be 0 or more")
        _require(self.fine_tune_epochs >= 0, f"{where}.fine_tune_epochs", "must be 0 or more")
        # The fine-tuning phase's early stopping reuses start_from_epoch: from there on it keeps the best weights.
        _require(self.fine_tune_epochs == 0 or self.start_from_epoch < self.fine_tune_epochs,
                 f"{where}.start_from_epoch",
                 f"must be below fine_tune_epochs ({self.fine_tune_epochs}) too, since the fine-tuning phase's early "
                 f"stopping counts from it; got {self.start_from_epoch}")
        _require(self.fine_tune_learning_rate > 0, f"{where}.fine_tune_learning_rate", "must be greater than 0")

    def check_paths(self, where: str) -> None:
        """A weights path must exist; checked when the stage starts, before any training."""
        if self.weights not in (None, "imagenet") and not Path(self.weights).expanduser().is_file():
            raise ParamsError(f"{where}.weights: {self.weights} is not a file (use null to train from scratch, "
                              "imagenet to download the pretrained weights, or the path of a weights file)")

    @property
    def pretrained(self) -> bool:
        return self.weights is not None


@dataclass(frozen=True)
class EvaluateParams:
    """How the trained models are scored."""

    batch_size: int

    def check(self, where: str) -> None:
        _require(self.batch_size >= 1, f"{where}.batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class GateParams:
    """The deck's decision flow (train threshold, then test threshold), then the challenger against
    the registered champion; see pipeline/decision.py."""

    metric: Literal["accuracy", "balanced_accuracy", "macro_f1"]
    min_train_score: float
    min_test_score: float
    max_regression: float
    confidence: float | None
    registered_model_name: str
    replace_incomparable: bool = False
    max_test_reuse: int = 20
    max_calibration_error: float | None = None
    promote: bool = True     # false: decide and report only; register nothing, leave deploy/ as it is

    # Keys of earlier versions, so an old params file gets told what to write instead.
    RENAMED: ClassVar[dict[str, str]] = {"min_train_accuracy": "min_train_score",
                                         "min_test_accuracy": "min_test_score"}

    def check(self, where: str) -> None:
        for key in ("min_train_score", "min_test_score", "max_regression"):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"{where}.{key}", f"must be between 0 and 1, got {value}")
        _require(self.confidence is None or 0.5 <= self.confidence < 1.0, f"{where}.confidence",
                 f"must be null or a level from 0.5 up to (not including) 1, such as 0.9 or 0.95; got {self.confidence}")
        name = self.registered_model_name
        _require(bool(name.strip()), f"{where}.registered_model_name", "must not be empty")
        # MLflow's own rule for model names (mlflow.utils.validation): checked here, before any training,
        # instead of failing at the first registration, after the models are trained and judged.
        _require(not any(char in name for char in "/:") and name != "." and not name.startswith(".."),
                 f"{where}.registered_model_name",
                 f"must not contain '/' or ':' nor be '.' or start with '..' (MLflow's rule), got {name!r}")
        _require(isinstance(self.max_test_reuse, int) and not isinstance(self.max_test_reuse, bool)
                 and self.max_test_reuse >= 1, f"{where}.max_test_reuse",
                 f"must be a whole number of models, 1 or more, got {self.max_test_reuse!r}")
        _require(self.max_calibration_error is None or 0 < self.max_calibration_error <= 1,
                 f"{where}.max_calibration_error",
                 f"must be null (off) or an expected calibration error above 0 and at most 1, such as 0.05; "
                 f"got {self.max_calibration_error}")


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, one typed section per stage."""

    base: BaseParams
    ingest: IngestParams
    split: SplitParams
    augment: AugmentParams
    train_custom: TrainCustomParams
    train_resnet50: TrainResnet50Params
    evaluate: EvaluateParams
    gate: GateParams


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate every section of a params file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    return params_from_dict(raw, source=str(path))


def params_from_dict(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping (what ``load_params`` does after reading YAML)."""
    try:
        params = _build(Params, raw, "")
        _check_across_sections(params)
        return params
    except ParamsError as error:
        raise ParamsError(f"{source}: {error}") from None


def _check_across_sections(params: Params) -> None:
    """Rules that tie two sections together."""
    _require(params.base.channels == 3 or params.augment.hue == 0, "augment.hue",
             "changes colours and needs base.channels: 3 (grayscale images have no hue); set it to 0")
    blocks = len(params.train_custom.blocks)
    # Each block halves the image (2x2 pooling): with more blocks than halvings, nothing is left to see.
    _require(params.base.image_size >= 2**blocks, "train_custom.blocks",
             f"{blocks} blocks halve the image {blocks} times, which needs base.image_size of at least "
             f"{2**blocks}, got {params.base.image_size}: use fewer blocks or larger images")


def to_flat_dict(section: Any, prefix: str = "") -> dict[str, Any]:
    """A section as ``{"prefix.key": value}`` (``{"key": value}`` without a prefix), for logging to MLflow."""
    flat = {}
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        flat[f"{prefix}.{field.name}" if prefix else field.name] = list(value) if isinstance(value, tuple) else value
    return flat


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ParamsError(f"{key}: {message}")


def _build(cls: type, raw: Any, where: str) -> Any:
    """Turn a mapping into dataclass ``cls``, checking keys, types and ranges."""
    label = where or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{label}: expected a mapping of keys to values, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = [key for key in raw if key not in names]
    if unknown:
        key = unknown[0]
        renamed = getattr(cls, "RENAMED", {}).get(key)
        if renamed:
            raise ParamsError(f"{_join(where, key)}: renamed to '{renamed}'; write {renamed} instead")
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
        raise ParamsError(f"{_join(where, key)}: unknown key{hint}")
    missing = [name for name in names if name not in raw]
    if missing:
        raise ParamsError(f"{_join(where, missing[0])}: missing key")
    values = {name: _coerce(raw[name], hints[name], _join(where, name)) for name in names}
    instance = cls(**values)
    if hasattr(instance, "check"):
        instance.check(where)
    return instance


def _yaml_word(value: Any) -> str:
    """A literal as it is written in params.yaml (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint and return it in that type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if not any(value == arg and type(value) is type(arg) for arg in args):   # 1 is not true
            allowed = " | ".join(_yaml_word(arg) for arg in args)
            raise ParamsError(f"{key}: must be one of {allowed}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list such as [1, 2], got {_describe(value)}")
        return tuple(_coerce(item, args[0], f"{key}[{index}]") for index, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected a whole number, got {_describe(value)}")
        return value
    if hint is float:
        # YAML 1.1 reads 1e-5 (no dot) as a string; accept any number written that way.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ParamsError(f"{key}: expected a number, got {_describe(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamsError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected text, got {_describe(value)}")
        return value
    raise TypeError(f"params: no rule for type {hint!r} at {key}")  # a bug in this module, not user input


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"
