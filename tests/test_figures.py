"""The pictures logged to MLflow render, with the labels a reader needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import figures
from pipeline.calibration import calibration


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


def test_gradcam_grid_puts_the_mistakes_left_and_the_successes_right() -> None:
    image, heat = np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((8, 8))
    wrong = [figures.HeatmapPanel(image, heat, "cat -> dog 0.97", False)]
    right = [figures.HeatmapPanel(image, heat, f"cat -> cat 0.9{i}", True) for i in range(2)]
    fig = figures.gradcam_grid([(wrong, right)], per_side=2, title="custom: test set")
    titles = [axis.title.get_text() for axis in fig.axes]
    assert titles == ["cat -> dog 0.97", "", "cat -> cat 0.90", "cat -> cat 0.91"]
    assert fig.axes[0].title.get_color() == "crimson" and fig.axes[2].title.get_color() == "darkgreen"
    assert len(fig.axes[0].images) == 2    # the photo, and the heatmap over it
    assert "most confidently wrong" in fig._suptitle.get_text()
    fig.canvas.draw()


def test_reliability_diagram_shows_the_bins_counts_and_both_calibrations() -> None:
    after = calibration([1, 1, 0, 0, 1, 0], np.array([[0.85], [0.85], [0.15], [0.85], [0.65], [0.65]]))
    before = calibration([1, 1, 0, 0, 1, 0], np.array([[0.99], [0.99], [0.01], [0.99], [0.9], [0.9]]))
    fig = figures.reliability_diagram(after, "custom: reliability", before, temperature=2.0)
    top, bottom = fig.axes
    legend = [text.get_text() for text in top.get_legend().get_texts()]
    assert f"ECE {after.ece:.3f}, Brier {after.brier:.3f} (temperature 2.00)" in legend
    assert f"without temperature: ECE {before.ece:.3f}, Brier {before.brier:.3f}" in legend
    assert {"4", "2"} <= {text.get_text() for text in bottom.texts}
    assert sorted(patch.get_height() for patch in bottom.patches if patch.get_height()) == [2, 4]
    plain = figures.reliability_diagram(after, "custom: reliability")
    assert len(plain.axes[0].get_legend().get_texts()) == 2
    plain.canvas.draw()


def test_a_picture_of_photos_saved_with_a_palette_is_smaller(tmp_path: Path) -> None:
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    heat = np.random.default_rng(1).uniform(size=(64, 64))
    panels = [figures.HeatmapPanel(photo, heat, "cat -> dog 0.97", False)] * 3
    fig = figures.gradcam_grid([(panels, panels)], per_side=3, title="custom: test set")
    figures.save_png(fig, tmp_path / "full.png")
    figures.save_png(fig, tmp_path / "palette.png", colours=256)
    with Image.open(tmp_path / "palette.png") as palette, Image.open(tmp_path / "full.png") as full:
        assert palette.mode == "P" and palette.size == full.size
    assert (tmp_path / "palette.png").stat().st_size < 0.6 * (tmp_path / "full.png").stat().st_size
