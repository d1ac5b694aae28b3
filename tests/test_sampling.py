"""Training examples: positives, negatives, replay, query buffer (tasks/sampling.py,
tasks/negatives.py, tasks/pseudo_positives.py, tasks/replay.py).

Hand-made geometry. Three cluster centroids: cluster 1 along e0, cluster 2 along e1, cluster 3
(a singleton) between e2 and e1, so its next-nearest cluster is 2. Every document gets a private
axis for the part of its vector orthogonal to its centroid, so its cosine to the query along e0
is exactly the number written next to it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sampling_world import CENTER_3, DOCS, axis

from driftlane.infra.config import SamplingConfig
from driftlane.tasks.batching import plan_batches
from driftlane.tasks.memory import CentroidTable, next_stream_index
from driftlane.tasks.negatives import (
    EXAMPLE_COLUMNS,
    CandidatePool,
    anchor_span,
    document_examples,
    examples_from_pairs,
)
from driftlane.tasks.pseudo_positives import RaggedTokens, pseudo_positives
from driftlane.tasks.replay import (
    QUERY_BUFFER_COLUMNS,
    empty_query_buffer,
    query_buffer_rows,
    replay_count,
    update_query_buffer,
)
from driftlane.tasks.sampling import (
    labeled_pairs,
    pseudo_positive_precision,
    sample_session,
    singleton_doc_keys,
    training_queries,
    training_texts,
)
from driftlane.tasks.scoring import maxsim_matrix
from driftlane.tasks.warmup import unit_rows


def pairs_of(*rows):
    return pd.DataFrame({"query_key": [r[0] for r in rows], "anchor": [r[1] for r in rows],
                         "positive_key": [r[2] for r in rows]})


def candidates(world):
    return CandidatePool.from_table(world["pool"], world["vectors"], world["centroids"])


def one_example(world, positive="s1/a", vector=None, query="s1/q1", **kw):
    args = {"margin": 0.05, "easy_ratio": 0.0, "seed": 0, "origin": "labeled"} | kw
    vector = axis(0) if vector is None else vector
    return examples_from_pairs(pairs_of((query, "query one", positive)), vector[None],
                               candidates(world), **args)


# --- positives ---


def test_labeled_pairs_and_training_queries(world):
    pairs = labeled_pairs(world["qrels"], "s1")
    assert pairs.to_dict("list") == {"query_key": ["s1/q1", "s1/q2"],
                                     "positive_key": ["s1/a", "s1/e"]}
    queries = pd.DataFrame({"query_id": ["q1", "q2", "q3", "q9"], "text": list("abcd")})
    labeled = training_queries(queries, world["qrels"], "s1", "labeled")
    assert labeled["query_key"].tolist() == ["s1/q1", "s1/q2"]
    selfsup = training_queries(queries, world["qrels"], "s1", "self_supervised")
    assert selfsup["query_key"].tolist() == ["s1/q1", "s1/q2", "s1/q3"]  # q9 is a test query


def test_pseudo_positive_is_best_maxsim_in_the_probed_clusters():
    rng = np.random.default_rng(0)
    n_docs, dim = 30, 8
    doc_tokens = [rng.standard_normal((int(rng.integers(1, 6)), dim)).astype(np.float16)
                  for _ in range(n_docs)]
    query_tokens = [rng.standard_normal((int(rng.integers(1, 4)), dim)).astype(np.float16)
                    for _ in range(6)]
    cluster_ids = np.arange(n_docs) % 5 + 10
    centroids = CentroidTable(np.arange(10, 15), rng.standard_normal((5, dim)))
    query_vectors = rng.standard_normal((6, dim)).astype(np.float32)
    pool = pd.DataFrame({"doc_key": [f"s/{i}" for i in range(n_docs)], "cluster_id": cluster_ids,
                         "session": "s"})
    ragged = [RaggedTokens(np.concatenate(t), np.r_[0, np.cumsum([len(x) for x in t])])
              for t in (query_tokens, doc_tokens)]
    for n_probe in (1, 2, 5):
        found = pseudo_positives([f"s/q{i}" for i in range(6)], query_vectors, ragged[0],
                                 pool, ragged[1], centroids, n_probe)
        assert len(found) == 6
        sims = unit_rows(query_vectors) @ centroids.vectors.T
        for i, row in enumerate(found.itertuples()):
            probed = centroids.ids[np.argsort(-sims[i])[:n_probe]]  # brute force reference
            candidates = np.flatnonzero(np.isin(cluster_ids, probed))
            scores = maxsim_matrix([query_tokens[i]], [doc_tokens[j] for j in candidates])[0]
            best = candidates[np.argmax(scores)]
            assert row.positive_key == f"s/{best}"
            assert row.cluster_id == cluster_ids[best]
            assert row.score == pytest.approx(scores.max(), abs=1e-5)


# --- negatives ---


def test_hard_negative_is_the_best_below_the_margin(world):
    # b scores 0.99 > 1 - 0.05: likely an unlabeled positive, skipped; c (0.9) is next
    example = one_example(world).iloc[0]
    assert (example.negative_key, example.negative_kind) == ("s1/c", "hard")
    assert example.cluster_id == 1
    no_margin = one_example(world, margin=0.0).iloc[0]
    assert no_margin.negative_key == "s1/b"
    strict = one_example(world, margin=0.2).iloc[0]  # only d (0.5) stays below 0.8
    assert strict.negative_key == "s1/d"


def test_known_positives_are_never_negatives(world):
    known = pd.DataFrame({"query_key": ["s1/q1", "s1/q1"], "positive_key": ["s1/a", "s1/c"]})
    example = one_example(world, known_positives=known).iloc[0]
    assert example.negative_key == "s1/d"


def test_easy_negatives_come_from_other_clusters(world):
    pairs = pairs_of(*[(f"s1/q{i}", "q", "s1/a") for i in range(40)])
    examples = examples_from_pairs(pairs, np.tile(axis(0), (40, 1)), candidates(world),
                                   margin=0.05, easy_ratio=1.0, seed=3, origin="labeled")
    assert (examples["negative_kind"] == "easy").all()
    clusters = world["pool"].set_index("doc_key")["cluster_id"]
    assert (clusters[examples["negative_key"]] != 1).all()
    assert examples["negative_key"].nunique() > 1  # drawn at random, not always the same
    mixed = examples_from_pairs(pairs, np.tile(axis(0), (40, 1)), candidates(world),
                                margin=0.05, easy_ratio=0.5, seed=3, origin="labeled")
    assert set(mixed["negative_kind"]) == {"easy", "hard"}


def test_singleton_positive_borrows_from_the_next_nearest_cluster(world):
    # g is alone in cluster 3; cluster 2 (centroid e1) is nearest to cluster 3's centroid
    example = one_example(world, positive="s1/g", vector=CENTER_3).iloc[0]
    assert example.negative_kind == "hard"
    assert example.negative_key in {"s1/e", "s1/f", "s0/x"}
    assert example.cluster_id == 3


def test_singleton_document_is_its_own_positive(world):
    assert singleton_doc_keys(world["pool"]).tolist() == ["s1/g"]
    assert singleton_doc_keys(world["pool"], session="s0").tolist() == []
    examples = document_examples(["s1/g"], world["texts"], candidates(world), span_words=8,
                                 margin=0.05, easy_ratio=0.0, seed=0)
    example = examples.iloc[0]
    assert example.query_key == "span:s1/g"
    assert example.positive_key == "s1/g" and example.origin == "span"
    assert example.negative_key in {"s1/e", "s1/f", "s0/x"}
    words = example.anchor.split()
    assert len(words) == 8 and example.anchor in world["texts"]["s1/g"]


def test_anchor_span():
    rng = np.random.default_rng(0)
    assert anchor_span("a b c", 5, rng) == "a b c"
    text = " ".join(str(i) for i in range(100))
    spans = {anchor_span(text, 10, rng) for _ in range(20)}
    assert all(len(s.split()) == 10 and s in text for s in spans)
    assert len(spans) > 1


def test_fewer_than_two_clusters_falls_back_without_crashing(world):
    one = world["pool"].iloc[:4].assign(cluster_id=1)  # a, b, c, d: one cluster
    vectors = world["vectors"][:4]
    config = SamplingConfig(easy_negative_ratio=1.0, replay_ratio=0.0)
    result = sample_session("s1", one, vectors, world["centroids"], world["texts"],
                            world["queries"].iloc[:1], world["query_vectors"][:1], config,
                            qrels=world["qrels"])
    assert result.fallback is not None and "1 cluster" in result.fallback
    assert result.fallback in result.notes
    example = result.examples.iloc[0]
    assert example.negative_kind == "random"  # no other cluster for an easy negative
    assert example.negative_key in {"s1/c", "s1/d"}  # still below the margin
    plan = plan_batches(result.examples, 2, 3, stratified=True, mixed_fraction=0.0)
    assert not plan.stratified.any()
    lonely = sample_session("s1", one.iloc[:1], vectors[:1], world["centroids"],
                            world["texts"], world["queries"].iloc[:1],
                            world["query_vectors"][:1], config, qrels=world["qrels"])
    assert lonely.examples["negative_key"].isna().all()
    assert any("without any allowed negative" in n for n in lonely.notes)


# --- the session, replay, buffer ---


def test_sample_session_labeled(world):
    config = SamplingConfig(replay_ratio=0.0, easy_negative_ratio=0.0)
    result = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                            world["texts"], world["queries"], world["query_vectors"], config,
                            qrels=world["qrels"])
    examples = result.examples
    assert tuple(examples.columns) == EXAMPLE_COLUMNS
    assert result.fallback is None
    # q1 -> a (negative c), q2 -> e (hard from cluster 2), then the singleton document g
    assert examples["query_key"].tolist() == ["s1/q1", "s1/q2", "span:s1/g"]
    assert examples["positive_key"].tolist() == ["s1/a", "s1/e", "s1/g"]
    assert examples["negative_key"].iloc[0] == "s1/c"
    assert examples["negative_key"].iloc[1] == "s1/f"  # 0.97 * 0.85 < 0.97 * 0.95 - 0.05
    assert examples["anchor"].iloc[0] == "query one"
    assert (examples["source"] == "new").all()
    texts = training_texts(examples, world["texts"])
    assert texts["positive"].iloc[0] == world["texts"]["s1/a"]
    assert texts["negative"].iloc[0] == world["texts"]["s1/c"]


def test_sample_session_self_supervised(world):
    tokens = np.stack([d[3] for d in DOCS]).astype(np.float16)  # one token per document
    doc_tokens = RaggedTokens(tokens, np.arange(len(DOCS) + 1))
    query_tokens = RaggedTokens(world["query_vectors"].astype(np.float16), np.arange(3))
    config = SamplingConfig(mode="self_supervised", n_probe=1, replay_ratio=0.0,
                            singleton_examples=False)
    result = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                            world["texts"], world["queries"], world["query_vectors"], config,
                            query_tokens=query_tokens, doc_tokens=doc_tokens)
    assert result.examples["positive_key"].tolist() == ["s1/a", "s1/e"]
    assert (result.examples["origin"] == "pseudo").all()


def buffer_of(world):
    rows = pd.DataFrame({"query_key": [f"s0/q{i}" for i in range(6)],
                         "query_text": [f"old query {i}" for i in range(6)],
                         "positive_key": ["s0/x", "s1/a", "gone/z", "s1/e", "s1/c", "s1/d"],
                         "cluster_id": np.array([2, 1, 9, 2, 1, 1], np.int64),
                         "session": "s0", "stream_index": np.arange(6, dtype=np.int64)})
    return rows, np.tile(axis(0), (6, 1))


def test_replay_ratio(world):
    buffer, buffer_vectors = buffer_of(world)
    assert replay_count(10, 0.0) == 0 and replay_count(10, 0.5) == 10
    assert replay_count(9, 0.25) == 3
    config = SamplingConfig(replay_ratio=0.5, easy_negative_ratio=0.0)
    result = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                            world["texts"], world["queries"], world["query_vectors"], config,
                            qrels=world["qrels"], query_buffer=buffer,
                            buffer_vectors=buffer_vectors)
    examples = result.examples
    n_new = int((examples["source"] == "new").sum())
    replay = examples[examples["source"] == "replay"]
    assert len(replay) == replay_count(n_new, 0.5) == n_new == 3
    assert (replay["origin"] == "buffer").all()
    assert "gone/z" not in set(replay["positive_key"])  # its positive left memory
    bigger = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                            world["texts"], world["queries"], world["query_vectors"],
                            config.model_copy(update={"replay_ratio": 0.75}),
                            qrels=world["qrels"], query_buffer=buffer,
                            buffer_vectors=buffer_vectors).examples
    replay = bigger[bigger["source"] == "replay"]
    # 9 wanted: the 5 usable buffered queries, then the one past document (s0/x)
    assert replay["origin"].tolist().count("buffer") == 5
    assert replay.loc[replay["origin"] == "span", "positive_key"].tolist() == ["s0/x"]


def test_query_buffer_never_exceeds_its_budget():
    buffer, seen = empty_query_buffer(), 0
    for session in range(6):
        examples = pd.DataFrame({
            "query_key": [f"s{session}/q{i}" for i in range(7)] + [f"span:s{session}/d"],
            "anchor": "text", "positive_key": [f"s{session}/d{i}" for i in range(8)],
            "negative_key": None, "negative_kind": "none", "cluster_id": np.int64(1),
            "origin": "labeled", "source": "new"})
        rows = query_buffer_rows(examples, f"s{session}", next_stream_index(buffer, seen))
        assert len(rows) == 7  # document examples are not buffered
        assert tuple(rows.columns) == QUERY_BUFFER_COLUMNS
        buffer, seen = update_query_buffer(buffer, rows, budget=10, seen=seen, seed=1)
        assert len(buffer) == min(10, 7 * (session + 1))
        assert seen == 7 * (session + 1)
        assert buffer["query_key"].is_unique
    again, _ = update_query_buffer(empty_query_buffer(), rows, 3, 0, seed=1)
    assert again.equals(update_query_buffer(empty_query_buffer(), rows, 3, 0, seed=1)[0])
    assert len(update_query_buffer(buffer, rows.iloc[:0], 0, seen, seed=1)[0]) == 0


def test_same_seed_same_examples_and_inputs_unchanged(world):
    buffer, buffer_vectors = buffer_of(world)
    copies = {k: v.copy() for k, v in world.items() if k != "centroids"}
    centroid_vectors = world["centroids"].vectors.copy()
    buffer_copy, bv_copy = buffer.copy(), buffer_vectors.copy()
    config = SamplingConfig(replay_ratio=0.6, easy_negative_ratio=0.5, seed=4)

    def run(cfg):
        return sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                              world["texts"], world["queries"], world["query_vectors"], cfg,
                              qrels=world["qrels"], query_buffer=buffer,
                              buffer_vectors=buffer_vectors).examples

    first = run(config)
    pd.testing.assert_frame_equal(first, run(config))
    others = [run(config.model_copy(update={"seed": s})) for s in range(5, 12)]
    assert any(not first.equals(o) for o in others)
    for key, value in copies.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(world[key], value)
        elif isinstance(value, pd.DataFrame | pd.Series):
            assert world[key].equals(value)
    np.testing.assert_array_equal(world["centroids"].vectors, centroid_vectors)
    pd.testing.assert_frame_equal(buffer, buffer_copy)
    np.testing.assert_array_equal(buffer_vectors, bv_copy)


def test_documents_as_queries_are_cropped_from_their_own_document(world):
    """document_example_ratio: a share of the session's documents train as their own
    positive, the anchor a span cut from that very document (inverse cloze task)."""
    config = SamplingConfig(replay_ratio=0.0, singleton_examples=False,
                            document_example_ratio=1.0, span_words=4)
    result = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                            world["texts"], world["queries"].iloc[:0],
                            world["query_vectors"][:0], config, qrels=world["qrels"].iloc[:0])
    spans = result.examples[result.examples["origin"] == "span"]
    own = world["pool"].loc[world["pool"]["session"] == "s1", "doc_key"]
    assert sorted(spans["positive_key"]) == sorted(own)
    for anchor, key in zip(spans["anchor"], spans["positive_key"], strict=True):
        assert anchor in world["texts"][key] and len(anchor.split()) <= 4
    assert (spans["query_key"] == "span:" + spans["positive_key"]).all()
    half = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                          world["texts"], world["queries"].iloc[:0],
                          world["query_vectors"][:0],
                          config.model_copy(update={"document_example_ratio": 0.5}),
                          qrels=world["qrels"].iloc[:0])
    assert len(half.examples) == round(0.5 * len(own))


def test_pseudo_positive_precision_counts_judged_queries_only():
    pairs = pd.DataFrame({"query_key": ["s/q1", "s/q2", "s/q3"],
                          "positive_key": ["s/a", "s/x", "s/c"]})
    qrels = pd.DataFrame({"query_id": ["q1", "q2", "q2"], "doc_id": ["a", "b", "x"],
                          "score": [1, 1, 0], "split": ["train", "test", "test"]})
    figures = pseudo_positive_precision(pairs, qrels, "s")
    # q1: a is judged relevant (hit); q2: x judged 0, b relevant (miss); q3: not judged
    assert figures == {"pseudo_positive_precision": 0.5, "pseudo_positives_judged": 2}
    assert pseudo_positive_precision(pairs, None, "s")["pseudo_positive_precision"] is None
