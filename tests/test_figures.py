"""The pictures logged to MLflow render, with the labels a reader needs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import figures


def _texts(fig) -> set[str]:
    return {text.get_text() for axis in fig.axes for text in [axis.title, *axis.texts, *axis.get_xticklabels()]}


def test_training_curves_show_train_and_validation_for_loss_and_accuracy() -> None:
    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6],
                            "accuracy": [0.5, 0.8, 0.9], "val_accuracy": [0.4, 0.7, 0.75]})
    fig = figures.training_curves(history, "custom")
    assert [axis.get_ylabel() for axis in fig.axes] == ["loss", "accuracy"]
    assert [len(axis.lines) for axis in fig.axes] == [2, 2]
    assert fig.axes[1].lines[1].get_ydata().tolist() == [0.4, 0.7, 0.75]
    fig.canvas.draw()


def test_confusion_matrix_names_the_classes() -> None:
    fig = figures.confusion_matrix(np.array([[3, 1], [0, 4]]), ["cat", "dog"], "custom: test set")
    assert {"cat", "dog", "custom: test set"} <= _texts(fig)
    assert {"3", "1", "0", "4"} <= _texts(fig)


def test_misclassified_grid_captions_each_mistake_and_says_when_there_is_none() -> None:
    images = np.zeros((7, 8, 8, 1), dtype=np.uint8)
    fig = figures.misclassified_grid(images, ["cat"] * 7, ["dog"] * 7, "mistakes", limit=6)
    assert sum(axis.title.get_text() == "cat -> dog" for axis in fig.axes) == 6
    empty = figures.misclassified_grid(np.zeros((0, 8, 8, 3)), [], [], "mistakes")
    assert "no misclassified images" in _texts(empty)
    empty.canvas.draw()
