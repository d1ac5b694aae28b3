"""The composed memory update: warm-up, streaming assignment, eviction, stable ids, save/load."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from driftlane.infra.config import MemoryConfig
from driftlane.tasks.memory_state import (
    load_memory_state,
    plot_cluster_sizes,
    save_memory_state,
    take_ragged,
)
from driftlane.tasks.memory_update import NewDocuments, id_changes, update_memory
from driftlane.tasks.prototypes import PrototypeSpec, make_hyperplanes

DIM = 16
SPEC = PrototypeSpec(n_bits=2, n_repetitions=2, projection_dim=8, seed=0, dim=DIM)
PLANES = make_hyperplanes(SPEC)


def blob_centres(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


CENTRES = blob_centres(6)


def documents(session: str, topics: list[int], per_topic: int, seed: int) -> NewDocuments:
    """Documents around the given blob centres, 3-5 tokens each near the document vector."""
    rng = np.random.default_rng(seed)
    vectors = np.concatenate([CENTRES[t] + 0.08 * rng.normal(size=(per_topic, DIM))
                              for t in topics]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    lengths = rng.integers(3, 6, size=len(vectors))
    tokens = np.concatenate([v + 0.05 * rng.normal(size=(n, DIM))
                             for v, n in zip(vectors, lengths, strict=True)]).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    keys = np.array([f"{session}/{i}" for i in range(len(vectors))])
    return NewDocuments(keys, vectors, tokens, offsets)


def config(**changes) -> MemoryConfig:
    base = {"budget": 60, "k_min": 2, "k_max": 8, "min_cluster_size": 3}
    return MemoryConfig(**{**base, **changes})


def test_take_ragged_matches_a_loop():
    tokens = np.arange(20, dtype=np.float32).reshape(10, 2)
    offsets = np.array([0, 3, 3, 7, 10])
    rows = np.array([3, 0, 2])
    got, got_offsets = take_ragged(tokens, offsets, rows)
    want = np.concatenate([tokens[offsets[r]:offsets[r + 1]] for r in rows])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_offsets, [0, 3, 6, 10])


def test_first_session_warms_up_and_keeps_the_budget():
    new = documents("s0", [0, 1, 2], 30, seed=1)
    update = update_memory(None, new, config(), SPEC, PLANES, "s0")
    state = update.state
    assert any("warm-up chose k=3" in n for n in update.notes)
    assert len(state.centroids) == 3 and state.next_cluster_id == 3
    assert len(state.memory) == 60 == update.report["memory_size"]
    assert len(state.assignments) == 90
    assert state.token_offsets[-1] == len(state.tokens)
    # each blob is one cluster
    by_topic = state.assignments["cluster_id"].to_numpy().reshape(3, 30)
    assert all(len(set(row)) == 1 for row in by_topic)
    assert update.report["n_clusters"] == 3 and update.report["evictions"] == 30
    # memory rows line up with their vectors
    keys = state.memory["doc_key"].to_numpy(str)
    rows = np.array([int(k.split("/")[1]) for k in keys])
    np.testing.assert_array_equal(state.vectors, new.vectors[rows])
    np.testing.assert_array_equal(state.prototype_counts, [30, 30, 30])


def test_second_session_joins_old_clusters_and_opens_one_for_a_new_topic():
    first = update_memory(None, documents("s0", [0, 1, 2], 30, seed=1), config(), SPEC,
                          PLANES, "s0").state
    new = documents("s1", [1, 4], 20, seed=2)
    before = new.vectors.copy()
    update = update_memory(first, new, config(), SPEC, PLANES, "s1")
    state = update.state
    np.testing.assert_array_equal(new.vectors, before)  # inputs unchanged
    topic1 = state.assignments.set_index("doc_key").loc["s0/30", "cluster_id"]
    s1 = state.assignments[state.assignments["session"] == "s1"]["cluster_id"].to_numpy()
    # the known topic joins its cluster, but for the few beyond mean + 2 std
    assert (s1[:20] == topic1).mean() >= 0.85
    assert (s1[20:] >= 3).all()  # the new topic only opens new clusters
    assert set(update.report["new_clusters"]) == set(s1[s1 >= 3].tolist())
    assert len(state.memory) <= 60
    assert len(state.assignments) == 130
    assert state.seen == 130


@pytest.mark.parametrize("strategy", ["cluster_aware", "reservoir", "prototypes_only"])
def test_budget_is_never_exceeded(strategy):
    state = None
    for i, topics in enumerate([[0, 1], [2, 3], [4, 5]]):
        update = update_memory(state, documents(f"s{i}", topics, 25, seed=i),
                               config(budget=30, eviction=strategy), SPEC, PLANES, f"s{i}")
        state = update.state
        assert len(state.memory) <= (0 if strategy == "prototypes_only" else 30)
        assert len(state.vectors) == len(state.memory) == len(state.token_offsets) - 1
    assert len(state.assignments) == 150
    # cluster prototypes still count every document assigned, memory or not
    assert state.prototype_counts.sum() == 150


def test_recluster_of_unchanged_data_keeps_every_id():
    first = update_memory(None, documents("s0", [0, 1, 2, 3], 20, seed=3),
                          config(budget=100), SPEC, PLANES, "s0").state
    empty = NewDocuments(np.array([], dtype=str), np.zeros((0, DIM), np.float32),
                         np.zeros((0, DIM), np.float16), np.zeros(1, np.int64))
    again = update_memory(first, empty, config(budget=100, recluster=True), SPEC, PLANES,
                          "s1").state
    merged = first.assignments.merge(again.assignments, on="doc_key")
    assert (merged["cluster_id_x"] == merged["cluster_id_y"]).all()
    assert again.next_cluster_id == first.next_cluster_id


def test_single_document_and_identical_documents_complete_with_a_reason():
    one = documents("s0", [0], 1, seed=4)
    update = update_memory(None, one, config(), SPEC, PLANES, "s0")
    assert len(update.state.centroids) == 1
    assert any("1 document(s)" in n for n in update.notes)
    same = NewDocuments(np.array(["s0/a", "s0/b", "s0/c"]),
                        np.repeat(one.vectors, 3, axis=0), np.repeat(one.tokens, 3, axis=0),
                        np.array([0, len(one.tokens), 2 * len(one.tokens),
                                  3 * len(one.tokens)]))
    update = update_memory(None, same, config(), SPEC, PLANES, "s0")
    assert len(update.state.centroids) == 1
    assert any("same vector" in n for n in update.notes)


def test_prototype_representation_clusters_on_prototypes():
    update = update_memory(None, documents("s0", [0, 1, 2], 20, seed=5),
                           config(representation="prototypes"), SPEC, PLANES, "s0")
    assert update.state.centroids.dim == SPEC.output_dim
    assert update.state.representation == "prototypes"
    # switching back forces a warm-up, and ids are matched by overlap
    nxt = update_memory(update.state, documents("s1", [0], 5, seed=6), config(), SPEC, PLANES,
                        "s1")
    assert any("representation changed" in n for n in nxt.notes)
    assert nxt.state.centroids.dim == DIM


def test_save_and_load_round_trip(tmp_path):
    state = update_memory(None, documents("s0", [0, 1], 20, seed=8), config(), SPEC, PLANES,
                          "s0").state
    save_memory_state(tmp_path / "memory", state, SPEC, PLANES)
    loaded, spec, planes = load_memory_state(str(tmp_path / "memory"))
    assert spec == SPEC
    for name in ("vectors", "tokens", "token_offsets", "prototype_sums", "prototype_counts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(state, name))
    for name in ("memory", "stats", "assignments", "size_history", "id_history"):
        pd.testing.assert_frame_equal(getattr(loaded, name), getattr(state, name))
    np.testing.assert_array_equal(loaded.centroids.vectors, state.centroids.vectors)
    assert (loaded.next_cluster_id, loaded.seen) == (state.next_cluster_id, state.seen)
    plot_cluster_sizes(state.size_history, tmp_path / "sizes.png", state.id_history)
    assert (tmp_path / "sizes.png").read_bytes()[:4] == b"\x89PNG"


def test_recluster_with_many_new_documents_in_one_topic_keeps_its_id():
    """Old and new clusters are matched on the same documents (the old memory): new
    documents joining a topic must not dilute its overlap and cost it its id."""
    first = update_memory(None, documents("s0", [0, 1, 2], 20, seed=1), config(budget=200),
                          SPEC, PLANES, "s0").state
    ids_before = first.assignments.set_index("doc_key")["cluster_id"]
    new = documents("s1", [0], 100, seed=3)  # five times the topic's old members
    # k fixed at 3: this test is about the matching, not the choice of k
    update = update_memory(first, new, config(budget=400, recluster=True, k_min=3, k_max=3),
                           SPEC, PLANES, "s1")
    after = update.state.assignments.set_index("doc_key")["cluster_id"]
    assert any("warm-up chose k=3" in n for n in update.notes)
    # every old document keeps its cluster id, and the new ones join topic 0's id
    assert (after.loc[ids_before.index] == ids_before).all()
    topic0 = ids_before.loc["s0/0"]
    assert (after[after.index.str.startswith("s1/")] == topic0).all()
    assert update.state.next_cluster_id == first.next_cluster_id  # no fresh id issued


# --- ID stability: how many earlier documents a session gave another cluster id ---


def test_an_ordinary_session_changes_no_id():
    first = update_memory(None, documents("s0", [0, 1, 2], 20, seed=1), config(), SPEC,
                          PLANES, "s0")
    assert first.report["n_assigned_before"] == first.report["id_changed"] == 0
    assert first.report["id_changed_share"] is None  # nothing was assigned before
    second = update_memory(first.state, documents("s1", [1, 4], 20, seed=2), config(), SPEC,
                           PLANES, "s1")
    assert second.report["id_changed_share"] == 0.0
    assert second.report["n_assigned_before"] == 60
    assert second.state.id_history.to_dict("list") == {
        "session": ["s0", "s1"], "n_assigned_before": [0, 60], "n_changed": [0, 0]}


def test_a_recluster_that_moves_documents_reports_the_share_it_changed():
    first = update_memory(None, documents("s0", [0, 1, 2, 3], 20, seed=3), config(budget=100),
                          SPEC, PLANES, "s0").state
    empty = NewDocuments(np.array([], dtype=str), np.zeros((0, DIM), np.float32),
                         np.zeros((0, DIM), np.float16), np.zeros(1, np.int64))
    # four topics forced into two clusters: two topics' documents must change id
    update = update_memory(first, empty, config(budget=100, recluster=True, k_min=2, k_max=2),
                           SPEC, PLANES, "s1")
    merged = first.assignments.merge(update.state.assignments, on="doc_key")
    changed = int((merged["cluster_id_x"] != merged["cluster_id_y"]).sum())
    assert changed >= 20
    assert update.report["id_changed"] == changed
    assert update.report["n_assigned_before"] == 80
    assert update.report["id_changed_share"] == pytest.approx(changed / 80)
    last = update.state.id_history.iloc[-1]
    assert (last["session"], last["n_assigned_before"], last["n_changed"]) == ("s1", 80, changed)


def test_id_changes_looks_documents_up_by_key():
    previous = pd.DataFrame({"doc_key": ["a", "b", "c"], "cluster_id": [1, 2, 3]})
    shuffled = pd.DataFrame({"doc_key": ["d", "c", "a", "b"], "cluster_id": [9, 3, 5, 2]})
    assert id_changes(previous, shuffled) == 1  # "a" moved from 1 to 5
    with pytest.raises(ValueError, match="missing"):
        id_changes(previous, shuffled.iloc[:2])


def test_a_format_1_state_loads_with_an_empty_id_history(tmp_path):
    state = update_memory(None, documents("s0", [0, 1], 20, seed=8), config(), SPEC, PLANES,
                          "s0").state
    folder = tmp_path / "memory"
    save_memory_state(folder, state, SPEC, PLANES)
    meta = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**meta, "format": 1}))
    (folder / "id_history.parquet").unlink()
    loaded, _, _ = load_memory_state(str(folder))
    assert len(loaded.id_history) == 0
    # the next session starts the history, and the plot marks the sessions before it n/a
    nxt = update_memory(loaded, documents("s1", [0], 5, seed=9), config(), SPEC, PLANES, "s1")
    assert nxt.state.id_history["session"].tolist() == ["s1"]
    plot_cluster_sizes(nxt.state.size_history, tmp_path / "sizes.png", nxt.state.id_history)
    assert (tmp_path / "sizes.png").read_bytes()[:4] == b"\x89PNG"
