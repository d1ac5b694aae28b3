"""Token windows over long documents.

A document is tokenized once, without special tokens; its content tokens are then cut into
overlapping windows of `content_per_window` tokens, and each window gets the model's special
tokens (e.g. ``[CLS] ... [SEP]`` for BERT, ``<s> ... </s>`` for RoBERTa) exactly once. The last
window of a long document is shifted back so that it ends exactly at the last token, so no
window is a tiny tail.

Everything here is a plain function over token ids and numpy arrays: no model, no file access.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SpecialTokens",
    "WindowTable",
    "build_window_batch",
    "content_per_window",
    "special_tokens_of",
    "tokenize_content",
    "window_input_ids",
    "window_spans",
    "window_table",
]

# A probe without rare characters: every tokenizer keeps it as plain content tokens.
_PROBE_TEXT = "hello world"


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a tokenizer wraps around one sequence: prefix + content + suffix."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int
    padding_side: str  # "right" or "left", as the tokenizer pads
    token_type_id: int | None  # constant token type of a single sequence; None: model has none

    @property
    def count(self) -> int:
        """Number of special tokens added to one window."""
        return len(self.prefix) + len(self.suffix)


@dataclass(frozen=True)
class WindowTable:
    """All windows of a group of documents, as parallel arrays (one entry per window)."""

    doc: np.ndarray  # (n_windows,) int64: index of the document the window belongs to
    start: np.ndarray  # (n_windows,) int64: first content token of the window
    end: np.ndarray  # (n_windows,) int64: one past the last content token
    n_windows: np.ndarray  # (n_docs,) int64: windows per document

    def __len__(self) -> int:
        return int(self.doc.shape[0])


def _check_window(content_per_window: int, overlap_tokens: int) -> None:
    if content_per_window < 1:
        raise ValueError(f"content_per_window must be >= 1, got {content_per_window}")
    if not 0 <= overlap_tokens < content_per_window:
        raise ValueError(
            f"overlap_tokens={overlap_tokens} must be in [0, content_per_window="
            f"{content_per_window}) so that each window advances"
        )


def window_table(
    n_content_tokens: Sequence[int] | np.ndarray, content_per_window: int, overlap_tokens: int
) -> WindowTable:
    """Windows of every document at once (vectorized `window_spans`).

    Window k of a document with n > content_per_window tokens starts at k * stride
    (stride = content_per_window - overlap_tokens) for k < ceil((n - content_per_window) / stride);
    its last window is [n - content_per_window, n). A document with n <= content_per_window has
    the single window [0, n), empty for n = 0.
    """
    _check_window(content_per_window, overlap_tokens)
    lengths = np.asarray(n_content_tokens, dtype=np.int64).reshape(-1)  # (n_docs,)
    if (lengths < 0).any():
        raise ValueError("token counts must be non-negative")
    stride = content_per_window - overlap_tokens
    excess = np.maximum(lengths - content_per_window, 0)
    # Regular windows start strictly before n - content_per_window; one more ends at n.
    n_windows = -(-excess // stride) + 1  # (n_docs,) ceil division
    doc = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), n_windows)  # (n_windows,)
    first_of_doc = np.cumsum(n_windows) - n_windows
    k = np.arange(doc.shape[0], dtype=np.int64) - first_of_doc[doc]  # window index in its doc
    is_last = k == n_windows[doc] - 1
    start = np.where(is_last, excess[doc], k * stride)
    end = np.minimum(start + content_per_window, lengths[doc])
    return WindowTable(doc=doc, start=start, end=end, n_windows=n_windows)


def window_spans(
    n_content_tokens: int, content_per_window: int, overlap_tokens: int
) -> list[tuple[int, int]]:
    """[start, end) spans over the content tokens of one document.

    Consecutive windows overlap by exactly `overlap_tokens`, except the last one, which is
    shifted back to end at `n_content_tokens` (it overlaps its predecessor by at least
    `overlap_tokens`). Every token lies in at least one span; a document with no content
    tokens gets the single empty span (0, 0).
    """
    table = window_table([n_content_tokens], content_per_window, overlap_tokens)
    return [(int(s), int(e)) for s, e in zip(table.start, table.end, strict=True)]


def special_tokens_of(tokenizer: Any) -> SpecialTokens:
    """Find the special tokens `tokenizer` adds around a single sequence.

    Transformers 5 fast tokenizers no longer expose `build_inputs_with_special_tokens`, so the
    template is read off a probe: the probe's ids with special tokens must be
    prefix + (ids without special tokens) + suffix, and prefix + suffix must have the length
    `tokenizer.num_special_tokens_to_add(pair=False)` reports.
    """
    with_special = tokenizer(_PROBE_TEXT, add_special_tokens=True, verbose=False)
    plain = list(tokenizer(_PROBE_TEXT, add_special_tokens=False, verbose=False)["input_ids"])
    ids = list(with_special["input_ids"])
    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    prefix_len = next(
        (i for i in range(len(ids) - len(plain) + 1) if ids[i : i + len(plain)] == plain), None
    )
    if prefix_len is None or len(ids) != len(plain) + n_special:
        raise ValueError(
            f"{type(tokenizer).__name__}: cannot read its special-token template "
            f"(probe {ids} vs content {plain}, {n_special} special tokens expected)"
        )
    token_type_id: int | None = None
    if "token_type_ids" in with_special:
        types = set(with_special["token_type_ids"])
        if len(types) != 1:
            raise ValueError(f"{type(tokenizer).__name__}: mixed token types in one sequence")
        token_type_id = int(types.pop())
    pad_id = tokenizer.pad_token_id
    return SpecialTokens(
        prefix=tuple(ids[:prefix_len]),
        suffix=tuple(ids[prefix_len + len(plain) :]),
        pad_id=0 if pad_id is None else int(pad_id),
        padding_side=str(getattr(tokenizer, "padding_side", "right")),
        token_type_id=token_type_id,
    )


def content_per_window(window_tokens: int, special: SpecialTokens) -> int:
    """Content tokens per window once the special tokens have their slots."""
    return window_tokens - special.count


def tokenize_content(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text without special tokens and without truncation.

    One batched call of the (fast) tokenizer. `verbose=False` turns off the tokenizer's
    "sequence longer than the maximum length" warning: long documents are expected here and
    are cut into windows afterwards.
    """
    if not texts:
        return []
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=False,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return [np.asarray(ids, dtype=np.int64) for ids in encoded["input_ids"]]


def window_input_ids(
    content_ids: np.ndarray | Sequence[int],
    spans: Sequence[tuple[int, int]],
    special: SpecialTokens,
) -> list[list[int]]:
    """Model input ids of each window: prefix + content[start:end] + suffix."""
    content = np.asarray(content_ids, dtype=np.int64)
    return [
        [*special.prefix, *content[start:end].tolist(), *special.suffix] for start, end in spans
    ]


def build_window_batch(
    content_ids: Sequence[np.ndarray],
    doc: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    special: SpecialTokens,
) -> dict[str, np.ndarray]:
    """Padded model inputs for a batch of windows, padded to the longest window of the batch.

    `content_ids[doc[i]][start[i]:end[i]]` is the content of window i. Returns `input_ids`,
    `attention_mask` and (when the model uses them) `token_type_ids`, each (batch, max_len)
    int64, padded on the tokenizer's padding side. `content_offset` (batch,) int64 gives the
    column of each window's first content token.
    """
    n_prefix, n_suffix = len(special.prefix), len(special.suffix)
    lengths = (end - start) + special.count  # (batch,)
    width = int(lengths.max())
    batch = lengths.shape[0]
    input_ids = np.full((batch, width), special.pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, width), dtype=np.int64)
    row_start = width - lengths if special.padding_side == "left" else np.zeros_like(lengths)
    prefix = np.asarray(special.prefix, dtype=np.int64)
    suffix = np.asarray(special.suffix, dtype=np.int64)
    for row in range(batch):
        left, length = int(row_start[row]), int(lengths[row])
        content_end = left + length - n_suffix
        input_ids[row, left : left + n_prefix] = prefix
        input_ids[row, left + n_prefix : content_end] = content_ids[doc[row]][start[row] : end[row]]
        input_ids[row, content_end : left + length] = suffix
        attention_mask[row, left : left + length] = 1
    features = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "content_offset": row_start + n_prefix,
    }
    if special.token_type_id is not None:
        features["token_type_ids"] = np.full((batch, width), special.token_type_id, dtype=np.int64)
    return features
