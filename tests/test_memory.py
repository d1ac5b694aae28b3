"""Clustered memory: statistics, refresh, fixed-centroid assignment, eviction (tasks/memory.py,
tasks/cluster_assignment.py, tasks/eviction.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from driftlane.tasks.cluster_assignment import (
    assign_to_nearest_cluster,
    group_outliers,
    pooled_boundary,
)
from driftlane.tasks.eviction import evict
from driftlane.tasks.memory import (
    MEMORY_COLUMNS,
    CentroidTable,
    append_to_memory,
    cluster_statistics,
    distances_to_centroids,
    empty_memory,
    memory_rows,
    next_stream_index,
    refresh_centroids,
    refresh_memory,
)
from driftlane.tasks.warmup import unit_rows

DIM = 16


def directions(k: int, seed: int) -> np.ndarray:
    """k random unit vectors in DIM dimensions (nearly orthogonal)."""
    return unit_rows(np.random.default_rng(seed).standard_normal((k, DIM)))


def around(center: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """n unit vectors scattered around `center`."""
    rng = np.random.default_rng(seed)
    return unit_rows(center[None, :] + noise * rng.standard_normal((n, DIM)))


@pytest.fixture()
def state():
    """Three clusters (ids 10, 11, 12) of 40, 30, 20 members with their memory table."""
    centers = directions(3, seed=0)
    sizes = (40, 30, 20)
    vectors = np.concatenate([around(c, s, 0.15, seed=i) for i, (c, s) in
                              enumerate(zip(centers, sizes, strict=True))])
    cluster_ids = np.repeat(np.array([10, 11, 12]), sizes)
    table = CentroidTable(np.array([10, 11, 12]), centers)
    keys = [f"s0/{i}" for i in range(len(vectors))]
    memory = memory_rows(keys, cluster_ids, np.zeros(len(keys)), "s0", 0)
    refreshed = refresh_memory(memory, vectors, table)
    return {"centers": centers, "vectors": vectors, "memory": refreshed.memory,
            "centroids": refreshed.centroids, "stats": refreshed.stats}


def brute_force_stats(vectors, cluster_ids, table):
    rows = []
    for cid, centroid in table.as_dict().items():  # reference: one cluster at a time
        members = vectors[cluster_ids == cid]
        d = [1.0 - float(np.dot(v, centroid)) for v in members]
        rows.append((cid, len(d), np.mean(d) if d else np.nan, np.std(d) if d else np.nan))
    return pd.DataFrame(rows, columns=["cluster_id", "count", "mean", "std"])


# --- tables, statistics, refresh ---


def test_centroid_table_sorts_normalizes_and_looks_up():
    table = CentroidTable(np.array([7, 3]), np.array([[0.0, 2.0], [3.0, 4.0]]))
    assert table.ids.tolist() == [3, 7]
    np.testing.assert_allclose(table.vectors, [[0.6, 0.8], [0.0, 1.0]], atol=1e-7)
    assert table.rows_of(np.array([7, 3, 7])).tolist() == [1, 0, 1]
    with pytest.raises(KeyError):
        table.rows_of(np.array([4]))
    with pytest.raises(ValueError):
        CentroidTable(np.array([1, 1]), np.eye(2))
    back = CentroidTable.from_mapping(table.as_dict(), dim=2)
    assert back.ids.tolist() == [3, 7] and np.array_equal(back.vectors, table.vectors)
    merged = table.with_centroids(CentroidTable(np.array([7, 9]), np.eye(2)))
    assert merged.ids.tolist() == [3, 7, 9]
    np.testing.assert_allclose(merged.vectors[1], [1.0, 0.0])


def test_cluster_statistics_match_brute_force(state):
    ids = state["memory"]["cluster_id"].to_numpy()
    table = CentroidTable(np.array([10, 11, 12, 99]),
                          np.concatenate([state["centroids"].vectors, directions(1, 9)]))
    stats = cluster_statistics(state["vectors"], ids, table)
    reference = brute_force_stats(state["vectors"], ids, table)
    assert stats["cluster_id"].tolist() == [10, 11, 12, 99]
    assert stats["count"].tolist() == [40, 30, 20, 0]
    np.testing.assert_allclose(stats[["mean", "std"]].to_numpy(),
                               reference[["mean", "std"]].to_numpy(), atol=1e-6)


def test_empty_cluster_statistics_are_carried_over(state):
    previous = state["stats"]
    keep = state["memory"]["cluster_id"].to_numpy() != 12  # cluster 12 lost every member
    stats = cluster_statistics(state["vectors"][keep],
                               state["memory"]["cluster_id"].to_numpy()[keep],
                               state["centroids"], previous=previous)
    pd.testing.assert_series_equal(stats.iloc[2], previous.iloc[2], check_names=False)
    without = cluster_statistics(state["vectors"][keep],
                                 state["memory"]["cluster_id"].to_numpy()[keep],
                                 state["centroids"])
    assert without["count"].iloc[2] == 0 and np.isnan(without["mean"].iloc[2])


def test_refresh_centroids_are_normalized_means_and_empty_clusters_keep_theirs(state):
    ids = state["memory"]["cluster_id"].to_numpy()
    stale = CentroidTable(np.array([10, 11, 12, 13]), np.concatenate(
        [directions(3, 5), directions(1, 6)]))
    refreshed = refresh_centroids(state["vectors"], ids, stale)
    for row, cid in enumerate([10, 11, 12]):
        mean = state["vectors"][ids == cid].mean(0)
        np.testing.assert_allclose(refreshed.vectors[row], mean / np.linalg.norm(mean),
                                   atol=1e-6)
    np.testing.assert_array_equal(refreshed.vectors[3], stale.vectors[3])


def test_refresh_memory_recomputes_distances_without_touching_inputs(state):
    memory = state["memory"].assign(distance=np.float32(9.0))
    before, vectors_before = memory.copy(), state["vectors"].copy()
    refreshed = refresh_memory(memory, state["vectors"], state["centroids"])
    pd.testing.assert_frame_equal(memory, before)
    assert state["vectors"].tobytes() == vectors_before.tobytes()
    expected = distances_to_centroids(state["vectors"], memory["cluster_id"].to_numpy(),
                                      refreshed.centroids)
    np.testing.assert_array_equal(refreshed.memory["distance"].to_numpy(), expected)
    assert list(refreshed.memory.columns) == list(MEMORY_COLUMNS)
    with pytest.raises(ValueError):
        refresh_memory(memory, state["vectors"][:5], state["centroids"])


# --- assignment ---


def test_assignment_keeps_statistics_until_the_next_refresh(state):
    stats_before = state["stats"].copy()
    centroids_before = state["centroids"].vectors.copy()
    # tighter than the members: well inside every boundary
    new = np.concatenate([around(state["centers"][0], 15, 0.08, seed=20),
                          around(state["centers"][2], 5, 0.08, seed=21)])
    assignment = assign_to_nearest_cluster(new, state["centroids"], state["stats"], z=3.0,
                                           min_cluster_size=5, next_cluster_id=13)
    assert not assignment.opened_new.any()
    assert assignment.cluster_ids.tolist() == [10] * 15 + [12] * 5
    assert len(assignment.new_centroids) == 0 and assignment.next_cluster_id == 13
    # nothing moved: the old statistics and centroids still describe the old members
    pd.testing.assert_frame_equal(state["stats"], stats_before)
    assert state["centroids"].vectors.tobytes() == centroids_before.tobytes()
    pd.testing.assert_frame_equal(
        cluster_statistics(state["vectors"], state["memory"]["cluster_id"].to_numpy(),
                           state["centroids"]), stats_before)
    np.testing.assert_allclose(
        assignment.distances,
        distances_to_centroids(new, assignment.cluster_ids, state["centroids"]), atol=1e-6)
    # the next refresh, with the new members appended, does change them
    rows = memory_rows([f"s1/{i}" for i in range(len(new))], assignment.cluster_ids,
                       assignment.distances, "s1", next_stream_index(state["memory"], 0))
    memory = append_to_memory(state["memory"], rows)
    refreshed = refresh_memory(memory, np.concatenate([state["vectors"], new]),
                               state["centroids"], previous_stats=state["stats"])
    assert refreshed.stats["count"].tolist() == [55, 30, 25]
    assert not np.allclose(refreshed.stats["mean"].iloc[0], stats_before["mean"].iloc[0],
                           rtol=0, atol=1e-9)
    pd.testing.assert_series_equal(refreshed.stats.iloc[1], stats_before.iloc[1])


def test_nearby_outliers_open_one_cluster_and_separate_groups_open_one_each(state):
    far = directions(1, seed=42)
    far = np.concatenate([far, -far])  # two far topics, far from each other too
    new = np.concatenate([around(state["centers"][1], 4, 0.08, seed=3),
                          around(far[0], 6, 0.1, seed=4), around(far[1], 5, 0.1, seed=5)])
    assignment = assign_to_nearest_cluster(new, state["centroids"], state["stats"], z=2.0,
                                           min_cluster_size=5, next_cluster_id=20)
    assert assignment.cluster_ids[:4].tolist() == [11] * 4
    assert assignment.opened_new.tolist() == [False] * 4 + [True] * 11
    assert assignment.cluster_ids[4:].tolist() == [20] * 6 + [21] * 5
    assert assignment.new_centroids.ids.tolist() == [20, 21]
    assert assignment.next_cluster_id == 22
    np.testing.assert_allclose(assignment.new_centroids.vectors[0],
                               unit_rows(new[4:10].mean(0, keepdims=True))[0], atol=1e-6)
    assert (assignment.distances[4:] < pooled_boundary(state["stats"], 2.0, 5)).all()


def test_outlier_grouping_is_capped_and_splits_down_to_the_radius():
    points = np.eye(DIM, dtype=np.float32)[:6]  # six mutually orthogonal outliers
    assert np.unique(group_outliers(points, radius=0.1, max_groups=64)).size == 6
    assert np.unique(group_outliers(points, radius=0.1, max_groups=4)).size == 4
    assert np.unique(group_outliers(points, radius=5.0, max_groups=64)).size == 1
    labels = group_outliers(np.repeat(points[:2], 3, axis=0), radius=0.01, max_groups=64)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_small_cluster_uses_the_pooled_boundary_or_joins(state):
    # cluster 13 has one member: std 0, so its own boundary would reject everything
    lone = directions(1, seed=77)[0]
    vectors = np.concatenate([state["vectors"], lone[None, :]])
    ids = np.r_[state["memory"]["cluster_id"].to_numpy(), 13]
    table = state["centroids"].with_centroids(CentroidTable(np.array([13]), lone[None, :]))
    stats = cluster_statistics(vectors, ids, table)
    near = around(lone, 3, 0.1, seed=8)  # within the typical radius of the other clusters
    opposite = -lone[None, :]  # cosine distance 2: beyond any radius
    pooled = assign_to_nearest_cluster(np.concatenate([near, opposite]), table, stats,
                                       z=2.0, min_cluster_size=5, next_cluster_id=14)
    assert pooled.cluster_ids.tolist() == [13, 13, 13, 14]
    joined = assign_to_nearest_cluster(opposite, CentroidTable(np.array([13]), lone[None, :]),
                                       stats, z=2.0, min_cluster_size=5, next_cluster_id=14,
                                       small_cluster_rule="join")
    assert joined.cluster_ids.tolist() == [13] and not joined.opened_new.any()


def test_single_document_and_identical_documents_complete(state):
    one = assign_to_nearest_cluster(directions(1, seed=50), state["centroids"], state["stats"],
                                    next_cluster_id=13)
    assert one.cluster_ids.tolist() == [13] and one.next_cluster_id == 14
    same = np.tile(directions(1, seed=51), (25, 1))
    many = assign_to_nearest_cluster(same, state["centroids"], state["stats"],
                                     next_cluster_id=13)
    assert many.cluster_ids.tolist() == [13] * 25 and len(many.new_centroids) == 1
    np.testing.assert_allclose(many.distances, 0.0, atol=1e-6)
    # a memory of identical documents (std 0) still accepts another identical one
    identical = np.tile(state["centers"][:1], (8, 1))
    table = CentroidTable(np.array([0]), state["centers"][:1])
    stats = cluster_statistics(identical, np.zeros(8, np.int64), table)
    again = assign_to_nearest_cluster(identical[:1], table, stats, next_cluster_id=1)
    assert again.cluster_ids.tolist() == [0] and not again.opened_new.any()
    empty = assign_to_nearest_cluster(np.zeros((0, DIM)), table, stats, next_cluster_id=1)
    assert len(empty.cluster_ids) == 0 and empty.next_cluster_id == 1


def test_without_clusters_the_batch_is_grouped_into_new_ones():
    centers = directions(2, seed=60)
    new = np.concatenate([around(centers[0], 5, 0.05, 1), around(centers[1], 5, 0.05, 2)])
    table = CentroidTable(np.zeros(0, np.int64), np.zeros((0, DIM)))
    stats = pd.DataFrame({"cluster_id": [], "count": [], "mean": [], "std": []})
    result = assign_to_nearest_cluster(new, table, stats, next_cluster_id=0)
    assert result.opened_new.all() and result.next_cluster_id == 1  # no radius known: one group


def test_assignment_does_not_modify_inputs_and_is_deterministic(state):
    new = np.concatenate([around(state["centers"][0], 5, 0.15, 1), directions(3, 99)])
    copies = new.copy(), state["stats"].copy(), state["centroids"].vectors.copy()
    first = assign_to_nearest_cluster(new, state["centroids"], state["stats"], next_cluster_id=13)
    second = assign_to_nearest_cluster(new, state["centroids"], state["stats"], next_cluster_id=13)
    assert new.tobytes() == copies[0].tobytes()
    pd.testing.assert_frame_equal(state["stats"], copies[1])
    assert state["centroids"].vectors.tobytes() == copies[2].tobytes()
    for a, b in zip(first[:3], second[:3], strict=True):
        assert a.tobytes() == b.tobytes()


# --- eviction ---


def random_memory(rng: np.random.Generator, n: int, n_clusters: int, seen: int = 0):
    ids = rng.integers(0, n_clusters, n)
    distance = rng.gamma(2.0, 0.05, n).astype(np.float32)
    memory = memory_rows([f"d{i}" for i in range(n)], ids, distance, "s", seen)
    stats = pd.DataFrame({"cluster_id": np.arange(n_clusters),
                          "count": np.bincount(ids, minlength=n_clusters)})
    grouped = memory.groupby("cluster_id")["distance"]
    stats["mean"] = grouped.mean().reindex(stats["cluster_id"]).to_numpy(np.float64)
    stats["std"] = grouped.std(ddof=0).reindex(stats["cluster_id"]).to_numpy(np.float64)
    return memory, stats


@pytest.mark.parametrize("strategy", ["cluster_aware", "reservoir", "prototypes_only"])
def test_budget_is_never_exceeded(strategy):
    rng = np.random.default_rng(123)
    for _ in range(40):  # random sizes, budgets, cluster counts, stream positions
        n, budget = int(rng.integers(0, 120)), int(rng.integers(0, 80))
        seen = int(rng.integers(0, 200))
        memory, stats = random_memory(rng, n, int(rng.integers(1, 12)),
                                      seen=seen - int(rng.integers(0, n + 1)))
        before = memory.copy()
        result = evict(memory, stats, budget, strategy, z=1.5, seed=int(rng.integers(99)),
                       seen=seen)
        assert len(result.memory) <= budget
        assert len(result.memory) == min(n, budget) or strategy == "prototypes_only"
        kept = set(result.memory["doc_key"])
        assert kept.isdisjoint(result.evicted_doc_keys)
        assert kept | set(result.evicted_doc_keys) == set(memory["doc_key"])
        pd.testing.assert_frame_equal(result.memory,
                                      memory.iloc[result.kept_rows].reset_index(drop=True))
        pd.testing.assert_frame_equal(memory, before)
        assert result.seen == seen + int((memory["stream_index"] >= seen).sum())


def brute_force_cluster_aware(memory, stats, budget, z, min_per_cluster):
    """Reference ranking with Python sorting, one row at a time."""
    st = stats.set_index("cluster_id")
    size = memory["cluster_id"].value_counts()
    members = {}
    for row in memory.itertuples():
        members.setdefault(row.cluster_id, []).append((row.distance, row.Index))
    rank = {}
    for rows in members.values():
        for r, (_, index) in enumerate(sorted(rows)):
            rank[index] = r
    keys = []
    for row in memory.itertuples():
        mean, std = st.loc[row.cluster_id, "mean"], st.loc[row.cluster_id, "std"]
        excess = row.distance - mean
        zscore = excess / std if std > 0 else (np.inf if excess > 1e-5 else 0.0)
        if rank[row.Index] < min_per_cluster:
            key = (0, rank[row.Index], -size[row.cluster_id], row.cluster_id, row.Index)
        else:
            tier = 2 if row.distance > mean + z * std + 1e-5 else 1
            key = (tier, zscore, 0, row.cluster_id, row.Index)
        keys.append(key)
    return sorted(index for *_, index in sorted(keys)[:budget])


def test_cluster_aware_matches_the_brute_force_ranking():
    rng = np.random.default_rng(5)
    for _ in range(15):
        memory, stats = random_memory(rng, int(rng.integers(10, 80)), int(rng.integers(1, 8)))
        budget = int(rng.integers(0, 80))
        result = evict(memory, stats, budget, "cluster_aware", z=1.0)
        assert result.kept_rows.tolist() == brute_force_cluster_aware(memory, stats, budget,
                                                                      1.0, 2)


def test_cluster_aware_drops_outliers_first_and_keeps_two_per_cluster(state):
    memory, stats = state["memory"], state["stats"]
    boundary = stats.set_index("cluster_id").eval("mean + 1.0 * std")
    outlier = memory["distance"].to_numpy() > boundary.reindex(memory["cluster_id"]).to_numpy()
    assert 0 < outlier.sum() < len(memory)
    result = evict(memory, stats, int((~outlier).sum()), "cluster_aware", z=1.0)
    assert set(result.evicted_doc_keys) == set(memory["doc_key"][outlier])
    # a budget far below the memory size still keeps two per cluster, the closest two
    tight = evict(memory, stats, 6, "cluster_aware", z=1.0)
    assert tight.memory["cluster_id"].value_counts().to_dict() == {10: 2, 11: 2, 12: 2}
    for cid, group in memory.groupby("cluster_id"):
        closest = set(group.nsmallest(2, "distance")["doc_key"])
        assert set(tight.memory.loc[tight.memory["cluster_id"] == cid, "doc_key"]) == closest
    # below 2 per cluster: every cluster keeps its closest member before any keeps a second
    assert sorted(evict(memory, stats, 4, "cluster_aware").memory["cluster_id"]) == \
        [10, 10, 11, 12]
    # under budget nothing goes
    assert len(evict(memory, stats, len(memory), "cluster_aware").evicted_doc_keys) == 0


def test_reservoir_matches_sequential_algorithm_r():
    """The vectorized reservoir equals Vitter's Algorithm R fed the same random draws."""
    budget, seen, seed = 7, 12, 3
    rng = np.random.default_rng(0)
    old_keys = [f"old{i}" for i in range(budget)]
    memory = pd.concat([memory_rows(old_keys, np.zeros(budget, np.int64), np.zeros(budget),
                                    "s0", 0),
                        memory_rows([f"new{i}" for i in range(30)], rng.integers(0, 3, 30),
                                    np.zeros(30), "s1", seen)], ignore_index=True)
    result = evict(memory, None, budget, "reservoir", seed=seed, seen=seen)
    draws = np.random.default_rng([seed, seen]).integers(0, seen + np.arange(30) + 1)
    reservoir = list(old_keys)
    for t, r in enumerate(draws):  # reference: one item at a time
        if r < budget:
            reservoir[r] = f"new{t}"
    assert result.memory["doc_key"].tolist() == reservoir
    assert result.seen == seen + 30


def test_reservoir_is_uniform_over_the_stream():
    budget, batch, n_batches, trials = 10, 20, 3, 100
    stream = batch * n_batches
    kept_count = np.zeros(stream)
    for trial in range(trials):
        memory, seen = empty_memory(), 0
        for b in range(n_batches):  # sessions arrive; evict after each
            rows = memory_rows([str(b * batch + i) for i in range(batch)],
                               np.zeros(batch, np.int64), np.zeros(batch), f"s{b}",
                               next_stream_index(memory, seen))
            memory = append_to_memory(memory, rows)
            memory, _, _, seen = evict(memory, None, budget, "reservoir", seed=trial,
                                       seen=seen)
        kept_count[memory["doc_key"].astype(int).to_numpy()] += 1
    per_batch = kept_count.reshape(n_batches, batch).sum(1) / (trials * budget)
    np.testing.assert_allclose(per_batch, 1 / n_batches, atol=0.07)  # 1/3 each, ~5 sigma
    assert per_batch.sum() == pytest.approx(1.0)


def test_eviction_is_reproducible_and_prototypes_only_keeps_no_members(state):
    memory = state["memory"]
    a = evict(memory, None, 20, "reservoir", seed=4, seen=0)
    b = evict(memory, None, 20, "reservoir", seed=4, seen=0)
    assert a.kept_rows.tolist() == b.kept_rows.tolist() and len(a.memory) == 20
    gone = evict(memory, state["stats"], 50, "prototypes_only")
    assert len(gone.memory) == 0 and len(gone.evicted_doc_keys) == len(memory)
    with pytest.raises(ValueError):
        evict(memory, None, 10, "cluster_aware")
    with pytest.raises(ValueError):
        evict(memory, None, -1, "reservoir")


def test_append_to_memory_rejects_duplicates_and_counts_the_stream():
    memory = memory_rows(["a", "b"], np.array([0, 0]), np.zeros(2), "s0", 0)
    with pytest.raises(ValueError):
        append_to_memory(memory, memory_rows(["b"], np.array([1]), np.zeros(1), "s1", 2))
    assert next_stream_index(memory, 0) == 2 and next_stream_index(memory, 9) == 9
    assert next_stream_index(empty_memory(), 4) == 4


# --- at scale: blocks, sampled grouping, the cluster cap ---


def test_blocked_nearest_search_equals_one_product(state):
    from driftlane.tasks.cluster_assignment import nearest_centroids

    rng = np.random.default_rng(3)
    unit = unit_rows(rng.standard_normal((1001, DIM)))
    table = CentroidTable(np.arange(40), unit_rows(rng.standard_normal((40, DIM))))
    sims = unit @ table.vectors.T  # reference: one product over every row
    for block_rows in (None, 1, 7, 1000):
        nearest, similarity = nearest_centroids(unit, table.vectors, block_rows)
        np.testing.assert_array_equal(nearest, np.argmax(sims, axis=1))
        np.testing.assert_allclose(similarity, sims.max(axis=1), atol=1e-6)
    # the assignment over odd-sized blocks equals the assignment of the whole array
    new = np.concatenate([around(state["centers"][0], 50, 0.15, 1),
                          around(state["centers"][1], 40, 0.3, 2), directions(13, 98)])
    whole = assign_to_nearest_cluster(new, state["centroids"], state["stats"],
                                      next_cluster_id=13, member_sums=True)
    blocks = assign_to_nearest_cluster((new[i:i + 17] for i in range(0, len(new), 17)),
                                       state["centroids"], state["stats"], next_cluster_id=13,
                                       member_sums=True)
    np.testing.assert_array_equal(blocks.cluster_ids, whole.cluster_ids)
    np.testing.assert_allclose(blocks.distances, whole.distances, atol=1e-6)
    assert blocks.next_cluster_id == whole.next_cluster_id
    # member sums: the normalized rows summed per cluster id, as a brute-force loop does
    expected = np.zeros_like(whole.member_sums)
    for row, cid in zip(unit_rows(new), whole.cluster_ids, strict=True):
        expected[cid] += row
    np.testing.assert_allclose(whole.member_sums, expected, atol=1e-5)
    np.testing.assert_allclose(blocks.member_sums, expected, atol=1e-5)
    assert assign_to_nearest_cluster(new, state["centroids"], state["stats"],
                                     next_cluster_id=13).member_sums is None


def test_many_outliers_are_grouped_on_a_sample(monkeypatch, state):
    from driftlane.tasks import cluster_assignment

    far = directions(4, seed=70)
    new = np.concatenate([around(-c, 30, 0.05, seed=i) for i, c in enumerate(far)])
    full = assign_to_nearest_cluster(new, state["centroids"], state["stats"],
                                     next_cluster_id=13)
    monkeypatch.setattr(cluster_assignment, "MAX_GROUPED_OUTLIERS", 25)
    sampled = assign_to_nearest_cluster(new, state["centroids"], state["stats"],
                                        next_cluster_id=13, seed=1)
    assert sampled.opened_new.all() and full.opened_new.all()
    # the same four topics, found from 25 of the 120 outliers
    assert len(np.unique(sampled.cluster_ids)) == len(np.unique(full.cluster_ids)) == 4
    pairs = set(zip(full.cluster_ids.tolist(), sampled.cluster_ids.tolist(), strict=True))
    assert len(pairs) == 4
    # every outlier's distance is to the centroid of the cluster it joined
    np.testing.assert_allclose(
        sampled.distances,
        distances_to_centroids(new, sampled.cluster_ids, sampled.new_centroids), atol=1e-6)


def test_the_cluster_cap_opens_the_largest_groups_and_renames_nothing(state):
    far = directions(3, seed=80)
    sizes = (6, 12, 9)
    new = np.concatenate([around(state["centers"][0], 5, 0.08, seed=1)]
                         + [around(-c, s, 0.05, seed=10 + i)
                            for i, (c, s) in enumerate(zip(far, sizes, strict=True))])
    free = assign_to_nearest_cluster(new, state["centroids"], state["stats"],
                                     next_cluster_id=20)
    assert free.next_cluster_id == 23 and not free.capped.any()
    capped = assign_to_nearest_cluster(new, state["centroids"], state["stats"],
                                       next_cluster_id=20, max_clusters=4)
    # room for one: the largest group (12 documents) opens cluster 20
    assert capped.new_centroids.ids.tolist() == [20] and capped.next_cluster_id == 21
    assert capped.cluster_ids[:5].tolist() == [10] * 5
    assert (capped.cluster_ids[11:23] == 20).all()
    assert capped.capped.sum() == 15 and not capped.capped[11:23].any()
    # the others join their nearest cluster, existing or just opened, with its distance
    everything = state["centroids"].with_centroids(capped.new_centroids)
    sims = unit_rows(new) @ everything.vectors.T
    rows = np.flatnonzero(capped.capped)
    np.testing.assert_array_equal(capped.cluster_ids[rows],
                                  everything.ids[np.argmax(sims[rows], axis=1)])
    np.testing.assert_allclose(capped.distances[rows], 1 - sims[rows].max(axis=1), atol=1e-6)
    full = assign_to_nearest_cluster(new, state["centroids"], state["stats"],
                                     next_cluster_id=20, max_clusters=3)
    assert len(full.new_centroids) == 0 and full.capped.sum() == 27
    assert set(full.cluster_ids.tolist()) <= {10, 11, 12}
    with pytest.raises(ValueError):
        assign_to_nearest_cluster(new, state["centroids"], state["stats"], max_clusters=0)
