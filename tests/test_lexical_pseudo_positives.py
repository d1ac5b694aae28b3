"""Label-free pseudo-positives fused with a lexical teacher: BM25 by hand, reciprocal-rank
fusion by hand, and the fused pick on hand-made clusters."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from driftlane.infra.config import SamplingConfig
from driftlane.tasks.lexical import Bm25Index, terms
from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.pseudo_positives import RaggedTokens, fused_best, pseudo_positives
from driftlane.tasks.sampling import sample_session


def test_terms_are_lowercased_words_and_digits():
    assert terms("CRISPR-Cas9, in 2012: e_coli!") == ["crispr", "cas9", "in", "2012", "e", "coli"]


def test_bm25_against_a_hand_computation():
    index = Bm25Index.build(["a b", "a c c", "d"])
    scores = index.scores(["c", "a z", "zzz"]).toarray()
    # c: df 1 of 3 documents; document 1 has 3 terms, the mean is 2
    idf_c = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    norm = 0.9 * (1 - 0.4 + 0.4 * 3 / 2)
    assert scores[0, 1] == pytest.approx(idf_c * 2 * 1.9 / (2 + norm))
    assert scores[0, 0] == scores[0, 2] == 0.0
    # a: df 2, in document 0 (2 terms) and 1 (3 terms); z is not in the pool
    idf_a = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    assert scores[1, 0] == pytest.approx(idf_a * 1.9 / (1 + 0.9 * (1 - 0.4 + 0.4 * 2 / 2)))
    assert scores[1, 1] == pytest.approx(idf_a * 1.9 / (1 + norm))
    assert not scores[2].any()


def test_reciprocal_rank_fusion_by_hand():
    # MaxSim ranks: 0, 1, 2; BM25 ranks: 2, 0, 1 -> fused 1/61+1/62, 1/62+1/63, 1/63+1/61
    best, fused = fused_best(np.array([0.9, 0.8, 0.7]), np.array([1.0, 0.0, 5.0]))
    assert best == 0 and fused == pytest.approx(1 / 61 + 1 / 62)
    # a tie of fused scores goes to the better first score
    best, _ = fused_best(np.array([0.5, 0.9]), np.array([1.0, 0.0]))
    assert best == 1
    # with k = 60, ranks 1 and 3 edge out 2 and 2 (1/61 + 1/63 > 2/62); a and c tie, and the
    # tie goes to the better first score
    best, fused = fused_best(np.array([0.9, 0.8, 0.1]), np.array([0.0, 0.8, 0.9]))
    assert best == 0 and fused == pytest.approx(1 / 61 + 1 / 63)


def one_token(vectors):
    return RaggedTokens(np.asarray(vectors, np.float32), np.arange(len(vectors) + 1))


def test_fusion_picks_what_the_lexical_teacher_and_maxsim_agree_on():
    pool = pd.DataFrame({"doc_key": ["s/a", "s/b", "s/c", "s/e", "s/d"],
                         "cluster_id": np.array([1, 1, 1, 1, 2], np.int64), "session": "s"})
    e = np.eye(4, dtype=np.float32)
    doc_tokens = one_token([e[0], 0.9 * e[0] + 0.1 * e[1], 0.5 * e[0] + 0.5 * e[1],
                            0.1 * e[0] + 0.9 * e[1], e[3]])
    query_tokens = one_token([e[0]])
    centroids = CentroidTable(np.array([1, 2]), np.stack([e[0], e[3]]))
    # MaxSim ranks a, b, c, e; BM25 ranks b, c, e, a (d is in the other cluster)
    lexical = sparse.csr_matrix(np.array([[0.0, 3.0, 2.0, 1.0, 9.0]]))
    plain = pseudo_positives(["s/q"], e[:1], query_tokens, pool, doc_tokens, centroids, 1)
    assert plain["positive_key"].tolist() == ["s/a"]
    fused = pseudo_positives(["s/q"], e[:1], query_tokens, pool, doc_tokens, centroids, 1,
                             lexical=lexical)
    # b: ranks 2 and 1 beat a's 1 and 4 and c's 3 and 2
    assert fused["positive_key"].tolist() == ["s/b"]
    assert fused["score"].iloc[0] == pytest.approx(1 / 62 + 1 / 61)
    # s/d scores highest by BM25 but lies in a cluster the query does not probe
    assert "s/d" not in fused["positive_key"].tolist()


def test_self_supervised_sampling_with_fusion_reads_the_texts(world):
    texts = world["texts"].copy()
    texts["s1/b"] = "query one"  # the lexical teacher's favourite for "query one"
    texts["s1/c"] = "one query among many other words in a longer text"
    tokens = RaggedTokens(np.stack(world["vectors"]).astype(np.float32),
                          np.arange(len(world["vectors"]) + 1))
    query_tokens = RaggedTokens(world["query_vectors"].astype(np.float32), np.arange(3))
    queries = world["queries"]
    config = SamplingConfig(mode="self_supervised", replay_ratio=0.0, n_probe=1)
    args = (world["pool"], world["vectors"], world["centroids"], texts, queries,
            world["query_vectors"])
    kwargs = {"qrels": world["qrels"], "query_tokens": query_tokens, "doc_tokens": tokens}
    plain = sample_session("s1", *args, config, **kwargs).examples
    fused = sample_session("s1", *args, config.model_copy(
        update={"pseudo_positive_scoring": "fusion"}), **kwargs).examples
    first = lambda frame: frame.set_index("query_key").loc["s1/q1", "positive_key"]  # noqa: E731
    assert first(plain) == "s1/a"  # MaxSim 1.0
    # fusion: b has MaxSim rank 2 and BM25 rank 1, a ranks 1 and 3 (no query word)
    assert first(fused) == "s1/b"
