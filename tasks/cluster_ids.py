"""Stable cluster IDs across re-clusterings (DESIGN step 6).

A cluster ID is a categorical feature for downstream models, so it must keep its meaning: an ID
is never reused, and when the clusters are rebuilt (forced re-warm-up, encoder change, split,
merge), each new cluster inherits the ID of the old cluster it matches, or gets a fresh one.

Matching is a one-to-one assignment solved with the Hungarian algorithm (Kuhn 1955; scipy's
`linear_sum_assignment`, Crouse 2016) on either
- member overlap: the Jaccard index |A & B| / |A | B| of the old and new clusters' doc keys,
  maximized; a pair under `min_jaccard` is not a match; or
- centroid distance: cosine distance 1 - a . b of the L2-normalized centroids, minimized; a
  pair over `max_centroid_distance` is not a match.
New clusters left without a match get fresh IDs from `next_id` on, in order of their new label.

The ID counter `next_id` is the whole registry: every ID ever issued is below it and it only
grows, so a fresh ID can never collide with a live or retired one.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from driftlane.tasks.memory import CentroidTable

DEFAULT_MIN_JACCARD = 0.5
DEFAULT_MAX_CENTROID_DISTANCE = 0.1
MatchMethod = Literal["jaccard", "centroid"]


class ClusterMatch(NamedTuple):
    """mapping: {new label: stable id} for every new label; next_id: first unused id after."""

    mapping: dict[int, int]
    next_id: int


def issue_cluster_ids(next_id: int, n: int) -> tuple[np.ndarray, int]:
    """(n,) int64 fresh ids next_id .. next_id + n - 1, and the new next_id."""
    if n < 0:
        raise ValueError(f"cannot issue {n} ids")
    return np.arange(next_id, next_id + n, dtype=np.int64), next_id + n


def apply_mapping(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """(n,) int64 stable ids of `labels` (n,) under `mapping`; KeyError for an unmapped label."""
    labels = np.asarray(labels, dtype=np.int64)
    keys = np.fromiter(mapping.keys(), dtype=np.int64, count=len(mapping))
    values = np.fromiter(mapping.values(), dtype=np.int64, count=len(mapping))
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    rows = np.searchsorted(keys, labels)
    found = rows < len(keys)
    found[found] = keys[rows[found]] == labels[found]
    if not found.all():
        raise KeyError(f"labels without a stable id: {np.unique(labels[~found])[:10].tolist()}")
    return values[rows]


def jaccard_overlap(
    old_labels_by_doc: pd.Series, new_labels_by_doc: pd.Series
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jaccard index between every old and every new cluster, by member doc keys.

    Both Series are indexed by doc key (unique). Returns (old ids (a,), new labels (b,),
    jaccard (a, b) float64); a cluster's size counts all its docs, shared with the other side
    or not, so documents that left memory lower the overlap.
    """
    for name, labels in (("old", old_labels_by_doc), ("new", new_labels_by_doc)):
        if not labels.index.is_unique:
            raise ValueError(f"{name} labels: doc keys are not unique")
    old_ids, old_codes = np.unique(old_labels_by_doc.to_numpy(np.int64), return_inverse=True)
    new_ids, new_codes = np.unique(new_labels_by_doc.to_numpy(np.int64), return_inverse=True)
    old_size = np.bincount(old_codes, minlength=len(old_ids))
    new_size = np.bincount(new_codes, minlength=len(new_ids))
    # codes of the shared docs, aligned by doc key
    old_pos = pd.Index(old_labels_by_doc.index).get_indexer(new_labels_by_doc.index)
    shared = old_pos >= 0
    pair = old_codes[old_pos[shared]] * len(new_ids) + new_codes[shared]
    intersection = np.bincount(pair, minlength=len(old_ids) * len(new_ids)).reshape(
        len(old_ids), len(new_ids)).astype(np.float64)
    union = old_size[:, None] + new_size[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        jaccard = np.where(union > 0, intersection / union, 0.0)
    return old_ids, new_ids, jaccard


def match_clusters(
    old_labels_by_doc: pd.Series,
    new_labels_by_doc: pd.Series,
    next_id: int,
    min_jaccard: float = DEFAULT_MIN_JACCARD,
    method: MatchMethod = "jaccard",
    old_centroids: CentroidTable | None = None,
    new_centroids: CentroidTable | None = None,
    max_centroid_distance: float = DEFAULT_MAX_CENTROID_DISTANCE,
) -> ClusterMatch:
    """Give every new cluster a stable id: its Hungarian match among the old ones, or a fresh id.

    old_labels_by_doc: stable cluster id per doc key (Series indexed by doc key);
    new_labels_by_doc: new clustering's label per doc key; next_id: the id counter (every id in
    use must be below it). method "jaccard" matches on member overlap (pairs with Jaccard below
    `min_jaccard`, or zero, stay unmatched); "centroid" on the cosine distance between
    `old_centroids` (keyed by stable id) and `new_centroids` (keyed by new label), pairs farther
    than `max_centroid_distance` stay unmatched. Returns the mapping new label -> stable id and
    the advanced counter; inputs are not modified.
    """
    old_stable = old_labels_by_doc.to_numpy(np.int64)
    if len(old_stable) and old_stable.max() >= next_id:
        raise ValueError(f"old cluster id {int(old_stable.max())} is not below next_id={next_id}")
    if method == "jaccard":
        old_ids, new_labels, similarity = jaccard_overlap(old_labels_by_doc, new_labels_by_doc)
        acceptable = (similarity >= min_jaccard) & (similarity > 0)
        cost = -similarity
    elif method == "centroid":
        if old_centroids is None or new_centroids is None:
            raise ValueError("method='centroid' needs old_centroids and new_centroids")
        if len(old_centroids.ids) and old_centroids.ids.max() >= next_id:
            raise ValueError("old centroid ids must be below next_id")
        missing = np.setdiff1d(new_labels_by_doc.to_numpy(np.int64), new_centroids.ids)
        if missing.size:
            raise KeyError(f"new labels without a centroid: {missing[:10].tolist()}")
        old_ids, new_labels = old_centroids.ids, new_centroids.ids
        cost = 1.0 - old_centroids.vectors.astype(np.float64) @ new_centroids.vectors.T
        acceptable = cost <= max_centroid_distance
    else:
        raise ValueError(f"unknown matching method {method!r}")

    mapping: dict[int, int] = {}
    if cost.size:
        old_rows, new_cols = linear_sum_assignment(cost)
        good = acceptable[old_rows, new_cols]
        mapping = {int(new_labels[c]): int(old_ids[r])
                   for r, c in zip(old_rows[good], new_cols[good], strict=True)}
    unmatched = [int(label) for label in new_labels if int(label) not in mapping]
    fresh, next_id = issue_cluster_ids(next_id, len(unmatched))
    mapping.update(zip(unmatched, fresh.tolist(), strict=True))
    return ClusterMatch(dict(sorted(mapping.items())), next_id)
