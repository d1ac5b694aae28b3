"""`[update] mode` end to end (flows/index_update.py, flows/reindex.py): what each mode
stores, that aligned and full train the same models, and that a re-index of an aligned store
evaluates exactly like the store that ran `full` throughout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from malformed_sessions import write_valid_session
from test_session_flow import published_files

from driftlane.flows.api import open_store
from driftlane.flows.reindex import reindex_flow
from driftlane.flows.session import session_flow
from driftlane.infra.config import SessionConfig, UpdateConfig, UpdateMode
from driftlane.infra.store import Store
from driftlane.tasks.publishing import published_blocks

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run(sessions, store_dir, mode: UpdateMode) -> Store:
    config = SessionConfig(update=UpdateConfig(mode=mode))
    for folder in sessions:
        assert session_flow(str(folder), str(store_dir), config)["status"] == "published"
    return Store(str(store_dir))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    sessions = [write_valid_session(root / "in" / "alpha", n_docs=6, name_prefix="a"),
                write_valid_session(root / "in" / "beta", n_docs=5, name_prefix="b")]
    return {mode: run(sessions, root / mode.value, mode) for mode in UpdateMode}


def index_docs(store: Store, session: int) -> int:
    import faiss

    m = store.sessions()[session]
    return faiss.read_index(store.path("sessions", m.folder, "index.faiss")).ntotal


def test_full_mode_writes_one_index_over_the_whole_corpus(stores):
    store = stores[UpdateMode.full]
    assert [index_docs(store, i) for i in (0, 1)] == [6, 11]
    blocks = published_blocks(store, store.sessions())
    assert [(b.shard, b.n_docs, b.maps) for b in blocks] == [("sessions/00001_beta", 11, [])]
    assert blocks[0].model_version == store.sessions()[1].model_version


def test_aligned_mode_adds_a_shard_of_the_new_documents_and_maps_the_rest(stores):
    store = stores[UpdateMode.aligned]
    manifests = store.sessions()
    assert [index_docs(store, i) for i in (0, 1)] == [6, 5]  # each shard: its own documents
    blocks = published_blocks(store, manifests)
    assert [(b.shard, b.n_docs, b.maps) for b in blocks] == [
        ("sessions/00000_alpha", 6, ["beta"]), ("sessions/00001_beta", 5, [])]
    # each shard holds the vectors of the model its session trained
    assert [b.model_version for b in blocks] == [m.model_version for m in manifests]
    assert manifests[1].summary["update_mode"] == "aligned"
    assert manifests[1].summary["vectors_model_version"] == manifests[1].model_version
    assert "alignment.npy" not in manifests[0].files  # nothing stored before: no map to fit
    fit = store.read_json(manifests[1], "alignment.json")
    assert fit["cosine_mapped"] >= fit["cosine_unmapped"] - 1e-6
    w = np.load(store.path("sessions", manifests[1].folder, "alignment.npy"))
    assert np.allclose(w @ w.T, np.eye(len(w)), atol=1e-4)
    # the models do not depend on the update mode: the index is not a training input
    full = stores[UpdateMode.full].sessions()
    assert [m.model_version for m in manifests] == [m.model_version for m in full]


def test_aligned_store_searches_through_its_shards(stores):
    searchable = open_store(stores[UpdateMode.aligned].url)
    assert searchable.index.ntotal == 11
    hits = searchable.search(["a document about the alpha topic"], k=11)
    assert len(hits) == 11 and set(hits["session"]) == {"alpha", "beta"}


def test_compatible_mode_trains_with_the_compatibility_term_and_keeps_stored_vectors(stores):
    store = stores[UpdateMode.compatible]
    manifests = store.sessions()
    assert [index_docs(store, i) for i in (0, 1)] == [6, 5]
    blocks = published_blocks(store, manifests)
    assert [(b.n_docs, b.maps) for b in blocks] == [(6, []), (5, [])]
    assert blocks[1].model_version == manifests[1].model_version  # new docs: the new model
    training = store.read_json(manifests[1], "training/training.json")
    assert training["loss"] == "BackwardCompatibleLoss"
    assert training["compatibility"]["n_examples_with_stored_vectors"] > 0


def test_reindex_of_an_aligned_store_evaluates_like_full_throughout(stores, tmp_path):
    store_dir = tmp_path / "store"
    shutil.copytree(stores[UpdateMode.aligned].path(), store_dir)
    before = published_files(store_dir)
    summary = reindex_flow(str(store_dir))
    assert summary["status"] == "reindexed" and summary["n_docs"] == 11
    full = stores[UpdateMode.full]
    expected = full.read_json(full.sessions()[-1], "metrics.json")
    for session, values in expected.items():
        for metric in ("ndcg@10", "recall@10"):
            assert summary["metrics"][session][metric] == pytest.approx(values[metric],
                                                                        abs=1e-6)
    store = Store(str(store_dir))
    assert published_files(store_dir) == before  # published sessions are never changed
    blocks = published_blocks(store, store.sessions())
    assert [(b.shard, b.n_docs, b.maps) for b in blocks] == [("reindex/00001_beta", 11, [])]
    record = json.loads((store_dir / "reindex" / "00001_beta" / "reindex.json").read_text())
    assert record["session"] == "beta" and "index.faiss" in record["files"]
    assert open_store(str(store_dir)).index.ntotal == 11
    assert reindex_flow(str(store_dir))["status"] == "already-reindexed"
    # verify and the pre-run check cover the re-index like a session
    assert store.damaged_files(store.sessions()) == []
    shard = store_dir / "reindex" / "00001_beta" / "index.faiss"
    shard.write_bytes(shard.read_bytes()[:-10])
    problems = store.damaged_files(store.sessions())
    assert len(problems) == 1 and "reindex/00001_beta/index.faiss" in problems[0]
    assert "reindex.json records" in problems[0]
