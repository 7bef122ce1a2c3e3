"""The two models, built from arguments only. Both take raw pixels (0-255) as input.

Preprocessing lives inside each model, as built-in Keras layers, so a saved model loads with
``keras.models.load_model`` (safe mode on) and needs nothing from this package to predict.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from pipeline.errors import PipelineError
from pipeline.fused_batch_norm import FusedBatchNormalization, as_plain_config, uses_fused
from pipeline.params import AugmentParams

log = logging.getLogger("pipeline.models")

# keras.applications.resnet50.preprocess_input ("caffe" mode): RGB -> BGR, minus the ImageNet
# channel means. Written as a fixed Dense layer so the saved model needs no custom code.
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)
# Weight decay applies to kernels only: variables named so (biases, BatchNormalization's scale and
# offset) are left out, as in the AdamW paper and keras-io's recipes.
NOT_DECAYED = ("bias", "gamma", "beta")


def augmentation_layers(augment: AugmentParams | None) -> list[keras.layers.Layer]:
    """Keras's random preprocessing layers for the switched-on changes, in a fixed order.

    They act only in training (``model.fit``); ``predict`` and evaluation pass images through
    unchanged. They work on raw 0-255 pixels and compute in float32 whatever the dtype policy.
    """
    if augment is None or not augment.active:
        return []
    layers: list[keras.layers.Layer] = []
    common = {"dtype": "float32"}
    if augment.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", name="augment_flip", **common))
    if augment.rotation > 0:
        layers.append(keras.layers.RandomRotation(augment.rotation, name="augment_rotation", **common))
    if augment.zoom > 0:
        layers.append(keras.layers.RandomZoom(augment.zoom, name="augment_zoom", **common))
    if augment.translation > 0:
        layers.append(keras.layers.RandomTranslation(augment.translation, augment.translation,
                                                     name="augment_translation", **common))
    if augment.contrast > 0:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), name="augment_contrast",
                                                  **common))
    if augment.hue > 0:
        layers.append(keras.layers.RandomHue(augment.hue, value_range=(0, 255), name="augment_hue", **common))
    if augment.rand_augment > 0:
        # Keras's RandAugment: num_ops=2 as in the paper's ImageNet recipe; every image of a batch gets
        # the same two changes, each at its own random strength up to the factor.
        layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=augment.rand_augment,
                                               name="augment_rand_augment", **common))
    return layers


def _augmented(inputs, augment: AugmentParams | None):
    x = inputs
    for layer in augmentation_layers(augment):
        x = layer(x)
    return x


def build_custom_cnn(input_shape: tuple[int, int, int], num_classes: int, blocks: Sequence[int],
                     dense_units: Sequence[int], dropout: float, *, batch_norm: bool = False,
                     pooling: str = "flatten", residual: bool = False, separable: bool = False,
                     augment: AugmentParams | None = None) -> keras.Model:
    """The deck's CNN: per block two 3x3 ReLU convolutions and a 2x2 max pooling; Flatten; dense layers.

    ``batch_norm`` puts BatchNormalization between each convolution and its ReLU (trained by
    TensorFlow's fused kernel, saved as Keras's own layer: :mod:`pipeline.fused_batch_norm`); ``pooling``
    ``global_average`` replaces Flatten; ``residual`` adds each block's input to its second
    convolution's output before that ReLU (ResNet's shortcut, through a 1x1 convolution where the
    number of filters changes); ``separable`` makes every convolution but the first on the pixels a
    depthwise separable one (Xception's: a 3x3 filter per channel, then a 1x1 convolution mixing
    them, about an eighth of the work and the weights); ``augment`` adds the random training-time
    changes first.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(_augmented(inputs, augment))
    for number, filters in enumerate(blocks, start=1):
        shortcut = x
        for conv in (1, 2):
            name = f"block{number}_conv{conv}"
            joined = residual and conv == 2
            convolution = keras.layers.SeparableConv2D if separable and (number, conv) != (1, 1) \
                else keras.layers.Conv2D
            if not (batch_norm or joined):
                x = convolution(filters, (3, 3), activation="relu", padding="same", name=name)(x)
                continue
            # The convolution's bias is redundant before a normalisation.
            x = convolution(filters, (3, 3), padding="same", use_bias=not batch_norm, name=name)(x)
            if batch_norm:
                x = FusedBatchNormalization(name=f"{name}_bn")(x)
            if joined:
                x = keras.layers.Add(name=f"block{number}_add")([x, _projected(shortcut, filters, number,
                                                                                batch_norm)])
            x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
        x = keras.layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{number}_pool")(x)
    if pooling == "global_average":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    outputs = _classifier_head(x, num_classes, dense_units, dropout)
    return keras.Model(inputs, outputs, name="custom_cnn")


def _projected(shortcut, filters: int, number: int, batch_norm: bool):
    """A block's input as its shortcut: itself when it has ``filters`` channels, else a 1x1 convolution."""
    if shortcut.shape[-1] == filters:
        return shortcut
    name = f"block{number}_shortcut"
    shortcut = keras.layers.Conv2D(filters, (1, 1), use_bias=not batch_norm, name=name)(shortcut)
    return FusedBatchNormalization(name=f"{name}_bn")(shortcut) if batch_norm else shortcut


def build_resnet50(input_shape: tuple[int, int, int], num_classes: int, weights: str | None,
                   dense_units: Sequence[int], dropout: float, *,
                   augment: AugmentParams | None = None) -> tuple[keras.Model, keras.Model]:
    """ResNet50 without its top and a new head; returns ``(model, base)``.

    ``weights`` is None (random initialisation), ``"imagenet"`` (downloaded by Keras once and
    cached) or the path of a weights file for ResNet50 without top. A pretrained base starts
    frozen and is called with ``training=False`` so its BatchNormalization statistics stay put.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = _augmented(inputs, augment)
    if input_shape[-1] == 1:
        x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    x = imagenet_preprocessing_layer()(x)
    base = with_fused_batch_norm(_resnet50_base((input_shape[0], input_shape[1], 3), weights))
    if weights is not None:
        base.trainable = False
        x = base(x, training=False)
    else:
        x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _classifier_head(x, num_classes, dense_units, dropout)
    return keras.Model(inputs, outputs, name="resnet50_transfer"), base


def with_fused_batch_norm(base: keras.Model) -> keras.Model:
    """``base`` with each of Keras's BatchNormalization layers trained by the fused kernel: the same
    layers, names, settings and weights (ResNet50's 53 normalizations are half its training step on a
    CPU in float32); saved as Keras's own layers again by :func:`for_inference`."""
    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        kind = FusedBatchNormalization if type(layer) is keras.layers.BatchNormalization else type(layer)
        return kind.from_config(layer.get_config())

    fused = keras.models.clone_model(base, clone_function=clone)
    fused.set_weights(base.get_weights())
    return fused


def imagenet_preprocessing_layer() -> keras.layers.Layer:
    """``resnet50.preprocess_input`` as a frozen Dense layer on the channel axis."""
    layer = keras.layers.Dense(3, name="resnet50_preprocess", trainable=False)
    layer.build((None, 3))
    to_bgr = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float32)
    layer.set_weights([to_bgr, -np.array(IMAGENET_BGR_MEANS, dtype=np.float32)])
    return layer


def unfreeze_top_layers(base: keras.Model, count: int) -> int:
    """Make the top ``count`` layers of a frozen base trainable, BatchNormalization excepted.

    Returns how many layers became trainable. The caller must compile again afterwards.
    """
    if count <= 0:
        return 0
    base.trainable = True
    for layer in base.layers[:-count] if count < len(base.layers) else []:
        layer.trainable = False
    unfrozen = 0
    for layer in base.layers[-count:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        elif layer.weights:
            unfrozen += 1
    return unfrozen


def compile_model(model: keras.Model, optimizer: str, learning_rate: float, loss: str, num_classes: int,
                  jit_compile: bool = False, *, label_smoothing: float = 0.0, cosine_decay_steps: int = 0,
                  weight_decay: float = 0.0, ema: bool = False, momentum: float = 0.0) -> None:
    """Compile with the params' optimizer and loss; the loss matches the output layer's shape.

    ``cosine_decay_steps`` > 0 decays the learning rate along a cosine to 0 over that many steps.
    ``weight_decay`` > 0 shrinks every kernel by that fraction per unit of learning rate at each step,
    apart from the gradient (Keras optimizers' decoupled decay: Adam becomes AdamW); biases and
    BatchNormalization's scale and offset are left out, as usual. ``ema`` keeps a moving average of
    the weights in the optimizer (momentum 0.99); :func:`pipeline.training.fit` swaps it in.
    ``momentum`` (SGD only) carries that share of each step into the next (Keras's classical momentum).
    """
    optimizers = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    if loss == "mse":
        loss_function = keras.losses.MeanSquaredError()
    elif num_classes == 2:
        loss_function = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    else:
        loss_function = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    rate = keras.optimizers.schedules.CosineDecay(learning_rate, cosine_decay_steps) if cosine_decay_steps > 0 \
        else learning_rate
    options = {"weight_decay": weight_decay} if weight_decay > 0 else {}
    if momentum > 0:
        options["momentum"] = momentum
    chosen = optimizers[optimizer](learning_rate=rate, use_ema=ema, **options)
    if weight_decay > 0:
        chosen.exclude_from_weight_decay(var_names=list(NOT_DECAYED))
    # Two classes: the share of images whose 0/1 answer matches the rounded target. Keras's own
    # binary accuracy compares with the target itself, so MixUp's blended targets would never match.
    accuracy = keras.metrics.MeanMetricWrapper(_accuracy_of_rounded_targets, name="accuracy") \
        if num_classes == 2 else "accuracy"
    model.compile(optimizer=chosen, loss=loss_function, metrics=[accuracy], jit_compile=jit_compile)


def _accuracy_of_rounded_targets(targets, predictions):
    return keras.metrics.binary_accuracy(keras.ops.round(targets), predictions)


def for_inference(model: keras.Model) -> keras.Model:
    """The same layers and weights, in float32, without the optimizer, loss and metrics that
    training attached, and with Keras's own BatchNormalization where training used the fused one.

    This is what is saved and logged: a model file is for predicting, and Adam's two moment
    estimates per weight would triple it (ResNet50: 284 MB instead of 94 MB, and every save, log
    and load slower by as much). ``clone_model`` is no help here, since it compiles the copy. The
    training precision (mixed_bfloat16 on CPUs that have it) is a training choice: the served model
    computes in float32, which every CPU runs natively, and answers as the trained model does to
    within bfloat16's rounding (the weights themselves are float32 under mixed precision).
    """
    mixed = any(layer.dtype_policy.name != "float32" for layer in model.layers)
    if not model.compiled and not mixed and not uses_fused(model):
        return model
    copy = model.__class__.from_config(as_plain_config(_float32_policies(model.get_config())))
    copy.set_weights(model.get_weights())
    return copy


def with_flip_averaging(model: keras.Model) -> keras.Model:
    """A model that answers with the mean of ``model``'s answers for the image and its mirror.

    The mirror is made by built-in layers only (a fixed 0/1 matrix on the width axis), so the saved
    model still loads in safe mode and takes raw pixels. ``model`` is kept whole, as a nested layer.
    """
    height, width, channels = model.input_shape[1:]
    inputs = keras.Input(shape=(height, width, channels), name="image")
    # float32 whatever the global policy (training may have set mixed_bfloat16): the mirror must not
    # round the pixels that the float32 model then sees.
    x = keras.layers.Permute((1, 3, 2), name="mirror_width_last", dtype="float32")(inputs)
    reverse = keras.layers.Dense(width, use_bias=False, trainable=False, name="mirror_reverse", dtype="float32")
    reverse.build((None, width))
    reverse.set_weights([np.eye(width, dtype=np.float32)[::-1]])
    mirrored = keras.layers.Permute((1, 3, 2), name="mirror_width_back", dtype="float32")(reverse(x))
    averaged = keras.layers.Average(name="flip_average", dtype="float32")([model(inputs), model(mirrored)])
    return keras.Model(inputs, averaged, name=f"{model.name}_flip_averaged")


def _float32_policies(config):
    """A model config with every mixed-precision dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and str(config.get("config", {}).get("name", "")).startswith("mixed_"):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def _classifier_head(x, num_classes: int, dense_units: Sequence[int], dropout: float):
    for number, units in enumerate(dense_units, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"fc{number}")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    # The output stays float32 under mixed precision: probabilities need the range.
    if num_classes == 2:
        return keras.layers.Dense(1, activation="sigmoid", name="output", dtype="float32")(x)
    return keras.layers.Dense(num_classes, activation="softmax", name="output", dtype="float32")(x)


def _resnet50_base(input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    if weights is None:
        base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=input_shape)
        # From scratch on a small data set, BatchNormalization's default momentum (0.99) takes
        # hundreds of steps to learn usable statistics; 0.9 lets validation follow training.
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        return base
    if weights == "imagenet":
        try:
            return keras.applications.ResNet50(include_top=False, weights="imagenet", input_shape=input_shape)
        except Exception as error:  # Keras raises plain Exception for a failed download
            raise PipelineError(
                "train_resnet50.weights: imagenet weights could not be downloaded "
                f"({str(error).splitlines()[0][:200]}). Either set weights to the path of a local "
                "ResNet50 no-top weights file, or to null to train from scratch") from None
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=input_shape)
    try:
        base.load_weights(Path(weights).expanduser())   # params accept "~/..." as check_paths does
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:   # .keras files are zip archives
        raise PipelineError(f"train_resnet50.weights: {weights} could not be loaded as ResNet50 (no top) "
                            f"weights: {str(error).splitlines()[0][:200]}") from None
    return base
