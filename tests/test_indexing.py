"""Index choice from the corpus size, and approximate indexes against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from driftlane.infra.config import IndexConfig
from driftlane.tasks.indexing import build_index_from_factory, choose_index, search


@pytest.mark.parametrize(("n", "expected"), [
    (1_000, "Flat"),
    (49_999, "Flat"),
    (50_000, "IVF1282,Flat"),  # 8 sqrt(N) = 1789, capped at N / 39 training points per list
    (2_000_000, "IVF11314,PQ{m}x4fs,RFlat"),
])
def test_auto_choice_follows_the_corpus_size(n, expected):
    assert choose_index(n, IndexConfig()) == expected


def test_nlist_stays_between_4_and_16_sqrt_n():
    for n in (60_000, 400_000, 900_000):
        factory = choose_index(n, IndexConfig(kind="ivf"))
        nlist = int(factory.split(",")[0][3:])
        assert 4 * np.sqrt(n) <= nlist <= 16 * np.sqrt(n)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_approximate_indexes_find_the_exact_neighbours(kind):
    docs, queries = clustered(8_000, 32, 0), clustered(100, 32, 1)
    config = IndexConfig(kind=kind)
    index = build_index_from_factory(docs, choose_index(len(docs), config), config.nprobe)
    _, exact = search(build_index_from_factory(docs, "Flat", 1), queries, 10)
    _, found = search(index, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found, strict=True)])
    assert recall >= 0.9, recall
