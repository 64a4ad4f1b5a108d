"""Versioned, swappable building blocks of the SKF pipeline (no Prefect imports here)."""
