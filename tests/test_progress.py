"""Progress reports (infra/progress.py): artifacts inside Prefect runs, bars in the CLI."""

from __future__ import annotations

import logging
import uuid

import pandas as pd
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from transformers import TrainerControl, TrainerState
from typer.testing import CliRunner

import driftlane.flows.cli as cli_module
import driftlane.infra.progress as progress_module
from driftlane.infra.config import FinetuneConfig
from driftlane.infra.progress import Progress, enable_cli_bars
from driftlane.tasks.finetune import _training_progress, fine_tune

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(autouse=True)
def bars_off(monkeypatch):
    """Bars start off and whatever a test switches on is switched off after it."""
    monkeypatch.setattr(progress_module, "_cli_bars", False)


@pytest.fixture
def fake_artifact_api(monkeypatch):
    """Pretend to be inside a run; record artifact calls instead of sending them."""
    calls: list[tuple[str, float]] = []

    def create(progress, key=None, description=None):
        calls.append(("create", progress))
        return uuid.uuid4()

    def update(artifact_id, progress, description=None, client=None):
        calls.append(("update", progress))
        return artifact_id

    monkeypatch.setattr(progress_module, "_in_prefect_run", lambda: True)
    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", create)
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", update)
    return calls


def progress_artifacts(flow_run_id, key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_outside_a_run_progress_counts_and_calls_no_api(monkeypatch, capsys):
    def no_api(*args, **kwargs):
        raise AssertionError("artifact API called outside a Prefect run")

    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", no_api)
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", no_api)
    monkeypatch.setattr(progress_module, "UPDATE_INTERVAL_S", 0.0)
    with Progress("embed 00_scifact", total=3, description="embedding 00_scifact") as progress:
        for _ in range(3):
            progress.advance()
    progress.close()  # idempotent
    assert progress.done == 3 and progress.key == "embed-00-scifact"
    assert capsys.readouterr() == ("", "")


def test_cli_bars_draw_on_stderr_only_when_enabled(capsys):
    enable_cli_bars(True)
    with Progress("embed", total=5, description="embedding docs", unit="docs") as progress:
        progress.advance(2)
        progress.update(5)
    out, err = capsys.readouterr()
    assert out == "" and "embedding docs" in err and "5/5" in err and "docs" in err
    enable_cli_bars(False)
    with Progress("embed", total=5, description="embedding docs") as progress:
        progress.advance(5)
    assert capsys.readouterr() == ("", "")


def test_updates_are_throttled_but_close_always_reports(monkeypatch, fake_artifact_api):
    monkeypatch.setattr(progress_module, "UPDATE_INTERVAL_S", 3600.0)
    with Progress("train", total=10, description="training") as progress:
        for _ in range(10):
            progress.advance()
    assert fake_artifact_api == [("create", 0.0), ("update", 100.0)]
    fake_artifact_api.clear()
    monkeypatch.setattr(progress_module, "UPDATE_INTERVAL_S", 0.0)
    with Progress("train", total=4, description="training") as progress:
        for _ in range(2):
            progress.advance()
    # closed half-way: the final report says where the work stopped
    assert fake_artifact_api == [("create", 0.0), ("update", 25.0), ("update", 50.0)]


def test_nothing_to_do_reports_100(fake_artifact_api):
    with Progress("embed", total=0, description="embedding nothing"):
        pass
    assert fake_artifact_api == [("create", 0.0), ("update", 100.0)]


def test_a_failing_artifact_api_warns_once_and_the_work_goes_on(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("server gone")

    monkeypatch.setattr(progress_module, "_in_prefect_run", lambda: True)
    monkeypatch.setattr(progress_module, "UPDATE_INTERVAL_S", 0.0)
    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda **kw: uuid.uuid4())
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", broken)
    with caplog.at_level(logging.WARNING, logger="driftlane.infra.progress"):
        with Progress("embed", total=4, description="embedding") as progress:
            for _ in range(4):
                progress.advance()
        monkeypatch.setattr("prefect.artifacts.create_progress_artifact", broken)
        with Progress("embed", total=4, description="embedding") as progress:
            progress.advance(4)
    assert progress.done == 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all("server gone" in m for m in messages)


def test_a_flow_run_ends_with_a_progress_artifact_at_100(monkeypatch):
    monkeypatch.setattr(progress_module, "UPDATE_INTERVAL_S", 0.0)

    @flow
    def count_to_four() -> None:
        with Progress("unit count_to_four", total=4, description="counting") as progress:
            for _ in range(4):
                progress.advance()

    state = count_to_four(return_state=True)
    assert state.is_completed()
    artifacts = progress_artifacts(state.state_details.flow_run_id, "unit-count-to-four")
    assert [(a.type, a.data, a.description) for a in artifacts] == [("progress", 100, "counting")]


def test_the_training_callback_reports_every_step(fake_artifact_api, monkeypatch):
    monkeypatch.setattr(progress_module, "UPDATE_INTERVAL_S", 0.0)
    callback = _training_progress("00_scifact")
    state, control = TrainerState(max_steps=4), TrainerControl()
    callback.on_train_begin(None, state, control)
    progress = callback.progress
    assert (progress.key, progress.total, progress.description) == (
        "train-00-scifact", 4, "training 00_scifact")
    for step in range(1, 5):
        state.global_step = step
        callback.on_step_end(None, state, control)
    callback.on_train_end(None, state, control)
    assert progress.done == 4 and callback.progress is None
    assert [p for _, p in fake_artifact_api] == [0.0, 25.0, 50.0, 75.0, 100.0]


def test_fine_tune_in_a_task_reports_its_steps_under_the_session_name(
        minilm_path, tmp_path, monkeypatch):
    """Two optimizer steps inside a task, reported under the session's name."""
    monkeypatch.setattr(progress_module, "UPDATE_INTERVAL_S", 0.0)
    examples = pd.DataFrame({"anchor": ["what do cats say", "how do fish move"],
                             "positive": ["cats meow at night", "fish swim with fins"]})
    config = FinetuneConfig(batch_size=2, max_seq_length=16, warmup_ratio=0.0)

    @task
    def train(session_name: str) -> int:
        return fine_tune(minilm_path, examples, config, tmp_path, batch_order=[[0, 1], [1]],
                         seed=0, session=session_name)["steps"]

    @flow
    def train_session() -> int:
        return train("07 unit")

    state = train_session(return_state=True)
    assert state.result() == 2
    artifacts = progress_artifacts(state.state_details.flow_run_id, "train-07-unit")
    assert [(a.data, a.description) for a in artifacts] == [(100, "training 07 unit")]


@pytest.mark.parametrize("flag, expected", [(["--progress"], True), (["--no-progress"], False),
                                            ([], False)])  # CliRunner's stderr is no terminal
@pytest.mark.parametrize("command", ["run-session", "run-stream"])
def test_cli_progress_option_switches_the_bars(monkeypatch, command, flag, expected):
    seen = []
    monkeypatch.setattr(cli_module, "_run_flows",
                        lambda *args: seen.append(progress_module._cli_bars))
    enable_cli_bars(not expected)
    result = CliRunner().invoke(cli_module.app,
                                [command, "session", "--store", "store", *flag],
                                catch_exceptions=False)
    assert result.exit_code == 0 and seen == [expected]
