"""LSH prototypes (tasks.prototypes): brute-force reference, hand-built buckets, cluster sums."""

from __future__ import annotations

import numpy as np
import pytest

import driftlane.tasks.prototypes as prototypes
from driftlane.tasks.prototypes import (
    PrototypeSpec,
    add_members,
    cluster_centroids,
    cluster_prototype_sums,
    document_prototypes,
    load_prototype_spec,
    make_hyperplanes,
    query_prototypes,
    remove_members,
    save_prototype_spec,
    simhash_buckets,
)
from driftlane.tasks.scoring import maxsim_matrix

SMALL = PrototypeSpec(n_bits=3, n_repetitions=4, projection_dim=None, seed=3, dim=16)
PROJECTED = PrototypeSpec(n_bits=2, n_repetitions=3, projection_dim=5, seed=11, dim=16)


def _token_sets(seed: int, n: int, dim: int, max_len: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((int(rng.integers(1, max_len + 1)), dim)).astype(np.float16)
        for _ in range(n)
    ]


def _reference_encoding(tokens: np.ndarray, spec: PrototypeSpec, planes: dict,
                        document_side: bool) -> np.ndarray:
    """MUVERA's FDE written out with loops over repetitions, buckets and tokens."""
    tokens = tokens.astype(np.float64)
    tokens = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
    blocks = []
    for rep in range(spec.n_repetitions):
        g = planes["simhash"][rep].astype(np.float64)
        codes = [sum(1 << i for i in range(spec.n_bits) if t @ g[:, i] > 0) for t in tokens]
        for bucket in range(spec.n_buckets):
            members = [t for t, c in zip(tokens, codes, strict=True) if c == bucket]
            if members:
                block = np.mean(members, axis=0) if document_side else np.sum(members, axis=0)
            elif document_side and len(tokens):
                distances = [bin(c ^ bucket).count("1") for c in codes]
                block = tokens[int(np.argmin(distances))]  # first of the nearest
            else:
                block = np.zeros(spec.dim)
            if spec.projection_dim is not None:
                block = block @ planes["projection"][rep].astype(np.float64)
            blocks.append(block)
    encoding = np.concatenate(blocks)
    if document_side and len(tokens):
        encoding = encoding / np.linalg.norm(encoding)
    return encoding


@pytest.mark.parametrize("spec", [SMALL, PROJECTED])
@pytest.mark.parametrize("document_side", [True, False])
def test_encoding_matches_loop_reference(spec, document_side, monkeypatch):
    docs = _token_sets(0, 9, spec.dim, 7)
    docs.insert(4, np.zeros((0, spec.dim), np.float16))  # a document without tokens
    planes = make_hyperplanes(spec)
    encode = document_prototypes if document_side else query_prototypes
    whole = encode(docs, spec, planes)
    assert whole.shape == (len(docs), spec.output_dim) and whole.dtype == np.float32
    reference = np.stack([_reference_encoding(d, spec, planes, document_side) for d in docs])
    np.testing.assert_allclose(whole, reference, rtol=1e-5, atol=1e-5)
    assert np.all(whole[4] == 0)
    # Chunks of a few tokens (many chunk boundaries) give the same encodings.
    monkeypatch.setattr(prototypes, "_TOKENS_PER_CHUNK", 5)
    monkeypatch.setattr(prototypes, "_FLOATS_PER_CHUNK", 7)
    np.testing.assert_allclose(encode(docs, spec, planes), whole, rtol=1e-6, atol=1e-6)


def test_hand_built_buckets_mean_sum_and_hamming_fill():
    spec = PrototypeSpec(n_bits=2, n_repetitions=1, projection_dim=None, seed=0, dim=2)
    # Bit 0: x > 0, bit 1: y > 0.
    planes = {"simhash": np.eye(2, dtype=np.float32)[None]}
    t0, t1, t2 = [0.6, 0.8], [0.8, 0.6], [0.6, -0.8]  # buckets 3, 3, 1; buckets 0 and 2 empty
    tokens = np.array([t0, t1, t2], dtype=np.float32)
    assert simhash_buckets(tokens, planes["simhash"][0]).tolist() == [3, 3, 1]
    doc = document_prototypes([tokens], spec, planes).reshape(4, 2)
    # Bucket 0 (00) is 1 bit from bucket 1 (t2), 2 bits from bucket 3; bucket 2 (10) is 1 bit
    # from bucket 3, where t0 and t1 tie and the first token wins. Then the whole encoding is
    # divided by its norm (sqrt(1 + 1 + 1 + 0.98)).
    blocks = np.array([t2, t2, t0, [0.7, 0.7]])
    np.testing.assert_allclose(doc, blocks / np.linalg.norm(blocks), atol=1e-6)
    query = query_prototypes([tokens], spec, planes).reshape(4, 2)
    np.testing.assert_allclose(query, [[0, 0], t2, [0, 0], [1.4, 1.4]], atol=1e-6)


def test_seeded_reproducible_and_inputs_unchanged():
    docs = _token_sets(1, 6, PROJECTED.dim, 8)
    copies = [d.copy() for d in docs]
    first = make_hyperplanes(PROJECTED)
    second = make_hyperplanes(PrototypeSpec(**PROJECTED.to_dict()))
    assert first.keys() == second.keys() == {"simhash", "projection"}
    for name in first:
        assert first[name].tobytes() == second[name].tobytes()
    assert document_prototypes(docs, PROJECTED, first).tobytes() == \
        document_prototypes(docs, PROJECTED, second).tobytes()
    other = make_hyperplanes(PrototypeSpec(**{**PROJECTED.to_dict(), "seed": 12}))
    assert not np.array_equal(first["simhash"], other["simhash"])
    for before, after in zip(copies, docs, strict=True):
        assert before.tobytes() == after.tobytes()
    assert SMALL.output_dim == 4 * 8 * 16 and PROJECTED.output_dim == 3 * 4 * 5


def test_spec_validation_and_plane_mismatch():
    with pytest.raises(ValueError):
        PrototypeSpec(n_bits=0)
    with pytest.raises(ValueError):
        PrototypeSpec(projection_dim=0)
    with pytest.raises(ValueError, match="do not match"):
        document_prototypes(_token_sets(0, 2, 16, 3), SMALL, make_hyperplanes(PROJECTED))


@pytest.mark.parametrize("spec", [SMALL, PROJECTED])
def test_save_load_round_trip(spec, tmp_path):
    planes = make_hyperplanes(spec)
    written = save_prototype_spec(str(tmp_path / "protos"), spec, planes)
    assert all(not w.endswith(".pkl") for w in written)
    loaded_spec, loaded = load_prototype_spec(str(tmp_path / "protos"))
    assert loaded_spec == spec
    assert loaded.keys() == planes.keys()
    for name in planes:
        assert loaded[name].dtype == planes[name].dtype
        assert loaded[name].tobytes() == planes[name].tobytes()


def test_incremental_cluster_updates_equal_recomputation():
    rng = np.random.default_rng(5)
    protos = rng.standard_normal((40, 12)).astype(np.float32)
    labels = rng.integers(0, 4, size=40)
    sums, counts = cluster_prototype_sums(protos[:30], labels[:30], 4)
    sums_copy, counts_copy = sums.copy(), counts.copy()
    # Members 0..9 leave; 30..39 join, two of them opening a new cluster 4.
    joining = labels[30:].copy()
    joining[:2] = 4
    sums2, counts2 = remove_members(sums, counts, protos[:10], labels[:10])
    sums2, counts2 = add_members(sums2, counts2, protos[30:], joining)
    assert np.array_equal(sums, sums_copy) and np.array_equal(counts, counts_copy)
    final_labels = np.r_[labels[10:30], joining]
    expected_sums, expected_counts = cluster_prototype_sums(protos[10:], final_labels, 5)
    assert np.array_equal(counts2, expected_counts)
    np.testing.assert_allclose(sums2, expected_sums, rtol=1e-12, atol=1e-9)
    centroids = cluster_centroids(sums2, counts2)
    for cluster in range(5):
        members = protos[10:][final_labels == cluster]
        np.testing.assert_allclose(centroids[cluster], members.mean(axis=0), atol=1e-5)
    # Emptying a cluster leaves exact zeros; removing what is not there is refused.
    emptied, emptied_counts = remove_members(sums2, counts2, protos[30:32], joining[:2])
    assert emptied_counts[4] == 0 and np.all(emptied[4] == 0)
    with pytest.raises(ValueError):
        remove_members(emptied, emptied_counts, protos[30:31], np.array([4]))
    with pytest.raises(ValueError):
        remove_members(sums, counts, protos[:1], np.array([9]))


def test_prototype_inner_product_tracks_maxsim_on_clustered_tokens():
    """On tokens drawn around shared topics, <query proto, doc proto> / repetitions follows
    exact MaxSim: high rank correlation, and the exact best document is ranked near the top."""
    rng = np.random.default_rng(0)
    dim, n_topics = 32, 12
    topics = rng.standard_normal((n_topics, dim))

    def token_set(n_tokens: int) -> np.ndarray:
        chosen = rng.choice(n_topics, size=3, replace=False)
        centers = topics[rng.choice(chosen, size=n_tokens)]
        return (centers + 0.35 * rng.standard_normal((n_tokens, dim))).astype(np.float32)

    docs = [token_set(int(rng.integers(8, 30))) for _ in range(150)]
    queries = [token_set(int(rng.integers(4, 10))) for _ in range(12)]
    spec = PrototypeSpec(n_bits=3, n_repetitions=20, projection_dim=None, seed=1, dim=dim)
    planes = make_hyperplanes(spec)
    approx = query_prototypes(queries, spec, planes) @ document_prototypes(docs, spec, planes).T
    approx /= spec.n_repetitions
    exact = maxsim_matrix(queries, docs)
    ranks = [np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(e)))[0, 1]
             for a, e in zip(approx, exact, strict=True)]
    assert np.mean(ranks) > 0.9
    best_rank = [int((a > a[np.argmax(e)]).sum()) for a, e in zip(approx, exact, strict=True)]
    assert np.median(best_rank) < 5


def test_document_normalization_keeps_long_varied_documents_in_the_ranking():
    """A long document of varied tokens holds the query's best matches (highest MaxSim), but
    its bucket centroids are short; a short document of one repeated, weaker match has a
    full-length centroid. Document encodings are unit vectors, so the long document still
    ranks first, as under MaxSim; without the normalization it would rank last."""
    spec = PrototypeSpec(n_bits=1, n_repetitions=1, projection_dim=None, seed=0, dim=3)
    planes = {"simhash": np.array([[[1.0], [0.0], [0.0]]], dtype=np.float32)}  # bit: x > 0
    query = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    angles = np.linspace(-1.2, 1.2, 9)
    varied = np.c_[np.cos(angles), np.sin(angles), np.zeros(9)]  # best match: cos 0 = 1
    varied = np.r_[varied, [[-1.0, 0.0, 0.0]]].astype(np.float32)  # fills the other bucket
    weak = np.tile([[0.8, 0.6, 0.0], [-1.0, 0.0, 0.0]], (3, 1)).astype(np.float32)  # cos 0.8
    docs = [varied, weak]
    exact = maxsim_matrix([query], docs)[0]
    assert exact[0] > exact[1]
    protos = document_prototypes(docs, spec, planes)
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-6)
    approx = (query_prototypes([query], spec, planes) @ protos.T)[0]
    assert approx[0] > approx[1]
