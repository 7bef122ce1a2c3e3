"""Manifest rows to tf.data: targets in the output layer's shape, decoded batches, repeatable shuffling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import decode_predictions, encode_targets, image_dataset, load_images, training_dataset
from pipeline.images import load_pixels

CLASSES = ["circle", "square", "triangle"]  # sorted; the fixture colours them red, green, blue


def _files(root: Path) -> tuple[list[str], list[int]]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return [str(p) for p in paths], [CLASSES.index(p.parent.name) for p in paths]


def _epoch(dataset) -> tuple[np.ndarray, np.ndarray]:
    images, targets = zip(*dataset.as_numpy_iterator())
    return np.concatenate(images), np.concatenate(targets)


# --- targets and predictions ---------------------------------------------------------------------

def test_encode_targets_two_classes_is_one_column() -> None:
    targets = encode_targets([0, 1, 1, 0], 2)
    assert targets.shape == (4, 1)
    assert targets.dtype == np.float32
    np.testing.assert_array_equal(targets[:, 0], [0, 1, 1, 0])


def test_encode_targets_three_classes_is_one_hot() -> None:
    targets = encode_targets([2, 0, 1], 3)
    assert targets.shape == (3, 3)
    assert targets.dtype == np.float32
    np.testing.assert_array_equal(targets, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])


def test_encode_targets_empty() -> None:
    assert encode_targets([], 3).shape == (0, 3)
    assert encode_targets([], 2).shape == (0, 1)


def test_decode_predictions_sigmoid_column() -> None:
    indices, probabilities = decode_predictions(np.array([[0.2], [0.7], [0.5001]], dtype=np.float32))
    np.testing.assert_array_equal(indices, [0, 1, 1])
    assert probabilities.shape == (3, 2)
    np.testing.assert_allclose(probabilities, [[0.8, 0.2], [0.3, 0.7], [0.4999, 0.5001]], atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_decode_predictions_softmax() -> None:
    outputs = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.05, 0.05, 0.9]])
    indices, probabilities = decode_predictions(outputs)
    np.testing.assert_array_equal(indices, [1, 0, 2])
    np.testing.assert_allclose(probabilities, outputs)


def test_encode_then_decode_round_trips() -> None:
    labels = [0, 1, 1, 0, 1]
    indices, _ = decode_predictions(encode_targets(labels, 2))
    np.testing.assert_array_equal(indices, labels)
    labels = [3, 0, 2, 1]
    indices, _ = decode_predictions(encode_targets(labels, 4))
    np.testing.assert_array_equal(indices, labels)


# --- the tf.data pipeline ------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_training_dataset_batches(image_folder: Path, channels: int) -> None:
    paths, labels = _files(image_folder)
    assert len(paths) == 36
    dataset = training_dataset(paths, labels, 3, image_size=32, channels=channels, batch_size=8, shuffle_seed=None)

    batches = list(dataset.as_numpy_iterator())

    assert [len(images) for images, _ in batches] == [8, 8, 8, 8, 4]
    for images, targets in batches:
        assert images.dtype == np.uint8
        assert images.shape[1:] == (32, 32, channels)
        assert targets.shape == (len(images), 3)
        np.testing.assert_array_equal(targets.sum(axis=1), 1)


def test_one_batch_shape_leaves_out_a_different_last_few_each_epoch(image_folder: Path) -> None:
    paths, labels = _files(image_folder)
    dataset = training_dataset(paths, labels, 3, image_size=32, channels=1, batch_size=8, shuffle_seed=0,
                               drop_remainder=True)
    epochs = [[images for images, _ in dataset.as_numpy_iterator()] for _ in range(3)]
    assert all([len(batch) for batch in epoch] == [8, 8, 8, 8] for epoch in epochs)   # 36 images: 4 left out
    kept = {frozenset(image.tobytes() for batch in epoch for image in batch) for epoch in epochs}
    assert len(kept) == 3   # reshuffled each epoch: other images left out each time


def test_training_dataset_unshuffled_keeps_order_and_pixels(image_folder: Path) -> None:
    paths, labels = _files(image_folder)
    images, targets = _epoch(training_dataset(paths, labels, 3, image_size=32, channels=3, batch_size=5,
                                              shuffle_seed=None))
    np.testing.assert_array_equal(targets.argmax(axis=1), labels)
    for i in (0, 17, 35):
        np.testing.assert_array_equal(images[i], load_pixels(paths[i], 32, 3))


def test_training_dataset_two_classes_targets_are_one_column(image_folder: Path) -> None:
    paths, labels = _files(image_folder)
    keep = [i for i, label in enumerate(labels) if label < 2]
    dataset = training_dataset([paths[i] for i in keep], [labels[i] for i in keep], 2, image_size=32, channels=1,
                               batch_size=10, shuffle_seed=None)
    images, targets = _epoch(dataset)
    assert images.shape == (24, 32, 32, 1)
    assert targets.shape == (24, 1)
    np.testing.assert_array_equal(targets[:, 0], [labels[i] for i in keep])


def _blend_of_two(image: np.ndarray, batch: np.ndarray) -> tuple[int, int, float, float]:
    """The batch images ``i``, ``j`` and weight ``w`` for which ``w * batch[i] + (1 - w) * batch[j]``
    comes closest to ``image``: least squares for every pair, and the distance left."""
    best = (0, 0, 0.0, np.inf)
    flat, others = image.ravel().astype(np.float64), batch.reshape(len(batch), -1).astype(np.float64)
    for i, first in enumerate(others):
        for j, second in enumerate(others):
            step = first - second
            weight = float(step @ (flat - second) / (step @ step)) if step @ step else 1.0
            distance = float(np.abs(weight * first + (1 - weight) * second - flat).max())
            if distance < best[3]:
                best = (i, j, weight, distance)
    return best


@pytest.fixture(params=["float32", "mixed_bfloat16"])
def precision(request: pytest.FixtureRequest):
    """The global precision the training stage sets (mixed_bfloat16 on CPUs that have it)."""
    import keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy(before)


def _two_class_batches(image_folder: Path, **mixing: float):
    """Batches of 8 of the fixture's first two classes (a one-column target), shuffled with seed 1,
    mixed as ``mixing`` says (``mixup=``, ``cutmix=``): a function of the seed, and the unmixed batches."""
    paths, labels = _files(image_folder)
    keep = [i for i, label in enumerate(labels) if label < 2]
    paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]

    def make(seed: int):
        return training_dataset(paths, labels, 2, image_size=32, channels=3, batch_size=8, shuffle_seed=seed,
                                **mixing)

    plain = training_dataset(paths, labels, 2, image_size=32, channels=3, batch_size=8, shuffle_seed=1)
    return make, list(plain.as_numpy_iterator())


def test_mixup_blends_each_image_and_its_target_by_one_weight(image_folder: Path, precision: str) -> None:
    make, plain = _two_class_batches(image_folder, mixup=0.4)
    mixed_batches = list(make(1).as_numpy_iterator())
    assert len(mixed_batches) == 3 and mixed_batches[0][0].dtype == np.float32
    blended = 0
    for (images, targets), (originals, original_targets) in zip(mixed_batches, plain):
        for image, target in zip(images, targets[:, 0]):
            i, j, weight, distance = _blend_of_two(image, originals)
            first, second = original_targets[i, 0], original_targets[j, 0]
            assert distance < 0.01 and 0 <= weight <= 1 + 1e-6
            if first != second:                        # the target is blended by the image's own weight
                assert target == pytest.approx(weight * first + (1 - weight) * second, abs=2e-3)
                blended += 0.02 < weight < 0.98
    assert blended >= 3                                # real blends, not only near-copies of one image
    # The same seed mixes the same way again; each epoch mixes anew.
    again = list(make(1).as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate([t for _, t in again]), np.concatenate([t for _, t in mixed_batches]))
    dataset = make(1)
    first_epoch, second_epoch = (np.concatenate([t for _, t in dataset.as_numpy_iterator()]) for _ in range(2))
    assert not np.array_equal(first_epoch, second_epoch)


def test_cutmix_pastes_one_rectangle_of_another_image_and_mixes_targets_by_area(image_folder: Path,
                                                                              precision: str) -> None:
    make, plain = _two_class_batches(image_folder, cutmix=1.0)
    cut_batches = list(make(1).as_numpy_iterator())
    assert len(cut_batches) == 3 and cut_batches[0][0].dtype == np.float32
    pasted = 0
    for (images, targets), (originals, original_targets) in zip(cut_batches, plain):
        for image, target, original, own_target in zip(images, targets[:, 0], originals, original_targets[:, 0]):
            changed = np.any(image != original, axis=-1)
            if not changed.any():
                continue
            rows, columns = np.nonzero(changed)
            box = (slice(rows.min(), rows.max() + 1), slice(columns.min(), columns.max() + 1))
            # The pixels that changed come from one other image of the batch, in one rectangle ...
            donors = [k for k, other in enumerate(originals) if np.array_equal(image[box], other[box])]
            assert donors, "the pasted rectangle is not a rectangle of any image of the batch"
            outside = np.ones(changed.shape, dtype=bool)
            outside[box] = False
            np.testing.assert_array_equal(image[outside], original[outside])
            # ... and the target is mixed by the share of the image the rectangle covers (Keras
            # computes it from the rectangle's unrounded sides: up to a row and a column more).
            uncovered = 1 - changed[box].size / changed.size
            if any(original_targets[k, 0] != own_target for k in donors):
                donor = next(original_targets[k, 0] for k in donors if original_targets[k, 0] != own_target)
                assert target == pytest.approx(uncovered * own_target + (1 - uncovered) * donor,
                                                abs=(2 * 32 + 1) / 32**2)
                pasted += 1
    assert pasted >= 3
    # The same seed cuts the same way again; each epoch anew.
    again = list(make(1).as_numpy_iterator())
    np.testing.assert_array_equal(np.concatenate([i for i, _ in again]), np.concatenate([i for i, _ in cut_batches]))
    dataset = make(1)
    first_epoch, second_epoch = (np.concatenate([i for i, _ in dataset.as_numpy_iterator()]) for _ in range(2))
    assert not np.array_equal(first_epoch, second_epoch)


def test_training_dataset_shuffle_is_repeatable_and_keeps_pairs(image_folder: Path) -> None:
    paths, labels = _files(image_folder)
    make = lambda seed: training_dataset(paths, labels, 3, image_size=32, channels=3, batch_size=8,  # noqa: E731
                                         shuffle_seed=seed)
    first_images, first_targets = _epoch(make(42))
    again_images, again_targets = _epoch(make(42))
    other_images, other_targets = _epoch(make(43))

    # Same seed, same order.
    np.testing.assert_array_equal(first_targets, again_targets)
    np.testing.assert_array_equal(first_images, again_images)
    # It is shuffled, and another seed gives another order.
    assert not np.array_equal(first_targets.argmax(axis=1), labels)
    assert not np.array_equal(first_images, other_images)
    # Every image is there once, and each stays with its own target: the fixture's class colour
    # (red, green, blue) is the strongest channel of every image of that class.
    assert sorted(first_targets.argmax(axis=1).tolist()) == sorted(labels)
    np.testing.assert_array_equal(first_images.mean(axis=(1, 2)).argmax(axis=1), first_targets.argmax(axis=1))


def test_training_dataset_reshuffles_each_epoch(image_folder: Path) -> None:
    paths, labels = _files(image_folder)
    dataset = training_dataset(paths, labels, 3, image_size=32, channels=3, batch_size=36, shuffle_seed=42)
    epoch1 = _epoch(dataset)[0]
    epoch2 = _epoch(dataset)[0]
    assert not np.array_equal(epoch1, epoch2)
    np.testing.assert_array_equal(np.sort(epoch1.reshape(36, -1), axis=0), np.sort(epoch2.reshape(36, -1), axis=0))


def test_image_dataset_and_load_images(image_folder: Path) -> None:
    paths, _ = _files(image_folder)
    stacked = load_images(paths[:5], 16, 1)
    assert stacked.shape == (5, 16, 16, 1) and stacked.dtype == np.uint8
    for i in range(5):
        np.testing.assert_array_equal(stacked[i], load_pixels(paths[i], 16, 1))
    assert len(list(image_dataset(paths, 16, 3).as_numpy_iterator())) == 36
    empty = load_images([], 16, 3)
    assert empty.shape == (0, 16, 16, 3) and empty.dtype == np.uint8
