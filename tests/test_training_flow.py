"""Fine-tuning through the flow: a trained model lands in the store and the next session
starts from it; retraining with the same inputs is a cache hit; the matrix covers the stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from driftlane.flows.cli import app
from driftlane.flows.session import session_flow
from driftlane.infra.config import SessionConfig
from driftlane.infra.store import Store
from driftlane.tasks.models import model_version, resolve_model_path
from driftlane.tasks.stream_builder import build_stream

pytestmark = pytest.mark.usefixtures("prefect_harness", "scratch")

CONFIG = SessionConfig.model_validate({
    "embedding": {"batch_size": 16, "chunking": {"window_tokens": 64, "overlap_tokens": 16}},
    "memory": {"budget": 60, "k_max": 4},
    "finetune": {"max_seq_length": 32, "batch_size": 4, "max_steps": 1, "warmup_ratio": 0.0,
                 "learning_rate": 1e-4},
})


@pytest.fixture(scope="module")
def stream(tmp_path_factory, datasets_dir):
    out = tmp_path_factory.mktemp("stream") / "s"
    build_stream(["scifact", "cosqa"], out, docs_per_session=30, queries_per_session=8,
                 datasets_dir=str(datasets_dir))
    return sorted(p for p in out.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, stream, prefect_harness):
    store = tmp_path_factory.mktemp("trained") / "store"
    results = [session_flow(str(s), str(store), CONFIG) for s in stream]
    return store, results


def test_each_session_publishes_a_trained_model_the_next_one_starts_from(trained_store):
    store_dir, results = trained_store
    store = Store(str(store_dir))
    first, second = store.sessions()
    base = resolve_model_path("default")
    assert first.model_version != model_version(base)
    assert second.model_version != first.model_version
    # the published weights are the model the manifest names, bit for bit
    folder = Path(store.path("sessions", first.folder, "model"))
    assert model_version(str(folder)) == first.model_version
    weights = load_file(str(folder / "model.safetensors"))
    base_weights = load_file(str(Path(base) / "model.safetensors"))
    changed = [k for k in weights if not np.array_equal(weights[k], base_weights[k])]
    assert changed, "one step of fine-tuning changed no weight"
    training = store.read_json(first, "training/training.json")
    assert training["steps"] == 1
    assert results[1]["model_version"] == second.model_version
    assert "training/query_buffer.parquet" in second.files


def test_matrix_covers_the_stream(trained_store):
    store_dir, _ = trained_store
    shown = CliRunner().invoke(app, ["show", "--store", str(store_dir), "--json"])
    stream = json.loads(shown.output)["stream"]
    r = stream["matrix"]["ndcg@10"]
    assert len(r) == 2 and r[0][1] is None and all(v is not None for v in r[1])
    assert stream["bwt"]["ndcg@10"] == pytest.approx(r[1][0] - r[0][0])
    text = CliRunner().invoke(app, ["show", "--store", str(store_dir)]).output
    assert "backward transfer" in text
    store = Store(str(store_dir))
    last = store.sessions()[-1]
    matrix = store.read_json(last, "matrix.json")
    assert matrix["matrix"]["ndcg@10"] == r
    timings = store.read_json(last, "timings.json")
    assert timings["training"] > 0 and timings["embedding"] > 0


def test_training_is_reproducible(trained_store, stream, tmp_path):
    """The same session and seeds into a fresh store train the same model, bit for bit."""
    _, results = trained_store
    again = session_flow(str(stream[0]), str(tmp_path / "again"), CONFIG)
    assert again["model_version"] == results[0]["model_version"]


def test_each_session_reports_what_training_bought(trained_store, stream, tmp_path):
    """`training_gain.json` holds the starting model's scores on the same sessions: for the
    first session the starting model is the base model, so its 'before' scores are exactly a
    zero-shot run's; for the second, the first session's trained model."""
    store_dir, results = trained_store
    store = Store(str(store_dir))
    first, second = store.sessions()
    gain = store.read_json(first, "training_gain.json")
    zero_shot = session_flow(str(stream[0]), str(tmp_path / "zero"), CONFIG.model_copy(
        update={"finetune": CONFIG.finetune.model_copy(update={"enabled": False})}))
    assert gain["before"] == zero_shot["metrics"]
    assert gain["after"] == results[0]["metrics"]
    assert gain["gain"]["ndcg@10"] == pytest.approx(
        gain["average_after"]["ndcg@10"] - gain["average_before"]["ndcg@10"])
    later = store.read_json(second, "training_gain.json")
    assert set(later["sessions"]) == {first.name, second.name}
    assert later["after"] == results[1]["metrics"]
    text = CliRunner().invoke(app, ["show", "--store", str(store_dir)]).output
    assert "training bought" in text


@pytest.mark.parametrize("mode", ["labeled", "self_supervised"])
def test_negatives_scored_on_prototypes_run_through_the_flow(stream, tmp_path, mode):
    """`negative_scoring = "prototypes"` reads token embeddings of the pool and the queries in
    either sampling mode; the summary carries the false-negative rate of mining."""
    config = SessionConfig.model_validate({**CONFIG.model_dump(mode="json"), "sampling": {
        "mode": mode, "negative_scoring": "prototypes"}})
    session_flow(str(stream[0]), str(tmp_path / "store"), config)
    store = Store(str(tmp_path / "store"))
    summary = store.read_json(store.sessions()[0], "training/sampling.json")
    assert summary["n_examples"] > 0
    assert "hard_negative_false_negative_rate" in summary["diagnostics"]


def test_mir_and_gss_replay_run_through_the_flow(stream, tmp_path):
    """The L2R baselines' replay rules: MIR ranks the buffered pairs with a virtual update of
    the session's starting model, GSS keeps the buffer with a score per pair."""
    config = SessionConfig.model_validate({**CONFIG.model_dump(mode="json"), "sampling": {
        "replay_selection": "mir", "mir_virtual_steps": 1, "query_buffer_policy": "gss",
        "replay_ratio": 0.5, "query_buffer_budget": 5}})
    for session in stream:
        session_flow(str(session), str(tmp_path / "store"), config)
    store = Store(str(tmp_path / "store"))
    first, second = store.sessions()
    summary = store.read_json(second, "training/sampling.json")
    assert summary["examples_by_source_and_negative"].get("replay/hard", 0) \
        + summary["examples_by_source_and_negative"].get("replay/easy", 0) > 0
    assert summary["query_buffer_size"] == 5
    buffer = pd.read_parquet(store.session_url(second, "training/query_buffer.parquet"))
    assert "gss_score" in buffer.columns and buffer["gss_score"].between(-1, 1).all()
