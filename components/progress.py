"""The one progress-callback type of long jobs (ingest, precompute, evaluation): ``(done, total)``.

Training reports richer records (:class:`components.training.engine.Progress`); everything else calls this.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ProgressCallback"]

ProgressCallback = Callable[[int, int], None]
