"""Cluster ids for documents no session has clustered: `driftlane assign`.

The ids come from one published session (the latest, or `--session N`): the encoder it
published (`flows.api.session_encoder`), its chunking, and the centroids of its clustered
memory, in the space and by the distance the memory clusters with (`tasks.cluster_lookup`).
The input is checked by a session corpus's rules (`tasks.ingest.read_corpus_file`) before the
encoder loads. No session is published and nothing is written to the store.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from driftlane.flows.cli import StoreOpt, _existing_store, _progress_bars, app
from driftlane.flows.cli_errors import command, fail
from driftlane.flows.cli_model import SessionOpt
from driftlane.infra.io import write_atomically

MEMORY_STATE = "memory/state.json"


@app.command("assign")
@command
def assign(
    store: StoreOpt,
    docs: Annotated[str, typer.Option(
        "--in", help="Documents to assign: BEIR corpus lines {\"_id\", \"title\", \"text\"} "
        "(.jsonl, or .jsonl.gz), checked like a session's corpus.jsonl.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Output file: .parquet or .csv (doc_id, cluster_id, distance).")],
    session: SessionOpt = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="Where documents are embedded: auto, cpu, cuda (default: the "
        "session's embedding device).", show_default=False)] = None,
) -> None:
    """Give unseen documents the stable id of their nearest cluster (latest encoder and
    memory, or --session N's); publishes nothing."""
    from driftlane.flows.api import session_encoder
    from driftlane.tasks.cluster_lookup import assign_documents
    from driftlane.tasks.ingest import read_corpus_file
    from driftlane.tasks.memory_state import load_centroids

    if out.suffix not in (".csv", ".parquet"):
        fail(f"{out}: unknown output format {out.suffix!r} (use .csv or .parquet)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _progress_bars(False)  # one summary line; no bars from loading the encoder
    st = _existing_store(store)
    encoder = session_encoder(st, session, device=device)
    manifest = encoder.manifest
    if MEMORY_STATE not in manifest.files:
        fail(f"session #{manifest.index} {manifest.name} has no clustered memory "
             "([memory] enabled was off): no cluster ids to give")
    table = read_corpus_file(docs, encoder.config.ingest.max_document_chars)
    saved = load_centroids(st.session_url(manifest, "memory"))
    assigned = assign_documents(table, saved, encoder.embedding)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        write_atomically(out, lambda tmp: assigned.to_csv(tmp, index=False))
    else:
        write_atomically(out, lambda tmp: assigned.to_parquet(tmp, index=False))
    typer.echo(f"{len(assigned)} documents -> {assigned['cluster_id'].nunique()} of "
               f"{len(saved.centroids)} clusters of session #{manifest.index} {manifest.name} "
               f"(model {manifest.model_version}, {encoder.origin}) -> {out}")
