"""The fused batch normalization computes what Keras's layer computes, and is saved as Keras's layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.fused_batch_norm import FusedBatchNormalization, as_plain_config, uses_fused
from pipeline.models import build_custom_cnn, for_inference, with_flip_averaging
from tests.conftest import REPO_ROOT


def _pair(momentum: float = 0.9) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """Keras's layer and the fused one, built alike, with the same non-trivial weights."""
    rng = np.random.default_rng(0)
    plain, fused = keras.layers.BatchNormalization(momentum=momentum), FusedBatchNormalization(momentum=momentum)
    for layer in (plain, fused):
        layer.build((None, 6, 5, 4))
    weights = [rng.uniform(0.5, 2.0, 4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2.0, 4)]
    for layer in (plain, fused):
        layer.set_weights([w.astype("float32") for w in weights])
    return plain, fused


def test_training_and_inference_match_keras_batch_normalization() -> None:
    plain, fused = _pair()
    images = np.random.default_rng(1).normal(3.0, 2.0, size=(3, 6, 5, 4)).astype("float32")
    for _ in range(3):   # three training steps: outputs from the batch, moving statistics updated alike
        np.testing.assert_allclose(fused(images, training=True), plain(images, training=True), rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(fused.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)   # the variance without Bessel's correction
    np.testing.assert_allclose(fused(images, training=False), plain(images, training=False), rtol=1e-5, atol=1e-5)


def test_gradients_match_keras_batch_normalization() -> None:
    import tensorflow as tf

    plain, fused = _pair()
    images = tf.constant(np.random.default_rng(2).normal(size=(2, 6, 5, 4)).astype("float32"))
    target = tf.constant(np.random.default_rng(3).normal(size=(2, 6, 5, 4)).astype("float32"))
    gradients = []
    for layer in (plain, fused):
        with tf.GradientTape() as tape:
            tape.watch(images)
            loss = tf.reduce_sum((layer(images, training=True) - target) ** 2)
        gradients.append(tape.gradient(loss, [images, layer.gamma.value, layer.beta.value]))
    for theirs, mine in zip(*gradients):
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-4)


def test_mixed_bfloat16_computes_in_bfloat16_and_keeps_float32_statistics() -> None:
    layer = FusedBatchNormalization(dtype="mixed_bfloat16")
    images = keras.ops.cast(np.random.default_rng(4).normal(size=(2, 4, 4, 3)), "bfloat16")
    assert keras.backend.standardize_dtype(layer(images, training=True).dtype) == "bfloat16"
    assert {keras.backend.standardize_dtype(w.dtype) for w in layer.weights} == {"float32"}


def test_what_the_fused_kernel_does_not_cover_is_left_to_keras() -> None:
    flat = np.random.default_rng(5).normal(size=(8, 3)).astype("float32")     # a dense layer's output: 2-D
    plain, fused = keras.layers.BatchNormalization(), FusedBatchNormalization()
    np.testing.assert_allclose(fused(flat, training=True), plain(flat, training=True), rtol=1e-5, atol=1e-5)
    channels_first = FusedBatchNormalization(axis=1)
    assert channels_first(np.ones((2, 3, 4, 4), "float32"), training=True).shape == (2, 3, 4, 4)


def test_the_saved_model_has_keras_own_layer_and_loads_without_this_package(tmp_path: Path) -> None:
    model = build_custom_cnn((16, 16, 3), 3, blocks=[4, 8], dense_units=[], dropout=0.0, batch_norm=True,
                             pooling="global_average", residual=True)
    assert uses_fused(model)
    images = np.random.default_rng(6).uniform(0, 255, size=(4, 16, 16, 3)).astype("float32")
    model(images, training=True)   # moving statistics away from their initial values
    saved = for_inference(model)
    assert not uses_fused(saved) and not uses_fused(for_inference(with_flip_averaging(model)))
    assert [type(layer).__name__ for layer in saved.layers].count("BatchNormalization") == 6   # 4 + 2 shortcuts
    np.testing.assert_allclose(saved.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
    saved.save(tmp_path / "model.keras")
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", saved.predict(images, verbose=0))
    # A fresh interpreter that never imports pipeline: plain Keras, safe mode, the same answers.
    check = ("import numpy as np, keras, sys; d = sys.argv[1]; "
             "m = keras.models.load_model(d + '/model.keras', safe_mode=True); "
             "np.testing.assert_allclose(m.predict(np.load(d + '/images.npy'), verbose=0), np.load(d + '/expected.npy'), "
             "rtol=1e-6); assert 'pipeline' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", check, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_as_plain_config_names_keras_layer_and_keeps_every_argument() -> None:
    layer = FusedBatchNormalization(momentum=0.8, epsilon=0.01, name="bn")
    config = keras.saving.serialize_keras_object(layer)
    plain = as_plain_config({"layers": [config]})["layers"][0]
    assert (plain["module"], plain["class_name"], plain["registered_name"]) == ("keras.layers", "BatchNormalization", None)
    rebuilt = keras.saving.deserialize_keras_object(plain)
    assert type(rebuilt) is keras.layers.BatchNormalization
    assert (rebuilt.momentum, rebuilt.epsilon, rebuilt.name) == (0.8, 0.01, "bn")


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_a_training_step_of_the_photo_network_matches_keras_layer(policy: str) -> None:
    """The photo preset's network, one optimizer step with each layer from the same weights: the same
    loss, and weights that stay within the precision's rounding."""
    from pipeline.models import compile_model

    keras.mixed_precision.set_global_policy(policy)
    try:
        fused = build_custom_cnn((32, 32, 3), 2, blocks=[8, 16], dense_units=[], dropout=0.0, batch_norm=True,
                                 pooling="global_average")
        plain = keras.Model.from_config(as_plain_config(fused.get_config()))
        plain.set_weights(fused.get_weights())
        assert not uses_fused(plain)
        images = np.random.default_rng(7).uniform(0, 255, size=(16, 32, 32, 3)).astype("float32")
        labels = (np.arange(16) % 2).astype("float32")
        losses = []
        for model in (fused, plain):
            # SGD: its step is the gradient scaled (Adam's first step is about the gradient's sign, which
            # rounding flips for weights whose gradient is near zero).
            compile_model(model, "sgd", 0.01, "crossentropy", 2)
            losses.append(float(model.train_on_batch(images, labels)[0]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    tolerance = 1e-4 if policy == "float32" else 2e-2
    assert losses[0] == pytest.approx(losses[1], rel=tolerance)
    for mine, theirs in zip(fused.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=tolerance, atol=tolerance)


def test_resnet50_trains_with_the_fused_layer_and_is_saved_with_keras_own() -> None:
    from pipeline.models import build_resnet50

    model, base = build_resnet50((32, 32, 3), 2, None, dense_units=[], dropout=0.0)
    normalisations = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(normalisations) == 53 and all(type(layer) is FusedBatchNormalization for layer in normalisations)
    assert {layer.momentum for layer in normalisations} == {0.9}   # from scratch: the statistics follow training
    images = np.random.default_rng(8).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    saved = for_inference(model)
    assert not uses_fused(saved)
    np.testing.assert_allclose(saved.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
