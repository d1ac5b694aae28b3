"""A re-cluster that keeps the clusters that still hold (DESIGN step 6, issue 15 item 3).

A forced re-cluster (or a change of cluster representation) used to run a fresh warm-up and
match its clusters to the old ones. On topics of unequal size the sampled silhouette is flat
around the best k, so another seed picks another k or merges other topics, and 7-13% of
documents changed ID although nothing had changed (benchmarks/results/clustering_cpu.md).

Here the re-cluster has two candidates, scored by the same sampled silhouette:
- *kept*: spherical k-means (Lloyd) started from the previous clusters' centroids, computed in
  the current space from the documents that carry a previous ID, plus the centroids of the
  fresh warm-up's clusters made mostly of documents without one (a topic the new documents
  brought). On unchanged data it converges to the previous partition.
- *fresh*: the warm-up (`choose_k_and_cluster`) as on a first session.
The fresh candidate replaces the kept one when its silhouette is higher by more than
`margin` (`[memory] recluster_margin`), or when the kept one's number of clusters lies
outside [k_min, k_max] (a changed range asks for another partition); IDs are matched to the
old clusters afterwards either way (`tasks.cluster_ids`). A stable ID is a contract with
downstream models, so a small silhouette gain does not buy a re-numbering; a new domain that
the kept clusters cannot absorb lowers their silhouette by far more than the margin.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from sklearn.metrics import silhouette_score

from driftlane.infra.config import MemoryConfig
from driftlane.tasks.warmup import (
    WarmupResult,
    choose_k_and_cluster,
    normalized_cluster_means,
    silhouette_sample_rows,
    spherical_lloyd,
    unit_euclidean_distances,
    unit_rows,
)

DEFAULT_MARGIN = 0.05
NO_PREVIOUS = -1


@dataclass(frozen=True)
class ReclusterResult:
    """The chosen partition (`result`), which candidate it is and both silhouettes.

    kept: True when the previous clusters (refined) were kept; kept_silhouette and
    fresh_silhouette are the sampled silhouettes of the two candidates (None when a candidate
    could not be scored); fresh_k: the k the fresh warm-up chose.
    """

    result: WarmupResult
    kept: bool
    kept_silhouette: float | None
    fresh_silhouette: float | None
    fresh_k: int

    def record(self, margin: float) -> dict[str, object]:
        """The memory report's account of the choice."""
        return {"kept_previous": self.kept, "kept_silhouette": self.kept_silhouette,
                "fresh_silhouette": self.fresh_silhouette, "fresh_k": self.fresh_k,
                "margin": margin}


def sampled_silhouette(labels: np.ndarray, sample: np.ndarray,
                       distances: np.ndarray) -> float | None:
    """Silhouette of `labels` on the sample rows (precomputed distances); None if undefined."""
    sample_labels = labels[sample]
    n_labels = np.unique(sample_labels).size
    if n_labels < 2 or n_labels >= len(sample):
        return None
    return float(silhouette_score(distances, sample_labels, metric="precomputed"))


def kept_start(unit: np.ndarray, previous: np.ndarray, fresh: WarmupResult) -> np.ndarray:
    """Start centroids of the kept candidate: one per previous cluster with a member here,
    plus each fresh cluster that is new: most of its members have no previous cluster, and
    it holds less than half of every previous cluster (else it continues that cluster)."""
    has_previous = previous != NO_PREVIOUS
    codes, inverse = np.unique(previous[has_previous], return_inverse=True)
    starts = [normalized_cluster_means(unit[has_previous], inverse, len(codes))]
    sizes = np.bincount(fresh.labels, minlength=fresh.k)
    newcomers = np.bincount(fresh.labels[~has_previous], minlength=fresh.k)
    overlap = np.zeros((len(codes), fresh.k), dtype=np.int64)  # previous x fresh members
    np.add.at(overlap, (inverse, fresh.labels[has_previous]), 1)
    continues = (overlap * 2 >= overlap.sum(axis=1, keepdims=True)).any(axis=0)
    starts.append(fresh.centroids[(newcomers * 2 > sizes) & ~continues])
    return np.concatenate(starts)


def recluster(vectors: np.ndarray, previous: np.ndarray, k_min: int, k_max: int,
              sample_size: int, seed: int, margin: float = DEFAULT_MARGIN) -> ReclusterResult:
    """Re-cluster `vectors` (n, d) whose rows carry `previous` cluster labels ((n,) int64, any
    id, NO_PREVIOUS for a row without one): the refined previous clusters unless a fresh
    warm-up's silhouette is higher by more than `margin` (see the module docstring)."""
    previous = np.asarray(previous, dtype=np.int64)
    if previous.shape != (len(vectors),):
        raise ValueError(f"previous labels have shape {previous.shape}, vectors {vectors.shape}")
    fresh = choose_k_and_cluster(vectors, k_min, k_max, sample_size, seed)
    fresh_score = fresh.silhouette_by_k.get(fresh.k)
    if fresh.reason is not None or not (previous != NO_PREVIOUS).any():
        return ReclusterResult(fresh, False, None, fresh_score, fresh.k)
    unit = unit_rows(vectors)
    labels, centroids = spherical_lloyd(unit, kept_start(unit, previous, fresh))
    sample = silhouette_sample_rows(len(unit), sample_size, seed)  # the warm-up's sample
    kept_score = sampled_silhouette(labels, sample, unit_euclidean_distances(unit[sample]))
    outside = not k_min <= len(centroids) <= k_max  # the asked range excludes the kept k
    if (kept_score is None or outside
            or (fresh_score is not None and fresh_score > kept_score + margin)):
        return ReclusterResult(fresh, False, kept_score, fresh_score, fresh.k)
    kept = replace(fresh, labels=labels, centroids=centroids, k=len(centroids))
    return ReclusterResult(kept, True, kept_score, fresh_score, fresh.k)


def warm_up_partition(space: np.ndarray, old_ids: np.ndarray | None, config: MemoryConfig
                      ) -> tuple[WarmupResult, ReclusterResult | None]:
    """The memory stage's warm-up over `space` (old memory rows first, carrying `old_ids`;
    None on a first session): a first warm-up, or a re-cluster and how it chose."""
    if old_ids is None:
        return choose_k_and_cluster(space, config.k_min, config.k_max,
                                    config.silhouette_sample, config.seed), None
    previous = np.concatenate([np.asarray(old_ids, dtype=np.int64),
                               np.full(len(space) - len(old_ids), NO_PREVIOUS, np.int64)])
    chosen = recluster(space, previous, config.k_min, config.k_max, config.silhouette_sample,
                       config.seed, config.recluster_margin)
    return chosen.result, chosen


def warm_up_notes(result: WarmupResult, chosen: ReclusterResult | None, n_docs: int,
                  margin: float) -> list[str]:
    """Log lines: which candidate a re-cluster took and why, then the warm-up's outcome."""
    def score(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.3f}"

    notes = []
    if chosen is not None:
        which = "kept the previous clusters" if chosen.kept else "took a fresh warm-up"
        notes.append(f"re-cluster {which}: silhouette kept {score(chosen.kept_silhouette)} "
                     f"(k={chosen.result.k if chosen.kept else 'n/a'}), fresh "
                     f"{score(chosen.fresh_silhouette)} (k={chosen.fresh_k}), margin {margin}")
    if result.reason:
        notes.append(f"warm-up: {result.reason}")
    elif chosen is None or not chosen.kept:
        notes.append(f"warm-up chose k={result.k} over {n_docs} documents (silhouette "
                     f"{score(result.silhouette_by_k.get(result.k))})")
    return notes
