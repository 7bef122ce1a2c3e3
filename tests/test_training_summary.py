"""The training summary (metrics/train_<model>.json) names the epoch whose weights were kept."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.training import HISTORY_COLUMNS, FitData, _summary

FIT = FitData(train=None, validation=None, train_size=64, batch_size=32, num_classes=2, input_shape=(32, 32, 3))


def history(*phases: tuple[str, list[float]]) -> pd.DataFrame:
    rows = [(phase, loss) for phase, losses in phases for loss in losses]
    return pd.DataFrame([(epoch, phase, loss, 0.5, loss, 1 - loss) for epoch, (phase, loss) in enumerate(rows, 1)],
                        columns=HISTORY_COLUMNS)


@pytest.mark.parametrize(("frame", "start_from_epoch", "best_epoch"), [
    (history(("fit", [0.7, 0.4, 0.5, 0.6])), 0, 2),
    # Early stopping watches from epoch 3 (start_from_epoch 2): epoch 2's lower loss was not kept.
    (history(("fit", [0.7, 0.4, 0.5, 0.6])), 2, 3),
    # ResNet50's fine-tuning keeps the best of its own phase, which may be worse than the first phase's.
    (history(("fit", [0.7, 0.3]), ("fine_tune", [0.5, 0.4, 0.45])), 0, 4),
    (history(("fit", [0.7, 0.3]), ("fine_tune", [0.35, 0.5, 0.45])), 1, 5),
])
def test_the_best_epoch_is_the_one_whose_weights_were_kept(frame: pd.DataFrame, start_from_epoch: int,
                                                           best_epoch: int) -> None:
    summary = _summary(frame, FIT, ["cat", "dog"], start_from_epoch)
    assert summary["best_epoch"] == best_epoch
    assert summary["best_val_loss"] == frame.loc[best_epoch - 1, "val_loss"]
    assert summary["epochs_run"] == len(frame)
