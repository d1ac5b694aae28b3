"""One session: ingest -> embed -> memory -> index -> evaluate -> publish (DESIGN 1-6, 9-11).

Every stage is a cached task keyed by content digests and code/config/model versions, with
results persisted in the store: a retry after a failure re-runs only what failed.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from infra.caching import result_storage_for
from infra.config import SessionConfig
from infra.store import Store, normalize_url
from tasks.embedding import embed_documents, encoder_version
from tasks.evaluation import evaluate_sessions
from tasks.indexing import build_index
from tasks.ingest import ingest_session
from tasks.publishing import plan_session, publish_session
from tasks.session_memory import update_session_memory


def session_run_name() -> str:
    """'<session name> -> <store>', so the UI's run list says which session went where."""
    params = flow_run.parameters
    name = PurePosixPath(str(params["session_url"]).rstrip("/")).name
    return f"{name} -> {normalize_url(params['store_url'])}"


@flow(name="driftlane-session", flow_run_name=session_run_name, log_prints=False)
def session_flow(session_url: str, store_url: str,
                 config: SessionConfig = SessionConfig()) -> dict:  # noqa: B008
    """Run the next session of a store from a BEIR session folder."""
    logger = get_run_logger()
    session_url, store_url = normalize_url(session_url), normalize_url(store_url)
    store = Store(store_url)
    results = result_storage_for(store)

    plan = plan_session(session_url, store_url, config.scratch_dir)
    if plan["status"] == "published":
        logger.info("session %s (digest %s) is already published in %s as #%d %s: nothing to do",
                    plan["name"], plan["digest"][:12], store.url, plan["index"],
                    plan["published_as"])
        return {"status": "already-published", "name": plan["name"], "index": plan["index"]}
    scratch = plan["scratch_dir"]

    ingested = ingest_session.with_options(result_storage=results)(
        session_url, plan["digest"], scratch)
    model_version = encoder_version(config.embedding.model)
    # Documents that enter memory keep their token embeddings (term-based scoring).
    embedding = config.embedding.model_copy(update={
        "keep_token_embeddings": config.embedding.keep_token_embeddings
        or config.memory.enabled})
    embedded = embed_documents.with_options(result_storage=results)(
        plan["name"], ingested, embedding, model_version, store.cache_url, scratch)
    memory = None
    if config.memory.enabled:
        memory = update_session_memory.with_options(result_storage=results)(
            plan["name"], ingested, embedded, plan["previous_memory"], config.memory, scratch)

    new_source = {"session": plan["name"], "docs_url": ingested["docs_path"],
                  "vectors_url": embedded["vectors_path"],
                  "queries_url": ingested["queries_path"], "qrels_url": ingested["qrels_path"]}
    sources = [*plan["previous"], new_source]
    index = build_index.with_options(result_storage=results)(plan["name"], sources, scratch)
    evaluation = evaluate_sessions.with_options(result_storage=results)(
        plan["name"], index, sources, config.embedding, config.evaluation, model_version,
        store.cache_url, scratch)

    manifest = publish_session(plan, ingested, embedded, index, evaluation, config,
                               model_version, memory)
    return {"status": "published", "name": manifest["name"], "index": manifest["index"],
            "metrics": evaluation["metrics"]}
