"""Self-supervised positives: for a query without labels, the best document of its clusters.

Every query not judged in the test split (`tasks.sampling.training_queries`) gets as
pseudo-positive the document with the highest exact MaxSim (`tasks.scoring`) among the pool
members of its `n_probe` nearest clusters, nearest by the query's vector against the centroids
(`pseudo_positives`). Token embeddings, for the MaxSim scores, are ragged float16 arrays given
as one (T, d) array plus (n + 1,) offsets (`RaggedTokens`).

With lexical scores (BM25 of `tasks.lexical`, `pseudo_positive_scoring = "fusion"`), the
candidates of a query are ranked twice, by MaxSim and by BM25, and the pseudo-positive is the
best by reciprocal-rank fusion, 1 / (60 + rank) summed over the two rankings (Cormack et al.
2009; ranks from 1): MaxSim alone picks the encoder's own favourite, which teaches it little; a
lexical ranking it does not share brings documents it misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.scoring import maxsim_matrix
from driftlane.tasks.warmup import unit_rows

__all__ = ["RRF_K", "RaggedTokens", "fused_best", "nearest_clusters", "pseudo_positives"]

RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009)


@dataclass(frozen=True)
class RaggedTokens:
    """Token embeddings of n texts: rows offsets[i]:offsets[i + 1] of `tokens` (T, d) are text i.

    offsets: (n + 1,) int64, non-decreasing, from 0 to T.
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
        if (len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(self.tokens)
                or (np.diff(offsets) < 0).any()):
            raise ValueError(f"offsets must rise from 0 to {len(self.tokens)} tokens")
        object.__setattr__(self, "offsets", offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, indices: np.ndarray) -> list[np.ndarray]:
        """The (t_i, d) token arrays of texts `indices` (views, not copies)."""
        return [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in indices.tolist()]


def nearest_clusters(vectors: np.ndarray, centroids: CentroidTable, n: int) -> np.ndarray:
    """(m, min(n, k)) int64 ids of the clusters nearest (cosine) to each row of `vectors` (m, d).

    Nearest first; ties go to the smaller cluster id.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sims = unit_rows(vectors) @ centroids.vectors.T  # (m, k)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    return centroids.ids[order]


def pseudo_positives(
    query_keys: Sequence[str] | np.ndarray,
    query_vectors: np.ndarray,
    query_tokens: RaggedTokens,
    pool: pd.DataFrame,
    doc_tokens: RaggedTokens,
    centroids: CentroidTable,
    n_probe: int,
    lexical: sparse.csr_matrix | None = None,
) -> pd.DataFrame:
    """Self-supervised positives: the best exact-MaxSim document in each query's nearest clusters
    (with `lexical`, the best by fusion of MaxSim and lexical ranks).

    query_vectors (m, d): vectors in the centroids' space (dense vectors, or query prototypes
    when clusters live on prototypes); query_tokens: m texts; pool: DataFrame(doc_key,
    cluster_id) of the candidates; doc_tokens: one per pool row.
    Only clusters with members in the pool are probed. Each probed cluster is scored once
    against all queries probing it (one `maxsim_matrix` call per cluster). Ties: the smaller
    cluster id, then the earlier pool row.

    lexical: (m, N) scores of the queries against the pool rows (BM25); the pseudo-positive
    is then `fused_best` of the candidates, and its score the fused one.

    Returns DataFrame(query_key, positive_key, cluster_id, score), one row per query that had a
    candidate, in query order.
    """
    keys = np.asarray(query_keys, dtype=object)
    if not len(keys) == len(query_vectors) == len(query_tokens):
        raise ValueError("query_keys, query_vectors and query_tokens differ in length")
    if len(doc_tokens) != len(pool):
        raise ValueError(f"{len(doc_tokens)} token arrays for {len(pool)} pool rows")
    empty = pd.DataFrame({"query_key": pd.Series(dtype=object),
                          "positive_key": pd.Series(dtype=object),
                          "cluster_id": pd.Series(dtype=np.int64),
                          "score": pd.Series(dtype=np.float32)})
    cluster_ids = pool["cluster_id"].to_numpy(np.int64)
    populated = np.unique(cluster_ids)
    if not len(keys) or not len(populated):
        return empty
    probe_table = CentroidTable(populated, centroids.vectors[centroids.rows_of(populated)])
    probes = nearest_clusters(query_vectors, probe_table, n_probe)  # (m, p)
    best_score = np.full(len(keys), -np.inf, dtype=np.float32)
    best_row = np.full(len(keys), -1, dtype=np.int64)
    candidates: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in keys]
    for cluster in np.unique(probes):
        asking = np.flatnonzero((probes == cluster).any(axis=1))  # queries probing it
        members = np.flatnonzero(cluster_ids == cluster)
        scores = maxsim_matrix(query_tokens.rows(asking), doc_tokens.rows(members))  # (q, s)
        if lexical is not None:
            for j, query in enumerate(asking):
                candidates[query].append((members, scores[j]))
            continue
        top = np.argmax(scores, axis=1)
        top_score = scores[np.arange(len(asking)), top]
        better = top_score > best_score[asking]
        best_score[asking[better]] = top_score[better]
        best_row[asking[better]] = members[top[better]]
    if lexical is not None:
        lexical = sparse.csr_matrix(lexical)
        for query, found_in in enumerate(candidates):
            if found_in:
                rows = np.concatenate([members for members, _ in found_in])
                maxsim = np.concatenate([scores for _, scores in found_in])
                lex = lexical[query].toarray().ravel()[rows]
                best, fused = fused_best(maxsim, lex)
                best_row[query], best_score[query] = rows[best], fused
    found = best_row >= 0
    rows = best_row[found]
    return pd.DataFrame({
        "query_key": keys[found],
        "positive_key": pool["doc_key"].to_numpy(dtype=object)[rows],
        "cluster_id": cluster_ids[rows],
        "score": best_score[found],
    })


def fused_best(first: np.ndarray, second: np.ndarray) -> tuple[int, float]:
    """(position, fused score) of the best candidate by reciprocal-rank fusion of two score
    vectors over the same candidates: 1 / (RRF_K + rank) summed, ranks from 1, higher scores
    first (ties: the earlier candidate). Ties of the fused score go to the better `first`
    score, then the earlier candidate."""
    n = len(first)
    fused = np.zeros(n)
    for scores in (first, second):
        order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64)))
        rank = np.empty(n)
        rank[order] = np.arange(1, n + 1)
        fused += 1.0 / (RRF_K + rank)
    best = int(np.lexsort((np.arange(n), -np.asarray(first, np.float64), -fused))[0])
    return best, float(fused[best])
