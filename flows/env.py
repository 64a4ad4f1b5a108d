"""Process environment the pipeline needs before Prefect, MLflow or pyiqa are imported."""

from __future__ import annotations

import os
from pathlib import Path

# No telemetry and no network probes: the pipeline must run offline (see docs/dependencies.md).
_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # The embedded default keeps MLflow in files under SKF_HOME; MLflow 3.17 refuses file stores without this.
    "MLFLOW_ALLOW_FILE_STORE": "true",
    "PREFECT_UI_ENABLED": "false",
    # A fresh PREFECT_HOME needs longer than Prefect's 20 s default to start the ephemeral API on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def configure_environment() -> None:
    """Set offline/telemetry defaults without overriding what the user already exported."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    home = os.environ.get("SKF_HOME", ".skf")
    # Every MLflow call of this process (CLI, flow runs of a worker) uses the configured store, never
    # MLflow's own default (./mlflow.db in whatever directory the process happens to run in).
    os.environ.setdefault("MLFLOW_TRACKING_URI", (Path(home).expanduser().resolve() / "mlruns").as_uri())
    # pyiqa reads its cache dir from TORCH_HOME at import time, so it must be set first.
    os.environ.setdefault("TORCH_HOME", os.path.join(os.path.abspath(home), "torch"))
