"""Manifest rows to a ``tf.data`` input pipeline: decode, resize, cache, shuffle, batch, prefetch.

Pixels come from :func:`pipeline.images.load_pixels`, the same rules ingest used to accept the
files, so anything in the manifest decodes here too.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.images import load_pixels

# Decoded uint8 images up to this size are cached in memory; beyond it, in a temporary file.
MEMORY_CACHE_LIMIT_BYTES = 2 * 1024**3


def encode_targets(label_indices: Sequence[int], num_classes: int) -> np.ndarray:
    """Targets in the shape the output layer has: one 0/1 column for two classes, else one-hot."""
    indices = np.asarray(label_indices, dtype=np.int64)
    if num_classes == 2:
        return indices.astype(np.float32).reshape(-1, 1)
    return np.eye(num_classes, dtype=np.float32)[indices]


def decode_predictions(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model outputs to ``(class indices, per-class probabilities)`` for any head shape."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape[-1] == 1:
        positive = probabilities[:, 0]
        probabilities = np.stack([1.0 - positive, positive], axis=1)
    return probabilities.argmax(axis=1), probabilities


def image_dataset(paths: Sequence[str], image_size: int, channels: int) -> tf.data.Dataset:
    """Decoded images (uint8, ``(size, size, channels)``), in order, decoded on every core."""

    def load(path: tf.Tensor) -> np.ndarray:
        return load_pixels(path.decode("utf-8"), image_size, channels)

    def decode(path: tf.Tensor) -> tf.Tensor:
        pixels = tf.numpy_function(load, [path], tf.uint8, stateful=False)
        pixels.set_shape((image_size, image_size, channels))
        return pixels

    return (tf.data.Dataset.from_tensor_slices(list(paths))
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))


def training_dataset(paths: Sequence[str], label_indices: Sequence[int], num_classes: int, *,
                     image_size: int, channels: int, batch_size: int,
                     shuffle_seed: int | None, shard: tuple[int, int] | None = None,
                     drop_remainder: bool = False, mixup: float = 0.0, cutmix: float = 0.0) -> tf.data.Dataset:
    """Batches of ``(images, targets)``; decoded once and cached, reshuffled each epoch if seeded.

    ``shard=(workers, index)`` keeps every workers-th file starting at ``index`` before anything is
    read, so each machine of a multi-worker run decodes only its own share. ``drop_remainder``
    leaves out the last, smaller batch of each epoch (reshuffled, so a different few images each
    time), so that every batch has one shape. ``mixup`` > 0 blends each image of a batch, and its
    target alike, with another of the same batch (:func:`mixed_up`); ``cutmix`` > 0 pastes a
    rectangle of another image of the batch into each, the targets mixed by area
    (:func:`cut_and_mixed`). With both, MixUp comes first.
    """
    paths, label_indices = list(paths), list(label_indices)
    if shard is not None:
        workers, index = shard
        paths, label_indices = paths[index::workers], label_indices[index::workers]
    images = image_dataset(paths, image_size, channels)
    targets = tf.data.Dataset.from_tensor_slices(encode_targets(label_indices, num_classes))
    dataset = tf.data.Dataset.zip((images, targets)).cache(_cache_file(len(paths), image_size, channels))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if mixup > 0:
        dataset = mixed_up(dataset, mixup, shuffle_seed)
    if cutmix > 0:
        dataset = cut_and_mixed(dataset, cutmix, shuffle_seed)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    if shard is not None:
        # Already sharded by file above; stop tf.distribute from sharding a second time.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options)
    return dataset


def mixed_up(batches: tf.data.Dataset, alpha: float, seed: int | None) -> tf.data.Dataset:
    """MixUp (Zhang et al. 2018) with Keras's own layer: each image becomes ``w * image + (1 - w) *
    other`` and its target ``w * target + (1 - w) * other's``, ``other`` drawn from the same batch
    and ``w`` from Beta(alpha, alpha), anew for every batch of every epoch (repeatably with a seed).
    Images come out as float32 on the 0-255 scale the model's input takes."""
    import keras

    return _mixed_by(batches, keras.layers.MixUp(alpha=alpha, seed=seed, dtype="float32"))


def cut_and_mixed(batches: tf.data.Dataset, factor: float, seed: int | None) -> tf.data.Dataset:
    """CutMix (Yun et al. 2019) with Keras's own layer: a rectangle of each image is replaced by the
    same rectangle of another image of the batch, and the target becomes ``w * target + (1 - w) *
    other's``, ``w`` the share of the image left uncovered. ``w`` is drawn from Beta(a, a), ``a``
    uniform between 0 and ``factor``, anew for every batch of every epoch (repeatably with a seed).
    Images come out as float32 on the 0-255 scale the model's input takes."""
    import keras

    return _mixed_by(batches, keras.layers.CutMix(factor=factor, seed=seed, dtype="float32"))


def _mixed_by(batches: tf.data.Dataset, layer) -> tf.data.Dataset:
    """Batches passed through a Keras layer that mixes images and targets (``MixUp``, ``CutMix``)."""

    def mix(images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # float32 whatever the training precision: the model's input takes float32 pixels.
        mixed = layer({"images": tf.cast(images, tf.float32), "labels": targets}, training=True)
        return mixed["images"], mixed["labels"]

    return batches.map(mix)   # one batch at a time: the layer's seed generator then steps in order


def _cache_file(count: int, image_size: int, channels: int) -> str:
    """Where decoded images are cached: memory ("") when they fit comfortably, else a temporary file,
    so a large photo folder cannot exhaust the machine's memory."""
    if count * image_size * image_size * channels <= MEMORY_CACHE_LIMIT_BYTES:
        return ""
    folder = tempfile.mkdtemp(prefix="image-pipeline-cache-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(Path(folder) / "decoded")


def load_images(paths: Sequence[str], image_size: int, channels: int) -> np.ndarray:
    """All images of a list as one uint8 array (for prediction and small evaluation sets)."""
    if not paths:
        return np.zeros((0, image_size, image_size, channels), dtype=np.uint8)
    return np.stack(list(image_dataset(paths, image_size, channels).as_numpy_iterator()))
