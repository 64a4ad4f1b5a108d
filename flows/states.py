"""How a stage that found its work already done ends: a ``Skipped`` state with the reason, not "Completed".

A rerun of ``skf-train`` skips every stage; in the Prefect UI each subflow then shows *Skipped* and why
(the finished run it reused, the cached priors), instead of a "Completed" that implies work. The state is
of type COMPLETED, so callers receive ``result`` as from any finished subflow.
"""

from __future__ import annotations

from typing import Any

from prefect.states import Completed, State

__all__ = ["done_or_skipped"]


def done_or_skipped(result: Any, skipped_because: str | None) -> Any:
    """``result`` itself when work was done; a ``Skipped`` state carrying it when ``skipped_because``."""
    if skipped_because is None:
        return result
    state: State[Any] = Completed(name="Skipped", message=skipped_because, data=result)
    return state
