"""A hand-made sampling world (tests of sampling, replay and negatives): three clusters of
unit vectors whose cosines to the queries are known exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd

from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.warmup import unit_rows

DIM = 24


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


def at_cosine(center: np.ndarray, cos: float, private_axis: int) -> np.ndarray:
    """A unit vector with cosine `cos` to the unit vector `center`, rest on its own axis."""
    return (cos * center + np.sqrt(1.0 - cos**2) * axis(private_axis)).astype(np.float32)


CENTER_3 = unit_rows((axis(2) + 0.5 * axis(1))[None])[0]
# doc key, cluster, session, vector: cluster 1 scored against the query e0 (1.0, 0.99, 0.9, 0.5)
DOCS = [
    ("s1/a", 1, "s1", at_cosine(axis(0), 1.0, 10)),
    ("s1/b", 1, "s1", at_cosine(axis(0), 0.99, 11)),
    ("s1/c", 1, "s1", at_cosine(axis(0), 0.9, 12)),
    ("s1/d", 1, "s1", at_cosine(axis(0), 0.5, 13)),
    ("s1/e", 2, "s1", at_cosine(axis(1), 0.95, 14)),
    ("s1/f", 2, "s1", at_cosine(axis(1), 0.85, 15)),
    ("s0/x", 2, "s0", at_cosine(axis(1), 0.8, 16)),
    ("s1/g", 3, "s1", at_cosine(CENTER_3, 0.95, 17)),
]


def make_world() -> dict:
    """A fresh copy of the hand-made world."""
    pool = pd.DataFrame({"doc_key": [d[0] for d in DOCS],
                         "cluster_id": np.array([d[1] for d in DOCS], np.int64),
                         "session": [d[2] for d in DOCS]})
    vectors = np.stack([d[3] for d in DOCS])
    centroids = CentroidTable(np.array([1, 2, 3]), np.stack([axis(0), axis(1), CENTER_3]))
    texts = pd.Series({d[0]: f"text of {d[0]} " + " ".join(f"w{i}" for i in range(40))
                       for d in DOCS})
    queries = pd.DataFrame({"query_key": ["s1/q1", "s1/q2"], "text": ["query one", "query two"]})
    query_vectors = np.stack([axis(0), at_cosine(axis(1), 0.97, 20)])
    qrels = pd.DataFrame({"query_id": ["q1", "q2", "q9"], "doc_id": ["a", "e", "d"],
                          "score": [1, 1, 1], "split": ["train", "train", "test"]})
    return {"pool": pool, "vectors": vectors, "centroids": centroids, "texts": texts,
            "queries": queries, "query_vectors": query_vectors, "qrels": qrels}
