"""The `driftlane` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from infra.config import ConfigError, load_config
from infra.store import Store, StoreError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Keep a retrieval encoder good while its corpus keeps changing.")

StoreOpt = Annotated[str, typer.Option("--store", help="Store URL (local folder or fsspec URL).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Config file (TOML/YAML/JSON).")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _run_flows(session_urls: list[str], store: str, config_path: Path | None) -> list[dict]:
    # Models load from local folders only; the temporary Prefect server must not try to
    # phone home from machines without internet.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without a server, Prefect starts a temporary one; its first start on a fresh machine
    # migrates a new database, which takes longer than Prefect's 20 s default on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.session import session_flow
    from infra.faults import InjectedFailure
    from infra.lock import StoreLocked
    from tasks.ingest import SessionFormatError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    summaries = []
    for url in session_urls:
        try:
            summary = session_flow(url, store, config)
        except (SessionFormatError, StoreError, StoreLocked, InjectedFailure,
                FileNotFoundError) as exc:
            _fail(str(exc))
        summaries.append(summary)
        if summary["status"] == "already-published":
            typer.echo(f"{summary['name']}: already in the store as session "
                       f"#{summary['index']}, nothing to do")
        else:
            typer.echo(f"{summary['name']}: published as session #{summary['index']}")
            _print_metrics(summary["metrics"])
    return summaries


def _print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    names = ["ndcg@10", "success@5", "recall@10", "recall@100"]
    typer.echo(f"  {'evaluated session':<28}" + "".join(f"{n:>12}" for n in names))
    for session, values in metrics.items():
        typer.echo(f"  {session:<28}" + "".join(f"{values[n]:>12.4f}" for n in names))


@app.command("run-session")
def run_session(
    session: Annotated[str, typer.Argument(help="Session folder (BEIR layout), any fsspec URL.")],
    store: StoreOpt,
    config: ConfigOpt = None,
) -> None:
    """Run SESSION as the next session of STORE."""
    _run_flows([session], store, config)


@app.command("run-stream")
def run_stream(
    sessions: Annotated[list[str], typer.Argument(help="Session folders, in stream order.")],
    store: StoreOpt,
    config: ConfigOpt = None,
) -> None:
    """Run several sessions in order; those already in the store are skipped."""
    _run_flows(sessions, store, config)


def store_summary(store: Store) -> dict:
    """What `show` reports: one entry per published session."""
    sessions = []
    for m in store.sessions():
        sessions.append({
            "index": m.index, "name": m.name, "digest": m.digest,
            "model_version": m.model_version, "n_docs": m.n_docs, "n_queries": m.n_queries,
            "created_at": m.created_at,
            "metrics": store.read_json(m, "metrics.json"),
        })
    return {"store": store.url, "sessions": sessions}


@app.command("show")
def show(
    store: StoreOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the sessions of a store: model version, documents, metrics."""
    st = Store(store)
    if not st.exists():
        _fail(f"{st.url}: no driftlane store here (no store.json)")
    try:
        summary = store_summary(st)
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    typer.echo(f"store {summary['store']}: {len(summary['sessions'])} session(s)")
    for s in summary["sessions"]:
        typer.echo(f"#{s['index']} {s['name']}  model {s['model_version']}  "
                   f"{s['n_docs']} docs  {s['n_queries']} queries  ({s['created_at']})")
        if s["metrics"]:
            _print_metrics(s["metrics"])


def main() -> None:  # pragma: no cover - console entry point
    app()
