"""A reproducible image-classification pipeline: six DVC stages, MLflow tracking, a deploy gate."""

import os

from pipeline.tensorflow_logs import quiet_start_up

# TensorFlow prints pages of C++ start-up notes (CUDA probes, oneDNN hints) before any of our
# logging. Keep them out of the user's way unless the user asked for them by setting the variable
# (TF_CPP_MIN_LOG_LEVEL=0 shows everything).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:
    quiet_start_up(int(os.environ["TF_CPP_MIN_LOG_LEVEL"]))
except ValueError:
    pass  # not a number: TensorFlow decides what it means
