"""The clustered memory through the CLI: three real sessions, a budget, exported cluster ids."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from real_sessions import cut_session
from typer.testing import CliRunner

from driftlane.flows.cli import app
from driftlane.infra.store import Store
from driftlane.tasks.memory_state import load_memory_state

pytestmark = pytest.mark.usefixtures("prefect_harness", "scratch")
BUDGET = 40


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def three_sessions(tmp_path_factory, datasets_dir):
    root = tmp_path_factory.mktemp("three")
    return [cut_session(datasets_dir / name, root / name, n_queries=2, n_extra_docs=20)
            for name in ("scifact", "cisi", "npl_vaswani")]


@pytest.fixture(scope="module")
def stream_store(tmp_path_factory, three_sessions, prefect_harness):
    root = tmp_path_factory.mktemp("memstore")
    config = root / "driftlane.toml"
    config.write_text("[embedding]\nbatch_size = 16\n[embedding.chunking]\nwindow_tokens = 96\n"
                      f"overlap_tokens = 16\n[memory]\nbudget = {BUDGET}\nk_max = 6\n"
                      "[finetune]\nmax_seq_length = 32\nbatch_size = 8\nmax_steps = 2\n")
    store = root / "store"
    result = run_cli("run-stream", *map(str, three_sessions), "--store", str(store),
                     "--config", str(config))
    assert result.exit_code == 0, result.output
    return store


def test_show_json_reports_clusters_and_memory(stream_store):
    result = run_cli("show", "--store", str(stream_store), "--json")
    sessions = json.loads(result.output)["sessions"]
    assert len(sessions) == 3
    for s in sessions:
        assert s["memory_budget"] == BUDGET
        assert 0 < s["memory_size"] <= BUDGET
        assert s["n_clusters"] >= 2
    text = run_cli("show", "--store", str(stream_store)).output
    assert f"/{BUDGET} documents" in text


def test_memory_keeps_the_budget_and_cluster_ids_are_stable(stream_store):
    store = Store(str(stream_store))
    manifests = store.sessions()
    states = [load_memory_state(store.session_url(m, "memory"))[0] for m in manifests]
    for state in states:
        assert len(state.memory) <= BUDGET
        assert len(state.vectors) == len(state.memory) == len(state.token_offsets) - 1
    # a document keeps its cluster id from one session to the next (no re-cluster asked)
    first, last = states[0].assignments, states[-1].assignments
    merged = first.merge(last, on="doc_key", suffixes=("_0", "_2"))
    assert len(merged) == len(first)
    assert (merged["cluster_id_0"] == merged["cluster_id_2"]).all()
    # ids are never reused: later sessions only add ids at or above the earlier counter
    assert states[2].next_cluster_id >= states[1].next_cluster_id >= states[0].next_cluster_id
    report = store.read_json(manifests[-1], "cluster_report.json")
    assert {"silhouette", "davies_bouldin", "calinski_harabasz", "dunn", "wcss",
            "n_clusters", "sizes", "new_clusters", "evictions"} <= set(report)
    png = store.fs.cat_file(store.session_url(manifests[-1], "cluster_sizes.png"))
    assert png[:4] == b"\x89PNG"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_clusters(stream_store, three_sessions, tmp_path, suffix):
    out = tmp_path / f"clusters{suffix}"
    result = run_cli("export-clusters", "--store", str(stream_store), "--out", str(out))
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, dtype={"doc_id": str}) if suffix == ".csv" else pd.read_parquet(out)
    assert list(table.columns) == ["doc_id", "cluster_id", "session"]
    expected = sum(sum(1 for _ in open(s / "corpus.jsonl")) for s in three_sessions)
    assert len(table) == expected
    assert table.groupby("session").size().to_dict() == {
        s.name: sum(1 for _ in open(s / "corpus.jsonl")) for s in three_sessions}
    corpus_ids = {json.loads(line)["_id"] for line in open(three_sessions[0] / "corpus.jsonl")}
    assert set(table[table["session"] == "scifact"]["doc_id"]) == corpus_ids


def test_export_clusters_bad_input(stream_store, tmp_path):
    bad = run_cli("export-clusters", "--store", str(stream_store), "--out",
                  str(tmp_path / "x.txt"))
    assert bad.exit_code == 2 and "use .csv or .parquet" in bad.output
    missing = run_cli("export-clusters", "--store", str(tmp_path / "nope"), "--out",
                      str(tmp_path / "x.csv"))
    assert missing.exit_code == 2 and "no driftlane store" in missing.output


def identical_session(folder, n_docs: int):
    """A session whose documents all have the same text."""
    import json as _json

    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(_json.dumps({"_id": f"d{i}", "title": "", "text": "the same words"}) + "\n")
    return folder


@pytest.mark.parametrize("n_docs", [1, 4])
def test_degenerate_sessions_complete_with_a_log_line(tmp_path, caplog, n_docs):
    from driftlane.flows.session import session_flow
    from driftlane.infra.config import SessionConfig

    session = identical_session(tmp_path / f"same{n_docs}", n_docs)
    config = SessionConfig.model_validate({"finetune": {"max_steps": 1, "batch_size": 2,
                                                        "max_seq_length": 16}})
    result = session_flow(str(session), str(tmp_path / "store"), config)
    assert result["status"] == "published"
    reason = "1 document(s)" if n_docs == 1 else "same vector"
    assert any(reason in r.getMessage() for r in caplog.records), reason
    assert Store(str(tmp_path / "store")).sessions()[0].summary["n_clusters"] == 1
