"""Stage ``train_resnet50``: Keras ResNet50 with a new head, pretrained (transfer learning) or from scratch.

With pretrained weights the base is frozen and the head trained first; then, if
``fine_tune_layers`` is set, the top of the base is unfrozen (BatchNormalization stays frozen)
and trained further with a lower learning rate.
"""

from __future__ import annotations

import logging

import keras

from pipeline.models import build_resnet50, compile_model, unfreeze_top_layers
from pipeline.params import Params
from pipeline.training import FitData, History, fit, trainer_entry

STAGE = "train_resnet50"
log = logging.getLogger("pipeline.train_resnet50")


def train_resnet50(data: FitData, params: Params, history: History) -> keras.Model:
    """Build ResNet50 from ``params.train_resnet50``, fit the head (or all of it), then fine-tune."""
    section = params.train_resnet50
    model, base = build_resnet50(data.input_shape, data.num_classes, section.weights, section.dense_units,
                                 section.dropout)
    compile_model(model, section.optimizer, data.scaled_learning_rate(section.learning_rate), section.loss,
                  data.num_classes, section.jit_compile)
    phase = "head" if section.pretrained else "train"
    fit(model, data, section, history, phase=phase, epochs=section.epochs)
    if section.pretrained and section.fine_tune_layers > 0 and section.fine_tune_epochs > 0:
        unfrozen = unfreeze_top_layers(base, section.fine_tune_layers)
        log.info("fine-tuning the top %d layers of ResNet50 (%d with weights) at learning rate %g",
                 section.fine_tune_layers, unfrozen, section.fine_tune_learning_rate)
        # Changing what is trainable only takes effect after compiling again.
        compile_model(model, section.optimizer, data.scaled_learning_rate(section.fine_tune_learning_rate),
                      section.loss, data.num_classes, section.jit_compile)
        fit(model, data, section, history, phase="fine_tune", epochs=section.fine_tune_epochs)
    return model


if __name__ == "__main__":
    trainer_entry(STAGE, "resnet50", train_resnet50, __doc__.splitlines()[0])
