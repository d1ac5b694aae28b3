"""Stable cluster ids: Hungarian matching, fresh ids, never reused (tasks/cluster_ids.py)."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from driftlane.tasks.cluster_ids import (
    apply_mapping,
    issue_cluster_ids,
    jaccard_overlap,
    match_clusters,
)
from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.warmup import choose_k_and_cluster, unit_rows


def labels_by_doc(labels, prefix="d") -> pd.Series:
    return pd.Series(np.asarray(labels, dtype=np.int64),
                     index=[f"{prefix}{i}" for i in range(len(labels))])


@pytest.mark.parametrize("method", ["jaccard", "centroid"])
def test_permuted_labels_map_back_exactly(method):
    rng = np.random.default_rng(0)
    old_ids = np.array([3, 8, 15, 16, 21, 40])
    old = labels_by_doc(old_ids[rng.integers(0, 6, 300)])
    permutation = rng.permutation(6)  # old id old_ids[i] becomes new label permutation[i]
    new = labels_by_doc(permutation[np.searchsorted(old_ids, old.to_numpy())])
    centers = unit_rows(rng.standard_normal((6, 8)))
    old_centroids = CentroidTable(old_ids, centers)
    new_centroids = CentroidTable(permutation, centers)
    mapping, next_id = match_clusters(old, new, next_id=41, method=method,
                                      old_centroids=old_centroids, new_centroids=new_centroids)
    assert mapping == {int(permutation[i]): int(old_ids[i]) for i in range(6)}
    assert next_id == 41
    np.testing.assert_array_equal(apply_mapping(new.to_numpy(), mapping), old.to_numpy())


def test_jaccard_matches_brute_force_sets():
    rng = np.random.default_rng(1)
    old = labels_by_doc(rng.integers(0, 4, 60))
    new = labels_by_doc(rng.integers(0, 5, 50)).rename(lambda key: f"d{int(key[1:]) + 20}")
    old_ids, new_labels, jaccard = jaccard_overlap(old, new)
    for i, a in enumerate(old_ids):  # reference: Python sets
        members_a = set(old.index[old == a])
        for j, b in enumerate(new_labels):
            members_b = set(new.index[new == b])
            expected = len(members_a & members_b) / len(members_a | members_b)
            assert jaccard[i, j] == pytest.approx(expected)


def test_hungarian_matching_is_optimal_against_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(10):
        old = labels_by_doc(rng.integers(0, 4, 40))
        new = labels_by_doc(rng.integers(0, 4, 40))
        mapping, _ = match_clusters(old, new, next_id=4, min_jaccard=0.0)
        old_ids, new_labels, jaccard = jaccard_overlap(old, new)
        best = max(sum(jaccard[p[j], j] for j in range(len(new_labels)))
                   for p in permutations(range(len(old_ids)), len(new_labels)))
        ours = sum(jaccard[list(old_ids).index(mapping[int(b)]), j]
                   for j, b in enumerate(new_labels) if mapping[int(b)] < 4)
        assert ours == pytest.approx(best)


def test_weak_or_missing_matches_get_fresh_ids():
    old = labels_by_doc([0] * 10 + [1] * 10 + [2] * 10)
    # new 0 == old 0 (Jaccard 1); old 1 splits into new 1 (0.4) and new 9 (0.6); new 4 keeps
    # 3 of old 2 (0.3); new 2 holds only new documents (0)
    new = pd.concat([labels_by_doc([0] * 10 + [1] * 4 + [9] * 6 + [4] * 3),
                     labels_by_doc([2] * 6, prefix="x")])
    mapping, next_id = match_clusters(old, new, next_id=5, min_jaccard=0.5)
    assert mapping == {0: 0, 1: 5, 2: 6, 4: 7, 9: 1}  # fresh ids in new-label order
    assert next_id == 8
    mapping, next_id = match_clusters(old, new, next_id=5, min_jaccard=0.3)
    assert mapping == {0: 0, 1: 5, 2: 6, 4: 2, 9: 1} and next_id == 7
    # zero overlap is never a match, whatever the threshold
    mapping, next_id = match_clusters(old, new, next_id=5, min_jaccard=0.0)
    assert mapping[1] == 5 and mapping[2] == 6 and next_id == 7


def test_centroid_matching_threshold():
    old = CentroidTable(np.array([0, 1]), np.eye(3)[:2])
    new = CentroidTable(np.array([0, 1]), np.array([[1.0, 0.05, 0.0], [0.0, 0.0, 1.0]]))
    mapping, next_id = match_clusters(labels_by_doc([0, 1]), labels_by_doc([0, 1]), 2,
                                      method="centroid", old_centroids=old, new_centroids=new)
    assert mapping == {0: 0, 1: 2} and next_id == 3
    with pytest.raises(ValueError):
        match_clusters(labels_by_doc([0]), labels_by_doc([0]), 2, method="centroid")


def test_ids_are_never_reused_across_reclusterings():
    rng = np.random.default_rng(3)
    n = 200
    current = labels_by_doc(np.zeros(n, np.int64))
    next_id = 1
    issued = {0}
    for _ in range(8):  # splits, merges, relabelings and new documents, one round at a time
        new_labels = rng.integers(0, int(rng.integers(1, 7)), n)
        new_labels[: n // 2] = current.to_numpy()[: n // 2] % 3  # part of the structure stays
        new = labels_by_doc(new_labels)
        live = set(current.unique().tolist())
        mapping, next_id = match_clusters(current, new, next_id, min_jaccard=0.4)
        ids = set(mapping.values())
        assert len(ids) == len(mapping)  # one new cluster per id
        fresh = ids - live
        assert fresh.isdisjoint(issued)  # never an id seen before, live or retired
        assert all(i < next_id for i in ids)
        issued |= ids
        current = pd.Series(apply_mapping(new.to_numpy(), mapping), index=new.index)


def test_reclustering_unchanged_data_keeps_ids():
    rng = np.random.default_rng(4)
    centers = unit_rows(rng.standard_normal((4, 16)))
    x = unit_rows(np.repeat(centers, 50, axis=0) + 0.1 * rng.standard_normal((200, 16)))
    with threadpool_limits(1):
        first = choose_k_and_cluster(x, k_max=6, seed=0)
        second = choose_k_and_cluster(x, k_max=6, seed=1)
    keys = [f"d{i}" for i in range(200)]
    stable = pd.Series(first.labels, index=keys)
    mapping, next_id = match_clusters(stable, pd.Series(second.labels, index=keys),
                                      next_id=first.k)
    assert (apply_mapping(second.labels, mapping) == first.labels).all()
    assert next_id == first.k


def test_inputs_untouched_and_bad_input_rejected():
    old, new = labels_by_doc([0, 0, 1]), labels_by_doc([1, 1, 0])
    old_copy, new_copy = old.copy(), new.copy()
    match_clusters(old, new, next_id=2)
    pd.testing.assert_series_equal(old, old_copy)
    pd.testing.assert_series_equal(new, new_copy)
    with pytest.raises(ValueError):
        match_clusters(old, new, next_id=1)  # id 1 in use but not below next_id
    with pytest.raises(ValueError):
        match_clusters(old, new, next_id=2, method="nearest")
    with pytest.raises(KeyError):
        apply_mapping(np.array([5]), {0: 1})
    assert issue_cluster_ids(7, 3)[0].tolist() == [7, 8, 9]
    assert issue_cluster_ids(7, 3)[1] == 10
