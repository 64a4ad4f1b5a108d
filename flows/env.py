"""Process environment the pipeline needs before Prefect, MLflow or pyiqa are imported."""

from __future__ import annotations

import os

# No telemetry and no network probes: the pipeline must run offline (see docs/dependencies.md).
_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # The embedded default keeps MLflow in files under SKF_HOME; MLflow 3.17 refuses file stores without this.
    "MLFLOW_ALLOW_FILE_STORE": "true",
    "PREFECT_UI_ENABLED": "false",
}


def configure_environment() -> None:
    """Set offline/telemetry defaults without overriding what the user already exported."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    home = os.environ.get("SKF_HOME", ".skf")
    # pyiqa reads its cache dir from TORCH_HOME at import time, so it must be set first.
    os.environ.setdefault("TORCH_HOME", os.path.join(os.path.abspath(home), "torch"))
