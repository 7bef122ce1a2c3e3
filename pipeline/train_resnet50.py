"""Stage ``train_resnet50``: Keras ResNet50 with a new head, pretrained (transfer learning) or from scratch.

With pretrained weights the base is frozen and the head trained first; then, if
``fine_tune_layers`` is set, the top of the base is unfrozen (BatchNormalization stays frozen)
and trained further with a lower learning rate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras

from pipeline.models import build_resnet50, unfreeze_top_layers
from pipeline.params import AugmentParams, TrainResnet50Params
from pipeline.training import FitData, History, compile_for_fit, fit, trainer_entry

STAGE = "train_resnet50"
log = logging.getLogger("pipeline.train_resnet50")


def train_resnet50(data: FitData, section: TrainResnet50Params, augment: AugmentParams | None, history: History,
                   callbacks: Sequence[keras.callbacks.Callback] = ()) -> keras.Model:
    """Build ResNet50 from its params section (and the augmentation), fit the head (or all of it), then fine-tune."""
    model, base = build_resnet50(data.input_shape, data.num_classes, section.weights, section.dense_units,
                                 section.dropout, augment=augment)
    compile_for_fit(model, data, section, section.learning_rate, section.epochs)
    phase = "head" if section.pretrained else "train"
    fit(model, data, section, history, phase=phase, epochs=section.epochs, callbacks=callbacks)
    if section.pretrained and section.fine_tune_layers > 0 and section.fine_tune_epochs > 0:
        unfrozen = unfreeze_top_layers(base, section.fine_tune_layers)
        log.info("fine-tuning the top %d layers of ResNet50 (%d with weights) at learning rate %g",
                 section.fine_tune_layers, unfrozen, section.fine_tune_learning_rate)
        # Changing what is trainable only takes effect after compiling again.
        compile_for_fit(model, data, section, section.fine_tune_learning_rate, section.fine_tune_epochs)
        fit(model, data, section, history, phase="fine_tune", epochs=section.fine_tune_epochs, callbacks=callbacks)
    return model


if __name__ == "__main__":
    trainer_entry(STAGE, train_resnet50, __doc__.splitlines()[0])
