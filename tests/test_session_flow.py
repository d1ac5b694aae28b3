"""The session flow end to end on small sessions: publish, caching, no-ops, bad input."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from malformed_sessions import MALFORMED, write_valid_session
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from test_store import snapshot

from driftlane.flows.session import session_flow
from driftlane.flows.stream import stream_flow
from driftlane.infra.config import ChunkingConfig, EmbeddingConfig, SessionConfig
from driftlane.infra.faults import InjectedFailure
from driftlane.infra.lock import StoreLock, StoreLocked
from driftlane.infra.store import Store, StoreError
from driftlane.tasks.ingest import SessionFormatError

pytestmark = pytest.mark.usefixtures("prefect_harness", "scratch")

CACHED_STAGES = ("ingest", "embed", "memory", "sample", "fine-tune", "re-embed-corpus", "index",
                 "evaluate")


def task_states(state, expected: tuple[str, ...] = (*CACHED_STAGES, "plan", "publish"),
                timeout: float = 15.0) -> dict[str, str]:
    """{stage: final state name} of one flow run's task runs (stage = first word of the name).

    Task run states reach the API as events, shortly after the run; poll until they are in.
    """
    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = {run.name.split()[0]: run.state_name for run in runs}
            settled = all(states.get(s) in ("Completed", "Cached", "Failed") for s in expected)
            if settled or time.monotonic() > deadline:
                return states
            time.sleep(0.2)


# Wall-clock records differ between any two runs: stage timings (and the report that shows
# them) and TensorBoard event files (named after host and time).
VOLATILE = ("timings.json", "report.md", "training/tensorboard/")


def published_files(store_dir) -> dict[str, bytes]:
    """Published session files, without the manifests' creation times and wall-clock records."""
    files = snapshot(store_dir / "sessions")
    files = {n: b for n, b in files.items()
             if not any(n.split("/", 1)[-1].startswith(v) for v in VOLATILE)}
    for name in [n for n in files if n.endswith("manifest.json")]:
        manifest = json.loads(files[name])
        manifest.pop("created_at")
        manifest["files"] = {k: v for k, v in manifest["files"].items()
                             if not k.startswith(VOLATILE)}
        files[name] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.fixture
def sessions(tmp_path):
    return [write_valid_session(tmp_path / "in" / "alpha", n_docs=6, name_prefix="a"),
            write_valid_session(tmp_path / "in" / "beta", n_docs=5, name_prefix="b")]


def test_two_sessions_publish_and_evaluate_everything_seen(tmp_path, sessions):
    store_dir = tmp_path / "store"
    first = session_flow(str(sessions[0]), str(store_dir))
    assert first["status"] == "published" and first["index"] == 0
    assert set(first["metrics"]) == {"alpha"}

    second = session_flow(str(sessions[1]), str(store_dir))
    assert second["index"] == 1
    assert set(second["metrics"]) == {"alpha", "beta"}
    for values in second["metrics"].values():
        assert set(values) >= {"ndcg@10", "success@5", "recall@10", "recall@100"}
        assert 0.0 <= values["ndcg@10"] <= 1.0
    # recall@100 over an 11-document corpus: every judged document is retrieved
    assert second["metrics"]["alpha"]["recall@100"] == pytest.approx(1.0)

    store = Store(str(store_dir))
    manifests = store.sessions()
    assert [(m.name, m.n_docs) for m in manifests] == [("alpha", 6), ("beta", 5)]
    assert {"docs.parquet", "queries.parquet", "qrels.parquet", "doc_vectors.npy",
            "index.faiss", "index_ids.parquet", "metrics.json", "config.json"} <= set(
        manifests[1].files)
    assert store.read_json(manifests[1], "metrics.json") == second["metrics"]


def test_feeding_a_published_session_again_is_a_noop(tmp_path, sessions):
    store_dir = tmp_path / "store"
    session_flow(str(sessions[0]), str(store_dir))
    before = snapshot(store_dir)
    again = session_flow(str(sessions[0]), str(store_dir))
    assert again == {"status": "already-published", "name": "alpha", "index": 0}
    # a byte-identical copy under another path is the same session too
    copy = shutil.copytree(sessions[0], tmp_path / "elsewhere" / "alpha")
    assert session_flow(str(copy), str(store_dir))["status"] == "already-published"
    assert snapshot(store_dir) == before


def test_same_name_with_other_content_is_an_error_not_an_overwrite(tmp_path, sessions):
    store_dir = tmp_path / "store"
    session_flow(str(sessions[0]), str(store_dir))
    before = snapshot(store_dir)
    other = write_valid_session(tmp_path / "other" / "alpha", n_docs=4, name_prefix="z")
    with pytest.raises(StoreError, match="already holds a session named 'alpha'"):
        session_flow(str(other), str(store_dir))
    assert snapshot(store_dir) == before


def test_retry_after_a_failed_publish_is_all_cache_hits(tmp_path, sessions, monkeypatch):
    store_dir = tmp_path / "store"
    monkeypatch.setenv("DRIFTLANE_FAIL_AT", "publish.rename")
    failed = session_flow(str(sessions[0]), str(store_dir), return_state=True)
    assert failed.is_failed()
    assert Store(str(store_dir)).sessions() == []
    assert all(task_states(failed)[s] == "Completed" for s in CACHED_STAGES)

    monkeypatch.delenv("DRIFTLANE_FAIL_AT")
    retried = session_flow(str(sessions[0]), str(store_dir), return_state=True)
    assert retried.is_completed()
    states = task_states(retried)
    assert {s: states[s] for s in CACHED_STAGES} == dict.fromkeys(CACHED_STAGES, "Cached")
    assert states["publish"] == "Completed"
    # the report times the run that published: every stage came from the cache
    timings = retried.result()["timings"]
    assert timings["embedding"] == timings["indexing"] == timings["evaluation"] == 0.0

    # the store ends as an uninterrupted run into a fresh store leaves it
    clean_dir = tmp_path / "clean-store"
    session_flow(str(sessions[0]), str(clean_dir))
    assert published_files(store_dir) == published_files(clean_dir)


def test_changing_chunking_reruns_embedding_and_later_stages_not_ingest(tmp_path, sessions,
                                                                        monkeypatch):
    store_dir = tmp_path / "store"
    monkeypatch.setenv("DRIFTLANE_FAIL_AT", "publish.stage")
    first = session_flow(str(sessions[0]), str(store_dir), return_state=True)
    assert first.is_failed()
    chunked = SessionConfig(embedding=EmbeddingConfig(
        chunking=ChunkingConfig(window_tokens=64, overlap_tokens=16)))
    second = session_flow(str(sessions[0]), str(store_dir), chunked, return_state=True)
    states = task_states(second)
    assert states["ingest"] == "Cached"
    assert {states[s] for s in ("embed", "memory", "index", "evaluate")} == {"Completed"}


@pytest.fixture(scope="module")
def published_store(tmp_path_factory, prefect_harness):
    """A store holding one published session, built once; tests copy it."""
    root = tmp_path_factory.mktemp("published")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLANE_SCRATCH", str(root / "scratch"))
        session = write_valid_session(root / "in" / "alpha", n_docs=6, name_prefix="a")
        session_flow(str(session), str(root / "store"))
    return root / "store"


@pytest.mark.parametrize("case", MALFORMED, ids=[c.id for c in MALFORMED])
def test_bad_input_is_rejected_and_the_store_is_unchanged(tmp_path, published_store, case):
    store_dir = shutil.copytree(published_store, tmp_path / "store")
    before = snapshot(store_dir)
    (tmp_path / "bad").mkdir()
    bad = case.build(tmp_path / "bad")
    with pytest.raises(SessionFormatError, match=case.match):
        session_flow(str(bad), str(store_dir))
    assert snapshot(store_dir) == before


def test_bad_input_never_creates_a_store(tmp_path):
    (tmp_path / "bad").mkdir()
    bad = MALFORMED[0].build(tmp_path / "bad")
    with pytest.raises(SessionFormatError):
        session_flow(str(bad), str(tmp_path / "new-store"))
    assert not (tmp_path / "new-store").exists()


def test_stream_flow_runs_sessions_in_order_and_skips_published(tmp_path, sessions):
    store_dir = tmp_path / "store"
    summaries = stream_flow([str(s) for s in sessions], str(store_dir))
    assert [s["index"] for s in summaries] == [0, 1]
    again = stream_flow([str(s) for s in sessions], str(store_dir))
    assert [s["status"] for s in again] == ["already-published"] * 2


def test_injected_failure_is_raised_to_the_caller(tmp_path, sessions, monkeypatch):
    monkeypatch.setenv("DRIFTLANE_FAIL_AT", "evaluate.write")
    with pytest.raises(InjectedFailure):
        session_flow(str(sessions[0]), str(tmp_path / "store"))
    assert Store(str(tmp_path / "store")).sessions() == []


def _run_at_once(sessions, store_dir, config=None) -> dict[str, object]:
    """Start one session flow per session, in threads, all at once; their results or errors."""
    outcomes: dict[str, object] = {}
    gate = threading.Barrier(len(sessions))

    def run(session):
        gate.wait()
        try:
            outcomes[session.name] = session_flow(str(session), str(store_dir),
                                                  config or SessionConfig())
        except (StoreError, StoreLocked) as exc:
            outcomes[session.name] = exc

    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return outcomes


def test_two_runs_at_once_on_one_store_take_turns(tmp_path, sessions):
    """The store is held for the whole run: the second run waits, then goes in as #1."""
    store_dir = tmp_path / "store"
    outcomes = _run_at_once(sessions, store_dir)
    assert all(isinstance(o, dict) for o in outcomes.values()), outcomes
    manifests = Store(str(store_dir)).sessions()
    assert [m.index for m in manifests] == [0, 1]
    # never interleaved: #1 was planned after #0 was published, so it evaluates both
    first, second = manifests
    assert outcomes[second.name]["index"] == 1
    assert set(outcomes[second.name]["metrics"]) == {first.name, second.name}
    assert not list(store_dir.glob(".lock*"))  # the lock is released


def test_a_run_waits_while_another_holds_the_store_then_publishes(tmp_path, sessions):
    store_dir = tmp_path / "store"
    session_flow(str(sessions[0]), str(store_dir))
    outcome: dict[str, object] = {}
    holder = StoreLock(Store(str(store_dir)).url, owner_label="another run (test)").acquire()
    try:
        runner = threading.Thread(target=lambda: outcome.update(
            result=session_flow(str(sessions[1]), str(store_dir))))
        runner.start()
        runner.join(timeout=8)
        assert runner.is_alive() and not outcome  # waiting for the store
        assert [m.name for m in Store(str(store_dir)).sessions()] == ["alpha"]
    finally:
        holder.release()
    runner.join(timeout=300)
    assert outcome["result"]["index"] == 1


def test_a_run_that_may_not_wait_fails_naming_the_holder_and_changes_nothing(tmp_path,
                                                                            sessions):
    store_dir = tmp_path / "store"
    session_flow(str(sessions[0]), str(store_dir))
    before = snapshot(store_dir)
    config = SessionConfig.model_validate({"lock": {"wait_seconds": 0}})
    with StoreLock(Store(str(store_dir)).url, owner_label="another run (test)"):
        with pytest.raises(StoreLocked, match=r"locked by another run .*\(another run \(test\)\)"):
            session_flow(str(sessions[1]), str(store_dir), config)
    assert snapshot(store_dir) == before
    # it goes in on its next run
    assert session_flow(str(sessions[1]), str(store_dir), config)["index"] == 1
