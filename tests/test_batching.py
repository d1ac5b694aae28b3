"""Batch order and training budget (tasks/batching.py): the curriculum from mixed to one cluster
per batch, no in-batch false negatives, seeded; steps from epochs or a fixed count."""

from __future__ import annotations

import numpy as np
import pandas as pd

from driftlane.infra.config import FinetuneConfig
from driftlane.tasks.batching import plan_batches, training_budget


def stratifiable(sizes=(8, 8, 8)):
    """Examples in clusters of the given sizes, every example with its own documents."""
    cluster = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    n = len(cluster)
    return pd.DataFrame({"query_key": [f"s/q{i}" for i in range(n)], "anchor": "a",
                         "positive_key": [f"s/p{i}" for i in range(n)],
                         "negative_key": [f"s/n{i}" for i in range(n)], "negative_kind": "hard",
                         "cluster_id": cluster, "origin": "labeled", "source": "new"})


def test_stratified_batches_after_the_curriculum():
    examples = stratifiable()
    plan = plan_batches(examples, batch_size=4, n_batches=12, mixed_fraction=0.5, seed=0)
    assert len(plan) == 12 and all(len(b) == 4 for b in plan.batches)
    assert not plan.stratified[:6].any() and plan.stratified[6:].all()
    cluster = examples["cluster_id"].to_numpy()
    assert all(len(set(cluster[b])) == 1 for b in plan.batches[6:])
    assert any(len(set(cluster[b])) > 1 for b in plan.batches[:6])
    for first in (0, 6):  # each pass shows every example once
        shown = np.sort(np.concatenate(plan.batches[first:first + 6]))
        np.testing.assert_array_equal(shown, np.arange(24))
    # the switch in the middle of a pass: leftovers of each cluster go to mixed batches
    uneven = stratifiable((7, 9, 5))
    plan = plan_batches(uneven, batch_size=4, n_batches=20, mixed_fraction=0.2, seed=1)
    assert not plan.stratified[:4].any()
    cluster = uneven["cluster_id"].to_numpy()
    assert all(len(set(cluster[b])) == 1 for b, s in zip(plan.batches, plan.stratified,
                                                         strict=True) if s)
    assert plan.stratified[4:].sum() >= 8
    plain = plan_batches(examples, 4, 12, stratified=False, seed=0)
    assert not plain.stratified.any()


def test_batches_are_seeded_and_avoid_in_batch_false_negatives():
    examples = stratifiable((6, 6))
    # examples 0-3 share one positive; example 4's negative is that positive
    examples.loc[0:3, "positive_key"] = "s/shared"
    examples.loc[4, "negative_key"] = "s/shared"
    plan = plan_batches(examples, batch_size=3, n_batches=8, mixed_fraction=0.5, seed=2)
    for batch in plan.batches:
        assert len(set(batch) & {0, 1, 2, 3, 4}) <= 1
    again = plan_batches(examples, batch_size=3, n_batches=8, mixed_fraction=0.5, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(plan.batches, again.batches, strict=True))
    other = plan_batches(examples, batch_size=3, n_batches=8, mixed_fraction=0.5, seed=3)
    assert any(not np.array_equal(a, b) for a, b in zip(plan.batches, other.batches,
                                                         strict=True))


def test_training_budget():
    config = FinetuneConfig(batch_size=32)
    assert training_budget(100, config).steps == 4  # ceil(100 / 32)
    assert training_budget(100, config.model_copy(update={"epochs": 2.5})).steps == 8
    assert training_budget(0, config).steps == 0
    by_steps = config.model_copy(update={"budget_unit": "steps", "steps": 50})
    budget = training_budget(10, by_steps)
    assert budget.steps == 50 and budget.examples == 1600 and budget.epochs == 160.0
    capped = config.model_copy(update={"epochs": 10, "max_steps": 7})
    assert training_budget(1000, capped).steps == 7
