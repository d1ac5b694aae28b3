"""Windowed document embeddings against `model.encode`, and the content-addressed cache."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
import uuid
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from driftlane.infra import embedding_cache as cache_module
from driftlane.infra.config import ChunkingConfig, WindowPooling
from driftlane.infra.embedding_cache import EmbeddingCache
from driftlane.tasks import embedding as embedding_module
from driftlane.tasks.chunking import tokenize_content, window_spans
from driftlane.tasks.embedding import embed_texts
from driftlane.tasks.embedding_stage import embed_with_cache
from driftlane.tasks.models import model_version, resolve_model_path
from driftlane.tasks.texts import document_text, text_digest


def _read_corpus(path: Path, limit: int | None = None) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = (json.loads(line) for line in handle)
        return [document_text(row["title"], row["text"]) for row in islice(rows, limit)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


@pytest.fixture(scope="module")
def cisi_texts(datasets_dir: Path) -> list[str]:
    return _read_corpus(datasets_dir / "cisi" / "corpus.jsonl", limit=200)


# --- identity helpers ---------------------------------------------------------------------


def test_document_text_and_digest() -> None:
    assert document_text("Title", "Body text") == "Title Body text"
    assert document_text("", "Body text") == "Body text"
    assert document_text("Only title", "") == "Only title"
    assert text_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_resolve_model_path(minilm_path: str, tmp_path: Path, monkeypatch) -> None:
    assert (Path(minilm_path) / "config.json").is_file()
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "enc").mkdir(parents=True)
    assert resolve_model_path("~/models/enc") == str(tmp_path / "models" / "enc")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model_path("~/no-such-model")


def test_model_version_tracks_weights_and_configs_only(tmp_path: Path) -> None:
    def folder(name: str, weights: bytes, config: str, readme: str) -> str:
        root = tmp_path / name
        (root / "1_Pooling").mkdir(parents=True)
        (root / "model.safetensors").write_bytes(weights)
        (root / "1_Pooling" / "config.json").write_text(config)
        (root / "README.md").write_text(readme)
        (root / ".gitattributes").write_text(readme)
        return str(root)

    base = model_version(folder("a", b"\x00\x01", '{"mean": true}', "card"))
    assert len(base) == 16 and int(base, 16) >= 0
    assert model_version(folder("b", b"\x00\x01", '{"mean": true}', "other card")) == base
    assert model_version(folder("c", b"\x00\x02", '{"mean": true}', "card")) != base
    assert model_version(folder("d", b"\x00\x01", '{"mean": false}', "card")) != base
    assert model_version("default") == model_version("default")


# --- embed_texts -------------------------------------------------------------------------


def test_short_texts_equal_model_encode(encoder, cisi_texts) -> None:
    fits = [t for t in cisi_texts if len(tokenize_content(encoder.tokenizer, [t])[0]) <= 254]
    texts = [fits[0], fits[1][:40], "retrieval", fits[2], "", fits[3][:300]]
    expected = encoder.encode(texts, normalize_embeddings=True)  # (6, 384)
    for pooling, batch_size in [(WindowPooling.mean, 32), (WindowPooling.max, 2)]:
        got = embed_texts(encoder, texts, ChunkingConfig(pooling=pooling), batch_size=batch_size)
        assert got.vectors.dtype == np.float32 and got.vectors.shape == expected.shape
        assert got.n_windows.tolist() == [1] * len(texts) and got.n_windows.dtype == np.int32
        assert got.token_embeddings is None
        assert _cosines(got.vectors, expected).min() > 0.9999
    assert not encoder.training


def _single_token_words(tokenizer, count: int, seed: int) -> list[str]:
    pool = (
        "the cat sat on a mat while dogs ran far away from home and people read books about "
        "science history music art water fire earth light dark night day time world city"
    ).split()
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in pool)
    return np.random.default_rng(seed).choice(pool, size=count).tolist()


def test_windows_match_brute_force_encoding(encoder) -> None:
    """Each window embedded on its own by model.encode, pooled by hand, equals embed_texts."""
    words = _single_token_words(encoder.tokenizer, 300, seed=1)
    chunking = ChunkingConfig(window_tokens=64, overlap_tokens=16)
    spans = window_spans(len(words), 62, 16)
    window_texts = [" ".join(words[start:end]) for start, end in spans]
    window_vectors = encoder.encode(window_texts, normalize_embeddings=True)  # (w, 384)
    window_tokens = encoder.encode(window_texts, output_value="token_embeddings")
    token_sum = np.zeros((len(words), 384))
    token_count = np.zeros(len(words))
    for (start, end), tokens in zip(spans, window_tokens, strict=True):
        token_sum[start:end] += tokens[1:-1].numpy()  # drop [CLS] and [SEP]
        token_count[start:end] += 1
    references = {
        WindowPooling.mean: window_vectors.mean(0),
        WindowPooling.max: window_vectors.max(0),
        WindowPooling.first: window_vectors[0],
    }
    for pooling, reference in references.items():
        got = embed_texts(
            encoder,
            [" ".join(words)],
            chunking.model_copy(update={"pooling": pooling}),
            batch_size=4,
            keep_token_embeddings=pooling == WindowPooling.mean,
        )
        assert got.n_windows.tolist() == [len(spans)]
        assert _cosines(got.vectors[0], reference) > 0.9999
        if got.token_embeddings is not None:
            expected_tokens = token_sum / token_count[:, None]
            (tokens,) = got.token_embeddings
            assert tokens.dtype == np.float16 and tokens.shape == (len(words), 384)
            assert np.abs(tokens.astype(np.float32) - expected_tokens).max() < 2e-2


@pytest.fixture(scope="module")
def long_document(datasets_dir: Path) -> str:
    words: list[str] = []
    for text in _read_corpus(datasets_dir / "scifact" / "corpus.jsonl", limit=40):
        words.extend(text.split())
    assert len(words) >= 2000
    return " ".join(words[:2000])


def test_long_document_windows_and_pooling(encoder, long_document) -> None:
    n_tokens = tokenize_content(encoder.tokenizer, [long_document])[0].shape[0]
    spans = window_spans(n_tokens, 254, 64)
    assert len(spans) > 10
    results = {
        pooling: embed_texts(
            encoder,
            [long_document],
            ChunkingConfig(pooling=pooling),
            keep_token_embeddings=pooling == WindowPooling.mean,
        )
        for pooling in WindowPooling
    }
    for result in results.values():
        assert result.n_windows.tolist() == [len(spans)]
        assert np.linalg.norm(result.vectors[0]) == pytest.approx(1.0, abs=1e-5)
    vectors = [results[p].vectors[0] for p in WindowPooling]
    for i in range(3):
        for j in range(i + 1, 3):
            assert _cosines(vectors[i], vectors[j]) < 0.999
    # The first window is exactly what model.encode sees when it truncates to 256 tokens.
    truncated = encoder.encode(long_document, normalize_embeddings=True)
    assert _cosines(results[WindowPooling.first].vectors[0], truncated) > 0.9999
    (tokens,) = results[WindowPooling.mean].token_embeddings
    assert tokens.shape == (n_tokens, 384) and tokens.dtype == np.float16
    # Every content token lies in some window: no row is left at zero.
    assert (np.abs(tokens).max(axis=1) > 0).all()


def test_window_longer_than_model_is_capped(encoder, long_document, caplog) -> None:
    text = " ".join(long_document.split()[:450])
    n_tokens = tokenize_content(encoder.tokenizer, [text])[0].shape[0]
    chunking = ChunkingConfig(window_tokens=512, overlap_tokens=64, pooling=WindowPooling.first)
    with caplog.at_level(logging.WARNING, logger="driftlane.tasks.embedding"):
        got = embed_texts(encoder, [text], chunking)
    assert "max_seq_length=256" in caplog.text
    assert got.n_windows.tolist() == [len(window_spans(n_tokens, 254, 64))] and n_tokens > 256
    assert _cosines(got.vectors[0], encoder.encode(text, normalize_embeddings=True)) > 0.9999


def test_empty_input(encoder) -> None:
    got = embed_texts(encoder, [], ChunkingConfig(), keep_token_embeddings=True)
    assert got.vectors.shape == (0, 384) and got.n_windows.shape == (0,)
    assert got.token_embeddings == []


class _PeakRss:
    """Samples this process' resident memory in a thread; `growth` is peak minus start."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def test_170k_word_document_in_bounded_memory(encoder, datasets_dir: Path) -> None:
    """The longest FIRE 2017 case (169k words), topped up to 170,000 words from the next."""
    texts = _read_corpus(datasets_dir / "fire2017_irled_task2" / "corpus.jsonl.gz")
    texts.sort(key=lambda t: len(t.split()), reverse=True)
    words = texts[0].split() + texts[1].split()
    document = " ".join(words[:170_000])
    del texts, words
    started = time.perf_counter()
    with _PeakRss() as rss:
        got = embed_texts(encoder, [document], ChunkingConfig())
    elapsed = time.perf_counter() - started
    n_tokens = tokenize_content(encoder.tokenizer, [document])[0].shape[0]
    assert got.n_windows.tolist() == [len(window_spans(n_tokens, 254, 64))]
    assert np.linalg.norm(got.vectors[0]) == pytest.approx(1.0, abs=1e-5)
    # All windows' hidden states at once would be ~0.45 GB (float32), all layers far more.
    assert rss.growth < 1 << 30, f"peak RSS grew by {rss.growth / 2**20:.0f} MiB"
    logging.getLogger(__name__).info(
        "170k words: %d tokens, %d windows, %.1f s, peak RSS +%.0f MiB",
        n_tokens,
        got.n_windows[0],
        elapsed,
        rss.growth / 2**20,
    )


# --- cache -------------------------------------------------------------------------------

SMALL = ChunkingConfig(window_tokens=32, overlap_tokens=8)


@pytest.fixture(params=["memory", "local"])
def cache_root(request, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://driftlane-test-{uuid.uuid4().hex}"
    return str(tmp_path / "cache")


@pytest.mark.parametrize("keep_tokens", [False, True])
def test_second_call_embeds_nothing(encoder, cisi_texts, cache_root: str, keep_tokens) -> None:
    texts = [cisi_texts[0], cisi_texts[1][:200], cisi_texts[0], "", cisi_texts[2][:90]]
    cache = EmbeddingCache(cache_root, "m1", SMALL, keep_token_embeddings=keep_tokens)
    first, embedded = embed_with_cache(
        encoder, texts, SMALL, cache, keep_token_embeddings=keep_tokens
    )
    assert embedded == 4  # the duplicate is embedded once
    assert np.array_equal(first.vectors[0], first.vectors[2])
    direct = embed_texts(encoder, texts, SMALL, keep_token_embeddings=keep_tokens)
    assert _cosines(first.vectors, direct.vectors).min() > 0.9999
    assert first.n_windows.tolist() == direct.n_windows.tolist()

    reopened = EmbeddingCache(cache_root, "m1", SMALL, keep_token_embeddings=keep_tokens)
    second, embedded = embed_with_cache(
        encoder, texts, SMALL, reopened, keep_token_embeddings=keep_tokens
    )
    assert embedded == 0
    assert np.array_equal(second.vectors, first.vectors)
    assert np.array_equal(second.n_windows, first.n_windows)
    if keep_tokens:
        assert [t.shape for t in second.token_embeddings] == [
            t.shape for t in first.token_embeddings
        ]
        for a, b in zip(second.token_embeddings, first.token_embeddings, strict=True):
            assert a.dtype == np.float16 and np.array_equal(a, b)
    else:
        assert second.token_embeddings is None


def test_partial_hits_embed_only_new_texts(encoder, cisi_texts, cache_root: str) -> None:
    a, b, c, d = (t[:150] for t in cisi_texts[10:14])
    cache = EmbeddingCache(cache_root, "m1", SMALL)
    embed_with_cache(encoder, [a, b], SMALL, cache)
    got, embedded = embed_with_cache(encoder, [b, c, a, d, c], SMALL, cache)
    assert embedded == 2
    direct = embed_texts(encoder, [b, c, a, d, c], SMALL)
    assert _cosines(got.vectors, direct.vectors).min() > 0.9999
    _, embedded = embed_with_cache(encoder, [d, c, b, a], SMALL, cache)
    assert embedded == 0


def test_other_config_or_model_version_misses(encoder, cisi_texts, cache_root: str) -> None:
    texts = [t[:120] for t in cisi_texts[20:23]]
    embed_with_cache(encoder, texts, SMALL, EmbeddingCache(cache_root, "m1", SMALL))
    other_chunking = ChunkingConfig(window_tokens=32, overlap_tokens=4)
    other_pooling = SMALL.model_copy(update={"pooling": WindowPooling.max})
    for version, chunking, keep in [
        ("m2", SMALL, False),
        ("m1", other_chunking, False),
        ("m1", other_pooling, False),
        ("m1", SMALL, True),
    ]:
        cache = EmbeddingCache(cache_root, version, chunking, keep_token_embeddings=keep)
        found, _ = cache.lookup([text_digest(t) for t in texts])
        assert not found.any(), (version, chunking, keep)
    found, hits = EmbeddingCache(cache_root, "m1", SMALL).lookup(
        [text_digest(texts[2]), text_digest("never seen"), text_digest(texts[0])]
    )
    assert found.tolist() == [True, False, True] and hits.vectors.shape == (2, 384)


def test_cache_layout_and_safe_formats(encoder, cisi_texts, tmp_path: Path) -> None:
    cache = EmbeddingCache(str(tmp_path), "m1", SMALL, keep_token_embeddings=True)
    got, _ = embed_with_cache(encoder, cisi_texts[:3], SMALL, cache, keep_token_embeddings=True)
    (folder,) = (tmp_path / "m1").iterdir()
    assert folder.name.startswith(SMALL.digest())
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 3 and not any(".tmp-" in n for n in names)
    shard = names[0].split(".")[0]
    assert names == [f"{shard}.digests.parquet", f"{shard}.tokens.npy", f"{shard}.vectors.npy"]
    vectors = np.load(folder / f"{shard}.vectors.npy", allow_pickle=False)
    tokens = np.load(folder / f"{shard}.tokens.npy", allow_pickle=False)
    assert vectors.dtype == np.float32 and np.array_equal(vectors, got.vectors)
    assert tokens.dtype == np.float16
    assert np.array_equal(tokens, np.concatenate(got.token_embeddings))


def test_shard_without_parquet_is_ignored(
    encoder, cisi_texts, cache_root: str, monkeypatch
) -> None:
    texts = [t[:100] for t in cisi_texts[30:33]]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(cache_module.pq, "write_table", crash)
        with pytest.raises(OSError, match="disk full"):
            embed_with_cache(encoder, texts, SMALL, EmbeddingCache(cache_root, "m1", SMALL))
    cache = EmbeddingCache(cache_root, "m1", SMALL)
    leftovers = cache.fs.ls(cache.folder, detail=False)
    assert [p for p in leftovers if p.endswith(".vectors.npy")]  # the vectors did land
    assert not [p for p in leftovers if ".tmp-" in p]
    found, _ = cache.lookup([text_digest(t) for t in texts])
    assert not found.any()
    _, embedded = embed_with_cache(encoder, texts, SMALL, cache)  # resume
    assert embedded == 3
    _, embedded = embed_with_cache(encoder, texts, SMALL, EmbeddingCache(cache_root, "m1", SMALL))
    assert embedded == 0


def test_cache_mismatch_is_refused(encoder, cache_root: str) -> None:
    cache = EmbeddingCache(cache_root, "m1", SMALL, keep_token_embeddings=False)
    with pytest.raises(ValueError, match="token embeddings"):
        embed_with_cache(encoder, ["x"], SMALL, cache, keep_token_embeddings=True)
    with pytest.raises(ValueError, match="chunking"):
        embed_with_cache(encoder, ["x"], ChunkingConfig(), cache)


def test_texts_split_into_groups_give_the_same_result(encoder, cisi_texts, monkeypatch) -> None:
    texts = [t[:400] for t in cisi_texts[40:47]]
    whole = embed_texts(encoder, texts, SMALL, keep_token_embeddings=True)
    monkeypatch.setattr(embedding_module, "_GROUP_CHARS", 700)
    monkeypatch.setattr(embedding_module, "_GROUP_TEXTS", 3)
    groups = embedding_module._text_groups(texts)
    assert len(groups) >= 3 and [i for g in groups for i in g] == list(range(len(texts)))
    assert all(len(g) <= 3 for g in groups)
    split = embed_texts(encoder, texts, SMALL, keep_token_embeddings=True)
    assert _cosines(whole.vectors, split.vectors).min() > 0.9999
    assert whole.n_windows.tolist() == split.n_windows.tolist()
    for a, b in zip(whole.token_embeddings, split.token_embeddings, strict=True):
        assert a.shape == b.shape and np.abs(a.astype(np.float32) - b).max() < 1e-2
