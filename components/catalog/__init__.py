"""The catalog: datasets and their immutable versions, images, quarantine, prior cache, training runs."""

from components.catalog.db import Catalog, close_catalogs, open_catalog, upgrade
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
    "Base",
    "Catalog",
    "Dataset",
    "DatasetVersion",
    "Image",
    "PriorCacheEntry",
    "QuarantinedInput",
    "TrainingRun",
    "close_catalogs",
    "open_catalog",
    "upgrade",
]
