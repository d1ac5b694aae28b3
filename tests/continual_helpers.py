"""Hand-made figures shared by the continual benchmark's tests."""

from __future__ import annotations

# R[i][j] of nDCG@10 for a three-session stream, by hand; other metrics are 0.1 lower.
NDCG = [[0.50, None, None],
        [0.40, 0.60, None],
        [0.45, 0.55, 0.70]]
SESSIONS = ["00_a", "01_b", "02_c"]


def rows_from(matrix):
    rows = []
    for i, name in enumerate(SESSIONS):
        metrics = {}
        for j, value in enumerate(matrix[i]):
            if value is not None:
                metrics[SESSIONS[j]] = {"ndcg@10": value, "success@5": value - 0.1,
                                        "recall@10": value - 0.1, "recall@100": value - 0.1,
                                        "n_queries": 10}
        rows.append((name, metrics))
    return rows


def timings(embedding, training, indexing=1.0):
    """A session's timings.json (or the summed stage times of a run)."""
    return {"embedding": embedding, "clustering": 2.0, "training": training,
            "indexing": indexing, "evaluation": 3.0,
            "total": embedding + 2.0 + training + indexing + 3.0}
