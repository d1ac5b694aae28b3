"""LSH prototypes: fixed-length vectors whose inner product approximates MaxSim (DESIGN step 4).

This is the fixed dimensional encoding (FDE) of MUVERA (Dhulipala, Hadian, Jayaram, Lee,
Mirrokni: "MUVERA: Multi-Vector Retrieval via Fixed Dimensional Encodings", NeurIPS 2024),
Section 2:

* Space partition. Per repetition, `n_bits` Gaussian hyperplanes g_1..g_b (SimHash, Charikar
  2002) put a token vector x into bucket phi(x) = sum_i [<g_i, x> > 0] * 2**i, one of
  B = 2**n_bits buckets.
* Document side. Block k of the encoding is the mean of the document's tokens in bucket k. An
  empty bucket takes the token whose bucket code is nearest to k in Hamming distance (the
  paper's filling of empty clusters; ties go to the token that comes first).
* Query side. Block k is the sum of the query's tokens in bucket k; empty buckets stay zero.
* Inner projection (optional). Each block is multiplied by a random +-1/sqrt(d_proj) matrix
  (d, d_proj), which preserves inner products in expectation.
* Repetitions. `n_repetitions` independent encodings are concatenated.
* Document normalization (not in the paper). The whole document encoding is divided by its L2
  norm.

Before that last step, <query_prototype, document_prototype> sums, over the query tokens, the
similarity to the centroid of the document tokens that share the query token's bucket, which
approximates the MaxSim (Chamfer) score of `tasks.scoring` times `n_repetitions`. But a centroid
is shorter the more its tokens disagree, while MaxSim takes the best token whatever the others:
unnormalized, the encoding under-scores long, varied documents (the ones MaxSim favours). On
cisi (benchmarks/results/prototypes_cpu.md) dividing the document encoding by its norm raised
the share of exact MaxSim's top 10 found in the prototype top 100 from 0.90 to 0.98, above the
mean-pooled dense vectors (0.94); the ranking of documents for one query is then that of
<q, d> / |d|. Token vectors are L2-normalized first, so both sides work in cosine geometry like
`tasks.scoring.maxsim_matrix`. The final count-sketch projection of the paper is not
implemented.

Cluster prototypes are means of their members' document prototypes, kept as running sums and
counts so that members can join and leave without recomputing the cluster.

Pure functions over arrays first; saving and loading a spec with its hyperplanes (JSON + npy,
no pickle, any fsspec URL) at the end.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
from scipy import sparse

__all__ = [
    "PROTOTYPE_ALGORITHM_VERSION",
    "PrototypeSpec",
    "add_members",
    "cluster_centroids",
    "cluster_prototype_sums",
    "document_prototype_blocks",
    "document_prototypes",
    "load_prototype_spec",
    "make_hyperplanes",
    "query_prototypes",
    "remove_members",
    "save_prototype_spec",
    "simhash_buckets",
]

# Bump when the encoding computed for the same spec and tokens changes (part of cache keys).
PROTOTYPE_ALGORITHM_VERSION = 2  # 2: document encodings L2-normalized

# Tokens encoded per chunk of whole documents: bounds the (tokens, buckets) Hamming table and
# the per-repetition copies, whatever the collection size.
_TOKENS_PER_CHUNK = 1 << 18
# Prototype floats summed per chunk of cluster members.
_FLOATS_PER_CHUNK = 1 << 24

_SPEC_FILE = "prototype_spec.json"
_SIMHASH_FILE = "simhash_planes.npy"
_PROJECTION_FILE = "projection.npy"


@dataclass(frozen=True)
class PrototypeSpec:
    """Sizes and seed of a prototype encoding.

    The default (4 bits, 20 repetitions, projection to 64: 20,480 dimensions) is the smallest
    configuration of the `benchmarks/prototypes.py` grid on cisi whose fidelity to exact MaxSim
    and nDCG@10 are both within 0.01 of the best (benchmarks/results/prototypes_cpu.md).
    """

    n_bits: int = 4  # SimHash hyperplanes per repetition: 2**n_bits buckets
    n_repetitions: int = 20  # independent partitions, concatenated
    projection_dim: int | None = 64  # inner random projection of each block; None keeps dim
    seed: int = 0
    dim: int = 384  # token vector width (all-MiniLM-L6-v2: 384)

    def __post_init__(self) -> None:
        if not 1 <= self.n_bits <= 12:
            raise ValueError(f"n_bits must be in 1..12, got {self.n_bits}")
        if self.n_repetitions < 1:
            raise ValueError(f"n_repetitions must be >= 1, got {self.n_repetitions}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 or None, got {self.projection_dim}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @property
    def n_buckets(self) -> int:
        return 1 << self.n_bits

    @property
    def block_dim(self) -> int:
        """Width of one bucket's block: projection_dim, or dim without projection."""
        return self.projection_dim if self.projection_dim is not None else self.dim

    @property
    def output_dim(self) -> int:
        """Length of a prototype: n_repetitions * 2**n_bits * block_dim."""
        return self.n_repetitions * self.n_buckets * self.block_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrototypeSpec:
        return cls(**data)


def make_hyperplanes(spec: PrototypeSpec) -> dict[str, np.ndarray]:
    """The random draws of an encoding, deterministic for a spec (numpy PCG64 from `spec.seed`).

    Returns {"simhash": (n_repetitions, dim, n_bits) float32 Gaussian hyperplanes} plus, when
    `spec.projection_dim` is set, {"projection": (n_repetitions, dim, projection_dim) float32
    with entries +-1/sqrt(projection_dim)} (MUVERA's inner projection).
    """
    rng = np.random.default_rng(spec.seed)
    planes = {
        "simhash": rng.standard_normal(
            (spec.n_repetitions, spec.dim, spec.n_bits), dtype=np.float32
        )
    }
    if spec.projection_dim is not None:
        signs = rng.integers(0, 2, size=(spec.n_repetitions, spec.dim, spec.projection_dim))
        scale = np.float32(1.0 / np.sqrt(spec.projection_dim))
        planes["projection"] = ((2 * signs - 1) * scale).astype(np.float32)
    return planes


def simhash_buckets(tokens: np.ndarray, hyperplanes: np.ndarray) -> np.ndarray:
    """SimHash bucket of each token: bit i is set when the token is on the positive side of
    hyperplane i. `tokens` (n, dim), `hyperplanes` (dim, n_bits) -> (n,) int64 in [0, 2**n_bits).
    """
    bits = (tokens @ hyperplanes) > 0  # (n, n_bits)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(hyperplanes.shape[1], dtype=np.int64))


def document_prototypes(
    token_arrays: Sequence[np.ndarray], spec: PrototypeSpec, planes: dict[str, np.ndarray]
) -> np.ndarray:
    """Document-side MUVERA encodings: mean per bucket, empty buckets filled, the whole
    encoding divided by its L2 norm (see module doc).

    `token_arrays`: n arrays (n_tokens_i, dim), any float dtype, not necessarily normalized.
    Returns (n, spec.output_dim) float32 unit rows; a document without tokens gets a zero vector.
    """
    return _encode(token_arrays, spec, planes, document_side=True)


def document_prototype_blocks(
    tokens: np.ndarray, offsets: np.ndarray, spec: PrototypeSpec,
    planes: dict[str, np.ndarray], block_rows: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Document prototypes of ragged token rows (`tokens` with `offsets`, n + 1 of them), a
    block of `block_rows` documents at a time: (first document of the block, its (b,
    output_dim) prototypes). Only one block's float32 token copies exist at once."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    n = len(offsets) - 1
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        arrays = [tokens[offsets[i]:offsets[i + 1]] for i in range(start, stop)]
        yield start, document_prototypes(arrays, spec, planes)


def query_prototypes(
    token_arrays: Sequence[np.ndarray], spec: PrototypeSpec, planes: dict[str, np.ndarray]
) -> np.ndarray:
    """Query-side MUVERA encodings: sum per bucket, empty buckets zero (see module doc).

    `token_arrays`: n arrays (n_tokens_i, dim). Returns (n, spec.output_dim) float32.
    """
    return _encode(token_arrays, spec, planes, document_side=False)


def _encode(
    token_arrays: Sequence[np.ndarray],
    spec: PrototypeSpec,
    planes: dict[str, np.ndarray],
    document_side: bool,
) -> np.ndarray:
    _check_planes(spec, planes)
    lengths = np.array([a.shape[0] for a in token_arrays], dtype=np.int64)  # (n,)
    for array in token_arrays:
        if array.ndim != 2 or array.shape[1] != spec.dim:
            raise ValueError(f"token arrays must be (n_tokens, {spec.dim}), got {array.shape}")
    out = np.zeros((len(token_arrays), spec.output_dim), dtype=np.float32)
    # Chunks of whole documents, each with about _TOKENS_PER_CHUNK tokens.
    chunk_of = np.cumsum(lengths) // _TOKENS_PER_CHUNK  # (n,) non-decreasing
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    for first, stop in zip(
        np.r_[0, bounds].tolist(), np.r_[bounds, len(lengths)].tolist(), strict=True
    ):
        if first == stop or not lengths[first:stop].sum():
            continue
        tokens = np.concatenate(token_arrays[first:stop]).astype(np.float32)  # (N, dim)
        tokens /= np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), 1e-12)  # (N, dim)
        out[first:stop] = _encode_chunk(tokens, lengths[first:stop], spec, planes, document_side)
    return out


def _encode_chunk(
    tokens: np.ndarray,
    lengths: np.ndarray,
    spec: PrototypeSpec,
    planes: dict[str, np.ndarray],
    document_side: bool,
) -> np.ndarray:
    """Encodings of the documents whose normalized tokens are concatenated in `tokens` (N, dim);
    `lengths` (n,) tokens per document. Returns (n, output_dim) float32."""
    n, n_buckets, block = len(lengths), spec.n_buckets, spec.block_dim
    n_tokens = tokens.shape[0]
    out = np.zeros((n, spec.n_repetitions, n_buckets, block), dtype=np.float32)
    owner = np.repeat(np.arange(n, dtype=np.int64), lengths)  # (N,) document of each token
    hamming = _hamming_table(spec.n_bits)  # (B, B)
    for rep in range(spec.n_repetitions):
        codes = simhash_buckets(tokens, planes["simhash"][rep])  # (N,)
        values = tokens @ planes["projection"][rep] if "projection" in planes else tokens
        cells = owner * n_buckets + codes  # (N,) flat (document, bucket) cell
        sums = _segment_sums(values, cells, n * n_buckets)  # (n * B, block) float32
        if document_side:
            counts = np.bincount(cells, minlength=n * n_buckets)  # (n * B,)
            sums /= np.maximum(counts, 1)[:, None].astype(np.float32)
            empty = (counts.reshape(n, n_buckets) == 0) & (lengths > 0)[:, None]  # (n, B)
            if empty.any():
                fill = _nearest_token_by_hamming(cells, counts, hamming, n, n_tokens)  # (n, B)
                sums.reshape(n, n_buckets, block)[empty] = values[fill[empty]]
        out[:, rep] = sums.reshape(n, n_buckets, block)
    out = out.reshape(n, spec.output_dim)
    if document_side:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _nearest_token_by_hamming(
    cells: np.ndarray, counts: np.ndarray, hamming: np.ndarray, n: int, n_tokens: int
) -> np.ndarray:
    """For every (document, bucket): the document's first token among those whose bucket code
    is nearest to the bucket in Hamming distance. `cells` (N,) = document * B + code of each
    token, `counts` (n * B,) tokens per cell. Returns (n, B) token indices (meaningless for a
    document without tokens)."""
    n_buckets = hamming.shape[0]
    first = np.full(n * n_buckets, n_tokens, dtype=np.int64)  # (n * B,) first token per cell
    occupied, first_seen = np.unique(cells, return_index=True)
    first[occupied] = first_seen
    # key[i, k, c]: distance(k, c) in the high digits, the first token of code c in document i
    # as tie-breaker in the low digits; codes absent from document i never win.
    present = (counts > 0).reshape(n, 1, n_buckets)
    key = hamming[None, :, :] * (n_tokens + 1) + first.reshape(n, 1, n_buckets)  # (n, B, B)
    key = np.where(present, key, np.iinfo(np.int64).max)
    return key.min(axis=2) % (n_tokens + 1)


def _hamming_table(n_bits: int) -> np.ndarray:
    """(2**n_bits, 2**n_bits) int64: Hamming distance between bucket codes i and j."""
    codes = np.arange(1 << n_bits, dtype=np.uint64)
    return np.bitwise_count(codes[:, None] ^ codes[None, :]).astype(np.int64)


def _segment_sums(
    values: np.ndarray, segments: np.ndarray, n_segments: int, dtype: type = np.float32
) -> np.ndarray:
    """Row sums per segment: out[s] = sum of values[i] with segments[i] == s.

    `values` (N, width), `segments` (N,) ints in [0, n_segments). Returns (n_segments, width) in
    `dtype`, as a sparse (n_segments, N) 0/1 matrix times `values`, over chunks of rows so that
    a conversion to `dtype` never copies more than about _FLOATS_PER_CHUNK floats.
    """
    out = np.zeros((n_segments, values.shape[1]), dtype=dtype)
    rows_per_chunk = max(1, _FLOATS_PER_CHUNK // max(1, values.shape[1]))
    for first in range(0, values.shape[0], rows_per_chunk):
        chunk = segments[first : first + rows_per_chunk]
        rows = np.asarray(values[first : first + rows_per_chunk], dtype=dtype)
        membership = sparse.csr_matrix(
            (np.ones(chunk.shape[0], dtype=dtype), (chunk, np.arange(chunk.shape[0]))),
            shape=(n_segments, chunk.shape[0]),
        )
        out += membership @ rows
    return out


def _check_planes(spec: PrototypeSpec, planes: dict[str, np.ndarray]) -> None:
    expected = {"simhash": (spec.n_repetitions, spec.dim, spec.n_bits)}
    if spec.projection_dim is not None:
        expected["projection"] = (spec.n_repetitions, spec.dim, spec.projection_dim)
    got = {name: tuple(array.shape) for name, array in planes.items()}
    if got != expected:
        raise ValueError(f"hyperplanes {got} do not match the spec {spec} (expected {expected})")


# --------------------------------------------------------------------------------------------
# Cluster prototypes: running sums and counts of member prototypes
# --------------------------------------------------------------------------------------------


def cluster_prototype_sums(
    member_protos: np.ndarray, labels: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and member counts of document prototypes.

    `member_protos` (n, D), `labels` (n,) ints in [0, n_clusters). Returns sums (n_clusters, D)
    float64 (float64 so that adding and removing members many times does not drift) and counts
    (n_clusters,) int64.
    """
    sums = np.zeros((n_clusters, member_protos.shape[1]), dtype=np.float64)
    counts = np.zeros(n_clusters, dtype=np.int64)
    return add_members(sums, counts, member_protos, labels)


def add_members(
    sums: np.ndarray, counts: np.ndarray, member_protos: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """New (sums, counts) with `member_protos` (m, D) joining clusters `labels` (m,).

    A label at or beyond the current number of clusters opens new clusters (the arrays grow).
    The inputs are not modified.
    """
    labels = _check_labels(labels, member_protos, sums)
    n_clusters = max(sums.shape[0], int(labels.max(initial=-1)) + 1)
    new_sums = np.zeros((n_clusters, sums.shape[1]), dtype=np.float64)
    new_sums[: sums.shape[0]] = sums
    new_counts = np.zeros(n_clusters, dtype=np.int64)
    new_counts[: counts.shape[0]] = counts
    new_sums += _segment_sums(member_protos, labels, n_clusters, dtype=np.float64)
    new_counts += np.bincount(labels, minlength=n_clusters)
    return new_sums, new_counts


def remove_members(
    sums: np.ndarray, counts: np.ndarray, member_protos: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """New (sums, counts) with `member_protos` (m, D) leaving clusters `labels` (m,).

    Raises ValueError if a label is not a cluster or a cluster would have fewer than 0 members.
    The inputs are not modified.
    """
    labels = _check_labels(labels, member_protos, sums)
    if labels.size and labels.max() >= sums.shape[0]:
        raise ValueError(f"label {int(labels.max())} is not one of {sums.shape[0]} clusters")
    new_counts = counts - np.bincount(labels, minlength=sums.shape[0])
    if (new_counts < 0).any():
        short = np.flatnonzero(new_counts < 0).tolist()
        raise ValueError(f"removing more members than clusters {short} hold")
    new_sums = sums - _segment_sums(member_protos, labels, sums.shape[0], dtype=np.float64)
    new_sums[new_counts == 0] = 0.0  # an emptied cluster holds exactly nothing
    return new_sums, new_counts


def cluster_centroids(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Cluster prototypes: sums (k, D) / counts (k,) -> (k, D) float32; empty clusters are 0."""
    centroids = sums / np.maximum(counts, 1)[:, None]
    return centroids.astype(np.float32)


def _check_labels(labels: np.ndarray, member_protos: np.ndarray, sums: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != member_protos.shape[0]:
        raise ValueError(f"labels {labels.shape} do not match prototypes {member_protos.shape}")
    if member_protos.ndim != 2 or member_protos.shape[1] != sums.shape[1]:
        raise ValueError(f"prototypes {member_protos.shape} do not match sums {sums.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    return labels


# --------------------------------------------------------------------------------------------
# Saving a spec with its hyperplanes (JSON + npy, no pickle)
# --------------------------------------------------------------------------------------------


def save_prototype_spec(
    folder: str, spec: PrototypeSpec, planes: dict[str, np.ndarray]
) -> list[str]:
    """Write the spec (JSON) and its hyperplanes (npy, no pickle) into `folder` (any fsspec URL).

    Returns the URLs written. The hyperplanes are saved, not only the seed, so that a store
    keeps working if numpy ever changes its random streams.
    """
    _check_planes(spec, planes)
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    meta = {"algorithm_version": PROTOTYPE_ALGORITHM_VERSION, "spec": spec.to_dict()}
    written = []
    with fs.open(f"{root}/{_SPEC_FILE}", "w") as handle:
        handle.write(json.dumps(meta, indent=2, sort_keys=True))
    written.append(f"{folder.rstrip('/')}/{_SPEC_FILE}")
    files = {"simhash": _SIMHASH_FILE, "projection": _PROJECTION_FILE}
    for name, array in planes.items():
        with fs.open(f"{root}/{files[name]}", "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        written.append(f"{folder.rstrip('/')}/{files[name]}")
    return written


def load_prototype_spec(folder: str) -> tuple[PrototypeSpec, dict[str, np.ndarray]]:
    """Read what `save_prototype_spec` wrote; shapes are checked against the spec."""
    fs, root = fsspec.core.url_to_fs(folder)
    with fs.open(f"{root}/{_SPEC_FILE}", "r") as handle:
        meta = json.load(handle)
    if meta.get("algorithm_version") != PROTOTYPE_ALGORITHM_VERSION:
        raise ValueError(
            f"{folder}: prototype algorithm version {meta.get('algorithm_version')}, "
            f"this code computes version {PROTOTYPE_ALGORITHM_VERSION}"
        )
    spec = PrototypeSpec.from_dict(meta["spec"])
    names = {"simhash": _SIMHASH_FILE}
    if spec.projection_dim is not None:
        names["projection"] = _PROJECTION_FILE
    planes = {}
    for name, file in names.items():
        with fs.open(f"{root}/{file}", "rb") as handle:
            planes[name] = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    _check_planes(spec, planes)
    return spec, planes
