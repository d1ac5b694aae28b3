"""A re-cluster keeps the clusters that still hold (tasks/recluster.py, issue 15 item 3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from driftlane.tasks.cluster_ids import apply_mapping, match_clusters
from driftlane.tasks.recluster import NO_PREVIOUS, recluster
from driftlane.tasks.warmup import (
    choose_k_and_cluster,
    nearest_centroid,
    spherical_lloyd,
    unit_rows,
)


@pytest.fixture(autouse=True)
def one_thread():
    with threadpool_limits(1):
        yield


def unequal_topics(n: int, n_topics: int = 10, dim: int = 384, noise: float = 0.06,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The clustering benchmark's data: random topic directions, Dirichlet(5) topic sizes."""
    rng = np.random.default_rng(seed)
    directions = unit_rows(rng.standard_normal((n_topics, dim)))
    topic = rng.choice(n_topics, size=n, p=rng.dirichlet(np.full(n_topics, 5.0)))
    return unit_rows(directions[topic] + noise * rng.standard_normal((n, dim))), topic


def survival(before: np.ndarray, after: np.ndarray) -> float:
    """Share of rows whose id survives when `after`'s clusters are matched to `before`'s."""
    keys = pd.Index(np.arange(len(before)))
    mapping, _ = match_clusters(pd.Series(before, index=keys), pd.Series(after, index=keys),
                                next_id=int(before.max()) + 1)
    return float((apply_mapping(after, mapping) == before).mean())


def test_unchanged_data_keeps_every_id_where_a_fresh_warm_up_does_not():
    x, _ = unequal_topics(2000)
    first = choose_k_and_cluster(x, 2, 16, 2000, seed=0)
    fresh = choose_k_and_cluster(x, 2, 16, 2000, seed=2)
    assert survival(first.labels, fresh.labels) < 0.95  # the failure this module removes
    chosen = recluster(x, first.labels, 2, 16, 2000, seed=2)
    assert chosen.kept
    assert survival(first.labels, chosen.result.labels) == 1.0
    np.testing.assert_array_equal(chosen.result.labels, first.labels)


def test_a_new_topic_gets_its_own_cluster_and_old_documents_keep_theirs():
    x, topic = unequal_topics(1600, n_topics=6, dim=64, noise=0.1, seed=3)
    old = topic < 4  # topics 4 and 5 arrive with the new session
    first = choose_k_and_cluster(x[old], 2, 10, 2000, seed=0)
    assert first.k == 4
    previous = np.full(len(x), NO_PREVIOUS)
    previous[old] = first.labels + 100  # stable ids are any integers
    chosen = recluster(x, previous, 2, 10, 2000, seed=1)
    assert chosen.kept and chosen.result.k == 6
    labels = chosen.result.labels
    assert survival(first.labels, labels[old]) == 1.0
    for new_topic in (4, 5):
        members = labels[topic == new_topic]
        assert np.unique(members).size == 1
        assert not np.isin(members, labels[old]).any()


def test_margin_decides_between_the_candidates():
    x, _ = unequal_topics(1200, n_topics=5, dim=32, noise=0.1, seed=4)
    # a poor previous partition: halves split along a random direction
    poor = (x @ np.random.default_rng(0).standard_normal(32) > 0).astype(np.int64)
    keeps = recluster(x, poor, 2, 8, 2000, seed=0, margin=2.0)
    assert keeps.kept and keeps.result.k == 2
    fresh = recluster(x, poor, 2, 8, 2000, seed=0)
    assert not fresh.kept and fresh.result.k == fresh.fresh_k > 2
    assert fresh.fresh_silhouette > fresh.kept_silhouette + 0.05
    # margin -2: the fresh warm-up even where the previous clusters are the topics
    good = choose_k_and_cluster(x, 2, 8, 2000, seed=0).labels
    assert not recluster(x, good, 2, 8, 2000, seed=0, margin=-2.0).kept


def test_a_k_range_that_excludes_the_kept_clusters_takes_the_fresh_warm_up():
    x, _ = unequal_topics(800, n_topics=4, dim=32, noise=0.1, seed=5)
    first = choose_k_and_cluster(x, 2, 8, 2000, seed=0)
    assert first.k == 4
    chosen = recluster(x, first.labels, 2, 2, 2000, seed=0, margin=2.0)
    assert not chosen.kept and chosen.result.k == 2


def test_spherical_lloyd_reaches_a_fixed_point_and_drops_empty_clusters():
    x, _ = unequal_topics(600, n_topics=3, dim=16, noise=0.2, seed=6)
    start = np.concatenate([x[:3], x[:1]])  # ties go to the first copy: the last stays empty
    labels, centroids = spherical_lloyd(x, start)
    assert len(centroids) == 3 and set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(nearest_centroid(x, centroids), labels)
    for c in range(3):
        mean = x[labels == c].mean(axis=0)
        np.testing.assert_allclose(centroids[c], mean / np.linalg.norm(mean), atol=1e-5)


def test_previous_labels_must_match_the_rows():
    x, _ = unequal_topics(50, n_topics=2, dim=8)
    with pytest.raises(ValueError, match="shape"):
        recluster(x, np.zeros(49, dtype=np.int64), 2, 4, 100, seed=0)
