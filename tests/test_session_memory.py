"""The composed memory update: warm-up, streaming assignment, eviction, stable ids, save/load."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from driftlane.infra.config import MemoryConfig
from driftlane.tasks.memory_records import id_changes
from driftlane.tasks.memory_state import (
    load_memory_state,
    plot_cluster_sizes,
    save_memory_state,
    take_ragged,
)
from driftlane.tasks.memory_update import NewDocuments, update_memory
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
    # dense clusters: no cluster prototype is computed (nothing reads them)
    assert state.prototype_sums.shape == (0, 0) and state.prototype_counts.shape == (0,)
    on_prototypes = update_memory(None, new, config(representation="prototypes"), SPEC, PLANES,
                                  "s0").state
    np.testing.assert_array_equal(on_prototypes.prototype_counts, [30, 30, 30])


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


@pytest.mark.parametrize("representation", ["dense", "prototypes"])
@pytest.mark.parametrize("strategy", ["cluster_aware", "reservoir", "prototypes_only"])
def test_budget_is_never_exceeded(strategy, representation):
    state = None
    for i, topics in enumerate([[0, 1], [2, 3], [4, 5]]):
        update = update_memory(state, documents(f"s{i}", topics, 25, seed=i),
                               config(budget=30, eviction=strategy,
                                      representation=representation), SPEC, PLANES, f"s{i}")
        state = update.state
        assert len(state.memory) <= (0 if strategy == "prototypes_only" else 30)
        assert len(state.vectors) == len(state.memory) == len(state.token_offsets) - 1
    assert len(state.assignments) == 150
    if representation == "prototypes":
        # cluster prototypes still count every document assigned, memory or not
        assert state.prototype_counts.sum() == 150
        assert state.prototype_sums.shape == (state.next_cluster_id, SPEC.output_dim)
    else:
        assert state.prototype_sums.size == state.prototype_counts.size == 0


def test_recluster_of_unchanged_data_keeps_every_id():
    first = update_memory(None, documents("s0", [0, 1, 2, 3], 20, seed=3),
                          config(budget=100), SPEC, PLANES, "s0").state
    empty = NewDocuments(np.array([], dtype=str), np.zeros((0, DIM), np.float32),
                         np.zeros((0, DIM), np.float16), np.zeros(1, np.int64))
    update = update_memory(first, empty, config(budget=100, recluster=True), SPEC, PLANES,
                           "s1")
    again = update.state
    assert any("re-cluster kept the previous clusters" in n for n in update.notes)
    assert update.report["warmup"]["recluster"]["kept_previous"] is True
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
    # k fixed at 3 and the fresh warm-up taken: this test is about the matching
    update = update_memory(first, new, config(budget=400, recluster=True, k_min=3, k_max=3,
                                              recluster_margin=-2.0),
                           SPEC, PLANES, "s1")
    after = update.state.assignments.set_index("doc_key")["cluster_id"]
    assert any("took a fresh warm-up" in n for n in update.notes)
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


# --- no dead work, bounded cluster count, sampled report ---


def test_dense_clusters_build_no_prototype(monkeypatch, tmp_path):
    from driftlane.tasks import memory_update

    calls = []

    def spy(name, function):
        def counted(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        monkeypatch.setattr(memory_update, name, counted)

    spy("document_prototypes", memory_update.document_prototypes)
    spy("cluster_prototype_sums", memory_update.cluster_prototype_sums)
    first = update_memory(None, documents("s0", [0, 1, 2], 20, seed=1), config(), SPEC, PLANES,
                          "s0").state
    second = update_memory(first, documents("s1", [1, 4], 20, seed=2), config(), SPEC, PLANES,
                           "s1").state
    again = update_memory(second, documents("s2", [2], 10, seed=3), config(recluster=True),
                          SPEC, PLANES, "s2").state
    moved = memory_update.reembedded_state(again, again.vectors, again.tokens,
                                           again.token_offsets, SPEC, PLANES)
    assert calls == []
    for state in (first, second, again, moved):
        assert state.prototype_sums.shape == (0, 0) and state.prototype_counts.shape == (0,)
    # the memory still keeps its documents' tokens (self-supervised sampling reads them)
    assert len(moved.tokens) == moved.token_offsets[-1] > 0
    save_memory_state(tmp_path / "memory", moved, SPEC, PLANES)
    loaded, _, _ = load_memory_state(str(tmp_path / "memory"))
    assert loaded.prototype_sums.shape == (0, 0) and loaded.prototype_counts.shape == (0,)
    # on prototypes the same functions do run
    update_memory(None, documents("s0", [0, 1], 10, seed=1), config(representation="prototypes"),
                  SPEC, PLANES, "s0")
    assert "document_prototypes" in calls and "cluster_prototype_sums" in calls


def test_streamed_cluster_prototypes_equal_a_recomputation(monkeypatch, tmp_path):
    from driftlane.tasks import cluster_assignment
    from driftlane.tasks.memory_state import split_tokens
    from driftlane.tasks.prototypes import cluster_prototype_sums, document_prototypes

    monkeypatch.setattr(cluster_assignment, "BLOCK_FLOATS", 7 * SPEC.output_dim)  # 7-doc blocks
    sessions = [documents("s0", [0, 1], 15, seed=1), documents("s1", [1, 3], 15, seed=2),
                documents("s2", [3, 5], 15, seed=3)]
    state = None
    for i, new in enumerate(sessions):
        state = update_memory(state, new, config(budget=20, representation="prototypes"), SPEC,
                              PLANES, f"s{i}").state
    protos = np.concatenate([document_prototypes(split_tokens(s.tokens, s.token_offsets), SPEC,
                                                 PLANES) for s in sessions])
    sums, counts = cluster_prototype_sums(protos, state.assignments["cluster_id"].to_numpy(),
                                          state.next_cluster_id)
    np.testing.assert_array_equal(state.prototype_counts, counts)
    np.testing.assert_allclose(state.prototype_sums, sums, atol=1e-5)
    save_memory_state(tmp_path / "memory", state, SPEC, PLANES)
    loaded, _, _ = load_memory_state(str(tmp_path / "memory"))
    np.testing.assert_array_equal(loaded.prototype_sums, state.prototype_sums)


def test_the_report_of_a_large_session_is_sampled(monkeypatch):
    from driftlane.tasks import memory_update

    monkeypatch.setattr(memory_update, "_REPORT_FLOATS", 1)  # sample: silhouette_sample rows
    small = config(silhouette_sample=50)
    first = update_memory(None, documents("s0", [0, 1, 2], 20, seed=1), small, SPEC, PLANES,
                          "s0")
    assert first.report["sample_size"] == 50 and first.report["n_documents"] == 60
    for representation in ("dense", "prototypes"):
        state = update_memory(None, documents("s0", [0, 1, 2], 20, seed=1),
                              config(silhouette_sample=50, representation=representation), SPEC,
                              PLANES, "s0").state
        update = update_memory(state, documents("s1", [1, 4], 30, seed=2),
                               config(silhouette_sample=50, representation=representation), SPEC,
                               PLANES, "s1")
        report = update.report
        assert report["sample_size"] == 50 and report["n_documents"] == 60 + 60
        assert sum(report["sizes"].values()) == 120  # sizes count every candidate
        assert report["silhouette"] is not None and report["dunn"] is not None
        assert set(update.seconds_by_step) == {"refresh", "assign", "evict", "state",
                                                  "report"}


def test_the_cluster_count_is_capped_and_no_id_changes():
    small = config(k_max=3, max_new_clusters=2, budget=40)  # at most 3 + 2 = 5 live clusters
    state, n_capped = None, 0
    for i, topics in enumerate([[0, 1], [2, 3], [4, 5], [3, 5], [0, 2, 4]]):
        update = update_memory(state, documents(f"s{i}", topics, 20, seed=i), small, SPEC,
                               PLANES, f"s{i}")
        before = state
        state = update.state
        assert len(state.centroids) <= 5 == update.report["max_live_clusters"]
        assert update.report["id_changed"] == 0
        assert state.centroids.ids.max() < state.next_cluster_id
        if before is not None:
            assert state.next_cluster_id >= before.next_cluster_id
            opened = set(update.report["new_clusters"])
            assert opened.isdisjoint(before.assignments["cluster_id"])  # ids never reused
        n_capped += update.report["capped_documents"]
    assert n_capped > 0


def test_a_stale_memberless_cluster_retires_and_its_documents_keep_their_id():
    gone = config(eviction="prototypes_only")  # memory keeps no member: every cluster memberless
    state = update_memory(None, documents("s0", [0, 1, 2], 20, seed=1), gone, SPEC, PLANES,
                          "s0").state
    s0 = state.assignments.set_index("doc_key")["cluster_id"]
    topic0, topic1 = s0.loc["s0/0"], s0.loc["s0/20"]
    for i in (1, 2, 3):  # only topic 0 comes back
        update = update_memory(state, documents(f"s{i}", [0], 20, seed=10 + i), gone, SPEC,
                               PLANES, f"s{i}")
        assert update.report["retired_clusters"] == []
        state = update.state
    update = update_memory(state, documents("s4", [0], 20, seed=14), gone, SPEC, PLANES, "s4")
    retired = update.report["retired_clusters"]
    assert topic1 in retired and topic0 not in retired
    assert topic1 not in update.state.centroids.ids and topic0 in update.state.centroids.ids
    assert any("retired" in note for note in update.notes)
    after = update.state.assignments.set_index("doc_key")["cluster_id"]
    assert (after.loc[s0.index] == s0).all()  # documents keep the id they were given
    # topic 1 comes back: a fresh id, the retired one is never reused
    back = update_memory(update.state, documents("s5", [1], 20, seed=15), gone, SPEC, PLANES,
                         "s5").state
    s5 = back.assignments[back.assignments["session"] == "s5"]["cluster_id"]
    assert (s5 >= update.state.next_cluster_id).all()


def test_take_ragged_parts_equals_take_ragged_of_the_stack():
    from driftlane.tasks.memory_state import concat_ragged, take_ragged_parts

    rng = np.random.default_rng(0)
    parts = []
    for n_docs in (4, 0, 6):
        lengths = rng.integers(0, 4, n_docs)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        parts.append((rng.standard_normal((offsets[-1], 3)).astype(np.float16), offsets))
    stacked = concat_ragged(concat_ragged(parts[0], parts[1]), parts[2])
    for rows in (np.array([9, 0, 5, 3]), np.arange(10), np.zeros(0, np.int64)):
        got = take_ragged_parts(tuple(parts), rows)
        want = take_ragged(*stacked, rows)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
