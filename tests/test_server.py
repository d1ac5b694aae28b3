"""driftlane as users run it: a real Prefect server, the served deployments, the landing folder,
and a failed run retried the way the UI's Retry button does it.

One server and one `python -m driftlane.flows.deploy` process are shared by the module (both real
subprocesses in their own process groups, stopped in `finally`). The deploy process runs with
`DRIFTLANE_FAIL_AT=train.start` armed by `DRIFTLANE_FAULT_SWITCH`: a run fails in
fine-tuning only while the switch file exists.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from real_sessions import cut_session
from test_session_flow import published_files

from driftlane.infra.faults import InjectedFailure, crash_point
from driftlane.infra.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
# The retry test fails the run in fine-tuning: on retry every stage before it must come back
# Cached, and fine-tuning and everything after it must run.
FAIL_POINT, FAIL_STAGE = "train.start", "fine-tune"
# Task runs that read or write live state and are never cached (task run name prefixes).
NEVER_CACHED = ("plan ", "start model", "model version", "report ", "publish ")
INTERVAL_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a process in its own process group (its flow-run children join that group)."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; make sure no child of the group outlives it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def wait_until(condition, timeout_s: float, what: str, logs: list[Path] = (), every_s=0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {log.name}:\n{tail(log)}" for log in logs)
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{detail}")
        time.sleep(every_s)


@dataclass
class Served:
    api_url: str
    root: Path
    store: Path
    landing: Path
    fault_switch: Path
    logs: list[Path]
    env: dict[str, str]  # the environment of a client process, without PREFECT_/DRIFTLANE_


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Prefect server on a free loopback port and driftlane's deployments served against it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("server")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("PREFECT_", "DRIFTLANE_"))}
    base_env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    PREFECT_SERVER_ANALYTICS_ENABLED="false")
    server_env = {**base_env, "PREFECT_HOME": str(root / "server-home"),
                  "PREFECT_SERVER_API_HOST": "127.0.0.1",
                  "PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_UI_ENABLED": "false"}
    deploy_env = {**base_env, "PREFECT_HOME": str(root / "client-home"),
                  "PREFECT_API_URL": api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                  "DRIFTLANE_SCRATCH": str(root / "scratch"), "DRIFTLANE_LOCK_LEASE_S": "15",
                  "DRIFTLANE_FAIL_AT": FAIL_POINT,
                  "DRIFTLANE_FAULT_SWITCH": str(root / "fault-switch")}
    served = Served(api_url, root, root / "store", root / "landing", root / "fault-switch",
                    [root / "server.log", root / "deploy.log"], base_env)
    served.landing.mkdir()

    server = deployer = None
    try:
        server = start_group([PREFECT, "server", "start"], server_env, served.logs[0])

        def healthy() -> bool:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited:\n{tail(served.logs[0])}")
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, 180, "the Prefect server's /api/health", served.logs)
        deployer = start_group(
            [sys.executable, "-m", "driftlane.flows.deploy", "--store", str(served.store),
             "--landing", str(served.landing), "--interval", str(INTERVAL_S)],
            deploy_env, served.logs[1])
        with temporary_settings({PREFECT_API_URL: api_url}):
            with get_client(sync_client=True) as client:
                def deployed() -> bool:
                    if deployer.poll() is not None:
                        pytest.fail(f"driftlane.flows.deploy exited:\n{tail(served.logs[1])}")
                    return len(client.read_deployments()) == 3

                wait_until(deployed, 120, "three deployments", served.logs)
            yield served
    finally:
        if deployer is not None:
            stop_group(deployer)
        if server is not None:
            stop_group(server)


def flow_runs(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def read_flow_run(flow_run_id: UUID):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def wait_final(flow_run_id: UUID, served: Served, timeout_s: float = 300,
               after: datetime | None = None):
    """The flow run once it reaches a final state (one entered after `after`, if given)."""
    def final():
        run = read_flow_run(flow_run_id)
        if run.state is None or not run.state.is_final():
            return None
        return run if after is None or run.state.timestamp > after else None

    return wait_until(final, timeout_s, f"flow run {flow_run_id} to finish", served.logs)


def task_states_by_attempt(flow_run_id: UUID, expected: dict[int, tuple[str, ...]],
                           timeout_s: float = 30) -> dict[int, dict[str, str]]:
    """{attempt: {task run name: state name}} of one flow run's task runs.

    Task run states arrive as events, shortly after the run; poll until, for each attempt in
    `expected`, a task run whose name starts with each given prefix is in a final state.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    final = {"Completed", "Cached", "Failed"}
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            attempts: dict[int, dict[str, str]] = {}
            for run in runs:
                attempts.setdefault(run.flow_run_run_count, {})[run.name] = run.state_name
            settled = all(
                any(name.startswith(prefix) and state in final
                    for name, state in attempts.get(attempt, {}).items())
                for attempt, prefixes in expected.items() for prefix in prefixes)
            if settled or time.monotonic() > deadline:
                return attempts
            time.sleep(0.5)


def state_of(states: dict[str, str], prefix: str) -> str | None:
    names = [name for name in states if name.startswith(prefix)]
    assert len(names) <= 1, f"several task runs start with {prefix!r}: {names}"
    return states[names[0]] if names else None


def deployment_id(name: str) -> UUID:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name).id


@pytest.fixture(scope="module")
def landed(served, datasets_dir) -> dict:
    """A complete session folder dropped into the landing folder and published by the
    ingestion schedule, next to a half-copied one. Its store is also the retry test's
    uninterrupted reference."""
    # A half-copied folder (no marker, corpus cut mid-line) that sorts first: if it were
    # picked up, its validation error would fail the ingestion run before b_full ran.
    half = cut_session(datasets_dir / "scifact", served.landing / "a_half", 2, 3)
    corpus = (half / "corpus.jsonl").read_bytes()
    (half / "corpus.jsonl").write_bytes(corpus[: len(corpus) // 2])
    # A complete folder: copied in first, marker written last.
    incoming = cut_session(datasets_dir / "scifact", served.root / "incoming" / "b_full", 2, 4)
    shutil.copytree(incoming, served.landing / "b_full")
    (served.landing / "b_full" / "_READY").touch()

    def session_run():
        runs = [r for r in flow_runs("driftlane-session") if r.name.startswith("b_full ->")]
        return runs[0] if runs else None

    run = wait_until(session_run, 120, "the ingestion schedule to start b_full", served.logs)
    return {"run": wait_final(run.id, served), "incoming": incoming}


def test_dropping_a_complete_session_folder_gets_it_published_once(served, landed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in ("driftlane-session/session", "driftlane-stream/stream",
                     "driftlane-ingestion/ingestion"):
            deployment = client.read_deployment_by_name(name)
            assert deployment.global_concurrency_limit.limit == 1, name
            assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE", name
            assert f"store:{served.store}" in deployment.tags, name
        ingestion = client.read_deployment_by_name("driftlane-ingestion/ingestion")
        assert f"landing:{served.landing}" in ingestion.tags
        assert ingestion.schedules[0].schedule.interval.total_seconds() == INTERVAL_S

    run = landed["run"]
    assert run.state.is_completed(), f"{run.state}\n{tail(served.logs[1])}"
    assert f"store:{served.store}" in run.tags and "session:b_full" in run.tags
    assert [m.name for m in Store(str(served.store)).sessions()] == ["b_full"]

    # Later scheduled runs list the landing folder again and do nothing: b_full is in the
    # store, a_half has no marker.
    def later_ingestion_completed():
        return [r for r in flow_runs("driftlane-ingestion")
                if r.state.is_completed() and r.start_time and r.start_time > run.end_time]

    wait_until(later_ingestion_completed, 90, "an ingestion run after b_full", served.logs)
    sessions_run = [r.name for r in flow_runs("driftlane-session")
                    if r.name.startswith(("a_half ", "b_full "))]
    assert sessions_run == [run.name]
    assert [m.name for m in Store(str(served.store)).sessions()] == ["b_full"]


def pause_ingestion() -> None:
    """Pause the ingestion schedule and drop its queued runs: they would compete for the CPU."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    ingestion = deployment_id("driftlane-ingestion/ingestion")
    with get_client(sync_client=True) as client:
        client.pause_deployment(ingestion)
        queued = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[ingestion])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
        for run in queued:
            client.delete_flow_run(run.id)


def test_retry_from_the_ui_resumes_from_the_failed_stage(served, landed):
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    pause_ingestion()
    session_deployment = deployment_id("driftlane-session/session")
    # The same session the landing test published without interruption, from another folder.
    session = shutil.copytree(landed["incoming"], served.root / "retry" / "b_full")
    retried_store = served.root / "retried-store"
    with get_client(sync_client=True) as client:
        served.fault_switch.touch()
        run = client.create_flow_run_from_deployment(
            session_deployment,
            parameters={"session_url": str(session), "store_url": str(retried_store)})
        failed = wait_final(run.id, served)
        assert failed.state.is_failed(), f"{failed.state}\n{tail(served.logs[1])}"
        first = task_states_by_attempt(run.id, {1: (FAIL_STAGE,)})[1]
        assert state_of(first, FAIL_STAGE) == "Failed", first
        assert state_of(first, "publish") is None, first
        # Shard task runs (" shard i/n") belong to their cached stage: they do not run again.
        before_failure = {name for name in first
                          if not name.startswith((*NEVER_CACHED, FAIL_STAGE))
                          and " shard " not in name}
        assert all(state_of(first, s) for s in ("ingest", "embed")), first
        assert all(first[name] == "Completed" for name in before_failure), first
        assert not Store(str(retried_store)).sessions()

        # What the UI's Retry button does: the same run, forced to AwaitingRetry.
        served.fault_switch.unlink()
        retry = client.set_flow_run_state(run.id, AwaitingRetry(), force=True)
        retried = wait_final(run.id, served, after=retry.state.timestamp)
        assert retried.state.is_completed(), f"{retried.state}\n{tail(served.logs[1])}"
        assert retried.run_count == 2
        # started from the deployment without tags, the run tagged itself like CLI runs
        assert "session:b_full" in retried.tags and f"store:{retried_store}" in retried.tags

        second = task_states_by_attempt(run.id, {2: (FAIL_STAGE, "publish")})[2]
        assert {name: second.get(name) for name in before_failure} == \
            dict.fromkeys(before_failure, "Cached"), second
        for stage in (FAIL_STAGE, "index", "evaluate", "publish"):
            assert state_of(second, stage) == "Completed", second

    # The store ends as the uninterrupted run of the landing test left its store.
    assert landed["run"].state.is_completed()
    assert [m.name for m in Store(str(retried_store)).sessions()] == ["b_full"]
    assert published_files(retried_store) == published_files(served.store)


def test_prefect_yaml_declares_the_same_deployments_for_a_work_pool():
    """prefect.yaml parses with Prefect's own model; every deployment writes one store at a
    time and points at a real flow."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {"session", "stream", "ingestion"}
    flows = {"session": "driftlane-session", "stream": "driftlane-stream",
             "ingestion": "driftlane-ingestion"}
    for name, deployment in by_name.items():
        assert deployment.concurrency_limit.limit == 1
        assert deployment.concurrency_limit.collision_strategy == "ENQUEUE"
        assert deployment.work_pool.name == "driftlane-process"
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(REPO_ROOT)
            assert load_flow_from_entrypoint(deployment.entrypoint).name == flows[name]
    assert by_name["ingestion"].schedules[0].interval.total_seconds() == 300
    assert set(by_name["ingestion"].parameters) == {"landing_url", "store_url", "marker"}


def test_landing_folder_listing_takes_marked_folders_in_name_order():
    import fsspec

    from driftlane.flows.ingestion import ready_session_folders

    fs = fsspec.filesystem("memory")
    for name, marked in (("2024-02", True), ("2024-01", True), ("2024-03", False)):
        fs.pipe(f"/landing-test/{name}/corpus.jsonl", b"{}\n")
        if marked:
            fs.pipe(f"/landing-test/{name}/_READY", b"")
    fs.pipe("/landing-test/notes.txt", b"a file, not a session folder")
    assert ready_session_folders("memory://landing-test") == (["2024-01", "2024-02"],
                                                               ["2024-03"])
    assert ready_session_folders("memory://no-such-landing") == ([], [])


def test_fault_switch_arms_the_failure_only_while_its_file_exists(tmp_path, monkeypatch):
    switch = tmp_path / "switch"
    monkeypatch.setenv("DRIFTLANE_FAIL_AT", "somewhere")
    monkeypatch.setenv("DRIFTLANE_FAULT_SWITCH", str(switch))
    crash_point("somewhere")  # no file: disarmed
    switch.touch()
    with pytest.raises(InjectedFailure):
        crash_point("somewhere")
    crash_point("elsewhere")
    monkeypatch.delenv("DRIFTLANE_FAULT_SWITCH")
    with pytest.raises(InjectedFailure):
        crash_point("somewhere")


def test_a_killed_run_frees_the_store_once_its_leases_lapse(served, tmp_path):
    """SIGKILL a CLI run holding the store (its Prefect global concurrency slot and its store
    lock); the next run waits for both leases (the slot's: Prefect's minimum of 60 s, then the
    server's repossessor) and publishes."""
    from malformed_sessions import write_valid_session
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from driftlane.infra.writer import limit_name

    session = write_valid_session(tmp_path / "in" / "alpha", n_docs=4, name_prefix="a")
    store = tmp_path / "store"
    config = tmp_path / "wait.toml"
    config.write_text("[lock]\nwait_seconds = 300\n[finetune]\nenabled = false\n")
    env = {**served.env, "PREFECT_API_URL": served.api_url,
           "PREFECT_HOME": str(tmp_path / "home"), "DRIFTLANE_SCRATCH": str(tmp_path / "s"),
           "DRIFTLANE_LOCK_LEASE_S": "15"}
    args = [str(Path(sys.executable).parent / "driftlane"), "run-session", str(session),
            "--store", str(store), "--config", str(config)]
    killed = subprocess.run(args, env={**env, "DRIFTLANE_KILL_AT": "embed.start"},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with temporary_settings({PREFECT_API_URL: served.api_url}):
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(limit_name(Store(str(store)).url))
    assert limit.limit == 1 and limit.active_slots == 1  # the dead run's slot

    started = time.monotonic()
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [m.name for m in Store(str(store)).sessions()] == ["alpha"]
    print(f"the run after the kill took {time.monotonic() - started:.0f} s")
