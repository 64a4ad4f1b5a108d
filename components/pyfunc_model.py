"""MLflow "models from code" entry point of the SKF enhancer pyfunc.

:func:`components.model_registry.log_enhancer` logs this file as the model's code; MLflow executes it
when the model is loaded (``mlflow.pyfunc.load_model``). It only names the wrapper class, so nothing
is pickled; the weights come from the model's safetensors artifacts. Do not import it elsewhere.
"""

import mlflow

from components.serving import EnhancerPyfunc

mlflow.models.set_model(EnhancerPyfunc())
