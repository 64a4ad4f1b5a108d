"""Prefect flows and the `skf` CLI: thin wrappers over `components`."""
