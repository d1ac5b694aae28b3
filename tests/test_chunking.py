"""Token windows: span properties against brute force, special tokens once per window."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from driftlane.tasks.chunking import (
    SpecialTokens,
    build_window_batch,
    special_tokens_of,
    tokenize_content,
    window_input_ids,
    window_spans,
    window_table,
)

SIZES = [*range(0, 80), 97, 128, 253, 254, 255, 256, 509, 1000, 4321]
WINDOWS = [(1, 0), (2, 0), (2, 1), (5, 0), (5, 3), (7, 6), (62, 16), (254, 64), (254, 0)]


def _check_spans(n: int, per_window: int, overlap: int, spans: list[tuple[int, int]]) -> None:
    if n == 0:
        assert spans == [(0, 0)]
        return
    assert spans[0][0] == 0 and spans[-1][1] == n
    covered = np.zeros(n, dtype=int)
    for start, end in spans:
        assert 0 <= start < end <= n
        assert end - start == min(per_window, n)  # full windows only, no tiny tail
        covered[start:end] += 1
    assert covered.min() >= 1
    for (s0, e0), (s1, e1) in zip(spans, spans[1:], strict=False):
        assert s0 < s1 and e0 < e1
        shared = e0 - s1
        if (s1, e1) == spans[-1]:
            assert overlap <= shared < per_window  # shifted back to end at n
        else:
            assert shared == overlap
    # No more windows than needed: without the last one, the tail would be uncovered.
    if len(spans) > 1:
        assert spans[-2][1] < n


@pytest.mark.parametrize(("per_window", "overlap"), WINDOWS)
def test_window_spans_cover_every_token_with_exact_overlap(per_window: int, overlap: int) -> None:
    for n in SIZES:
        _check_spans(n, per_window, overlap, window_spans(n, per_window, overlap))


def test_short_and_empty_documents_get_one_window() -> None:
    assert window_spans(0, 254, 64) == [(0, 0)]
    assert window_spans(1, 254, 64) == [(0, 1)]
    assert window_spans(254, 254, 64) == [(0, 254)]
    assert window_spans(255, 254, 64) == [(0, 254), (1, 255)]
    assert window_spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert window_spans(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (7, 11)]


def test_window_table_matches_per_document_spans() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 900, size=200)
    table = window_table(lengths, 62, 16)
    assert table.n_windows.tolist() == [len(window_spans(int(n), 62, 16)) for n in lengths]
    expected = [(d, s, e) for d, n in enumerate(lengths) for s, e in window_spans(int(n), 62, 16)]
    got = list(zip(table.doc.tolist(), table.start.tolist(), table.end.tolist(), strict=True))
    assert got == expected


@pytest.mark.parametrize(("per_window", "overlap"), [(0, 0), (4, 4), (4, 5), (4, -1)])
def test_window_spans_rejects_windows_that_do_not_advance(per_window: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        window_spans(10, per_window, overlap)


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def test_window_ids_carry_special_tokens_exactly_once(bert_tokenizer) -> None:
    special = special_tokens_of(bert_tokenizer)
    assert special.prefix == (bert_tokenizer.cls_token_id,)
    assert special.suffix == (bert_tokenizer.sep_token_id,)
    assert special.count == bert_tokenizer.num_special_tokens_to_add(pair=False)
    text = " ".join(f"passage {i} of the retrieval test corpus." for i in range(60))
    (content,) = tokenize_content(bert_tokenizer, [text])
    assert content.shape[0] > 300
    spans = window_spans(content.shape[0], 62, 16)
    specials = set(bert_tokenizer.all_special_ids)
    for (start, end), ids in zip(spans, window_input_ids(content, spans, special), strict=True):
        assert ids[0] == bert_tokenizer.cls_token_id and ids[-1] == bert_tokenizer.sep_token_id
        assert sum(token in specials for token in ids) == 2
        assert ids[1:-1] == content[start:end].tolist()
        assert len(ids) == end - start + 2 <= 64
    # A short text's single window is exactly what the tokenizer itself produces.
    short = "hello world, a short document"
    (short_ids,) = tokenize_content(bert_tokenizer, [short])
    spans = window_spans(short_ids.shape[0], 62, 16)
    assert window_input_ids(short_ids, spans, special) == [bert_tokenizer(short)["input_ids"]]


def test_long_text_tokenized_without_truncation_or_warning(bert_tokenizer, caplog) -> None:
    fresh = AutoTokenizer.from_pretrained(bert_tokenizer.name_or_path)  # warns once per instance
    text = "token " * 1000
    with caplog.at_level(logging.WARNING):
        (ids,) = tokenize_content(fresh, [text])
    assert ids.shape == (1000,)
    assert "longer than the specified maximum" not in caplog.text
    with caplog.at_level(logging.WARNING):
        fresh(text)  # the plain call does warn: the check above can fail
    assert "longer than the specified maximum" in caplog.text


def _template_tokenizer(single: str) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5, "again": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.mark.parametrize(
    ("single", "prefix", "suffix"),
    [("<s> $A </s> </s>", (1,), (2, 2)), ("$A </s>", (), (2,)), ("<s> <s> $A", (1, 1), ())],
)
def test_special_tokens_read_from_any_template(single, prefix, suffix) -> None:
    tokenizer = _template_tokenizer(single)
    special = special_tokens_of(tokenizer)
    assert (special.prefix, special.suffix, special.pad_id) == (prefix, suffix, 0)
    (content,) = tokenize_content(tokenizer, ["hello world again hello"])
    ids = window_input_ids(content, [(0, 4)], special)
    assert ids == [tokenizer("hello world again hello")["input_ids"]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_window_batch_pads_to_longest_window(side: str) -> None:
    special = SpecialTokens(
        prefix=(101,), suffix=(102,), pad_id=0, padding_side=side, token_type_id=0
    )
    content = [np.arange(10, 20), np.arange(30, 33)]
    batch = build_window_batch(
        content, np.array([0, 1, 0]), np.array([0, 0, 6]), np.array([6, 3, 10]), special
    )
    assert batch["input_ids"].shape == (3, 8)
    rows = [[101, 10, 11, 12, 13, 14, 15, 102], [101, 30, 31, 32, 102], [101, 16, 17, 18, 19, 102]]
    for row, ids in enumerate(rows):
        width = len(ids)
        mask = batch["attention_mask"][row]
        assert mask.sum() == width
        kept = batch["input_ids"][row][mask == 1].tolist()
        assert kept == ids
        assert (batch["input_ids"][row][mask == 0] == 0).all()
        offset = batch["content_offset"][row]
        assert batch["input_ids"][row][offset] == ids[1]
        if side == "left":
            assert mask[-width:].all()
        else:
            assert mask[:width].all()
    assert (batch["token_type_ids"] == 0).all()
