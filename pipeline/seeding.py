"""The one seeding helper: the first call of every stage that draws random numbers."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int, *, tensorflow: bool = False, deterministic: bool = False) -> None:
    """Seed Python and NumPy, and TensorFlow/Keras for the stages that train or predict.

    With ``deterministic`` TensorFlow also uses deterministic ops only, so training repeats
    bit for bit on the CPU, at some cost in speed.
    """
    random.seed(seed)
    np.random.seed(seed)
    if tensorflow or deterministic:
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(seed)
        if deterministic:
            tf.config.experimental.enable_op_determinism()
