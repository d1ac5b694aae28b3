"""Aligned updates and sharded indexes (tasks/alignment.py, tasks/index_shards.py), on
synthetic vectors: the map, and shards searched as one against one index built at once."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from driftlane.tasks.alignment import compose_maps, fit_alignment, mean_cosine
from driftlane.tasks.index_shards import ShardedIndex
from driftlane.tasks.indexing import build_exact_index, build_index_from_factory, search
from driftlane.tasks.search import stored_vectors


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q.astype(np.float32)


def clustered(n: int, d: int, seed: int, centres: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    return unit(c[rng.integers(0, centres, n)] + 0.5 * rng.normal(size=(n, d)))


def test_fit_alignment_maps_a_rotation_back():
    old = unit(np.random.default_rng(0).normal(size=(3000, 384)))
    true = rotation(384, 1)
    w = fit_alignment(old, old @ true, shrinkage=0.0)
    assert np.abs(w - true).max() < 1e-3
    assert np.allclose(w @ w.T, np.eye(384), atol=1e-4)  # orthogonal: norms are kept


def test_shrinkage_keeps_a_small_fit_near_the_identity():
    """Fewer documents than dimensions (the small benchmark's memory): plain Procrustes
    spins the unseen directions; shrunk towards the identity it maps held-out documents well."""
    rng = np.random.default_rng(2)
    old = unit(rng.normal(size=(400, 128)))
    drift = fit_alignment(rng.normal(size=(128, 128)) * 0.02 + np.eye(128),
                          np.eye(128), 0.0)  # a small rotation, as fine-tuning makes
    new = old @ drift
    train, held = slice(0, 40), slice(40, 400)
    plain = fit_alignment(old[train], new[train], shrinkage=0.0)
    shrunk = fit_alignment(old[train], new[train], shrinkage=1.0)
    unmapped = mean_cosine(old[held], new[held])
    assert mean_cosine(old[held] @ plain, new[held]) < unmapped
    assert mean_cosine(old[held] @ shrunk, new[held]) > unmapped


def test_compose_maps_is_the_product_in_order():
    a, b = rotation(8, 3), rotation(8, 4)
    assert compose_maps([], 8) is None
    assert np.allclose(compose_maps([a, b], 8), a @ b, atol=1e-6)


def three_sessions(d: int = 32, n: int = 1500) -> list[np.ndarray]:
    return [clustered(n, d, seed) for seed in (10, 11, 12)]


def test_flat_shards_return_the_top_10_of_one_index_built_at_once():
    blocks = three_sessions()
    queries = clustered(50, 32, 99)
    whole = build_exact_index(np.concatenate(blocks))
    sharded = ShardedIndex([build_exact_index(b) for b in blocks], [None] * 3)
    assert sharded.ntotal == whole.ntotal
    want_scores, want_rows = search(whole, queries, 10)
    got_scores, got_rows = search(sharded, queries, 10)
    assert np.array_equal(got_rows, want_rows)
    assert np.allclose(got_scores, want_scores, atol=1e-6)


def test_mapped_shards_search_as_if_their_vectors_were_rewritten():
    """A shard whose vectors count as v @ M (M orthogonal) answers the query through M^T:
    the same top 10 and scores as an index over the rewritten vectors; stored_vectors returns
    the mapped vectors; merged() is that rewritten index."""
    blocks = three_sessions()
    maps = [rotation(32, 20) @ rotation(32, 21), rotation(32, 21), None]
    rewritten = [b if m is None else b @ m for b, m in zip(blocks, maps, strict=True)]
    queries = clustered(50, 32, 98)
    whole = build_exact_index(np.concatenate(rewritten))
    sharded = ShardedIndex([build_exact_index(b) for b in blocks], maps)
    want_scores, want_rows = search(whole, queries, 10)
    got_scores, got_rows = search(sharded, queries, 10)
    assert np.array_equal(got_rows, want_rows)
    assert np.allclose(got_scores, want_scores, atol=1e-5)
    rows = np.array([[0, 1600], [3100, 4499]])
    assert np.allclose(stored_vectors(sharded, rows),
                       np.concatenate(rewritten)[rows], atol=1e-5)
    merged = sharded.merged()
    assert merged.ntotal == whole.ntotal
    assert np.array_equal(search(merged, queries, 10)[1], want_rows)


def test_ivf_shards_recall_the_top_10_of_one_ivf_built_at_once():
    blocks = three_sessions(n=4000)
    queries = clustered(200, 32, 97)
    factory = "IVF128,Flat"
    whole = build_index_from_factory(np.concatenate(blocks), factory, nprobe=32)
    sharded = ShardedIndex([build_index_from_factory(b, "IVF64,Flat", nprobe=32)
                            for b in blocks], [None] * 3)
    _, want = search(whole, queries, 10)
    _, got = search(sharded, queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.99
    assert isinstance(faiss.extract_index_ivf(sharded.shards[0]), faiss.IndexIVF)


def test_fewer_documents_than_k_and_empty_shards():
    block = clustered(3, 16, 5)
    sharded = ShardedIndex([build_exact_index(block), faiss.IndexFlatIP(16),
                            build_exact_index(block)], [None, None, None])
    scores, rows = search(sharded, block[:2], 10)
    assert rows.shape == (2, 6) and (rows >= 0).all()
    assert sorted(rows[0][:2].tolist()) == [0, 3]  # the query's own vector, twice
    with pytest.raises(ValueError):
        ShardedIndex([], [])
