"""Where the pipeline keeps its state, resolved once from the environment.

The embedded default is a laptop setup: everything under ``SKF_HOME`` (``./.skf``): a SQLite catalog,
local object storage, a file-backed MLflow store. Production points the same settings at PostgreSQL,
``s3://`` and an MLflow server through environment variables; nothing else changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, Field, ValidationError

from components.errors import UserInputError


class Limits(BaseModel):
    """Resource limits that keep memory and disk bounded on any input; each is one environment variable.

    The defaults fit the public datasets (LOL, LOL-v2, MEF/LIME/NPE/DICM) with a wide margin and refuse what
    only a damaged or hostile input would need.
    """

    max_file_bytes: int = Field(
        512 * 2**20, gt=0, description="Largest single input file ingest reads (SKF_MAX_FILE_BYTES)."
    )
    max_image_pixels: int = Field(
        64_000_000, gt=0, description="Largest width x height ingest decodes (SKF_MAX_IMAGE_PIXELS)."
    )
    max_archive_bytes: int = Field(
        16 * 2**30, gt=0, description="Largest total uncompressed size of an archive (SKF_MAX_ARCHIVE_BYTES)."
    )
    max_archive_members: int = Field(
        200_000, gt=0, description="Most members an archive may hold (SKF_MAX_ARCHIVE_MEMBERS)."
    )
    max_enhance_pixels: int = Field(
        50_000_000, gt=0, description="Largest width x height `skf enhance` accepts (SKF_MAX_ENHANCE_PIXELS)."
    )
    enhance_tile: int = Field(
        1024, ge=64, description="Tile side `skf enhance` splits larger images into (SKF_ENHANCE_TILE)."
    )

    ENV: ClassVar[dict[str, str]] = {
        "max_file_bytes": "SKF_MAX_FILE_BYTES",
        "max_image_pixels": "SKF_MAX_IMAGE_PIXELS",
        "max_archive_bytes": "SKF_MAX_ARCHIVE_BYTES",
        "max_archive_members": "SKF_MAX_ARCHIVE_MEMBERS",
        "max_enhance_pixels": "SKF_MAX_ENHANCE_PIXELS",
        "enhance_tile": "SKF_ENHANCE_TILE",
    }

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Limits:
        values: dict[str, int] = {}
        for field_name, var in cls.ENV.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[field_name] = int(raw.replace("_", ""))
            except ValueError:
                raise UserInputError(
                    f"{var}={raw!r} is not a whole number; set it to e.g. {cls.model_fields[field_name].default}"
                ) from None
        try:
            return cls(**values)
        except ValidationError as exc:
            bad = ", ".join(f"{cls.ENV[str(e['loc'][0])]}: {e['msg']}" for e in exc.errors())
            raise UserInputError(f"invalid limit setting ({bad})") from None


class Settings(BaseModel):
    home: Path = Field(description="Root for local state (SKF_HOME).")
    catalog_url: str = Field(description="SQLAlchemy URL of the catalog (SKF_CATALOG_URL).")
    storage_uri: str = Field(description="Root URI for datasets, priors and checkpoints (SKF_STORAGE_URI).")
    mlflow_tracking_uri: str = Field(description="MLflow tracking URI (MLFLOW_TRACKING_URI).")
    mlflow_experiment_name: str = Field(
        "skf", min_length=1, description="MLflow experiment of the enhancer runs (MLFLOW_EXPERIMENT_NAME)."
    )
    weights_uri: str = Field(description="Where metric and SKB weights live (SKF_WEIGHTS_URI).")
    limits: Limits = Field(default_factory=lambda: Limits(), description="Resource limits (SKF_MAX_*).")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("SKF_HOME", ".skf")).expanduser().resolve()
        return cls(
            home=home,
            catalog_url=env.get("SKF_CATALOG_URL", f"sqlite:///{home / 'catalog.db'}"),
            storage_uri=env.get("SKF_STORAGE_URI", str(home / "store")),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI", (home / "mlruns").as_uri()),
            # MLflow's own variable, so fluent MLflow calls and this pipeline agree on the experiment.
            mlflow_experiment_name=env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or "skf",
            weights_uri=env.get("SKF_WEIGHTS_URI", str(home / "weights")),
            limits=Limits.from_env(env),
        )


def get_settings() -> Settings:
    """Current settings (re-read each call so tests can change the environment)."""
    return Settings.from_env()
