"""Grad-CAM: the heatmap lies where the evidence for the class is, through nested models too."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.gradcam import feature_layer, gradcam
from pipeline.models import build_custom_cnn, build_resnet50
from pipeline.params import AugmentParams

SIZE = 16


def corner_image() -> np.ndarray:
    """A red square in the top-right corner and a green one, as bright, in the bottom-left."""
    image = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
    image[:4, -4:, 0] = 255.0
    image[-4:, :4, 1] = 255.0
    return image


def colour_channels(name: str) -> keras.layers.Conv2D:
    """A 1x1 convolution whose two channels are the red and the green of each pixel."""
    conv = keras.layers.Conv2D(2, 1, use_bias=False, name=name)
    conv.build((None, SIZE, SIZE, 3))
    conv.set_weights([np.array([[[[1, 0], [0, 1], [0, 0]]]], dtype=np.float32)])
    return conv


def red_top_right_head(x) -> keras.layers.Layer:
    """The answer: class 1 when the top-right corner is red; nothing else counts."""
    x = keras.layers.Flatten()(x)
    head = keras.layers.Dense(1, activation="sigmoid", name="output")
    output = head(x)
    kernel = np.zeros((SIZE, SIZE, 2), dtype=np.float32)
    kernel[:4, -4:, 0] = 1.0
    head.set_weights([kernel.reshape(-1, 1), np.array([-1.0], dtype=np.float32)])
    return output


def corner_classifier(nested_base: bool = False) -> keras.Model:
    """The pipeline's shape of model: augmentation (off at inference), rescaling, convolutions
    (in a nested model, like the ResNet50 base, when ``nested_base``), the output layer."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.RandomFlip("horizontal", name="augment_flip")(inputs)
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    if nested_base:
        base_inputs = keras.Input((SIZE, SIZE, 3))
        x = keras.Model(base_inputs, colour_channels("conv")(base_inputs), name="base")(x)
    else:
        x = colour_channels("conv")(x)
    return keras.Model(inputs, red_top_right_head(x), name="corner")


def with_mirror_average(classifier: keras.Model) -> keras.Model:
    """A wrapper like flip averaging: the classifier nested, called on the image and its mirror."""
    inputs = keras.Input((SIZE, SIZE, 3))
    mirrored = keras.layers.RandomFlip("horizontal")(inputs, training=True)
    return keras.Model(inputs, keras.layers.Average()([classifier(inputs), classifier(mirrored)]))


@pytest.mark.parametrize("build", [corner_classifier, lambda: corner_classifier(nested_base=True),
                                   lambda: with_mirror_average(corner_classifier())],
                         ids=["plain", "nested-base", "nested-classifier"])
def test_the_heatmap_is_brightest_in_the_corner_the_answer_depends_on(build) -> None:
    model = build()
    image = corner_image()
    (heatmap,) = gradcam(model, image[None], [1])
    assert heatmap.shape == (SIZE, SIZE)
    assert heatmap[:4, -4:].min() > 0.9 and heatmap.max() == pytest.approx(1.0)
    # The green corner is as bright as the red one, but the answer does not depend on it.
    assert heatmap[-4:, :4].max() < 0.05
    assert heatmap[4:-4, 4:-4].max() < 0.05
    # For the other class the red corner is evidence against: no heat anywhere.
    (against,) = gradcam(model, image[None], [0])
    assert against.max() == 0.0


def test_heatmaps_follow_each_image_in_a_batch() -> None:
    model = corner_classifier()
    moved = corner_image()[:, ::-1].copy()    # the red square now top-left: not what the model reads
    heatmaps = gradcam(model, np.stack([corner_image(), moved, corner_image()]), [1, 1, 1], batch_size=2)
    assert heatmaps.shape == (3, SIZE, SIZE)
    assert heatmaps[0][:4, -4:].min() > 0.9 and heatmaps[2][:4, -4:].min() > 0.9
    assert heatmaps[1][:4, -4:].max() < 0.05


def test_the_feature_map_of_each_trainer_is_its_last_convolution() -> None:
    custom = build_custom_cnn((32, 32, 3), 3, [4, 8], [], 0.0, batch_norm=True, pooling="global_average",
                              augment=AugmentParams(True, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, False))
    assert feature_layer(custom).name == "block2_conv2_relu"
    resnet, base = build_resnet50((32, 32, 1), 2, None, [], 0.0)
    assert feature_layer(resnet) is base
    heatmaps = gradcam(resnet, np.full((2, 32, 32, 1), 128.0), [0, 1])
    assert heatmaps.shape == (2, 32, 32) and np.isfinite(heatmaps).all()
    assert ((heatmaps >= 0) & (heatmaps <= 1)).all()


def test_a_model_without_convolutions_is_refused_by_name() -> None:
    inputs = keras.Input((SIZE, SIZE, 3))
    dense = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="output")(
        keras.layers.Flatten()(inputs)), name="dense_only")
    with pytest.raises(PipelineError, match="model dense_only has no convolutional layer"):
        gradcam(dense, corner_image()[None], [0])
