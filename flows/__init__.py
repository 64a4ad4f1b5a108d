"""Prefect flows and the `skf` CLI: thin wrappers over `components`.

Importing the package sets the offline/no-telemetry environment first, so flow-run processes started by a
worker (which never import the CLI) get the same settings as the CLI.
"""

from flows.env import configure_environment

configure_environment()
