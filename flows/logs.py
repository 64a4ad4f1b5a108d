"""The project's own log records (``components.*``, ``models.*``) in the Prefect UI, beside the flow's.

Prefect ships only its own loggers and ``get_run_logger()`` to the API. The warnings a user must see
(random-init SKB, "never promoted", inference warnings) are logged by ``components`` with the standard
``logging`` module, so without this they reach a worker's stderr and nowhere else. This is what
``PREFECT_LOGGING_EXTRA_LOGGERS`` does, set in code: that setting is read when Prefect is imported, before a
worker's flow-run process imports this package, and it would also try to ship records logged outside any run
(the CLI's), which Prefect then warns about.
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import APILogHandler

__all__ = ["PROJECT_LOGGERS", "RunLogHandler", "ship_project_logs"]

PROJECT_LOGGERS = ("components", "models")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records logged inside a flow or task run only."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get():
            super().emit(record)


def ship_project_logs(level: int = logging.WARNING) -> None:
    """Attach one :class:`RunLogHandler` (records at ``level`` and above) to each project logger; idempotent.

    The loggers' own levels are left alone, so what the CLI and the tests see does not change."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
            handler = RunLogHandler()
            handler.setLevel(level)
            logger.addHandler(handler)
