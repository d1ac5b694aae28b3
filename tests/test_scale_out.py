"""Sharded embedding on the task runner chosen in config: threads, or a local Dask cluster."""

from __future__ import annotations

import numpy as np
import pytest
from malformed_sessions import write_valid_session
from test_session_flow import published_files

from driftlane.flows.session import session_flow
from driftlane.infra.config import RunnerConfig, RunnerKind, SessionConfig
from driftlane.infra.runners import current_runner, map_shards, shard_runner, split

pytestmark = pytest.mark.usefixtures("prefect_harness", "scratch")


def test_split_covers_every_item_once_in_order():
    assert split(0, 4) == []
    assert split(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert [i for r in split(7, 1) for i in r] == list(range(7))


def test_map_shards_needs_a_runner_and_returns_results_in_shard_order():
    from prefect import task

    @task
    def double(x: int) -> int:
        return 2 * x

    with pytest.raises(RuntimeError, match="shard_runner"):
        map_shards(double, [{"x": 1}])
    assert current_runner() is None
    done: list[int] = []
    with shard_runner(RunnerConfig(max_workers=3)):
        assert current_runner().max_workers == 3
        out = map_shards(double, [{"x": i} for i in range(6)], lambda i, _r: done.append(i))
    assert out == [0, 2, 4, 6, 8, 10]
    assert sorted(done) == list(range(6))
    assert current_runner() is None


def _vectors(store) -> dict[str, bytes]:
    return {name: data for name, data in published_files(store).items()
            if name.endswith((".npy",))}


def test_dask_cluster_of_two_workers_embeds_exactly_like_the_flow_process(tmp_path):
    """The whole session flow, once with threads and once on a local Dask cluster of 2 worker
    processes, 3 shards each: every published vector and token file is byte-identical."""
    session = write_valid_session(tmp_path / "in" / "alpha", n_docs=11, name_prefix="a")
    base = {"finetune": {"enabled": False}}
    threads = SessionConfig.model_validate({**base, "runner": {"shard_docs": 4}})
    dask = SessionConfig.model_validate({**base, "runner": {
        "kind": RunnerKind.dask, "shard_docs": 4, "dask_workers": 2}})
    assert threads.digest() == dask.digest()  # the runner is not part of the result

    a = session_flow(str(session), str(tmp_path / "threads"), threads, return_state=True)
    b = session_flow(str(session), str(tmp_path / "dask"), dask, return_state=True)
    assert a.is_completed() and b.is_completed()
    left, right = _vectors(tmp_path / "threads"), _vectors(tmp_path / "dask")
    assert any(name.endswith("doc_vectors.npy") for name in left)
    assert any("memory/" in name for name in left)  # token embeddings of memory documents
    assert left == right
    vectors = np.load(next((tmp_path / "dask" / "sessions").glob("*/doc_vectors.npy")))
    assert vectors.shape[0] == 11 and np.isfinite(vectors).all()


def test_stage_embeds_only_what_the_cache_lacks_and_loads_no_encoder_when_all_cached(
        tmp_path, minilm_path, monkeypatch):
    import driftlane.tasks.embedding_stage as embedding_module
    from driftlane.infra.config import ChunkingConfig, EmbeddingConfig
    from driftlane.infra.embedding_cache import EmbeddingCache
    from driftlane.tasks.embedding_stage import embed_stage

    chunking = ChunkingConfig(window_tokens=32, overlap_tokens=8)
    embedding = EmbeddingConfig(model=minilm_path, device="cpu", chunking=chunking)
    texts = ["cats purr", "dogs bark", "cats purr", "fish swim", "birds sing", "owls hoot"]
    cache = EmbeddingCache(str(tmp_path / "cache"), "v1", chunking)
    with shard_runner(RunnerConfig(shard_docs=2)):
        first, n_embedded = embed_stage("unit", texts, embedding, cache)
    assert n_embedded == 5  # distinct texts, in 3 shards
    assert first.vectors.shape == (6, 384)
    np.testing.assert_array_equal(first.vectors[0], first.vectors[2])
    assert len(list((tmp_path / "cache").rglob("*.digests.parquet"))) == 3

    loads = []
    monkeypatch.setattr(embedding_module, "load_encoder", lambda *a: loads.append(a))
    with shard_runner(RunnerConfig(shard_docs=2)):
        again, n_again = embed_stage("unit", texts[::-1], embedding, cache)
    again_plain, n_plain = embed_stage("unit", texts, embedding, cache)  # no runner
    assert n_again == n_plain == 0 and loads == []
    np.testing.assert_array_equal(again.vectors, first.vectors[::-1])
    np.testing.assert_array_equal(again_plain.vectors, first.vectors)
