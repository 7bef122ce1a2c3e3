"""Stage ``train_custom``: the deck's VGG-style CNN, trained from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from pipeline.models import build_custom_cnn
from pipeline.params import AugmentParams, TrainCustomParams
from pipeline.training import FitData, History, compile_for_fit, fit, trainer_entry

STAGE = "train_custom"


def train_custom(data: FitData, section: TrainCustomParams, augment: AugmentParams | None, history: History,
                 callbacks: Sequence[keras.callbacks.Callback] = ()) -> keras.Model:
    """Build the CNN from its params section (and the augmentation) and fit it with early stopping."""
    model = build_custom_cnn(data.input_shape, data.num_classes, section.blocks, section.dense_units,
                             section.dropout, batch_norm=section.batch_norm, pooling=section.pooling,
                             residual=section.residual, separable=section.separable,
                             augment=augment)
    compile_for_fit(model, data, section, section.learning_rate, section.epochs)
    fit(model, data, section, history, phase="train", epochs=section.epochs, callbacks=callbacks)
    return model


if __name__ == "__main__":
    trainer_entry(STAGE, train_custom, __doc__.splitlines()[0])
