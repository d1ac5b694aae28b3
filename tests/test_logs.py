"""Library loggers reach the Prefect run log, so their warnings show in the UI."""

from __future__ import annotations

import asyncio
import logging

from driftlane.infra.logs import module_logger


def test_outside_a_run_it_is_the_plain_module_logger(caplog):
    with caplog.at_level(logging.INFO, logger="tasks.example"):
        module_logger("tasks.example").warning("window_tokens %d exceeds", 512)
    assert [r.getMessage() for r in caplog.records] == ["window_tokens 512 exceeds"]


def test_inside_a_task_the_warning_is_in_the_run_log(prefect_harness):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    logger = module_logger("tasks.example")

    @task
    def warn() -> None:
        logger.warning("library warning from a task")

    @flow
    def run_it():
        warn()
        logger.info("library note from the flow")

    state = run_it(return_state=True)
    APILogHandler().flush()

    async def messages() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[state.state_details.flow_run_id])))
        return [log.message for log in logs]

    found: list[str] = []
    for _ in range(60):  # the log worker ships in batches: wait on the condition
        found = asyncio.run(messages())
        if {"library warning from a task", "library note from the flow"} <= set(found):
            break
        asyncio.run(asyncio.sleep(1))
    assert "library warning from a task" in found
    assert "library note from the flow" in found
