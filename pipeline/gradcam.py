"""Where a model looks: Grad-CAM heatmaps (Selvaraju et al., 2017; keras-io's "Grad-CAM class
activation visualization").

The gradient of a class's logit with respect to the last convolutional feature map, averaged over the
map's positions, weighs each of its channels; the weighted sum of the channels, less its negative
part, is the heatmap: bright where the evidence for that class lies. It is taken on the raw photo
(0-255 pixels), through the model's own augmentation (inactive at inference) and preprocessing
layers, exactly as the saved model sees it, and scaled up to the photo's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.calibration import OUTPUT_LAYER, classifier_of
from pipeline.errors import PipelineError

_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
_POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def feature_layer(classifier: keras.Model) -> keras.layers.Layer:
    """The layer whose output is the last convolutional feature map: the last layer with a 4-D output
    that is not a pooling, from the first convolution on (a Conv2D, its BatchNormalization or ReLU, or a
    nested model of convolutions such as the ResNet50 base)."""
    chosen, convolved = None, False
    for layer in classifier.layers:
        convolved = convolved or _convolutional(layer)
        if convolved and len(_graph_output(layer).shape) == 4 and not isinstance(layer, _POOLING):
            chosen = layer
    if chosen is None:
        raise PipelineError(f"model {classifier.name} has no convolutional layer: Grad-CAM needs one")
    return chosen


def gradcam(model: keras.Model, images: np.ndarray, class_indices: Sequence[int], batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps, ``(n, height, width)`` in [0, 1] (1 = the brightest spot of each image), of
    class ``class_indices[i]`` on raw image ``images[i]``.

    ``model`` is a classifier built by :mod:`pipeline.models`, or a model with one nested in it (the
    heatmap is then the classifier's, on the image as given).
    """
    classifier = classifier_of(model)
    head = classifier.get_layer(OUTPUT_LAYER)
    probe = keras.Model(classifier.inputs, [_graph_output(feature_layer(classifier)), head.input])
    images = np.asarray(images, dtype=np.float32)
    classes = np.asarray(class_indices)
    heatmaps = [np.zeros((0, *images.shape[1:3]), dtype=np.float32)]
    for start in range(0, len(images), batch_size):
        heatmaps.append(_batch_heatmaps(probe, head, images[start:start + batch_size],
                                        classes[start:start + batch_size]))
    return np.concatenate(heatmaps)


def _batch_heatmaps(probe: keras.Model, head: keras.layers.Dense, images: np.ndarray,
                    classes: np.ndarray) -> np.ndarray:
    pixels = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        tape.watch(pixels)   # records the path even where every weight is frozen
        feature_map, features = probe(pixels, training=False)
        logits = tf.matmul(tf.cast(features, tf.float32), tf.cast(head.kernel, tf.float32)) + \
            tf.cast(head.bias, tf.float32)
        if logits.shape[-1] == 1:   # one sigmoid unit: class 1's logit is z, class 0's is -z
            score = logits[:, 0] * tf.constant(np.where(classes == 1, 1.0, -1.0), tf.float32)
        else:
            score = tf.gather(logits, tf.constant(classes, tf.int32), axis=1, batch_dims=1)
    gradients = tf.cast(tape.gradient(score, feature_map), tf.float32)
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2))
    heatmaps = tf.nn.relu(tf.einsum("bhwc,bc->bhw", tf.cast(feature_map, tf.float32), channel_weights))
    peak = tf.reduce_max(heatmaps, axis=(1, 2), keepdims=True)
    heatmaps = tf.math.divide_no_nan(heatmaps, peak)
    return tf.image.resize(heatmaps[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()


def _graph_output(layer: keras.layers.Layer):
    """The layer's output tensor in the classifier's graph. A nested model's ``.output`` is the tensor
    of its own inner graph, not of the call in the classifier: that call is its last inbound node."""
    if isinstance(layer, keras.Model):
        return layer._inbound_nodes[-1].output_tensors[0]
    return layer.output


def _convolutional(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.Model):
        return any(_convolutional(inner) for inner in layer.layers)
    return isinstance(layer, _CONVOLUTIONS)
