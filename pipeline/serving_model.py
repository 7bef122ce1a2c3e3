"""The model file MLflow logs for serving ("models from code"): loading the model runs it.

MLflow keeps this file, not a pickle of the model object, and rebuilds
:class:`~pipeline.serving.ImageClassifierModel` from it with the ``pipeline`` package that
``log_serving_model`` logs beside it, so loading executes only code that ships with the model.
"""

from mlflow.models import set_model

from pipeline.serving import ImageClassifierModel

set_model(ImageClassifierModel())
