"""A reproducible image-classification pipeline: six DVC stages, MLflow tracking, a deploy gate."""

import os

# TensorFlow prints pages of C++ start-up notes (CUDA probes, oneDNN hints) before any of our
# logging. Keep them out of the user's way unless the user asked for them by setting the variable.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
