"""BM25 over a session's candidate pool: a label-free teacher that does not share the encoder's
blind spots (issue 13, self-supervised pseudo-positives).

Okapi BM25 (Robertson et al. 1994) with Anserini's defaults k1 = 0.9, b = 0.4; terms are
lower-cased runs of letters and digits (no stemming, no stop list: IDF discounts common
words); IDF is Lucene's log(1 + (N - df + 0.5) / (df + 0.5)), computed on the pool itself, so
the scores need nothing but the texts at hand. `Bm25Index` holds the (documents x terms)
weight matrix; `scores` gives the sparse (queries x documents) scores in one product.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

__all__ = ["BM25_B", "BM25_K1", "Bm25Index", "terms"]

BM25_K1 = 0.9
BM25_B = 0.4
_TERM = re.compile(r"[^\W_]+")


def terms(text: str) -> list[str]:
    """The BM25 terms of a text: lower-cased runs of letters and digits."""
    return _TERM.findall(str(text).lower())


@dataclass(frozen=True)
class Bm25Index:
    """BM25 weights of n documents: row i of `weights` (n, V) is document i's term weights."""

    vocabulary: dict[str, int]
    weights: sparse.csr_matrix

    @classmethod
    def build(cls, documents: Sequence[str], k1: float = BM25_K1, b: float = BM25_B) -> Bm25Index:
        vocabulary: dict[str, int] = {}
        rows, cols = [], []
        for i, text in enumerate(documents):
            for term in terms(text):
                rows.append(i)
                cols.append(vocabulary.setdefault(term, len(vocabulary)))
        n = len(documents)
        tf = sparse.csr_matrix((np.ones(len(rows), np.float64), (rows, cols)),
                               shape=(n, len(vocabulary)))
        tf.sum_duplicates()
        length = np.asarray(tf.sum(axis=1)).ravel()
        norm = k1 * (1.0 - b + b * length / max(length.mean(), 1e-9)) if n else length
        df = np.bincount(tf.indices, minlength=len(vocabulary))
        idf = np.log1p((n - df + 0.5) / (df + 0.5))
        weights = tf.tocoo()
        data = (idf[weights.col] * weights.data * (k1 + 1.0)
                / (weights.data + norm[weights.row]))
        return cls(vocabulary, sparse.csr_matrix((data, (weights.row, weights.col)),
                                                 shape=tf.shape))

    def scores(self, queries: Sequence[str]) -> sparse.csr_matrix:
        """(m, n) BM25 scores of every query against every document (a repeated query term
        counts once per occurrence); terms not in the pool score nothing."""
        rows, cols = [], []
        for i, text in enumerate(queries):
            for term in terms(text):
                col = self.vocabulary.get(term)
                if col is not None:
                    rows.append(i)
                    cols.append(col)
        counts = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                   shape=(len(queries), len(self.vocabulary)))
        return (counts @ self.weights.T).tocsr()
