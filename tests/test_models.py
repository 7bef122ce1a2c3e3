"""The two models: the deck's CNN and ResNet50 with a new head, both built from arguments only.

ResNet50 is big, so it is built four times in this file: once to make a local weights file, once
from that file (shared by several tests), once from scratch, once to fail on a garbage file.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.models import (
    augmentation_layers,
    build_custom_cnn,
    build_resnet50,
    compile_model,
    for_inference,
    imagenet_preprocessing_layer,
    unfreeze_top_layers,
    with_flip_averaging,
)
from pipeline.params import AugmentParams


def _raw_images(count: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Raw 0-255 pixels, as the models take them."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape)).astype(np.float32)


# --- the custom CNN ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def custom_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_custom_cnn(input_shape=(32, 32, 1), num_classes=3, blocks=(64, 32), dense_units=(16,), dropout=0.1)


def test_custom_cnn_blocks_follow_the_deck(custom_cnn: keras.Model) -> None:
    convs = [layer for layer in custom_cnn.layers if isinstance(layer, keras.layers.Conv2D)]
    pools = [layer for layer in custom_cnn.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert [conv.filters for conv in convs] == [64, 64, 32, 32]
    for conv in convs:
        assert tuple(conv.kernel_size) == (3, 3)
        assert conv.activation is keras.activations.relu
    assert len(pools) == 2
    for pool in pools:
        assert tuple(pool.pool_size) == (2, 2)
        assert tuple(pool.strides) == (2, 2)
    # Each block is conv, conv, pool in that order.
    kinds = [type(layer).__name__ for layer in custom_cnn.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.MaxPooling2D))]
    assert kinds == ["Conv2D", "Conv2D", "MaxPooling2D"] * 2


def test_custom_cnn_head(custom_cnn: keras.Model) -> None:
    layers = custom_cnn.layers
    flatten_at = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Flatten)]
    assert len(flatten_at) == 1
    dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [16, 3]
    assert dense[0].activation is keras.activations.relu
    assert dense[-1].activation is keras.activations.softmax
    assert layers[-1] is dense[-1]
    assert all(layers.index(d) > flatten_at[0] for d in dense)
    dropouts = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
    assert [d.rate for d in dropouts] == [0.1]
    assert custom_cnn.input_shape == (None, 32, 32, 1)
    assert custom_cnn.output_shape == (None, 3)
    # 32 -> 16 -> 8 after two poolings, 32 filters.
    flatten = layers[flatten_at[0]]
    assert flatten.output.shape[-1] == 8 * 8 * 32


def test_custom_cnn_takes_raw_pixels(custom_cnn: keras.Model) -> None:
    rescaling = [layer for layer in custom_cnn.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescaling) == 1
    assert rescaling[0].scale == pytest.approx(1 / 255)
    probabilities = custom_cnn.predict(_raw_images(4, (32, 32, 1)), verbose=0)
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_custom_cnn_two_classes_has_one_sigmoid_unit() -> None:
    model = build_custom_cnn(input_shape=(32, 32, 3), num_classes=2, blocks=(4,), dense_units=(), dropout=0.0)
    output = model.layers[-1]
    assert isinstance(output, keras.layers.Dense)
    assert output.units == 1
    assert output.activation is keras.activations.sigmoid
    assert model.output_shape == (None, 1)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    predictions = model.predict(_raw_images(3, (32, 32, 3)), verbose=0)
    assert predictions.shape == (3, 1)
    assert ((predictions >= 0) & (predictions <= 1)).all()


def test_custom_cnn_builder_uses_only_its_arguments() -> None:
    a = build_custom_cnn(input_shape=(32, 32, 3), num_classes=5, blocks=(2, 3, 4), dense_units=(7, 6), dropout=0.0)
    assert len([layer for layer in a.layers if isinstance(layer, keras.layers.MaxPooling2D)]) == 3
    assert [d.units for d in a.layers if isinstance(d, keras.layers.Dense)] == [7, 6, 5]


@pytest.mark.parametrize(("num_classes", "loss", "expected"), [
    (2, "crossentropy", keras.losses.BinaryCrossentropy),
    (3, "crossentropy", keras.losses.CategoricalCrossentropy),
    (3, "mse", keras.losses.MeanSquaredError),
])
def test_compile_model_matches_loss_to_output(num_classes: int, loss: str, expected: type) -> None:
    model = build_custom_cnn(input_shape=(32, 32, 1), num_classes=num_classes, blocks=(2,), dense_units=(),
                             dropout=0.0)
    compile_model(model, "sgd", 0.01, loss, num_classes)
    assert isinstance(model.loss, expected)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_two_class_training_accuracy_counts_blended_targets_by_their_larger_share() -> None:
    """MixUp's targets lie between 0 and 1: an answer on the side of the larger share counts as right
    (as the multi-worker loop and class weights round them), not as wrong every time."""
    keras.utils.set_random_seed(0)
    model = build_custom_cnn(input_shape=(16, 16, 1), num_classes=2, blocks=(4,), dense_units=(), dropout=0.0)
    compile_model(model, "sgd", 0.0, "crossentropy", num_classes=2)
    images = _raw_images(8, (16, 16, 1))
    answers = model.predict(images, verbose=0)[:, 0] > 0.5
    blended = np.where(answers, 0.7, 0.3).astype(np.float32).reshape(-1, 1)   # each on the model's side
    assert model.evaluate(images, blended, verbose=0, return_dict=True)["accuracy"] == 1.0
    assert model.evaluate(images, 1 - blended, verbose=0, return_dict=True)["accuracy"] == 0.0


def saved_and_loaded(model: keras.Model, folder: Path, count: int = 3, tolerance: float = 1e-5) -> keras.Model:
    """Save ``model``, load it back in safe mode, and check it predicts as before on the same pixels."""
    path = folder / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    images = _raw_images(count, model.input_shape[1:], seed=5)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0),
                               rtol=tolerance, atol=tolerance / 10)
    return loaded


def test_saved_custom_cnn_loads_in_safe_mode_with_same_predictions(custom_cnn: keras.Model, tmp_path: Path) -> None:
    saved_and_loaded(custom_cnn, tmp_path)


def test_the_inference_copy_predicts_alike_and_saves_no_optimizer_state(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_custom_cnn(input_shape=(16, 16, 1), num_classes=3, blocks=(16,), dense_units=(64,), dropout=0.0)
    compile_model(model, "adam", 0.01, "crossentropy", num_classes=3)
    images = _raw_images(8, (16, 16, 1))
    model.train_on_batch(images, np.eye(3)[np.arange(8) % 3])   # Adam now holds two moments per weight

    copy = for_inference(model)
    assert model.compiled and not copy.compiled
    assert for_inference(copy) is copy
    for name in ("trained", "copy"):
        (model if name == "trained" else copy).save(tmp_path / f"{name}.keras")
    with zipfile.ZipFile(tmp_path / "copy.keras") as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        assert "optimizer" not in weights and "layers" in weights
    # Adam's state was two thirds of the file.
    assert (tmp_path / "copy.keras").stat().st_size < 0.5 * (tmp_path / "trained.keras").stat().st_size
    loaded = keras.models.load_model(tmp_path / "copy.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


# --- ImageNet preprocessing ----------------------------------------------------------------------

def test_imagenet_preprocessing_layer_matches_keras_preprocess_input() -> None:
    images = _raw_images(4, (8, 8, 3), seed=1)
    expected = keras.applications.resnet50.preprocess_input(images.copy())
    actual = keras.ops.convert_to_numpy(imagenet_preprocessing_layer()(images))
    np.testing.assert_allclose(actual, expected, atol=1e-3)
    assert not imagenet_preprocessing_layer().trainable


def test_imagenet_preprocessing_layer_swaps_to_bgr() -> None:
    red = np.zeros((1, 1, 1, 3), dtype=np.float32)
    red[..., 0] = 255.0
    out = keras.ops.convert_to_numpy(imagenet_preprocessing_layer()(red))[0, 0, 0]
    np.testing.assert_allclose(out, [-103.939, -116.779, 255.0 - 123.68], atol=1e-3)


# --- ResNet50 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_weights_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """A local ResNet50-no-top weights file, with some arrays set to values no fresh model has."""
    keras.utils.set_random_seed(123)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    marked = {}
    for name in ("conv1_conv", "conv3_block2_2_conv", "conv5_block3_3_conv"):
        layer = base.get_layer(name)
        weights = [w + 0.25 for w in layer.get_weights()]
        layer.set_weights(weights)
        marked[name] = weights
    bn = base.get_layer("conv2_block1_1_bn")
    bn_weights = bn.get_weights()
    bn_weights[2] = np.full_like(bn_weights[2], 0.5)  # moving mean
    bn.set_weights(bn_weights)
    marked["conv2_block1_1_bn"] = bn_weights
    path = tmp_path_factory.mktemp("weights") / "resnet50_notop.weights.h5"
    base.save_weights(path)
    return path, marked


@pytest.fixture(scope="module")
def pretrained(resnet_weights_file) -> tuple[keras.Model, keras.Model]:
    path, _ = resnet_weights_file
    keras.utils.set_random_seed(7)
    return build_resnet50((32, 32, 3), num_classes=2, weights=str(path), dense_units=(8,), dropout=0.2)


def test_resnet50_loads_the_given_weights_file(pretrained, resnet_weights_file) -> None:
    _, base = pretrained
    _, marked = resnet_weights_file
    for name, expected in marked.items():
        actual = base.get_layer(name).get_weights()
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            np.testing.assert_array_equal(a, e)


def test_a_weights_path_under_the_home_folder_loads(resnet_weights_file, monkeypatch: pytest.MonkeyPatch) -> None:
    """``~/...`` passes the params check (it expands ~), so loading must expand it too."""
    path, marked = resnet_weights_file
    monkeypatch.setenv("HOME", str(path.parent))
    _, base = build_resnet50((32, 32, 3), num_classes=2, weights=f"~/{path.name}", dense_units=(8,), dropout=0.2)
    np.testing.assert_array_equal(base.get_layer("conv1_conv").get_weights()[0], marked["conv1_conv"][0])


def test_pretrained_base_is_frozen(pretrained) -> None:
    model, base = pretrained
    assert base.trainable is False
    assert base.trainable_weights == []
    # Only the new head trains: fc1 (kernel, bias) and output (kernel, bias).
    trainable_names = sorted({w.path.split("/")[0] for w in model.trainable_weights})
    assert trainable_names == ["fc1", "output"]
    assert len(model.trainable_weights) == 4
    assert model.get_layer("resnet50_preprocess").trainable is False


def test_pretrained_model_shape_and_head(pretrained) -> None:
    model, base = pretrained
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 1)  # two classes: one sigmoid unit
    assert model.layers[-1].activation is keras.activations.sigmoid
    assert any(layer is base for layer in model.layers)
    assert not any(layer.name == "gray_to_rgb" for layer in model.layers)


def test_saved_resnet50_loads_in_safe_mode_with_same_predictions(pretrained, tmp_path: Path) -> None:
    model, _ = pretrained
    loaded = saved_and_loaded(model, tmp_path, count=2, tolerance=1e-4)
    assert loaded.get_layer("resnet50_preprocess").trainable is False


def test_unfreeze_top_layers_keeps_batch_normalization_frozen(pretrained) -> None:
    model, base = pretrained
    try:
        count = 20
        unfrozen = unfreeze_top_layers(base, count)
        top, rest = base.layers[-count:], base.layers[:-count]
        assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in top)
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                assert layer.trainable is False, layer.name
        for layer in rest:
            assert layer.trainable is False, layer.name
        with_weights = [layer for layer in top
                        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
        assert with_weights and all(layer.trainable for layer in with_weights)
        assert unfrozen == len(with_weights)
        # Only those layers' variables (kernel and bias of each conv) train in the base now.
        assert len(base.trainable_weights) == sum(len(layer.trainable_weights) for layer in with_weights)
        bn_variables = {id(v) for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
                        for v in layer.weights}
        assert not bn_variables & {id(v) for v in model.trainable_weights}
    finally:
        base.trainable = False


def test_unfreeze_zero_layers_unfreezes_nothing(pretrained) -> None:
    _, base = pretrained
    try:
        assert unfreeze_top_layers(base, 0) == 0
        assert base.trainable_weights == []
    finally:
        base.trainable = False


def test_resnet50_from_scratch_on_grayscale() -> None:
    keras.utils.set_random_seed(0)
    model, base = build_resnet50((32, 32, 1), num_classes=4, weights=None, dense_units=(), dropout=0.0)
    assert model.input_shape == (None, 32, 32, 1)
    # The gray channel repeated three times, before ImageNet's preprocessing (get_layer raises when missing).
    gray_to_rgb = model.get_layer("gray_to_rgb")
    assert isinstance(gray_to_rgb, keras.layers.Concatenate) and gray_to_rgb.axis == -1
    gray = _raw_images(2, (32, 32, 1))
    rgb = keras.Model(model.input, gray_to_rgb.output).predict(gray, verbose=0)
    np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1))
    assert base.input_shape == (None, 32, 32, 3)
    assert base.trainable is True
    assert len(base.trainable_weights) > 100
    predictions = model.predict(_raw_images(2, (32, 32, 1)), verbose=0)
    assert predictions.shape == (2, 4)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["garbage.weights.h5", "garbage.keras", "empty.keras"])
def test_resnet50_garbage_weights_file_is_a_pipeline_error(tmp_path: Path, name: str) -> None:
    """A truncated download, a renamed file, a .keras archive without the weights inside: one line each."""
    garbage = tmp_path / name
    if name == "empty.keras":
        import zipfile

        with zipfile.ZipFile(garbage, "w") as archive:
            archive.writestr("config.json", "{}")
    else:
        garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(PipelineError) as info:
        build_resnet50((32, 32, 3), num_classes=3, weights=str(garbage), dense_units=(), dropout=0.0)
    assert str(garbage) in str(info.value)
    assert "train_resnet50.weights" in str(info.value)


# --- augmentation and the photo recipe -----------------------------------------------------------

PHOTO_AUGMENT = AugmentParams(horizontal_flip=True, rotation=0.05, zoom=0.1, translation=0.1, contrast=0.2, hue=0.05,
                              rand_augment=0.2, mixup=0.2, cutmix=0.0, flip_average=False)


def _photo_cnn(augment: AugmentParams | None = PHOTO_AUGMENT) -> keras.Model:
    return build_custom_cnn((24, 24, 3), 2, blocks=(4, 8), dense_units=(), dropout=0.2, batch_norm=True,
                            pooling="global_average", augment=augment)


def test_augmentation_changes_images_in_training_only() -> None:
    model = _photo_cnn()
    images = _raw_images(4, (24, 24, 3), seed=3)
    augmenting = keras.Sequential(augmentation_layers(PHOTO_AUGMENT))
    trained_view = keras.ops.convert_to_numpy(augmenting(images, training=True))
    assert not np.allclose(trained_view, images)                       # training sees changed pixels
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(augmenting(images, training=False)), images)
    # In prediction the model is the same function with or without its augmentation layers.
    plain = _photo_cnn(augment=None)
    plain.set_weights(model.get_weights())
    np.testing.assert_allclose(model.predict(images, verbose=0), plain.predict(images, verbose=0), rtol=1e-6)


def test_rand_augment_alone_changes_images_in_training_only() -> None:
    alone = AugmentParams(horizontal_flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0, hue=0.0,
                          rand_augment=0.5, mixup=0.0, cutmix=0.0, flip_average=False)
    [layer] = augmentation_layers(alone)
    assert isinstance(layer, keras.layers.RandAugment) and layer.num_ops == 2 and layer.value_range == (0, 255)
    images = _raw_images(4, (24, 24, 3), seed=5)
    changed = [not np.allclose(keras.ops.convert_to_numpy(layer(images, training=True)), images) for _ in range(5)]
    assert any(changed)                   # two of eleven changes per batch, each at a random strength
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)


def test_no_augmentation_layer_unless_switched_on() -> None:
    off = AugmentParams(horizontal_flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0, hue=0.0,
                         rand_augment=0.0, mixup=0.0, cutmix=0.0, flip_average=False)
    assert augmentation_layers(off) == [] and augmentation_layers(None) == []
    names = [layer.name for layer in augmentation_layers(PHOTO_AUGMENT)]
    assert names == ["augment_flip", "augment_rotation", "augment_zoom", "augment_translation", "augment_contrast",
                     "augment_hue", "augment_rand_augment"]


def test_batch_norm_and_global_average_pooling_are_built_when_asked() -> None:
    model = _photo_cnn()
    kinds = [type(layer).__name__ for layer in model.layers]
    normalised = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(normalised) == 4 and "GlobalAveragePooling2D" in kinds and "Flatten" not in kinds
    deck = build_custom_cnn((24, 24, 3), 2, blocks=(4, 8), dense_units=(), dropout=0.2)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in deck.layers)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_residual_blocks_add_each_blocks_input_and_save_in_safe_mode(batch_norm: bool, tmp_path: Path) -> None:
    model = build_custom_cnn((24, 24, 3), 2, blocks=(8, 8, 16), dense_units=(), dropout=0.0, batch_norm=batch_norm,
                             pooling="global_average", residual=True)
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)] == [
        "block1_add", "block2_add", "block3_add"]
    # A 1x1 projection where the filters change (3 -> 8, 8 -> 16), the input itself where they do not.
    assert [layer.name for layer in model.layers if layer.name.endswith("_shortcut")] == [
        "block1_shortcut", "block3_shortcut"]
    block2 = model.get_layer("block2_add")
    assert any(tensor is model.get_layer("block1_pool").output for tensor in block2.input)   # the block's input
    plain = build_custom_cnn((24, 24, 3), 2, blocks=(8, 8, 16), dense_units=(), dropout=0.0, batch_norm=batch_norm,
                             pooling="global_average")
    assert not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)
    saved_and_loaded(model, tmp_path)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_separable_blocks_keep_a_plain_first_convolution_and_save_in_safe_mode(batch_norm: bool,
                                                                               tmp_path: Path) -> None:
    model = build_custom_cnn((24, 24, 3), 2, blocks=(8, 16), dense_units=(), dropout=0.0, batch_norm=batch_norm,
                             pooling="global_average", separable=True)
    kinds = {layer.name: type(layer).__name__ for layer in model.layers if "conv" in layer.name and
             not layer.name.endswith(("_bn", "_relu"))}
    assert kinds == {"block1_conv1": "Conv2D", "block1_conv2": "SeparableConv2D",
                     "block2_conv1": "SeparableConv2D", "block2_conv2": "SeparableConv2D"}
    # A 3x3 filter per channel and a 1x1 mix: 9 * 8 + 8 * 16 weights where a plain 3x3 has 9 * 8 * 16.
    assert model.get_layer("block2_conv1").count_params() == 9 * 8 + 8 * 16 + (0 if batch_norm else 16)
    saved_and_loaded(model, tmp_path)


def test_augmented_cnn_saves_and_loads_in_safe_mode_with_same_predictions(tmp_path: Path) -> None:
    loaded = saved_and_loaded(_photo_cnn(), tmp_path)
    assert [layer.name for layer in loaded.layers if layer.name.startswith("augment_")] == [
        "augment_flip", "augment_rotation", "augment_zoom", "augment_translation", "augment_contrast", "augment_hue",
        "augment_rand_augment"]


def test_cosine_schedule_and_label_smoothing_reach_the_optimizer_and_loss() -> None:
    model = _photo_cnn(augment=None)
    compile_model(model, "adam", 0.002, "crossentropy", 2, label_smoothing=0.1, cosine_decay_steps=100)
    schedule = model.optimizer.learning_rate_schedule if hasattr(model.optimizer, "learning_rate_schedule") \
        else model.optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    assert float(schedule(0)) == pytest.approx(0.002) and float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
    assert model.loss.get_config()["label_smoothing"] == pytest.approx(0.1)


def test_flip_averaging_answers_the_mean_for_image_and_mirror_and_loads_in_safe_mode(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    model = _photo_cnn(augment=None)
    averaged = with_flip_averaging(model)
    images = _raw_images(6, (24, 24, 3), seed=2)
    mirrors = images[:, :, ::-1, :].copy()
    plain, flipped = model.predict(images, verbose=0), model.predict(mirrors, verbose=0)
    assert not np.allclose(plain, flipped, atol=1e-4)          # the model alone tells them apart
    np.testing.assert_allclose(averaged.predict(images, verbose=0), (plain + flipped) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(averaged.predict(mirrors, verbose=0), averaged.predict(images, verbose=0),
                               rtol=1e-5, atol=1e-6)
    loaded = saved_and_loaded(averaged, tmp_path)
    assert loaded.get_layer("mirror_reverse").trainable is False


def test_flip_averaging_stays_float32_after_training_in_mixed_precision(tmp_path: Path) -> None:
    """Training leaves the global policy at mixed_bfloat16 on CPUs with it: the wrapper built after it
    must not round the pixels it mirrors (pixel values between integers, from a resize, say)."""
    keras.utils.set_random_seed(3)
    model = for_inference(_photo_cnn(augment=None))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        averaged = with_flip_averaging(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    computing = [layer for layer in averaged.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert {layer.dtype_policy.name for layer in computing} == {"float32"}
    images = _raw_images(4, (24, 24, 3), seed=5).astype(np.float32) + 0.3
    mirrors = images[:, :, ::-1, :].copy()
    expected = (model.predict(images, verbose=0) + model.predict(mirrors, verbose=0)) / 2
    np.testing.assert_allclose(averaged.predict(images, verbose=0), expected, rtol=1e-6, atol=1e-7)


def test_weight_decay_shrinks_kernels_but_not_biases_or_normalisation() -> None:
    keras.utils.set_random_seed(2)
    model = _photo_cnn(augment=None)
    compile_model(model, "sgd", 0.1, "crossentropy", 2, weight_decay=0.5)
    before = {variable.path: keras.ops.convert_to_numpy(variable) for variable in model.trainable_variables}
    zeros = [keras.ops.zeros_like(variable) for variable in model.trainable_variables]
    model.optimizer.apply_gradients(zip(zeros, model.trainable_variables))   # no gradient: only the decay acts
    kinds = set()
    for variable in model.trainable_variables:
        after = keras.ops.convert_to_numpy(variable)
        if variable.name == "kernel":
            np.testing.assert_allclose(after, before[variable.path] * (1 - 0.1 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(after, before[variable.path])
        kinds.add(variable.name)
    assert {"kernel", "bias", "gamma", "beta"} <= kinds


@pytest.mark.parametrize(("momentum", "after_two_steps"), [(0.0, -0.2), (0.9, -0.29)])
def test_sgd_momentum_carries_each_step_into_the_next(momentum: float, after_two_steps: float) -> None:
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    compile_model(model, "sgd", 0.1, "mse", 1, momentum=momentum)
    (kernel,) = model.trainable_variables
    for _ in range(2):      # the same gradient twice: plain SGD steps 0.1 twice, momentum 0.1 then 0.1 + 0.9 * 0.1
        model.optimizer.apply_gradients([(keras.ops.ones_like(kernel), kernel)])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel), [[after_two_steps]], rtol=1e-6)


def test_the_inference_copy_of_a_mixed_precision_model_computes_in_float32(tmp_path: Path) -> None:
    """Trained in mixed_bfloat16, served in float32: every layer, nested ones included, and the
    same answers to within bfloat16's rounding."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_custom_cnn((16, 16, 1), 3, [4], [8], 0.0)
        compile_model(model, "adam", 1e-3, "crossentropy", 3)
        resnet, base = build_resnet50((32, 32, 3), 2, weights=None, dense_units=[], dropout=0.0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    images = _raw_images(8, (16, 16, 1))
    model.train_on_batch(images, np.eye(3)[np.arange(8) % 3])
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in model.layers}

    copy = for_inference(model)
    copy.save(tmp_path / "copy.keras")
    loaded = keras.models.load_model(tmp_path / "copy.keras", safe_mode=True)
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
    served = np.asarray(loaded.predict_on_batch(images))
    assert served.dtype == np.float32
    np.testing.assert_allclose(served, model.predict(images, verbose=0), atol=2e-2)

    nested = for_inference(resnet).get_layer(base.name)
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in base.layers}
    assert {layer.dtype_policy.name for layer in nested.layers} == {"float32"}
