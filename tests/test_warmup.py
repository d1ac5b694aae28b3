"""Warm-up clustering (tasks/warmup.py): k by sampled silhouette, seeded, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score, silhouette_score
from threadpoolctl import threadpool_limits

from driftlane.tasks.warmup import choose_k_and_cluster, count_distinct_rows, unit_rows


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny fits: OpenMP threads cost more than they give on a shared 2-core machine."""
    with threadpool_limits(1):
        yield


def unit_blobs(n: int, k: int, dim: int = 24, spread: float = 1.0, seed: int = 0):
    """make_blobs around k random directions at radius 10, L2-normalized: k clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim))
    centers *= 10.0 / np.linalg.norm(centers, axis=1, keepdims=True)
    x, y = make_blobs(n_samples=n, centers=centers, cluster_std=spread, random_state=seed)
    return unit_rows(x.astype(np.float32)), y


@pytest.mark.parametrize(("k_true", "seed"), [(3, 1), (5, 2), (8, 3)])
def test_blobs_with_known_k_give_that_k(k_true, seed):
    x, y = unit_blobs(80 * k_true, k_true, seed=seed)
    result = choose_k_and_cluster(x, k_min=2, k_max=10, sample_size=300, seed=seed)
    assert result.reason is None
    assert result.k == k_true
    assert max(result.silhouette_by_k, key=result.silhouette_by_k.get) == k_true
    assert sorted(result.silhouette_by_k) == list(range(2, 11))
    assert adjusted_rand_score(y, result.labels) > 0.98  # bisections are not refined


def test_shapes_centroids_and_silhouette_on_the_sample():
    x, _ = unit_blobs(300, 4, seed=5)
    result = choose_k_and_cluster(x, k_max=6, sample_size=10_000, seed=0)
    assert result.labels.dtype == np.int64 and result.labels.shape == (300,)
    assert result.centroids.shape == (result.k, x.shape[1])
    assert result.centroids.dtype == np.float32
    # centroid = normalized member mean (brute force, one cluster at a time)
    for c in range(result.k):
        mean = x[result.labels == c].mean(0)
        np.testing.assert_allclose(result.centroids[c], mean / np.linalg.norm(mean), atol=1e-5)
    # the sample covers all rows here, so the score is the full silhouette
    full = silhouette_score(x, result.labels)
    assert result.silhouette_by_k[result.k] == pytest.approx(full, abs=1e-5)


def test_seeded_run_is_reproducible_bit_for_bit_and_input_untouched():
    x, _ = unit_blobs(400, 5, spread=3.0, seed=7)
    before = x.copy()
    first = choose_k_and_cluster(x, k_max=8, sample_size=150, seed=11)
    second = choose_k_and_cluster(x, k_max=8, sample_size=150, seed=11)
    assert first.k == second.k
    assert first.labels.tobytes() == second.labels.tobytes()
    assert first.centroids.tobytes() == second.centroids.tobytes()
    assert first.silhouette_by_k == second.silhouette_by_k
    assert x.tobytes() == before.tobytes()


def test_unnormalized_input_is_clustered_by_direction():
    x, y = unit_blobs(240, 3, seed=4)
    scales = np.random.default_rng(0).uniform(0.1, 50.0, size=(len(x), 1)).astype(np.float32)
    result = choose_k_and_cluster(x * scales, k_max=6, sample_size=240, seed=0)
    assert result.k == 3
    assert adjusted_rand_score(y, result.labels) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_documents_give_one_cluster_with_a_reason(n):
    x = np.ones((n, 8), dtype=np.float32)
    result = choose_k_and_cluster(x)
    assert result.k == 1 and result.labels.tolist() == [0] * n
    assert result.centroids.shape == (1, 8)
    assert "nothing to cluster" in result.reason


def test_identical_documents_give_one_cluster_with_a_reason():
    x = np.tile(np.float32([[3.0, 4.0, 0.0]]), (50, 1))
    result = choose_k_and_cluster(x, k_max=5)
    assert result.k == 1 and (result.labels == 0).all()
    np.testing.assert_allclose(result.centroids, [[0.6, 0.8, 0.0]], atol=1e-6)
    assert "same vector" in result.reason


def test_fewer_distinct_points_than_k_min_give_one_cluster_with_a_reason():
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 30 rows, 3 distinct
    result = choose_k_and_cluster(x, k_min=4, k_max=6)
    assert result.k == 1
    assert "3 distinct" in result.reason
    # with k_min within reach, the three points are found, and k_max is capped at 3
    result = choose_k_and_cluster(x, k_min=2, k_max=6)
    assert result.k == 3 and sorted(result.silhouette_by_k) == [2, 3]


def test_two_distinct_documents_cannot_have_a_silhouette():
    result = choose_k_and_cluster(np.eye(2, dtype=np.float32))
    assert result.k == 1 and result.reason is not None


def test_count_distinct_rows():
    x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)
    assert count_distinct_rows(x) == 4
    assert count_distinct_rows(np.eye(5, dtype=np.float32), stop_at=3) == 3


def test_bad_arguments_are_rejected():
    x, _ = unit_blobs(50, 2)
    with pytest.raises(ValueError):
        choose_k_and_cluster(x, k_min=5, k_max=3)
    with pytest.raises(ValueError):
        choose_k_and_cluster(x, sample_size=1)


@pytest.mark.parametrize("seed", [0, 3])
def test_one_bisecting_run_gives_what_one_fit_per_k_gives(seed):
    """The replayed partitions equal a BisectingKMeans fit to each k, label for label."""
    from sklearn.cluster import BisectingKMeans

    from driftlane.tasks.warmup import bisecting_partitions

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(7, 12))
    sizes = rng.integers(20, 120, size=7)
    vectors = np.concatenate([c + 0.3 * rng.normal(size=(s, 12))
                              for c, s in zip(centres, sizes, strict=True)])
    unit = unit_rows(vectors)
    partitions = bisecting_partitions(unit, 2, 9, seed)
    assert sorted(partitions) == list(range(2, 10))
    for k, labels in partitions.items():
        direct = BisectingKMeans(n_clusters=k, random_state=seed).fit_predict(unit)
        np.testing.assert_array_equal(labels, direct, err_msg=f"k={k}")
