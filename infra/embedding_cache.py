"""Content-addressed store of document embeddings under an fsspec URL.

`EmbeddedTexts` holds what `tasks.embedding.embed_texts` computes for a list of texts: L2-
normalized document vectors, window counts and optionally float16 token embeddings. An
`EmbeddingCache` keeps them by text digest, per model version and chunking config, so a text
is embedded once per encoder however many sessions and stages see it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from driftlane.infra.config import ChunkingConfig
from driftlane.infra.io import write_fs_atomically

__all__ = ["EMBEDDING_ALGORITHM_VERSION", "EmbeddedTexts", "EmbeddingCache"]

# Bump when `tasks.embedding.embed_texts` changes what it computes for the same model and
# config: it names every cache folder, so old cached vectors are then ignored instead of mixed
# with new ones.
EMBEDDING_ALGORITHM_VERSION = 1


@dataclass
class EmbeddedTexts:
    """Document vectors (and optionally token embeddings) of a list of texts, in order."""

    vectors: np.ndarray  # (n, dim) float32, L2-normalized document vectors
    n_windows: np.ndarray  # (n,) int32 windows per text
    token_embeddings: list[np.ndarray] | None = (
        None  # per text (n_content_tokens_i, hidden) float16
    )

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def take(self, indices: Sequence[int] | np.ndarray) -> EmbeddedTexts:
        """The rows at `indices` (token arrays are shared, not copied)."""
        idx = np.asarray(indices, dtype=np.int64)
        tokens = None
        if self.token_embeddings is not None:
            tokens = [self.token_embeddings[i] for i in idx.tolist()]
        return EmbeddedTexts(self.vectors[idx], self.n_windows[idx], tokens)

    def stacked_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """The token embeddings as one (total tokens, hidden) float16 array, text i at rows
        offsets[i]:offsets[i + 1] of the (n + 1,) int64 offsets."""
        if self.token_embeddings is None:
            raise ValueError("these embeddings kept no token embeddings")
        arrays = self.token_embeddings
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        tokens = (np.concatenate(arrays) if arrays
                  else np.zeros((0, self.vectors.shape[1]), np.float16))
        return tokens, offsets


def _npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of an .npy stream (no pickles, C order only)."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
    if fortran_order or dtype.hasobject:
        raise ValueError("unsupported .npy layout in embedding cache")
    return shape, dtype, handle.tell()


class EmbeddingCache:
    """Content-addressed cache of document vectors (and optional float16 token embeddings).

    Keyed by (model_version, text digest, chunking config digest, keep_token_embeddings).
    Layout under `root_url/<model_version>/<chunking digest>-<vec|tok>-e<algorithm version>/`,
    one shard per `add` call:
      <shard>.vectors.npy      (n, dim) float32
      <shard>.tokens.npy       (sum of token counts, hidden) float16, documents concatenated
      <shard>.digests.parquet  digest, n_windows, token_offset, token_count
    Every file is written under a temporary name in the same folder and renamed; the parquet
    comes last, so a shard without its parquet (an interrupted add) is ignored.
    """

    def __init__(
        self,
        root_url: str,
        model_version: str,
        chunking: ChunkingConfig,
        keep_token_embeddings: bool = False,
    ) -> None:
        if "://" not in root_url:
            root_url = os.path.expanduser(root_url)
        self.root_url = root_url
        self.fs, root = fsspec.core.url_to_fs(root_url)
        self.model_version = model_version
        self.chunking = chunking
        self.keep_token_embeddings = keep_token_embeddings
        kind = "tok" if keep_token_embeddings else "vec"
        config_key = f"{chunking.digest()}-{kind}-e{EMBEDDING_ALGORITHM_VERSION}"
        self.folder = f"{root.rstrip('/')}/{model_version}/{config_key}"
        self._index: dict[str, tuple[str, int]] = {}  # digest -> (shard, row)
        self._shards: dict[str, dict[str, np.ndarray]] = {}  # shard -> parquet columns

    def _path(self, shard: str, suffix: str) -> str:
        return f"{self.folder}/{shard}.{suffix}"

    def _refresh(self) -> None:
        """Read the parquet of every complete shard not seen yet."""
        for path in sorted(self.fs.glob(f"{self.folder}/*.digests.parquet")):
            shard = path.rsplit("/", 1)[-1].removesuffix(".digests.parquet")
            if shard in self._shards:
                continue
            with self.fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
            columns = {name: table.column(name).to_numpy() for name in table.column_names}
            self._shards[shard] = columns
            for row, digest in enumerate(columns["digest"].tolist()):
                self._index.setdefault(digest, (shard, row))

    def contains(self, digests: Sequence[str]) -> np.ndarray:
        """(n,) bool: which digests the cache holds (reads no vectors)."""
        self._refresh()
        return np.array([digest in self._index for digest in digests], dtype=bool)

    def lookup(self, digests: Sequence[str]) -> tuple[np.ndarray, EmbeddedTexts]:
        """(found mask (n,) bool, embeddings of the found digests in their order)."""
        self._refresh()
        hits = [self._index.get(digest) for digest in digests]
        found = np.array([hit is not None for hit in hits], dtype=bool)
        by_shard: dict[str, list[tuple[int, int]]] = {}  # shard -> [(output position, row)]
        for position, hit in enumerate(hit for hit in hits if hit is not None):
            by_shard.setdefault(hit[0], []).append((position, hit[1]))
        n_found = int(found.sum())
        vectors: np.ndarray | None = None
        n_windows = np.zeros(n_found, dtype=np.int32)
        tokens: list[np.ndarray] | None = [] if self.keep_token_embeddings else None
        token_slots: list[np.ndarray | None] = [None] * n_found
        for shard, wanted in by_shard.items():
            positions = np.array([p for p, _ in wanted], dtype=np.int64)
            rows = np.array([r for _, r in wanted], dtype=np.int64)
            with self.fs.open(self._path(shard, "vectors.npy"), "rb") as handle:
                shard_vectors = np.load(handle, allow_pickle=False)
            if vectors is None:
                vectors = np.empty((n_found, shard_vectors.shape[1]), dtype=np.float32)
            vectors[positions] = shard_vectors[rows]
            columns = self._shards[shard]
            n_windows[positions] = columns["n_windows"][rows]
            if self.keep_token_embeddings:
                self._read_tokens(shard, columns, positions, rows, token_slots)
        if tokens is not None:
            tokens.extend(array for array in token_slots if array is not None)
        if vectors is None:
            vectors = np.zeros((0, 0), dtype=np.float32)
        return found, EmbeddedTexts(vectors, n_windows, tokens)

    def _read_tokens(
        self,
        shard: str,
        columns: dict[str, np.ndarray],
        positions: np.ndarray,
        rows: np.ndarray,
        slots: list[np.ndarray | None],
    ) -> None:
        # Seek to each document's rows: a shard's token file can be far larger than what a
        # lookup needs.
        with self.fs.open(self._path(shard, "tokens.npy"), "rb") as handle:
            shape, dtype, data_offset = _npy_header(handle)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for position, row in zip(positions.tolist(), rows.tolist(), strict=True):
                offset = int(columns["token_offset"][row])
                count = int(columns["token_count"][row])
                handle.seek(data_offset + offset * row_bytes)
                buffer = handle.read(count * row_bytes)
                # Copied so cached arrays are writable like freshly embedded ones.
                rows_read = np.frombuffer(buffer, dtype=dtype).reshape(count, *shape[1:])
                slots[position] = rows_read.copy()

    def _write_atomic(self, path: str, write: Callable[[IO[bytes]], None]) -> None:
        write_fs_atomically(self.fs, path, write)

    def add(self, digests: Sequence[str], embedded: EmbeddedTexts) -> None:
        """Store the embeddings of `digests` not cached yet as one new shard."""
        digests = list(digests)
        if len(digests) != len(embedded):
            raise ValueError(f"{len(digests)} digests for {len(embedded)} embeddings")
        if self.keep_token_embeddings and embedded.token_embeddings is None:
            raise ValueError("this cache keeps token embeddings, but none were given")
        self._refresh()
        seen: set[str] = set()
        keep: list[int] = []
        for i, digest in enumerate(digests):
            if digest not in self._index and digest not in seen:
                seen.add(digest)
                keep.append(i)
        if not keep:
            return
        new = embedded.take(keep)
        shard = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        self.fs.makedirs(self.folder, exist_ok=True)
        self._write_atomic(
            self._path(shard, "vectors.npy"),
            lambda handle: np.save(handle, new.vectors.astype(np.float32), allow_pickle=False),
        )
        token_count = np.zeros(len(new), dtype=np.int64)
        if self.keep_token_embeddings:
            assert new.token_embeddings is not None
            arrays = new.token_embeddings
            token_count = np.array([array.shape[0] for array in arrays], dtype=np.int64)
            self._write_atomic(
                self._path(shard, "tokens.npy"),
                lambda handle: _write_concatenated_npy(handle, arrays),
            )
        token_offset = np.cumsum(token_count) - token_count
        table = pa.table(
            {
                "digest": pa.array([digests[i] for i in keep], type=pa.string()),
                "n_windows": pa.array(new.n_windows.astype(np.int32)),
                "token_offset": pa.array(token_offset),
                "token_count": pa.array(token_count),
            }
        )
        self._write_atomic(
            self._path(shard, "digests.parquet"), lambda handle: pq.write_table(table, handle)
        )
        self._refresh()


def _write_concatenated_npy(handle: IO[bytes], arrays: Sequence[np.ndarray]) -> None:
    """Write the row-wise concatenation of float16 (t_i, hidden) arrays as one .npy, streaming."""
    hidden = arrays[0].shape[1]
    total = sum(array.shape[0] for array in arrays)
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype("<f2")),
        "fortran_order": False,
        "shape": (total, hidden),
    }
    np.lib.format.write_array_header_2_0(handle, header)
    for array in arrays:
        handle.write(np.ascontiguousarray(array, dtype="<f2").tobytes())
