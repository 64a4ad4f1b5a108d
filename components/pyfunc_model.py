"""MLflow "models from code" entry point of the SKF enhancer pyfunc.

:func:`components.model_registry.log_enhancer` logs this file as the model's code; MLflow executes it
when the model is loaded (``mlflow.pyfunc.load_model``). Nothing is pickled: the wrapper below is
rebuilt from this code and the weights come from the model's safetensors artifacts. Keeping the class
here (not in ``components.serving``) keeps MLflow's pyfunc machinery out of every CLI start-up.
"""

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel, PythonModelContext

from components.inference import load_enhancer_files
from components.serving import ARTIFACT_NET, ARTIFACT_SKB, ARTIFACT_SPEC, default_device, enhance_batch


class EnhancerPyfunc(PythonModel):
    """MLflow pyfunc around :class:`~components.inference.Enhancer`.

    ``predict`` takes the (N, H, W, 3) float32 [0, 1] batch of the model signature. Its ``np.ndarray``
    hint is one MLflow infers no schema from: the logged tensor signature stays the contract, and MLflow
    does not warn about a ``predict`` without type hints.
    """

    def load_context(self, context: Any) -> None:
        arts = context.artifacts
        self.enhancer = load_enhancer_files(
            arts[ARTIFACT_SPEC], arts[ARTIFACT_NET], arts.get(ARTIFACT_SKB), device=default_device()
        ).eval()

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        batch = np.asarray(model_input, dtype=np.float32)
        return enhance_batch(self.enhancer, batch)


mlflow.models.set_model(EnhancerPyfunc())
