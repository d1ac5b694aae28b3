"""Exact MaxSim (tasks.scoring) against a plain double loop on tiny seeded data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driftlane.tasks.scoring import (
    maxsim_against_batches,
    maxsim_matrix,
    maxsim_scores,
    pad_token_batch,
    prepare_doc_batches,
)


def _token_sets(rng: np.random.Generator, n: int, dim: int, max_len: int) -> list[np.ndarray]:
    return [rng.standard_normal((int(rng.integers(1, max_len + 1)), dim)) for _ in range(n)]


def _loop_maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    """The definition: sum over query tokens of the max cosine to the document's tokens."""
    total = 0.0
    for q in query:
        best = -np.inf
        for d in doc:
            best = max(best, float(q @ d / (np.linalg.norm(q) * np.linalg.norm(d))))
        total += best
    return total


@pytest.fixture
def tiny():
    rng = np.random.default_rng(7)
    queries = _token_sets(rng, 5, 8, 6)
    docs = _token_sets(rng, 13, 8, 9)
    reference = np.array([[_loop_maxsim(q, d) for d in docs] for q in queries])
    return queries, docs, reference


def test_pad_token_batch_shapes_and_mask():
    arrays = [np.ones((2, 3), np.float16), np.zeros((0, 3)), np.full((4, 3), 2.0)]
    padded, mask = pad_token_batch(arrays)
    assert padded.shape == (3, 4, 3) and padded.dtype == np.float32
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    assert np.all(padded[0, :2] == 1) and np.all(padded[0, 2:] == 0) and np.all(padded[1] == 0)
    empty, empty_mask = pad_token_batch([], dim=3)
    assert empty.shape == (0, 1, 3) and empty_mask.shape == (0, 1)


def test_maxsim_scores_match_loop_and_ignore_padding(tiny):
    queries, docs, reference = tiny
    padded, mask = pad_token_batch(docs)
    # Padding slots hold a vector that would win every max if they were not masked out.
    padded[~mask] = 1000.0 * queries[0][0]
    for q, expected in zip(queries, reference, strict=True):
        got = maxsim_scores(q, padded, mask)
        assert isinstance(got, np.ndarray) and got.shape == (len(docs),)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    as_torch = maxsim_scores(torch.from_numpy(queries[1]), torch.from_numpy(padded),
                             torch.from_numpy(mask))
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), reference[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("batch_docs", "max_block"), [(1, 1), (3, 17), (5, 1 << 20), (64, 40)])
def test_maxsim_matrix_matches_loop_for_any_batching(tiny, batch_docs, max_block):
    queries, docs, reference = tiny
    got = maxsim_matrix(queries, docs, batch_docs=batch_docs, max_block=max_block)
    assert got.shape == reference.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_maxsim_matrix_float16_input_and_inputs_unchanged(tiny):
    queries, docs, _ = tiny
    queries16 = [q.astype(np.float16) for q in queries]
    docs16 = [d.astype(np.float16) for d in docs]
    copies = [a.copy() for a in queries16 + docs16]
    reference = np.array(
        [[_loop_maxsim(q.astype(np.float64), d.astype(np.float64)) for d in docs16]
         for q in queries16]
    )
    np.testing.assert_allclose(maxsim_matrix(queries16, docs16, batch_docs=4), reference,
                               rtol=1e-4, atol=1e-4)
    for before, after in zip(copies, queries16 + docs16, strict=True):
        assert np.array_equal(before, after)


def test_maxsim_matrix_empty_sets_score_zero(tiny):
    queries, docs, reference = tiny
    dim = docs[0].shape[1]
    got = maxsim_matrix([*queries, np.zeros((0, dim))], [*docs, np.zeros((0, dim))], batch_docs=4)
    np.testing.assert_allclose(got[:-1, :-1], reference, rtol=1e-5, atol=1e-5)
    assert np.all(got[-1] == 0) and np.all(got[:, -1] == 0)
    assert maxsim_matrix([], docs).shape == (0, len(docs))


def test_prepared_batches_score_like_maxsim_matrix(tiny):
    queries, docs, reference = tiny
    batches = prepare_doc_batches(docs, batch_docs=4)
    assert sum(int(b.doc_index.shape[0]) for b in batches) == len(docs)
    for subset in (queries, queries[2:]):  # prepared once, scored twice
        got = maxsim_against_batches(subset, batches, len(docs), max_block=50)
        np.testing.assert_allclose(got, reference[len(queries) - len(subset):],
                                   rtol=1e-5, atol=1e-5)
