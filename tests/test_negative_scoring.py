"""Hard negatives scored on token prototypes, and the false-negative rate of mining
(tasks/sampling.py, tasks/training.py; issue 15, item 1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sampling_world import DOCS, at_cosine, axis

from driftlane.infra.config import SamplingConfig
from driftlane.tasks.prototypes import PrototypeSpec, document_prototypes, make_hyperplanes
from driftlane.tasks.pseudo_positives import RaggedTokens
from driftlane.tasks.sampling import hard_negative_judgments, sample_session


def prototype_space(world_: dict, cosines: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pool 'prototypes' whose cosine to query q1's (along e0) is `cosines[doc]`."""
    pool = np.stack([at_cosine(axis(0), cosines.get(key, 0.0), 10 + i)
                     for i, key in enumerate(world_["pool"]["doc_key"])])
    queries = np.stack([axis(0), axis(1)])
    return pool, queries


def test_prototype_scores_choose_another_hard_negative(world):  # noqa: F811
    config = SamplingConfig(replay_ratio=0.0, easy_negative_ratio=0.0, singleton_examples=False)
    args = (world["pool"], world["vectors"], world["centroids"], world["texts"],
            world["queries"], world["query_vectors"], config)
    dense = sample_session("s1", *args, qrels=world["qrels"]).examples
    assert dense.set_index("query_key").loc["s1/q1", "negative_key"] == "s1/c"  # dense 0.9
    # on prototypes d (0.8) outscores c (0.3); b (0.99) is still within the margin of a (1.0)
    space = prototype_space(world, {"s1/a": 1.0, "s1/b": 0.99, "s1/c": 0.3, "s1/d": 0.8})
    scored = sample_session("s1", *args, qrels=world["qrels"], prototype_space=space).examples
    q1 = scored.set_index("query_key").loc["s1/q1"]
    assert (q1["negative_key"], q1["negative_kind"]) == ("s1/d", "hard")
    # the clusters do not change: examples keep their positive's cluster
    assert scored["cluster_id"].tolist() == dense["cluster_id"].tolist()


def test_false_negative_rate_counts_judged_hard_negatives_of_new_examples():
    examples = pd.DataFrame({
        "query_key": ["s/q1", "s/q1", "s/q2", "s/q3", "s/q1"],
        "negative_key": ["s/c", "s/d", "s/e", "s/f", "s/c"],
        "negative_kind": ["hard", "hard", "hard", "hard", "easy"],
        "source": ["new", "new", "new", "new", "new"]})
    qrels = pd.DataFrame({"query_id": ["q1", "q1", "q2"], "doc_id": ["a", "c", "b"],
                          "score": [1, 1, 1], "split": ["train", "test", "train"]})
    # q3 has no judgment: left out; of the three judged hard negatives, (q1, c) is a positive
    assert hard_negative_judgments(examples, qrels, "s") == {
        "hard_negative_false_negative_rate": 1 / 3, "hard_negatives_judged": 3}
    assert hard_negative_judgments(examples, None, "s")["hard_negatives_judged"] == 0


def test_sample_session_reports_the_false_negative_rate(world):  # noqa: F811
    config = SamplingConfig(replay_ratio=0.0, easy_negative_ratio=0.0, singleton_examples=False)
    qrels = pd.concat([world["qrels"], pd.DataFrame(
        {"query_id": ["q1"], "doc_id": ["c"], "score": [1], "split": ["test"]})])
    result = sample_session("s1", world["pool"], world["vectors"], world["centroids"],
                            world["texts"], world["queries"], world["query_vectors"], config,
                            qrels=qrels)
    # q1's negative c is judged relevant in the test split; q2's negative f is not judged
    assert result.diagnostics["hard_negative_false_negative_rate"] == 0.5
    assert any("judged positives: 0.500 of 2" in note for note in result.notes)


def test_prototypes_in_blocks_equal_one_pass():
    from driftlane.tasks import training
    from driftlane.tasks.prototypes import document_prototype_blocks

    spec = PrototypeSpec(n_bits=2, n_repetitions=2, projection_dim=8, seed=0, dim=16)
    planes = make_hyperplanes(spec)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((int(n), 16)).astype(np.float16) for n in (3, 1, 4, 2, 5)]
    ragged = RaggedTokens(np.concatenate(arrays), np.r_[0, np.cumsum([len(a) for a in arrays])])
    whole = document_prototypes(arrays, spec, planes)
    blocks = list(document_prototype_blocks(ragged.tokens, ragged.offsets, spec, planes, 2))
    assert [start for start, _ in blocks] == [0, 2, 4]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), whole)
    np.testing.assert_array_equal(training.pool_prototypes(ragged, spec, planes), whole)
    assert len(DOCS) == 8  # the shared world is the one test_sampling describes
