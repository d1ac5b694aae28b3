"""How long one session trains, and the order of its batches (DESIGN step 8).

- Training budget (`training_budget`): steps = ceil(n_examples * epochs / batch_size) or a fixed
  number of steps, capped by max_steps; the batch plan cycles through the examples, a new seeded
  shuffle per pass.
- Batches (`plan_batches`). A curriculum from mixed to stratified: the first
  `curriculum_mixed_fraction` of the session's batches are drawn from all clusters, the rest from
  one cluster each ("Embedding And Clustering Your Data Can Improve Contrastive Pretraining",
  Merrick 2024). In a stratified pass each cluster's examples fill whole batches; what is
  left of every cluster (fewer than a batch) is pooled into mixed batches, flagged as such.
  No batch holds the same query twice, or a document that is one example's positive and another
  example's positive or negative (in-batch false negatives for the ranking loss); such an
  example waits for a later batch.

Inputs are the examples of `tasks.sampling.sample_session`; `tasks.finetune.fine_tune` trains on
the plan, one optimizer step per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from driftlane.infra.config import FinetuneConfig

__all__ = ["BatchPlan", "TrainingBudget", "plan_batches", "training_budget"]

# The batch order's random stream: the generator is seeded with [seed, _BATCH_STREAM], apart
# from the streams 1-3 that sampling draws examples from (tasks.negatives).
_BATCH_STREAM = 4


class TrainingBudget(NamedTuple):
    """Steps of one session's fine-tuning, examples they show (with repeats), passes."""

    steps: int
    examples: int
    epochs: float


@dataclass(frozen=True)
class BatchPlan:
    """Row positions of the examples of each batch, in training order.

    stratified: (n_batches,) bool, True for a batch drawn from one cluster by the stratified
    rule (a mixed batch may still happen to hold one cluster).
    """

    batches: list[np.ndarray]
    stratified: np.ndarray

    def __len__(self) -> int:
        return len(self.batches)


def training_budget(n_examples: int, config: FinetuneConfig) -> TrainingBudget:
    """Steps of one session: ceil(n_examples * epochs / batch_size) or `config.steps`.

    Capped by `config.max_steps`; 0 steps when there is nothing to train on.
    """
    if n_examples <= 0:
        return TrainingBudget(0, 0, 0.0)
    if config.budget_unit == "epochs":
        steps = max(1, math.ceil(n_examples * config.epochs / config.batch_size))
    else:
        steps = config.steps
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    shown = steps * config.batch_size
    return TrainingBudget(steps, shown, shown / n_examples)


def plan_batches(
    examples: pd.DataFrame,
    batch_size: int,
    n_batches: int,
    *,
    stratified: bool = True,
    mixed_fraction: float = 0.3,
    seed: int = 0,
) -> BatchPlan:
    """The order of training: `n_batches` batches of example row positions.

    examples: `tasks.negatives.EXAMPLE_COLUMNS` (query_key, positive_key, negative_key and
    cluster_id are used). The first round(mixed_fraction * n_batches) batches are mixed, later
    ones stratified (one cluster each; leftovers of each cluster pooled into mixed batches), see
    the module docstring. Each pass over the examples uses every example once, in a new seeded
    shuffle; passes repeat until `n_batches`. With fewer than 2 clusters every batch is mixed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= mixed_fraction <= 1.0:
        raise ValueError(f"mixed_fraction must be in [0, 1], got {mixed_fraction}")
    n = len(examples)
    if n == 0 or n_batches <= 0:
        return BatchPlan([], np.zeros(0, dtype=bool))
    rng = np.random.default_rng([int(seed), _BATCH_STREAM])
    clusters = examples["cluster_id"].to_numpy(np.int64)
    keys = _BatchKeys(examples)
    stratify = stratified and len(np.unique(clusters)) >= 2
    n_mixed = round(mixed_fraction * n_batches) if stratify else n_batches
    batches: list[np.ndarray] = []
    flags: list[bool] = []
    while len(batches) < n_batches:
        shuffled = rng.permutation(n)
        mixed = keys.batches(shuffled, batch_size)
        room = max(0, n_mixed - len(batches))
        batches.extend(mixed[:room])
        flags.extend([False] * len(mixed[:room]))
        if room >= len(mixed):
            continue
        # the rest of this pass, stratified
        rest = np.concatenate(mixed[room:])
        rest = rest[np.argsort(_positions_in(shuffled, rest), kind="stable")]  # pass order
        pure, leftover = [], []
        for cluster in np.unique(clusters[rest]):
            for batch in keys.batches(rest[clusters[rest] == cluster], batch_size):
                (pure if len(batch) == batch_size else leftover).append(batch)
        pooled = keys.batches(np.concatenate(leftover), batch_size) if leftover else []
        stage = [(b, True) for b in pure] + [(b, False) for b in pooled]
        for i in rng.permutation(len(stage)):
            batches.append(stage[i][0])
            flags.append(stage[i][1])
    return BatchPlan(batches[:n_batches], np.array(flags[:n_batches], dtype=bool))


def _positions_in(order: np.ndarray, items: np.ndarray) -> np.ndarray:
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    return where[items]


class _BatchKeys:
    """Greedy collision-free batching: no repeated query, no positive that is another example's
    positive or negative, no negative that is another example's positive."""

    def __init__(self, examples: pd.DataFrame) -> None:
        self.query = examples["query_key"].to_numpy(dtype=object)
        self.positive = examples["positive_key"].to_numpy(dtype=object)
        negative = examples["negative_key"].to_numpy(dtype=object)
        self.negative = np.where(pd.notna(negative), negative, None)

    def batches(self, items: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """Consecutive batches of `items` (in order); a colliding example waits for the next."""
        out: list[np.ndarray] = []
        waiting: list[int] = []
        stream = iter(items.tolist())
        exhausted = False
        while not exhausted or waiting:
            batch = _OpenBatch()
            still: list[int] = []
            for i in waiting:
                if len(batch.members) < batch_size and batch.fits(*self._keys(i)):
                    batch.add(i, *self._keys(i))
                else:
                    still.append(i)
            while len(batch.members) < batch_size and not exhausted:
                i = next(stream, None)
                if i is None:
                    exhausted = True
                elif batch.fits(*self._keys(i)):
                    batch.add(i, *self._keys(i))
                else:
                    still.append(i)
            waiting = still
            if batch.members:
                out.append(np.array(batch.members, dtype=np.int64))
        return out

    def _keys(self, i: int) -> tuple[str, str, str | None]:
        return self.query[i], self.positive[i], self.negative[i]


class _OpenBatch:
    def __init__(self) -> None:
        self.members: list[int] = []
        self.queries: set[str] = set()
        self.positives: set[str] = set()
        self.documents: set[str] = set()  # positives and negatives

    def fits(self, query: str, positive: str, negative: str | None) -> bool:
        return (query not in self.queries and positive not in self.documents
                and (negative is None or negative not in self.positives))

    def add(self, i: int, query: str, positive: str, negative: str | None) -> None:
        self.members.append(i)
        self.queries.add(query)
        self.positives.add(positive)
        self.documents.add(positive)
        if negative is not None:
            self.documents.add(negative)
