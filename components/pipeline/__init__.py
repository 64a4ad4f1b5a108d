"""The ``skf-train`` pipeline's Prefect-free parts: parameters and presets, and the run summary."""
