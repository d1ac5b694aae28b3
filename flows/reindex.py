"""`driftlane reindex`: the `full` index of the latest session, at any time (issue 14).

Aligned and compatible sessions keep the vectors earlier sessions stored (carried by alignment
maps, or trusted to be compatible). A re-index re-embeds every published document with the
latest session's model, builds one shard over the corpus and evaluates every session's test
queries against it: the store then searches exactly as if it had run `full` throughout (an
aligned store trains the same models as a full one, so its re-index equals the full store's
index). Published sessions are never changed: the re-index is published beside them, into
`reindex/<latest session folder>/` (index.faiss, index_ids.parquet, index_blocks.json,
metrics.json, runs.parquet, then reindex.json last), and `tasks.publishing.published_blocks`
prefers it for the latest session, so `search`, `export-model` and the next session use it.
The next session adds its own shard to it as usual.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from driftlane.infra.caching import result_storage_for, scratch_for
from driftlane.infra.config import LockConfig, RunnerConfig, SessionConfig
from driftlane.infra.runners import shard_runner
from driftlane.infra.store import REINDEX_DIR, REINDEX_RECORD, Store, StoreError, normalize_url
from driftlane.infra.writer import held_store_lock, store_writer
from driftlane.tasks.evaluation import evaluate_sessions
from driftlane.tasks.indexing import build_index, reembed_sources
from driftlane.tasks.models import start_model
from driftlane.tasks.publishing import (
    INDEX_BLOCKS,
    index_blocks_record,
    previous_model,
    published_sources,
)
from driftlane.tasks.stage_results import IndexBlock, SearchableIndex


@flow(name="driftlane-reindex", flow_run_name="reindex {store_url}", log_prints=False)
def reindex_flow(store_url: str, lock: LockConfig = LockConfig(),  # noqa: B008
                 runner: RunnerConfig = RunnerConfig(),  # noqa: B008
                 scratch_dir: str | None = None) -> dict:
    """Re-embed the whole corpus with the latest model and publish the latest session's
    `full` index beside it (see the module docstring). Returns the evaluation's metrics."""
    store_url = normalize_url(store_url)
    label = f"flow run {flow_run.id} ({flow_run.name}): reindex"
    with store_writer(store_url, label, lock), shard_runner(runner):
        return _reindex(Store(store_url), scratch_dir)


def _reindex(store: Store, scratch_base: str | None) -> dict:
    logger = get_run_logger()
    manifests = store.check_published()
    if not manifests:
        raise StoreError(f"{store.url}: no published session to re-index")
    last = manifests[-1]
    folder = f"{REINDEX_DIR}/{last.folder}"
    if store.fs.exists(store.path(folder, REINDEX_RECORD)):
        logger.info("session %s is already re-indexed (%s): nothing to do", last.name, folder)
        return {"status": "already-reindexed", "session": last.name, "folder": folder}
    config = SessionConfig.model_validate(store.read_json(last, "config.json"))
    scratch = scratch_for(store, scratch_base)
    results = result_storage_for(store)
    model = start_model(previous_model(store, manifests), config.embedding.model, scratch)
    embedding = config.embedding.model_copy(update={"model": model.path,
                                                    "keep_token_embeddings": False})
    name = f"{last.name} (reindex)"
    reembedded = reembed_sources.with_options(result_storage=results)(
        name, published_sources(store, manifests), embedding, model.version, store.cache_url,
        scratch)
    shard = build_index.with_options(result_storage=results)(
        name, reembedded.sources, config.index, scratch)
    block = IndexBlock(session=last.name, shard=folder, index_url=shard.index_path,
                       ids_url=shard.ids_path, n_docs=shard.n_docs,
                       model_version=model.version, factory=shard.factory)
    searchable = SearchableIndex(blocks=[block])
    evaluation = evaluate_sessions.with_options(result_storage=results)(
        name, searchable, reembedded.sources, embedding, config.evaluation, model.version,
        store.cache_url, scratch)

    local = Path(scratch) / "publish" / f"reindex-{last.folder}"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for rel, path in {"index.faiss": shard.index_path, "index_ids.parquet": shard.ids_path,
                      "metrics.json": evaluation.metrics_path,
                      "runs.parquet": evaluation.runs_path}.items():
        shutil.copy2(path, local / rel)
    (local / INDEX_BLOCKS).write_text(json.dumps(
        index_blocks_record(searchable, "full", model.version), indent=2, sort_keys=True))
    held_store_lock(store.url).check()  # a run that lost the store never writes
    store.publish_reindex(local, last, folder, REINDEX_RECORD,
                          {"model_version": model.version, "n_docs": shard.n_docs,
                           "factory": shard.factory})
    shutil.rmtree(local, ignore_errors=True)
    logger.info("re-indexed %d documents of %d sessions with model %s into %s",
                shard.n_docs, len(manifests), model.version, folder)
    return {"status": "reindexed", "session": last.name, "folder": folder,
            "metrics": evaluation.metrics, "n_docs": shard.n_docs,
            "model_version": model.version}
