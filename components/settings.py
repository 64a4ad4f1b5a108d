"""Where the pipeline keeps its state, resolved once from the environment.

The embedded default is a laptop setup: everything under ``SKF_HOME`` (``./.skf``): a SQLite catalog,
local object storage, a file-backed MLflow store. Production points the same settings at PostgreSQL,
``s3://`` and an MLflow server through environment variables; nothing else changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field


class Settings(BaseModel):
    home: Path = Field(description="Root for local state (SKF_HOME).")
    catalog_url: str = Field(description="SQLAlchemy URL of the catalog (SKF_CATALOG_URL).")
    storage_uri: str = Field(description="Root URI for datasets, priors and checkpoints (SKF_STORAGE_URI).")
    mlflow_tracking_uri: str = Field(description="MLflow tracking URI (MLFLOW_TRACKING_URI).")
    weights_uri: str = Field(description="Where metric and SKB weights live (SKF_WEIGHTS_URI).")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("SKF_HOME", ".skf")).expanduser().resolve()
        return cls(
            home=home,
            catalog_url=env.get("SKF_CATALOG_URL", f"sqlite:///{home / 'catalog.db'}"),
            storage_uri=env.get("SKF_STORAGE_URI", str(home / "store")),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI", (home / "mlruns").as_uri()),
            weights_uri=env.get("SKF_WEIGHTS_URI", str(home / "weights")),
        )


def get_settings() -> Settings:
    """Current settings (re-read each call so tests can change the environment)."""
    return Settings.from_env()
