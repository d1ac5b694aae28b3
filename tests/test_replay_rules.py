"""MIR and GSS, the published replay rules the benchmark compares driftlane's memory with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sampling_world import axis

from driftlane.infra.config import FinetuneConfig, SamplingConfig
from driftlane.tasks.gradient_diversity import (
    GSS_SCORE,
    gradient_cosines,
    gss_greedy,
    gss_update_query_buffer,
    pair_gradients,
)
from driftlane.tasks.negatives import CandidatePool
from driftlane.tasks.replay import query_buffer_rows, replay_examples
from driftlane.tasks.sampling import sample_session

# --- GSS ---


def linear_head_gradient(q, p, n):
    """The flattened d x d gradient of -log softmax(s [q.p, q.n])[0] w.r.t. a linear head W
    (outputs W e at W = I), by autograd-free finite differences of the loss."""
    d, s = len(q), 1.0  # the cosine does not depend on the scale; 1 keeps differences exact

    def loss(w):
        out_q, out_p, out_n = w @ q, w @ p, w @ n
        logits = s * np.array([out_q @ out_p, out_q @ out_n])
        return -logits[0] + np.log(np.exp(logits - logits.max()).sum()) + logits.max()

    eye, eps = np.eye(d), 1e-6
    grad = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            step = np.zeros((d, d))
            step[i, j] = eps
            grad[i, j] = (loss(eye + step) - loss(eye - step)) / (2 * eps)
    return grad.ravel()


def test_gradient_cosines_match_the_linear_head_gradient():
    rng = np.random.default_rng(0)
    pairs = [tuple(v / np.linalg.norm(v) for v in rng.normal(size=(3, 5))) for _ in range(4)]
    factors = pair_gradients(*(np.stack([pair[k] for pair in pairs]) for k in range(3)))
    full = np.stack([linear_head_gradient(*pair) for pair in pairs])
    unit = full / np.linalg.norm(full, axis=1, keepdims=True)
    np.testing.assert_allclose(gradient_cosines(factors, factors), unit @ unit.T, atol=1e-5)


def test_pair_without_negative_uses_the_alignment_term():
    q, p = axis(0)[None], axis(1)[None]
    no_negative = pair_gradients(q, p, np.full_like(q, np.nan))
    np.testing.assert_allclose(no_negative[0, 1], -axis(1))
    np.testing.assert_allclose(no_negative, pair_gradients(q, p))


def gradient_of(q_axis: int, p_axis: int, n_axis: int) -> np.ndarray:
    return pair_gradients(axis(q_axis)[None], axis(p_axis)[None], axis(n_axis)[None])


def test_gss_fills_then_admits_only_opposing_gradients():
    same = np.concatenate([gradient_of(0, 1, 2)] * 6)
    # a pair whose positive and negative are swapped: the opposite gradient (cosine -1)
    opposite = gradient_of(0, 2, 1)
    kept, scores = gss_greedy(np.zeros(0), np.zeros((0, 2, 24)), same, budget=4, compared=3,
                              seed=0)
    assert kept.tolist() == [0, 1, 2, 3]  # room: every pair enters
    np.testing.assert_allclose(scores, [0.0, 1.0, 1.0, 1.0])
    entered = 0
    for seed in range(20):
        full_kept, full_scores = gss_greedy(scores, same[:4], np.concatenate([same[:3],
                                                                               opposite]),
                                            budget=4, compared=3, seed=seed)
        assert len(full_kept) == 4
        assert not set(full_kept.tolist()) & {4, 5, 6}  # redundant pairs never enter
        entered += 7 in full_kept.tolist()
    # it replaces a slot of score C_i = 2 with probability 2 / (2 + 0) = 1 once drawn
    assert entered == 20


def test_gss_is_seeded_and_respects_the_budget():
    rng = np.random.default_rng(1)
    grads = pair_gradients(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)),
                           rng.normal(size=(40, 8)))
    first = gss_greedy(np.zeros(0), np.zeros((0, 2, 8)), grads, budget=10, compared=5, seed=3)
    again = gss_greedy(np.zeros(0), np.zeros((0, 2, 8)), grads, budget=10, compared=5, seed=3)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert len(first[0]) == 10 and len(set(first[0].tolist())) == 10
    assert len(gss_greedy(np.zeros(0), np.zeros((0, 2, 8)), grads, 0, 5, 3)[0]) == 0


def test_gss_buffer_update_on_the_sampling_world(world):
    pool = CandidatePool.from_table(world["pool"], world["vectors"], world["centroids"])
    examples = pd.DataFrame({
        "query_key": ["s1/q1", "s1/q2", "span:s1/g"], "anchor": ["query one", "query two", "x"],
        "positive_key": ["s1/a", "s1/e", "s1/g"], "negative_key": ["s1/c", None, "s1/f"],
        "negative_kind": ["hard", "none", "hard"], "cluster_id": np.array([1, 2, 3]),
        "origin": ["labeled", "labeled", "span"], "source": "new"})
    rows = query_buffer_rows(examples, "s1", 0)
    new = examples.iloc[:2]
    buffer, seen = gss_update_query_buffer(
        rows.iloc[:0], np.zeros((0, 24)), rows, new, world["query_vectors"], pool, budget=5,
        seen=0, compared=10, margin=0.05, easy_ratio=0.0, seed=0)
    assert buffer["query_key"].tolist() == ["s1/q1", "s1/q2"] and seen == 2
    assert GSS_SCORE in buffer.columns and buffer[GSS_SCORE].iloc[0] == 0.0
    # the second session offers them again: the buffer is full at budget 2 and they repeat it
    again = rows.assign(stream_index=rows["stream_index"] + 2)
    vectors = world["query_vectors"]
    kept, seen = gss_update_query_buffer(buffer, vectors, again, new, vectors, pool, budget=2,
                                         seen=seen, compared=10, margin=0.05, easy_ratio=0.0,
                                         seed=0)
    assert len(kept) == 2 and seen == 4
    with pytest.raises(ValueError, match="stream_index"):
        gss_update_query_buffer(buffer, vectors, rows, new, vectors, pool, budget=2, seen=2,
                                compared=10, margin=0.05, easy_ratio=0.0, seed=0)


# --- MIR ---


def test_ranked_replay_keeps_the_highest_scores(world):
    pool = CandidatePool.from_table(world["pool"], world["vectors"], world["centroids"])
    buffer = pd.DataFrame({"query_key": [f"s0/q{i}" for i in range(4)],
                           "query_text": [f"old query {i}" for i in range(4)],
                           "positive_key": ["s1/a", "gone/z", "s1/e", "s1/c"],
                           "cluster_id": np.array([1, 9, 2, 1], np.int64), "session": "s0",
                           "stream_index": np.arange(4, dtype=np.int64)})
    seen_candidates = []

    def rank(candidates):
        seen_candidates.append(candidates["query_key"].tolist())
        return np.array([0.1, 0.9, 0.5])

    replay = replay_examples(buffer, np.tile(axis(0), (4, 1)), pool, world["texts"], 2,
                             session="s1", span_words=8, margin=0.05, easy_ratio=0.0, seed=0,
                             rank=rank)
    # every buffered pair whose positive is in the pool is a candidate (not gone/z)
    assert seen_candidates == [["s0/q0", "s0/q2", "s0/q3"]]
    assert replay["query_key"].tolist() == ["s0/q2", "s0/q3"]  # scores 0.9 and 0.5
    with pytest.raises(ValueError, match="scores"):
        replay_examples(buffer, np.tile(axis(0), (4, 1)), pool, world["texts"], 2,
                        session="s1", span_words=8, margin=0.05, easy_ratio=0.0, seed=0,
                        rank=lambda c: np.zeros(1))


def test_sample_session_passes_its_new_examples_to_the_replay_rank(world):
    buffer = pd.DataFrame({"query_key": ["s0/q0", "s0/q1"], "query_text": ["a", "b"],
                           "positive_key": ["s1/a", "s1/e"], "cluster_id": np.array([1, 2]),
                           "session": "s0", "stream_index": np.arange(2)})
    calls = []

    def rank(new, candidates):
        calls.append((new["source"].unique().tolist(), len(candidates)))
        return np.arange(len(candidates), dtype=float)

    result = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                            world["texts"], world["queries"], world["query_vectors"],
                            SamplingConfig(replay_ratio=0.25), qrels=world["qrels"],
                            query_buffer=buffer, buffer_vectors=np.tile(axis(0), (2, 1)),
                            replay_rank=rank)
    assert calls == [(["new"], 2)]
    replay = result.examples[result.examples["source"] == "replay"]
    assert replay["query_key"].tolist() == ["s0/q1"]  # the higher score of the two


def test_interference_scores_follow_the_virtual_update(minilm_path):
    from driftlane.tasks.interference import interference_scores

    new = pd.DataFrame({"anchor": ["how do plants make energy", "what causes tides"],
                        "positive": ["Photosynthesis turns light into chemical energy.",
                                     "The moon's gravity pulls the oceans into tides."],
                        "negative": ["The stock market fell on Tuesday.",
                                     "Bread rises because of yeast."]})
    # the new examples themselves, and the same queries with positive and negative swapped
    swapped = new.assign(positive=new["negative"], negative=new["positive"])
    candidates = pd.concat([new, swapped, new.iloc[:1].assign(negative=None)],
                           ignore_index=True)
    config = FinetuneConfig(device="cpu", max_seq_length=32, batch_size=2, learning_rate=1e-4)
    scores = interference_scores(minilm_path, new, candidates, config, steps=3, seed=0)
    assert scores.shape == (5,)
    assert (scores[:2] < 0).all()  # training on them lowers their loss
    assert (scores[2:4] > 0).all()  # and raises the loss of their contradiction
    assert scores[4] == 0.0  # no negative: no loss
    again = interference_scores(minilm_path, new, candidates, config, steps=3, seed=0)
    np.testing.assert_allclose(scores, again, rtol=1e-5, atol=1e-7)
