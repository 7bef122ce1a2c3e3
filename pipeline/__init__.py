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

# MLflow 3 reports usage to its makers' servers from every process that imports it, unless told
# not to (or it sees CI or pytest). Nothing here talks to the internet unless the user asks:
# off unless the user set the variable (MLFLOW_DISABLE_TELEMETRY=false turns it back on). It is
# read when mlflow is first imported, so it is set here, before any stage imports mlflow.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
