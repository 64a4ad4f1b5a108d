"""Data plane: layouts, sources, validation, ingestion into the catalog, demo data, torch datasets."""
