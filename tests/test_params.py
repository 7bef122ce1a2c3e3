"""params.yaml is typed at the door: every mistake fails at once with a message that names the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.params import (
    Params,
    ParamsError,
    TrainResnet50Params,
    load_params,
    params_from_dict,
    to_flat_dict,
)
from pipeline.seeding import seed_everything
from tests.conftest import REPO_ROOT


def test_load_params_reads_the_projects_own_file() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.base.image_size >= 32
    assert params.base.channels in (1, 3)
    assert len(params.split.ratios) == 3
    assert isinstance(params.split.ratios, tuple)
    assert isinstance(params.train_custom.blocks, tuple)
    assert 0.0 <= params.gate.min_test_score <= 1.0


def test_sections_are_frozen(raw_params: dict) -> None:
    params = params_from_dict(raw_params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.base.seed = 1  # type: ignore[misc]


def test_params_error_is_a_pipeline_error() -> None:
    # The stage runner turns PipelineError into one line and exit code 2; ParamsError must be one.
    assert issubclass(ParamsError, PipelineError)


def test_load_params_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(path)


def test_load_params_invalid_yaml_gives_the_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)


def test_load_params_names_the_file_in_errors(tmp_path: Path, raw_params: dict) -> None:
    raw_params["gate"]["min_test_score"] = 2
    path = tmp_path / "custom-params.yaml"
    path.write_text(yaml.safe_dump(raw_params))
    with pytest.raises(ParamsError, match=r"custom-params\.yaml: gate\.min_test_score"):
        load_params(path)


def test_misspelt_key_is_named_with_a_suggestion(raw_params: dict) -> None:
    raw_params["train_custom"]["epocs"] = raw_params["train_custom"].pop("epochs")
    with pytest.raises(ParamsError) as info:
        params_from_dict(raw_params)
    message = str(info.value)
    assert "train_custom.epocs" in message
    assert "did you mean 'epochs'" in message


def test_unknown_top_level_section(raw_params: dict) -> None:
    raw_params["deploy_settings"] = {"x": 1}
    with pytest.raises(ParamsError, match="deploy_settings: unknown key"):
        params_from_dict(raw_params)


def test_unknown_key_without_close_match_lists_known_keys(raw_params: dict) -> None:
    raw_params["gate"]["zzzz"] = 1
    with pytest.raises(ParamsError, match=r"gate\.zzzz: unknown key \(known keys: metric, min_train_score"):
        params_from_dict(raw_params)


def test_missing_key(raw_params: dict) -> None:
    del raw_params["split"]["ratios"]
    with pytest.raises(ParamsError, match=r"split\.ratios: missing key"):
        params_from_dict(raw_params)


def test_missing_section(raw_params: dict) -> None:
    del raw_params["gate"]
    with pytest.raises(ParamsError, match=r"gate: missing key"):
        params_from_dict(raw_params)


def test_wrong_type_names_the_key(raw_params: dict) -> None:
    raw_params["train_custom"]["epochs"] = "ten"
    with pytest.raises(ParamsError, match=r"train_custom\.epochs: expected a whole number, got 'ten'"):
        params_from_dict(raw_params)


def test_bool_is_not_accepted_as_int(raw_params: dict) -> None:
    raw_params["base"]["seed"] = True
    with pytest.raises(ParamsError, match=r"base\.seed"):
        params_from_dict(raw_params)


def test_section_that_is_not_a_mapping(raw_params: dict) -> None:
    raw_params["split"] = [0.8, 0.1, 0.1]
    with pytest.raises(ParamsError, match=r"split: expected a mapping"):
        params_from_dict(raw_params)


def test_literal_value_outside_choices(raw_params: dict) -> None:
    raw_params["train_custom"]["optimizer"] = "adagrad"
    with pytest.raises(ParamsError, match=r"train_custom\.optimizer: must be one of adam \| sgd \| rmsprop"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("value", ["auto", True, False])
def test_jit_compile_is_auto_true_or_false(raw_params: dict, value) -> None:
    raw_params["train_resnet50"]["jit_compile"] = value
    assert params_from_dict(raw_params).train_resnet50.jit_compile == value


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_jit_compile_refuses_what_is_not_auto_true_or_false(raw_params: dict, value) -> None:
    raw_params["train_custom"]["jit_compile"] = value
    with pytest.raises(ParamsError, match=r"train_custom\.jit_compile: must be one of auto \| true \| false"):
        params_from_dict(raw_params)


def test_channels_must_be_1_or_3(raw_params: dict) -> None:
    raw_params["base"]["channels"] = 2
    with pytest.raises(ParamsError, match=r"base\.channels"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("ratios", [[0.8, 0.1, 0.2], [0.5, 0.2, 0.2], [0.7, 0.15, 0.1]])
def test_ratios_must_sum_to_one(raw_params: dict, ratios: list[float]) -> None:
    raw_params["split"]["ratios"] = ratios
    with pytest.raises(ParamsError, match=r"split\.ratios: must sum to 1"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("ratios", [[1.0, 0.0, 0.0], [0.9, 0.2, -0.1], [0.0, 0.5, 0.5]])
def test_ratios_must_be_positive(raw_params: dict, ratios: list[float]) -> None:
    raw_params["split"]["ratios"] = ratios
    with pytest.raises(ParamsError, match=r"split\.ratios: every ratio must be greater than 0"):
        params_from_dict(raw_params)


def test_two_ratios_are_rejected(raw_params: dict) -> None:
    raw_params["split"]["ratios"] = [0.9, 0.1]
    with pytest.raises(ParamsError, match=r"split\.ratios: needs three numbers"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("ratios", [[0.8, 0.1, 0.1], [0.7, 0.15, 0.15], [0.6, 0.2, 0.2]])
def test_the_decks_ratios_are_accepted(raw_params: dict, ratios: list[float]) -> None:
    raw_params["split"]["ratios"] = ratios
    assert params_from_dict(raw_params).split.ratios == tuple(ratios)


@pytest.mark.parametrize("size", [31, 16, 0])
def test_image_size_below_32_is_rejected(raw_params: dict, size: int) -> None:
    raw_params["base"]["image_size"] = size
    with pytest.raises(ParamsError, match=r"base\.image_size: must be at least 32"):
        params_from_dict(raw_params)


def test_image_size_32_is_accepted(raw_params: dict) -> None:
    raw_params["base"]["image_size"] = 32
    assert params_from_dict(raw_params).base.image_size == 32


@pytest.mark.parametrize("distance", [-1, 33, 64])
def test_near_duplicate_distance_outside_0_32_is_rejected(raw_params: dict, distance: int) -> None:
    raw_params["ingest"]["near_duplicate_distance"] = distance
    with pytest.raises(ParamsError, match=r"ingest\.near_duplicate_distance: must be between 0 \(off\) and 32 bits"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("distance", [0, 8, 32])
def test_near_duplicate_distance_0_to_32_is_accepted(raw_params: dict, distance: int) -> None:
    raw_params["ingest"]["near_duplicate_distance"] = distance
    assert params_from_dict(raw_params).ingest.near_duplicate_distance == distance


def test_near_duplicate_distance_must_be_a_whole_number(raw_params: dict) -> None:
    raw_params["ingest"]["near_duplicate_distance"] = 8.5
    with pytest.raises(ParamsError, match=r"ingest\.near_duplicate_distance: expected a whole number"):
        params_from_dict(raw_params)


@pytest.mark.parametrize(("similarity", "ok"), [(-0.1, False), (0, True), (0.6, True), (1, True), (1.5, False)])
def test_near_duplicate_similarity_must_be_between_0_and_1(raw_params: dict, similarity: float, ok: bool) -> None:
    raw_params["ingest"]["near_duplicate_similarity"] = similarity
    if ok:
        assert params_from_dict(raw_params).ingest.near_duplicate_similarity == similarity
    else:
        with pytest.raises(ParamsError, match=r"ingest\.near_duplicate_similarity: must be between 0 and 1"):
            params_from_dict(raw_params)


@pytest.mark.parametrize("key", ["min_train_score", "min_test_score", "max_regression"])
@pytest.mark.parametrize("value", [-0.01, 1.5])
def test_thresholds_outside_0_1_are_rejected(raw_params: dict, key: str, value: float) -> None:
    raw_params["gate"][key] = value
    with pytest.raises(ParamsError, match=rf"gate\.{key}: must be between 0 and 1"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0])
def test_thresholds_at_the_edges_are_accepted(raw_params: dict, value: float) -> None:
    raw_params["gate"]["min_test_score"] = value
    assert params_from_dict(raw_params).gate.min_test_score == float(value)


@pytest.mark.parametrize("value", [1.5, 1.0, 0.3, 0, -0.95, "high"])
def test_a_confidence_outside_half_to_one_is_refused(raw_params: dict, value: object) -> None:
    raw_params["gate"]["confidence"] = value
    with pytest.raises(ParamsError, match=r"gate\.confidence: (must be null or a level|expected a number)"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("value", [None, 0.5, 0.9, 0.95, 0.99])
def test_a_confidence_level_or_null_is_accepted(raw_params: dict, value: float | None) -> None:
    raw_params["gate"]["confidence"] = value
    assert params_from_dict(raw_params).gate.confidence == value


@pytest.mark.parametrize("name", ["team/classifier", "cats:dogs", ".", "..", "../up", "..hidden", "image-classifier",
                                  "Cats & dogs v2", ".classifier", "a..b"])
def test_a_registered_model_name_is_refused_exactly_when_mlflow_would(raw_params: dict, name: str) -> None:
    """Refused before any training, by the rule MLflow applies at the first registration (after it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    raw_params["gate"]["registered_model_name"] = name
    if mlflow_accepts:
        assert params_from_dict(raw_params).gate.registered_model_name == name
    else:
        with pytest.raises(ParamsError, match=r"gate\.registered_model_name: must not contain '/' or ':'"):
            params_from_dict(raw_params)


@pytest.mark.parametrize(("seed", "ok"), [(-1, False), (0, True), (2**32 - 1, True), (2**32, False)])
def test_a_seed_is_an_unsigned_32_bit_number(raw_params: dict, seed: int, ok: bool) -> None:
    raw_params["base"]["seed"] = seed
    if ok:
        assert params_from_dict(raw_params).base.seed == seed
        seed_everything(seed, tensorflow=False)   # what every stage does first with it
    else:
        with pytest.raises(ParamsError, match=r"base\.seed: must be from 0 to 4294967295"):
            params_from_dict(raw_params)


@pytest.mark.parametrize(("blocks", "ok"), [(5, True), (6, False)])
def test_no_more_custom_cnn_blocks_than_the_image_can_be_halved(raw_params: dict, blocks: int, ok: bool) -> None:
    raw_params["base"]["image_size"] = 32
    raw_params["train_custom"]["blocks"] = [8] * blocks
    if ok:
        params = params_from_dict(raw_params)
        from pipeline.models import build_custom_cnn

        build_custom_cnn((32, 32, 1), 3, params.train_custom.blocks, [], 0.0)   # builds: 32 halved 5 times is 1
    else:
        with pytest.raises(ParamsError, match=r"train_custom\.blocks: 6 blocks halve the image 6 times, which needs "
                                              r"base\.image_size of at least 64, got 32"):
            params_from_dict(raw_params)


@pytest.mark.parametrize(("fine_tune_epochs", "ok"), [(0, True), (4, True), (3, False)])
def test_fine_tuning_counts_early_stopping_from_start_from_epoch_too(raw_params: dict, fine_tune_epochs: int,
                                                                   ok: bool) -> None:
    """A warm-up longer than the fine-tuning phase would leave it without early stopping or its best weights."""
    raw_params["train_resnet50"].update(epochs=5, start_from_epoch=3, fine_tune_epochs=fine_tune_epochs)
    if ok:
        assert params_from_dict(raw_params).train_resnet50.fine_tune_epochs == fine_tune_epochs
    else:
        with pytest.raises(ParamsError,
                           match=r"train_resnet50\.start_from_epoch: must be below fine_tune_epochs \(3\)"):
            params_from_dict(raw_params)


def test_the_gated_metric_is_one_of_three(raw_params: dict) -> None:
    raw_params["gate"]["metric"] = "f2"
    with pytest.raises(ParamsError, match=r"gate\.metric: must be one of accuracy \| balanced_accuracy \| macro_f1, "
                                          r"got 'f2'"):
        params_from_dict(raw_params)
    raw_params["gate"]["metric"] = "macro_f1"
    assert params_from_dict(raw_params).gate.metric == "macro_f1"


@pytest.mark.parametrize(("old", "new"), [("min_train_accuracy", "min_train_score"),
                                          ("min_test_accuracy", "min_test_score")])
def test_an_old_threshold_name_says_what_it_is_called_now(raw_params: dict, old: str, new: str) -> None:
    raw_params["gate"][old] = raw_params["gate"].pop(new)
    with pytest.raises(ParamsError, match=rf"gate\.{old}: renamed to '{new}'; write {new} instead"):
        params_from_dict(raw_params)


def test_float_written_as_1e_minus_5_string_is_accepted(raw_params: dict) -> None:
    # YAML 1.1 (PyYAML) reads 1e-5 without a dot as the string "1e-5".
    assert yaml.safe_load("x: 1e-5")["x"] == "1e-5"
    raw_params["train_resnet50"]["fine_tune_learning_rate"] = "1e-5"
    params = params_from_dict(raw_params)
    assert params.train_resnet50.fine_tune_learning_rate == pytest.approx(1e-5)
    assert isinstance(params.train_resnet50.fine_tune_learning_rate, float)


def test_float_from_int_becomes_float(raw_params: dict) -> None:
    raw_params["train_custom"]["learning_rate"] = 1
    value = params_from_dict(raw_params).train_custom.learning_rate
    assert value == 1.0 and isinstance(value, float)


@pytest.mark.parametrize("value", ["fast", ".nan", float("nan"), float("inf")])
def test_float_that_is_not_a_finite_number_is_rejected(raw_params: dict, value: object) -> None:
    raw_params["train_custom"]["learning_rate"] = value
    with pytest.raises(ParamsError, match=r"train_custom\.learning_rate"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("dropout", [1.0, -0.1])
def test_dropout_range(raw_params: dict, dropout: float) -> None:
    raw_params["train_custom"]["dropout"] = dropout
    with pytest.raises(ParamsError, match=r"train_custom\.dropout: must be in \[0, 1\)"):
        params_from_dict(raw_params)


def test_list_item_type_is_checked_with_its_index(raw_params: dict) -> None:
    raw_params["train_custom"]["blocks"] = [64, "wide"]
    with pytest.raises(ParamsError, match=r"train_custom\.blocks\[1\]"):
        params_from_dict(raw_params)


def test_empty_blocks_are_rejected(raw_params: dict) -> None:
    raw_params["train_custom"]["blocks"] = []
    with pytest.raises(ParamsError, match=r"train_custom\.blocks: needs at least one block"):
        params_from_dict(raw_params)


def test_max_per_class_may_be_null_or_positive(raw_params: dict) -> None:
    raw_params["ingest"]["max_per_class"] = 5
    assert params_from_dict(raw_params).ingest.max_per_class == 5
    raw_params["ingest"]["max_per_class"] = 0
    with pytest.raises(ParamsError, match=r"ingest\.max_per_class"):
        params_from_dict(raw_params)


def test_check_paths_names_a_missing_weights_file(raw_params: dict, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-weights.weights.h5"
    raw_params["train_resnet50"]["weights"] = str(missing)
    section = params_from_dict(raw_params).train_resnet50
    assert isinstance(section, TrainResnet50Params)
    assert section.pretrained
    with pytest.raises(ParamsError) as info:
        section.check_paths("train_resnet50")
    assert str(missing) in str(info.value)
    assert "train_resnet50.weights" in str(info.value)


def test_check_paths_accepts_null_imagenet_and_an_existing_file(raw_params: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    existing = tmp_path / "w.weights.h5"
    existing.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)   # a relative path is the project's: stages run from its root
    for weights in (None, "imagenet", str(existing), "w.weights.h5"):
        raw_params["train_resnet50"]["weights"] = weights
        section = params_from_dict(raw_params).train_resnet50
        assert section.check_paths("train_resnet50") is None
        assert section.weights == weights and section.pretrained is (weights is not None)


def test_check_paths_rejects_a_directory(raw_params: dict, tmp_path: Path) -> None:
    raw_params["train_resnet50"]["weights"] = str(tmp_path)
    with pytest.raises(ParamsError, match="is not a file"):
        params_from_dict(raw_params).train_resnet50.check_paths("train_resnet50")


def test_to_flat_dict_prefixes_keys_and_lists_tuples(raw_params: dict) -> None:
    flat = to_flat_dict(params_from_dict(raw_params).split, "split")
    assert flat == {"split.ratios": list(map(float, raw_params["split"]["ratios"]))}


# --- augmentation and the from-scratch training options ------------------------------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("rotation", -0.1, "augment.rotation: must be 0 (off) or more, got -0.1"),
    ("rotation", 0.6, "augment.rotation: is a fraction of a full turn and must be at most 0.5"),
    ("zoom", 1.5, "augment.zoom: must be below 1"),
    ("contrast", -1, "augment.contrast: must be 0 (off) or more"),
    ("translation", "wide", "augment.translation: expected a number"),
    ("mixup", -0.2, "augment.mixup: is the alpha of MixUp's Beta(alpha, alpha) and must be 0 (off) to 1, got -0.2"),
    ("mixup", 2, "augment.mixup: is the alpha of MixUp's Beta(alpha, alpha) and must be 0 (off) to 1, got 2"),
    ("cutmix", -0.5, "augment.cutmix: is the largest alpha of CutMix's Beta(alpha, alpha) and must be 0 (off) to 1"),
    ("cutmix", 1.5, "augment.cutmix: is the largest alpha of CutMix's Beta(alpha, alpha) and must be 0 (off) to 1"),
    ("rand_augment", -0.1, "augment.rand_augment: must be 0 (off) or more, got -0.1"),
    ("rand_augment", 1.2, "augment.rand_augment: is RandAugment's strength, a fraction of each change's largest, "
                          "and must be 0 (off) to 1, got 1.2"),
])
def test_augmentation_factors_out_of_range_are_refused(raw_params: dict, key: str, value: object,
                                                       message: str) -> None:
    raw_params["augment"][key] = value
    with pytest.raises(ParamsError, match=re.escape(message)):
        params_from_dict(raw_params)


def test_hue_needs_colour(raw_params: dict) -> None:
    raw_params["augment"].update(hue=0.1, contrast=0.2)
    raw_params["base"]["channels"] = 1
    with pytest.raises(ParamsError, match=r"augment.hue: changes colours and needs base.channels: 3"):
        params_from_dict(raw_params)
    raw_params["base"]["channels"] = 3
    assert params_from_dict(raw_params).augment.active


def test_contrast_alone_is_fine_on_grayscale(raw_params: dict) -> None:
    raw_params["augment"]["contrast"] = 0.2
    raw_params["base"]["channels"] = 1
    assert params_from_dict(raw_params).augment.contrast == 0.2


def test_the_digits_default_augments_nothing(raw_params: dict) -> None:
    assert not params_from_dict(raw_params).augment.active


@pytest.mark.parametrize("value", ["weighted", "auto", True, 1])
def test_class_weight_is_null_or_balanced(raw_params: dict, value: object) -> None:
    raw_params["train_custom"]["class_weight"] = value
    with pytest.raises(ParamsError, match=r"train_custom.class_weight: must be one of balanced"):
        params_from_dict(raw_params)


def test_label_smoothing_needs_crossentropy(raw_params: dict) -> None:
    raw_params["train_resnet50"].update(label_smoothing=0.1, loss="mse")
    with pytest.raises(ParamsError, match=r"train_resnet50.label_smoothing: applies to the crossentropy loss only"):
        params_from_dict(raw_params)


def test_momentum_is_for_sgd_and_below_one(raw_params: dict) -> None:
    raw_params["train_custom"].update(optimizer="sgd", momentum=0.9)
    assert params_from_dict(raw_params).train_custom.momentum == 0.9
    raw_params["train_custom"]["momentum"] = 1.0
    with pytest.raises(ParamsError, match=r"train_custom.momentum: must be in \[0, 1\) \(0 = plain SGD\), got 1.0"):
        params_from_dict(raw_params)
    raw_params["train_custom"]["momentum"] = 0.0
    raw_params["train_resnet50"]["momentum"] = 0.9      # with the default optimizer, adam
    with pytest.raises(ParamsError, match=r"train_resnet50.momentum: applies to optimizer sgd only"):
        params_from_dict(raw_params)


@pytest.mark.parametrize(("key", "value"), [("pooling", "max"), ("lr_schedule", "linear")])
def test_recipe_choices_are_checked(raw_params: dict, key: str, value: str) -> None:
    raw_params["train_custom"][key] = value
    with pytest.raises(ParamsError, match=rf"train_custom.{key}: must be one of"):
        params_from_dict(raw_params)


def test_replace_incomparable_is_a_yes_or_no_that_defaults_to_no(raw_params: dict) -> None:
    assert params_from_dict(raw_params).gate.replace_incomparable is False
    raw_params["gate"]["replace_incomparable"] = "yes"
    with pytest.raises(ParamsError, match=r"gate\.replace_incomparable: expected true or false"):
        params_from_dict(raw_params)
    raw_params["gate"]["replace_incomparable"] = True
    assert params_from_dict(raw_params).gate.replace_incomparable is True


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "20"])
def test_max_test_reuse_is_a_whole_number_of_models(raw_params: dict, value) -> None:
    assert params_from_dict(raw_params).gate.max_test_reuse == 20
    raw_params["gate"]["max_test_reuse"] = value
    with pytest.raises(ParamsError, match=r"gate\.max_test_reuse"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "often"])
def test_max_calibration_error_is_off_or_an_error_between_0_and_1(raw_params: dict, value) -> None:
    assert params_from_dict(raw_params).gate.max_calibration_error is None
    raw_params["gate"]["max_calibration_error"] = 0.05
    assert params_from_dict(raw_params).gate.max_calibration_error == 0.05
    raw_params["gate"]["max_calibration_error"] = value
    with pytest.raises(ParamsError, match=r"gate\.max_calibration_error"):
        params_from_dict(raw_params)


def test_temperature_scaling_is_off_by_default_and_true_or_false(raw_params: dict) -> None:
    params = params_from_dict(raw_params)
    assert params.train_custom.temperature_scaling is False and params.train_resnet50.temperature_scaling is False
    raw_params["train_resnet50"]["temperature_scaling"] = "yes"
    with pytest.raises(ParamsError, match=r"train_resnet50\.temperature_scaling: expected true or false"):
        params_from_dict(raw_params)


@pytest.mark.parametrize("value", [-1, 4, 10])
def test_start_from_epoch_is_a_warm_up_shorter_than_the_run(raw_params: dict, value: int) -> None:
    raw_params["train_custom"].update(epochs=4, start_from_epoch=3)
    assert params_from_dict(raw_params).train_custom.start_from_epoch == 3
    raw_params["train_custom"]["start_from_epoch"] = value
    with pytest.raises(ParamsError, match=r"train_custom\.start_from_epoch: must be from 0 up to \(not including\) "
                                          r"epochs \(4\)"):
        params_from_dict(raw_params)
