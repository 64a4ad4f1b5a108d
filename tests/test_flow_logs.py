"""The project's own warnings reach the Prefect API of the run that logged them, and nothing else."""

from __future__ import annotations

import logging
import uuid

import pytest


def _run_logs(flow_run_id: uuid.UUID) -> list[tuple[str, int, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [(log.name, log.level, log.message) for log in logs]


def test_component_warnings_are_shipped_to_the_flow_run(prefect_harness: None) -> None:
    from prefect import flow, task
    from prefect.runtime import flow_run

    import flows.pipeline  # noqa: F401  (importing the pipeline attaches the handler)

    marker = uuid.uuid4().hex

    @task
    def in_a_task() -> None:
        logging.getLogger("components.skb").warning("task warning %s", marker)

    @flow
    def logs_something() -> str:
        logging.getLogger("components.model_registry").warning("never promoted %s", marker)
        logging.getLogger("models.se").warning("model warning %s", marker)
        logging.getLogger("components.training").info("info %s", marker)  # below the shipped level
        in_a_task()
        return flow_run.get_id()

    run_id = uuid.UUID(logs_something())
    shipped = [(name, msg) for name, level, msg in _run_logs(run_id) if marker in msg]
    assert ("components.model_registry", f"never promoted {marker}") in shipped
    assert ("models.se", f"model warning {marker}") in shipped
    assert ("components.skb", f"task warning {marker}") in shipped
    assert not any(msg.startswith("info") for _, msg in shipped)


def test_outside_a_run_nothing_is_sent_and_prefect_does_not_complain(
    prefect_harness: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    import flows.pipeline  # noqa: F401

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logging.getLogger("components.inference").warning("a CLI warning outside any run")
    assert not [w for w in caught if "without a flow run id" in str(w.message)]
    assert "without a flow run id" not in capsys.readouterr().err
