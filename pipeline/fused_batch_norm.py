"""Keras's BatchNormalization, trained with TensorFlow's fused kernel: the same layer, computed faster.

Keras 3 computes batch normalization from separate operations (the batch's moments, then the
normalization, each in float32 after a cast from mixed precision), and their gradients are as many
more passes over every activation. On a CPU those memory-bound passes, not the convolutions, were
most of the photo preset's training step; TensorFlow's ``FusedBatchNormV3`` makes one pass forward
and one backward (bfloat16 in and out, statistics in float32). The ``batch_norm`` benchmark row
measures the two side by side (docs/performance.md).

:class:`FusedBatchNormalization` is a subclass that changes only how ``call`` computes: the same
weights, the same configuration, the same moving-average update (Keras's momentum, the batch's
variance without Bessel's correction). It is a training-time choice: :func:`as_plain_config` turns
it back into ``keras.layers.BatchNormalization`` in a model's configuration, which is how
``models.for_inference`` saves a model that loads with plain Keras in safe mode.
"""

from __future__ import annotations

import keras
from keras import ops

FUSED_DTYPES = ("float32", "bfloat16", "float16")
MIN_EPSILON = 1.001e-5   # TensorFlow's fused kernel raises a smaller epsilon to this


@keras.saving.register_keras_serializable(package="pipeline")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization over the last axis of 4-D images by one fused TensorFlow kernel.

    Anything the fused kernel does not cover (a mask, batch renormalization, synchronized statistics,
    another axis or rank, no scale or offset, a tiny epsilon) is left to Keras's own ``call``.
    """

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        if training and self.trainable:
            # mean=None with the default averaging factor of 1: the batch's own mean and variance come
            # back, the variance with Bessel's correction, which Keras's update does not apply.
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)[:3]
            count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=False)[0]
        return ops.cast(outputs, self.compute_dtype)

    def _fused_applies(self, inputs, mask) -> bool:
        return (mask is None and not self.renorm and not getattr(self, "synchronized", False)
                and len(inputs.shape) == 4 and self.axis in (-1, 3) and self.scale and self.center
                and self.epsilon >= MIN_EPSILON and keras.backend.standardize_dtype(inputs.dtype) in FUSED_DTYPES)


def as_plain_config(config):
    """A model configuration with every :class:`FusedBatchNormalization` made Keras's own layer (the
    same arguments and weights), so that the model it builds needs nothing from this package."""
    if isinstance(config, dict):
        if config.get("class_name") == FusedBatchNormalization.__name__:
            config = {**config, "module": "keras.layers", "class_name": "BatchNormalization", "registered_name": None}
        return {key: as_plain_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [as_plain_config(value) for value in config]
    return config


def uses_fused(model: keras.Model) -> bool:
    """Whether ``model`` (or a model nested in it) holds a :class:`FusedBatchNormalization`."""
    return any(isinstance(layer, FusedBatchNormalization)
               or (isinstance(layer, keras.Model) and uses_fused(layer)) for layer in model.layers)
