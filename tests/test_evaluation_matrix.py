"""The evaluation matrix R, average performance and backward transfer, checked by hand."""

from __future__ import annotations

import pytest

from driftlane.tasks.evaluation import continual_summary, metrics_matrix, ranking_from_search


def row(**scores):
    return {s: {"ndcg@10": v, "success@5": v, "recall@10": v, "recall@100": v}
            for s, v in scores.items()}


def test_two_session_stream_by_hand():
    # after a: a scores 0.50; after b: a dropped to 0.40, b scores 0.70
    rows = [("a", row(a=0.50)), ("b", row(a=0.40, b=0.70))]
    r = metrics_matrix(rows, "ndcg@10")
    assert r[0, 0] == 0.50 and r[1, 0] == 0.40 and r[1, 1] == 0.70
    assert r[0, 1] != r[0, 1]  # NaN: b was not seen after a
    summary = continual_summary(rows)
    assert summary["avg"]["ndcg@10"] == pytest.approx((0.40 + 0.70) / 2)
    assert summary["bwt"]["ndcg@10"] == pytest.approx(0.40 - 0.50)
    assert summary["matrix"]["ndcg@10"] == [[0.5, None], [0.4, 0.7]]


def test_a_session_without_test_queries_is_left_out():
    rows = [("a", row(a=0.5)), ("b", row(a=0.6)), ("c", row(a=0.7, c=0.2))]
    summary = continual_summary(rows)
    assert summary["avg"]["ndcg@10"] == pytest.approx((0.7 + 0.2) / 2)
    assert summary["bwt"]["ndcg@10"] == pytest.approx(0.7 - 0.5)  # only a has R[j][j]


def test_one_session_has_no_backward_transfer():
    summary = continual_summary([("a", row(a=0.3))])
    assert summary["avg"]["ndcg@10"] == pytest.approx(0.3)
    assert summary["bwt"]["ndcg@10"] is None


def test_ranking_from_search_skips_missing_rows():
    import numpy as np

    run = ranking_from_search(["q"], np.array([[0.9, 0.1]]), np.array([[1, -1]]), ["d0", "d1"])
    assert run == {"q": {"d1": pytest.approx(0.9)}}
