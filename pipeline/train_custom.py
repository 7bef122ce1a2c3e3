"""Stage ``train_custom``: the deck's VGG-style CNN, trained from scratch."""

from __future__ import annotations

import keras

from pipeline.models import build_custom_cnn, compile_model
from pipeline.params import Params
from pipeline.training import FitData, History, fit, trainer_entry

STAGE = "train_custom"


def train_custom(data: FitData, params: Params, history: History) -> keras.Model:
    """Build the CNN from ``params.train_custom`` and fit it with early stopping."""
    section = params.train_custom
    model = build_custom_cnn(data.input_shape, data.num_classes, section.blocks, section.dense_units,
                             section.dropout)
    compile_model(model, section.optimizer, data.scaled_learning_rate(section.learning_rate), section.loss,
                  data.num_classes, section.jit_compile)
    fit(model, data, section, history, phase="train", epochs=section.epochs)
    return model


if __name__ == "__main__":
    trainer_entry(STAGE, "custom", train_custom, __doc__.splitlines()[0])
