"""The catalog: datasets and their immutable versions, images, quarantine, prior cache, training runs."""

from components.catalog.db import (
    RESET_ENV,
    Catalog,
    CatalogError,
    CatalogLostError,
    close_catalogs,
    masked_url,
    open_catalog,
    upgrade,
)
from components.catalog.models import (
    Base,
    Dataset,
    DatasetVersion,
    Image,
    PriorCacheEntry,
    QuarantinedInput,
    TrainingRun,
)

__all__ = [
    "RESET_ENV",
    "Base",
    "Catalog",
    "CatalogError",
    "CatalogLostError",
    "Dataset",
    "DatasetVersion",
    "Image",
    "PriorCacheEntry",
    "QuarantinedInput",
    "TrainingRun",
    "close_catalogs",
    "masked_url",
    "open_catalog",
    "upgrade",
]
