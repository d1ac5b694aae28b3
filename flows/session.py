"""One session, in the order of DESIGN.md: ingest, embed, memory, sample, fine-tune, re-embed,
index, evaluate, report, publish.

Every stage is a cached task keyed by content digests and code/config/model versions, with
results persisted in the store: a retry after a failure re-runs only what failed.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from driftlane.flows.index_update import update_index
from driftlane.infra.caching import result_storage_for
from driftlane.infra.config import SessionConfig, StartModel, UpdateMode
from driftlane.infra.runners import shard_runner
from driftlane.infra.store import Store, normalize_url
from driftlane.infra.writer import store_writer
from driftlane.tasks.embedding_stage import embed_documents
from driftlane.tasks.evaluation import evaluate_sessions, report_session
from driftlane.tasks.ingest import ingest_session
from driftlane.tasks.models import start_model
from driftlane.tasks.publishing import plan_session, publish_session, stage_timings, training_files
from driftlane.tasks.session_memory import reembed_memory, update_session_memory
from driftlane.tasks.stage_results import EncoderModel, Source
from driftlane.tasks.training import fine_tune_session, sample_training


def session_run_name() -> str:
    """'<session name> -> <store>', so the UI's run list says which session went where."""
    params = flow_run.parameters
    name = PurePosixPath(str(params["session_url"]).rstrip("/")).name
    return f"{name} -> {normalize_url(params['store_url'])}"


def session_tags(session_url: str, store_url: str) -> list[str]:
    """Tags that let the UI filter runs by store and by session."""
    name = PurePosixPath(str(session_url).rstrip("/")).name
    return ["driftlane", f"store:{normalize_url(store_url)}", f"session:{name}"]


@flow(name="driftlane-session", flow_run_name=session_run_name, log_prints=False)
def session_flow(session_url: str, store_url: str,
                 config: SessionConfig = SessionConfig()) -> dict:  # noqa: B008
    """Run the next session of a store from a BEIR session folder."""
    session_url, store_url = normalize_url(session_url), normalize_url(store_url)
    _tag_this_run(session_tags(session_url, store_url))
    # One writer per store, from planning to publishing (a retry takes it again).
    label = f"flow run {flow_run.id} ({flow_run.name}): session {session_url}"
    with store_writer(store_url, label, config.lock), shard_runner(config.runner):
        return _run_session(session_url, store_url, config)


def _tag_this_run(wanted: list[str]) -> None:
    """Give this flow run the store and session tags when whoever started it did not (a
    `prefect deployment run`, the UI's Run button), so the UI filters every run alike."""
    missing = [t for t in wanted if t not in set(flow_run.tags)]
    if not missing or not flow_run.id:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=[*flow_run.tags, *missing])
    except Exception as exc:  # noqa: BLE001 - tags are a convenience, never a failure
        get_run_logger().warning("could not tag this run with %s: %s", missing, exc)


def _run_session(session_url: str, store_url: str, config: SessionConfig) -> dict:
    logger = get_run_logger()
    store = Store(store_url)
    results = result_storage_for(store)

    limit = config.ingest.max_document_chars
    plan = plan_session(session_url, store_url, config.scratch_dir, limit)
    if plan.status == "published":
        logger.info("session %s (digest %s) is already published in %s as #%d %s: nothing to do",
                    plan.name, plan.digest[:12], store.url, plan.index, plan.published_as)
        return {"status": "already-published", "name": plan.name, "index": plan.index}
    scratch = plan.scratch_dir

    ingested = ingest_session.with_options(result_storage=results)(
        session_url, plan.digest, scratch, limit)
    # The current model: the last session's (the base model for the first session)
    start = start_model(plan.previous_model, config.embedding.model, scratch)
    # Documents that enter memory keep their token embeddings (term-based scoring).
    embedding = config.embedding.model_copy(update={
        "model": start.path,
        "keep_token_embeddings": config.embedding.keep_token_embeddings
        or config.memory.enabled})
    embedded = embed_documents.with_options(result_storage=results)(
        plan.name, ingested, embedding, start.version, store.cache_url, scratch)

    memory = None
    if config.memory.enabled:
        memory = update_session_memory.with_options(result_storage=results)(
            plan.name, ingested, embedded, plan.previous_memory, config.memory, scratch)

    docs_urls = {src.session: src.docs_url for src in plan.previous}
    docs_urls[plan.name] = ingested.docs_path
    final = start
    sampled = trained = None
    compatible = config.update.mode == UpdateMode.compatible
    if config.finetune.enabled and memory is not None:
        sampled = sample_training.with_options(result_storage=results)(
            plan.name, ingested, embedded, memory, docs_urls, plan.previous_training,
            config.sampling, config.finetune, embedding, start.version, store.cache_url,
            scratch, stored_vectors=compatible)
        # DESIGN 8 trains the current model; joint retraining starts again from the base model
        init = (start if config.finetune.start_from == StartModel.previous
                else start_model(None, config.embedding.model, scratch))
        trained = fine_tune_session.with_options(result_storage=results)(
            plan.name, sampled, config.finetune, init, scratch,
            config.update.compatibility_weight if compatible else None)
        final = EncoderModel(path=trained.model_path, version=trained.model_version)
    elif config.finetune.enabled:
        logger.warning("fine-tuning needs the clustered memory (memory.enabled): skipped")
    final_embedding = embedding.model_copy(update={"model": final.path,
                                                   "keep_token_embeddings": False})

    # DESIGN 9: vectors from an older model are stale. `[update] mode` says what follows:
    # full re-embeds everything; aligned and compatible keep what earlier sessions stored.
    new_source = Source(session=plan.name, docs_url=ingested.docs_path,
                        vectors_url=embedded.vectors_path, model_version=start.version,
                        queries_url=ingested.queries_path, qrels_url=ingested.qrels_path)
    changed = final.version != start.version
    clustered = memory  # what the clustering stage computed (its cost is reported below)
    known = None
    if memory is not None and changed:
        memory = reembed_memory.with_options(result_storage=results)(
            plan.name, memory, docs_urls, embedding.model_copy(update={"model": final.path}),
            final.version, store.cache_url, scratch)
        known = memory.member_vectors()
    start_embedding = embedding.model_copy(update={"keep_token_embeddings": False})
    update = update_index(plan, config, new_source, start, final, start_embedding,
                          final_embedding, clustered, known, store.cache_url, results)
    sources = [*plan.previous, update.own_vectors]
    # DESIGN 10: every session so far, on its own test queries, against the whole corpus
    evaluation = evaluate_sessions.with_options(result_storage=results)(
        plan.name, update.searchable, sources, final_embedding, config.evaluation,
        final.version, store.cache_url, scratch)

    # What training bought: the starting model on the same sessions. Its vectors exist
    # already (the new documents were embedded with it, earlier ones are stored or in the
    # cache), so this costs a query pass, not a corpus pass.
    before = None
    if changed:
        before = evaluate_sessions.with_options(result_storage=results)(
            plan.name, update.searchable_before, [*plan.previous, new_source],
            start_embedding, config.evaluation, start.version, store.cache_url, scratch)

    timings = stage_timings(embedded, clustered, memory if memory is not clustered else None,
                            sampled, trained, update.reembedded, update.indexing, evaluation,
                            before)
    report = report_session(plan.name, plan.previous, evaluation,
                            memory.cluster_report_path if memory else None, timings, scratch,
                            before)
    extra = {**report.files, **training_files(sampled, trained), **update.files}
    manifest = publish_session(plan, ingested, update.own_vectors, update.shard,
                               update.searchable, evaluation, config, final.version, memory,
                               extra)
    return {"status": "published", "name": manifest.name, "index": manifest.index,
            "metrics": evaluation.metrics, "model_version": final.version,
            "summary": report.summary, "timings": timings}
