"""The continual benchmark's cost: work in load-independent units, in all and per session."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from continual_helpers import SESSIONS, timings  # noqa: E402

from benchmarks import (  # noqa: E402
    continual_costs,
    continual_results,
)

# --- work in load-independent units --------------------------------------------------------


def test_tokens_through_windows_by_hand():
    # 96-token windows with 2 special tokens hold 94 content tokens; stride 94 - 16 = 78.
    # 200 tokens: [0, 94), [78, 172), [106, 200) -> 3 x 94 + 3 x 2 = 288
    counts = continual_costs.window_token_counts([200, 50, 0, 94, 95], 96, 16, 2)
    assert counts.tolist() == [288, 52, 2, 96, 192]


def test_encoding_and_training_units_and_their_cost():
    encoded = continual_costs.encoding_units(
        ["d1", "d2", "d3"], [3, 1, 2], {"d1": ("document", 288), "d2": ("query", 12)},
        window_tokens=96)
    # d3 is no text of the stream: its 2 windows count 96 tokens each
    assert encoded == {"texts": 3, "windows": 6, "tokens": 288 + 12 + 2 * 96,
                       "texts_by_kind": {"document": 1, "query": 1, "other": 1}}
    trained = continual_costs.training_units([
        {"steps": 3, "batch_size": 16, "tokens_per_example": 200.5},
        {"steps": 2, "batch_size": 16, "tokens_per_example": 100.0}])
    assert trained == {"steps": 5, "examples": 80, "tokens": 48 * 200.5 + 32 * 100}
    work = {"encoded": encoded, "trained": trained}
    assert continual_costs.cost_token_equivalents(work) == 492 + 3 * 12824
    assert continual_costs.cost_token_equivalents({"encoded": encoded, "trained": None}) \
        is None


def test_training_tokens_cut_each_text_and_count_negatives_the_loss_used():
    from benchmarks.continual_runs import WorkCounter

    class WordTokenizer:  # one token per word
        def __call__(self, texts, **_):
            return {"input_ids": [[7] * len(text.split()) for text in texts]}

    counter = object.__new__(WorkCounter)  # no encoder to load
    counter.tokenizer, counter.n_special = WordTokenizer(), 2
    examples = pd.DataFrame({"anchor": ["a b c", "a " * 20],
                             "positive_key": ["s/1", "s/2"], "negative_key": ["s/2", None]})
    doc_content = {"s/1": 5, "s/2": 30}
    # cut at 10: anchors 5 and 10, positives 7 and 10, the one negative 10
    assert counter._tokens_per_example(examples, doc_content, 10, True) == \
        pytest.approx((5 + 7 + 10 + 10 + 10) / 2)
    assert counter._tokens_per_example(examples, doc_content, 10, False) == \
        pytest.approx((5 + 7 + 10 + 10) / 2)


def test_aggregate_averages_cpu_seconds_and_work():
    def run(cpu, tokens):
        return {"avg_ndcg@10": 0.5, "cpu_s": cpu,
                "work": {"encoded": {"tokens": tokens, "texts_by_kind": {"document": tokens}},
                         "trained": {"steps": 2}, "cost_token_equivalents": tokens}}

    out = continual_results.aggregate_seeds({0: run(100.0, 10), 1: run(300.0, 30)})
    assert out["cpu_s"] == 200.0 and out["std"]["cpu_s"] == pytest.approx(141.42, abs=0.01)
    assert out["work"] == {"encoded": {"tokens": 20.0, "texts_by_kind": {"document": 20.0}},
                           "trained": {"steps": 2.0}, "cost_token_equivalents": 20.0}
    assert continual_results.aggregate_seeds({0: run(1.0, 1), 1: {"cpu_s": 2.0}})["work"] \
        is None  # a seed without counts: no partial mean


# --- cost per session (issue 14) ---------------------------------------------------------------


def test_files_belong_to_the_session_whose_manifest_follows_them():
    published = [100.0, 200.0, 300.0]
    owners = continual_costs.owners_by_time([50.0, 100.0, 100.4, 150.0, 300.2, 999.0],
                                            published)
    assert owners == [0, 0, 0, 1, 2, 2]  # 0.5 s of slack; after the last: the last session
    assert continual_costs.owners_by_time([100.4], published, slack_s=0.0) == [1]
    # a cache shard's name holds its time in nanoseconds; other files use their mtime
    name = "cache/m/c-vec-e1/01700000000123456789-abcdef012345.vectors.npy"
    assert continual_costs.file_time(name, 5.0) == pytest.approx(1_700_000_000.123456789)
    assert continual_costs.file_time("x/manifest.json", 5.0) == 5.0
    assert continual_costs.file_time("x/manifest.json", "yesterday", default=7.0) == 7.0
    with pytest.raises(ValueError, match="no published session"):
        continual_costs.owners_by_time([1.0], [])


def per_session_work():
    """Three sessions' work by hand: cache shards of sessions 0, 2, 2; sessions 0 and 2
    trained; session folders of 1000-1200 bytes; cache files of sessions 0, 0, 1, 2."""
    return continual_costs.per_session_work(
        3, shard_owners=[0, 2, 2],
        shard_units=[{"texts": 2, "tokens": 100}, {"texts": 1, "tokens": 40},
                     {"texts": 3, "tokens": 60}],
        trained={0: {"steps": 2, "batch_size": 16, "tokens_per_example": 10.0},
                 2: {"steps": 1, "batch_size": 16, "tokens_per_example": 20.0}},
        session_bytes=[1000, 1100, 1200], cache_owners=[0, 0, 1, 2],
        cache_file_bytes=[10, 20, 30, 40])


def test_work_and_bytes_per_session_by_hand():
    assert per_session_work() == {
        "encoded_texts": [2, 0, 4], "encoded_tokens": [100, 0, 100],
        "trained_steps": [2, 0, 1], "trained_examples": [32, 0, 16],
        "trained_tokens": [320, 0, 320], "session_bytes": [1000, 1100, 1200],
        "cache_bytes": [30, 30, 40]}


def test_session_costs_sums_and_last_over_second():
    times = continual_costs.per_session_times(
        [timings(10, 20, 2), timings(4, 30, 1), timings(5, 0, 1)], continual_results.STAGES)
    costs = continual_costs.session_costs(SESSIONS, times, {"per_session": per_session_work()})
    assert costs["sessions"] == SESSIONS
    assert costs["embedding_indexing_s"] == [12.0, 5.0, 6.0]
    assert costs["embedding_training_s"] == [30.0, 34.0, 5.0]
    # tokens encoded + 3 x tokens trained
    assert costs["embedding_training_cost"] == [100 + 960, 0, 100 + 960]
    assert costs["bytes_added"] == [1030, 1130, 1240]
    assert costs["cumulative"]["embedding_training_cost"] == 2120
    assert costs["cumulative"]["embedding_indexing_s"] == 23.0
    assert costs["cumulative"]["bytes_added"] == 3400
    flat = costs["last_over_second"]
    assert flat["embedding_indexing_s"] == pytest.approx(1.2)
    assert flat["bytes_added"] == pytest.approx(1240 / 1130, abs=1e-4)
    assert flat["embedding_training_cost"] is None  # the second session cost nothing
    # a session without timings: its seconds, their sum and a ratio through it are unknown
    partial = continual_costs.session_costs(
        SESSIONS, continual_costs.per_session_times([timings(10, 20), timings(4, 30), None],
                                                    continual_results.STAGES), None)
    assert partial["embedding_indexing_s"] == [11.0, 5.0, None]
    assert partial["cumulative"]["embedding_indexing_s"] is None
    assert partial["last_over_second"]["embedding_indexing_s"] is None
    assert partial["bytes_added"] is None and partial["cumulative"]["bytes_added"] is None
    assert continual_costs.session_costs(SESSIONS, None, {"encoded": {}}) is None
    assert continual_costs.last_over_second([5.0]) is None  # one session: no second


def test_aggregate_averages_the_per_session_costs_over_seeds():
    def run(scale):
        work = per_session_work()
        work = {"per_session": {k: [v * scale for v in values] for k, values in work.items()}}
        return {"avg_ndcg@10": 0.5, "sessions": SESSIONS, "work": work,
                "time_s_per_session": continual_costs.per_session_times(
                    [timings(10 * scale, 20), timings(4 * scale, 30), timings(5 * scale, 0)],
                    continual_results.STAGES)}

    out = continual_results.aggregate_seeds({0: run(1), 1: run(3)})
    assert out["work"]["per_session"]["cache_bytes"] == [60.0, 60.0, 80.0]  # mean of x1, x3
    assert out["time_s_per_session"]["embedding"] == [20.0, 8.0, 10.0]
    costs = out["session_costs"]
    assert costs["sessions"] == SESSIONS
    assert costs["embedding_indexing_s"] == [21.0, 9.0, 11.0]
    assert costs["bytes_added"] == [2060.0, 2260.0, 2480.0]
    assert costs["last_over_second"]["embedding_indexing_s"] == pytest.approx(11 / 9, abs=1e-4)
    older = {k: v for k, v in run(1).items() if k != "time_s_per_session"}  # older code
    mixed = continual_results.aggregate_seeds({0: run(1), 1: older})
    assert mixed["time_s_per_session"] is None
    assert mixed["session_costs"]["embedding_indexing_s"] is None
    assert mixed["session_costs"]["bytes_added"] == [1030.0, 1130.0, 1240.0]


class WordTokenizer:  # one token per word
    def __call__(self, texts, **_):
        return {"input_ids": [[7] * len(text.split()) for text in texts]}


def test_work_of_a_hand_made_store_splits_over_its_sessions(tmp_path):
    from benchmarks.continual_runs import WorkCounter
    from driftlane.infra.config import ChunkingConfig
    from driftlane.infra.embedding_cache import EmbeddedTexts, EmbeddingCache
    from driftlane.infra.store import SessionManifest, Store
    from driftlane.tasks.texts import text_digest

    counter = object.__new__(WorkCounter)  # no encoder to load
    counter.tokenizer, counter.n_special, counter._sessions = WordTokenizer(), 2, {}
    counter.window_tokens, counter.overlap_tokens = 96, 16
    store = Store(str(tmp_path / "store"))
    store.ensure()
    cache = EmbeddingCache(store.cache_url, "m1", ChunkingConfig(window_tokens=96,
                                                                  overlap_tokens=16))
    for index, (name, docs) in enumerate({"a": ["one two three", "four"],
                                          "b": ["five six"]}.items()):
        texts = [*docs, f"query of {name}"]
        cache.add([text_digest(t) for t in texts],
                  EmbeddedTexts(np.zeros((len(texts), 4), np.float32),
                                np.ones(len(texts), np.int32)))
        folder = tmp_path / name
        folder.mkdir()
        pd.DataFrame({"doc_id": [str(i) for i in range(len(docs))], "title": [""] * len(docs),
                      "text": docs}).to_parquet(folder / "docs.parquet")
        pd.DataFrame({"query_id": ["q"], "text": [f"query of {name}"]}).to_parquet(
            folder / "queries.parquet")
        store.publish_session(folder, SessionManifest(
            name=name, index=index, digest=f"d{index}", model_version="m1",
            n_docs=len(docs), n_queries=1, config_digest="c"))
        if index == 0:  # the next session writes its cache files after this one's manifest
            time.sleep(continual_costs.CLOCK_SLACK_S + 0.1)
    work = counter.work_of_store(store.url)

    def sizes(folder):
        return {path.name: path.stat().st_size for path in sorted(folder.rglob("*"))
                if path.is_file()}

    # tokens: each content word + 2 special tokens; a: 5 + 3 + 5 (query), b: 4 + 5
    assert work["encoded"]["tokens"] == 22 and work["encoded"]["texts"] == 5
    per = work["per_session"]
    assert per["encoded_tokens"] == [13, 9] and per["encoded_texts"] == [3, 2]
    assert per["trained_tokens"] == [0, 0] and per["trained_steps"] == [0, 0]
    sessions = store.path("sessions")
    assert per["session_bytes"] == [sum(sizes(Path(sessions) / f).values())
                                    for f in sorted(os.listdir(sessions))]
    cache_files = sizes(Path(store.path("cache")))
    shards = sorted({name.split(".")[0] for name in cache_files})
    assert len(shards) == 2
    assert per["cache_bytes"] == [sum(b for n, b in cache_files.items() if n.startswith(s))
                                  for s in shards]
