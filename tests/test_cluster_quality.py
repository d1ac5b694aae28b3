"""Cluster quality report: indices against sklearn and brute force (tasks/cluster_quality.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from driftlane.tasks.cluster_quality import cluster_report, dunn_index
from driftlane.tasks.warmup import unit_rows


@pytest.fixture()
def clustered():
    rng = np.random.default_rng(0)
    centers = unit_rows(rng.standard_normal((4, 12)))
    labels = np.repeat(np.array([5, 9, 2, 30]), [30, 20, 25, 15])
    codes = np.searchsorted([2, 5, 9, 30], labels)
    x = unit_rows(centers[codes] + 0.2 * rng.standard_normal((len(labels), 12)))
    return x, labels


def brute_force_dunn(x, labels):
    """Reference: centroid separation over 2 x the largest member-to-mean distance."""
    means = {c: x[labels == c].mean(0) for c in np.unique(labels)}
    separation = min(np.linalg.norm(means[a] - means[b])
                     for a in means for b in means if a != b)
    diameter = max(2 * np.linalg.norm(v - means[c]) for v, c in zip(x, labels, strict=True))
    return separation / diameter


def test_report_matches_references(clustered):
    x, labels = clustered
    report = cluster_report(x, labels, sample_size=10_000, seed=0, new_cluster_ids=[30],
                            n_evicted=4)
    assert report["n_clusters"] == 4 and report["n_documents"] == 90
    assert report["sizes"] == {2: 25, 5: 30, 9: 20, 30: 15}
    assert report["new_clusters"] == [30] and report["evictions"] == 4
    assert report["silhouette"] == pytest.approx(silhouette_score(x, labels), abs=1e-6)
    assert report["dunn"] == pytest.approx(brute_force_dunn(x.astype(np.float64), labels))
    means = {c: x[labels == c].astype(np.float64).mean(0) for c in np.unique(labels)}
    wcss = sum(float(((x[labels == c] - m) ** 2).sum()) for c, m in means.items())
    assert report["wcss"] == pytest.approx(wcss, rel=1e-6)
    assert report["reason"] is None
    json.dumps(report)  # JSON-ready


def test_wcss_equals_kmeans_inertia(clustered):
    x, _ = clustered
    with threadpool_limits(1):
        model = KMeans(4, n_init=1, random_state=0).fit(x.astype(np.float64))
    report = cluster_report(x, model.labels_)
    assert report["wcss"] == pytest.approx(model.inertia_, rel=1e-4)


def test_separated_clusters_score_better_than_random_labels(clustered):
    x, labels = clustered
    good = cluster_report(x, labels)
    bad = cluster_report(x, np.random.default_rng(1).permutation(labels))
    assert good["silhouette"] > bad["silhouette"]
    assert good["davies_bouldin"] < bad["davies_bouldin"]
    assert good["calinski_harabasz"] > bad["calinski_harabasz"]
    assert good["dunn"] > bad["dunn"]
    assert good["wcss"] < bad["wcss"]


def test_sampled_silhouette_is_seeded(clustered):
    x, labels = clustered
    a = cluster_report(x, labels, sample_size=40, seed=3)
    b = cluster_report(x, labels, sample_size=40, seed=3)
    assert a == b
    assert a["silhouette"] == pytest.approx(silhouette_score(x, labels), abs=0.1)


@pytest.mark.parametrize(("vectors", "labels"), [
    (np.ones((1, 4)), [0]),                      # a single document
    (np.tile([[1.0, 2.0, 0.0]], (10, 1)), [0] * 10),   # identical documents, one cluster
    (np.eye(3), [0, 1, 2]),                      # every document its own cluster
    (np.zeros((0, 4)), []),                      # nothing
])
def test_degenerate_inputs_report_a_reason(vectors, labels):
    report = cluster_report(np.asarray(vectors, np.float32), np.asarray(labels))
    assert report["reason"] is not None
    assert report["silhouette"] is None and report["dunn"] is None
    json.dumps(report)


def test_identical_documents_in_two_clusters_do_not_crash():
    report = cluster_report(np.ones((6, 3), np.float32), np.array([0, 0, 0, 1, 1, 1]))
    assert report["wcss"] == 0.0 and report["dunn"] is None
    assert report["reason"] is not None
    assert dunn_index(np.ones((2, 2)), np.zeros(2, np.int64), 1) is None


def test_a_large_clustering_is_reported_on_a_seeded_sample(clustered):
    from driftlane.tasks.cluster_quality import report_sample_rows

    x, labels = clustered
    full = cluster_report(x, labels)
    assert full["sample_size"] == 90
    sampled = cluster_report(x, labels, report_sample=60, seed=2)
    assert sampled["sample_size"] == 60 and sampled["n_documents"] == 90
    assert sampled["sizes"] == full["sizes"] and sampled["n_clusters"] == 4  # every document
    assert sampled == cluster_report(x, labels, report_sample=60, seed=2)  # seeded
    rows = report_sample_rows(90, 60, 2)
    assert len(rows) == 60 and (np.diff(rows) > 0).all()
    # the caller may hand over only the sampled rows
    assert cluster_report(x[rows], labels, report_sample=60, seed=2, sample_rows=rows) == sampled
    # the indices on 60 of 90 rows are near the full ones; WCSS is scaled to all 90
    assert sampled["wcss"] == pytest.approx(full["wcss"], rel=0.25)
    assert sampled["silhouette"] == pytest.approx(full["silhouette"], abs=0.1)
    assert sampled["davies_bouldin"] == pytest.approx(full["davies_bouldin"], rel=0.25)
    with pytest.raises(ValueError):
        cluster_report(x[:10], labels, sample_rows=rows)
