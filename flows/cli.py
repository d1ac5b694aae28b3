"""The `driftlane` command line.

Every command ends a failure with one line `error: <what>: <why>` on stderr and an exit code
(1 bug, 2 bad input or usage, 3 store busy, 4 environment: permission, disk full, damaged
store); `--debug` adds the traceback. See `flows.cli_errors`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from driftlane.flows.cli_errors import command, console_without_tracebacks, fail, set_debug
from driftlane.flows.preflight import check_run
from driftlane.infra.config import load_config
from driftlane.infra.io import write_atomically
from driftlane.infra.progress import enable_cli_bars
from driftlane.infra.store import Store, StoreError

if TYPE_CHECKING:
    import pandas as pd

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Keep a retrieval encoder good while its corpus keeps changing.")

StoreOpt = Annotated[str, typer.Option("--store", help="Store URL (local folder or fsspec URL).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Config file (TOML/YAML/JSON).")]
ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", show_default=False,
    help="Progress bars on stderr for embedding and training (default: when stderr is a "
         "terminal).")]


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="On failure, print the traceback too "
                     "(and keep tracebacks in Prefect's console output).")] = False,
) -> None:
    """Keep a retrieval encoder good while its corpus keeps changing."""
    set_debug(debug)


def _progress_bars(progress: bool | None) -> None:
    """Switch the progress bars on or off; None: on when stderr is a terminal.

    Ours only: the libraries' own bars (loading weights, writing shards) are switched off.
    """
    enable_cli_bars(sys.stderr.isatty() if progress is None else progress)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _existing_store(url: str) -> Store:
    """The store at `url`; exits with an error when there is none."""
    st = Store(url)
    if not st.exists():
        fail(f"{st.url}: no driftlane store here (no store.json)")
    return st


def flow_environment() -> None:
    """Environment every command that runs a flow sets first."""
    # Models load from local folders only; the temporary Prefect server must not try to
    # phone home from machines without internet.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without a server, Prefect starts a temporary one; its first start on a fresh machine
    # migrates a new database, which takes longer than Prefect's 20 s default on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _run_flows(session_urls: list[str], store: str, config_path: Path | None) -> list[dict]:
    flow_environment()
    config = load_config(config_path)
    # paths, store and input are checked before any server starts (seconds, one line)
    check_run(session_urls, store, config)
    console_without_tracebacks()
    from prefect import tags

    from driftlane.flows.session import session_flow, session_tags

    summaries = []
    for url in session_urls:
        with tags(*session_tags(url, store)):
            summary = session_flow(url, store, config)
        summaries.append(summary)
        if summary["status"] == "already-published":
            typer.echo(f"{summary['name']}: already in the store as session "
                       f"#{summary['index']}, nothing to do")
        else:
            typer.echo(f"{summary['name']}: published as session #{summary['index']}")
            _print_metrics(summary["metrics"])
    return summaries


def _print_gain(gain: dict) -> None:
    """What the session's fine-tuning bought, averaged over the sessions evaluated."""
    parts = [f"{metric} {gain['average_before'][metric]:.4f} -> "
             f"{gain['average_after'][metric]:.4f} ({delta:+.4f})"
             for metric, delta in gain["gain"].items() if metric in ("ndcg@10", "success@5")]
    typer.echo("  training bought (starting model -> trained, average over "
               f"{len(gain['sessions'])} session(s)): " + ", ".join(parts))


def _print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    names = ["ndcg@10", "success@5", "recall@10", "recall@100"]
    typer.echo(f"  {'evaluated session':<28}" + "".join(f"{n:>12}" for n in names))
    for session, values in metrics.items():
        typer.echo(f"  {session:<28}" + "".join(f"{values[n]:>12.4f}" for n in names))


@app.command("run-session")
@command
def run_session(
    session: Annotated[str, typer.Argument(help="Session folder (BEIR layout), any fsspec URL.")],
    store: StoreOpt,
    config: ConfigOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Run SESSION as the next session of STORE."""
    _progress_bars(progress)
    _run_flows([session], store, config)


@app.command("run-stream")
@command
def run_stream(
    sessions: Annotated[list[str], typer.Argument(help="Session folders, in stream order.")],
    store: StoreOpt,
    config: ConfigOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Run several sessions in order; those already in the store are skipped."""
    _progress_bars(progress)
    _run_flows(sessions, store, config)


def store_summary(store: Store) -> dict:
    """What `show` reports: one entry per published session."""
    from driftlane.tasks.evaluation import TRAINING_GAIN, continual_summary

    sessions = []
    for m in store.sessions():
        sessions.append({
            "index": m.index, "name": m.name, "digest": m.digest,
            "model_version": m.model_version, "n_docs": m.n_docs, "n_queries": m.n_queries,
            "created_at": m.created_at,
            "n_clusters": m.summary.get("n_clusters"),
            "memory_size": m.summary.get("memory_size"),
            "memory_budget": m.summary.get("memory_budget"),
            "metrics": store.read_json(m, "metrics.json"),
            # the starting model's scores on the same sessions, and the gain (sessions that
            # fine-tuned a new model)
            "training_gain": (store.read_json(m, TRAINING_GAIN) if TRAINING_GAIN in m.files
                              else None),
        })
    stream = continual_summary([(s["name"], s["metrics"]) for s in sessions])
    return {"store": store.url, "sessions": sessions, "stream": stream,
            "index": index_summary(store)}


def index_summary(store: Store) -> list[dict]:
    """What the latest session's index holds: per block, the shard, the model that made its
    vectors and the alignment maps applied (`tasks.index_shards`)."""
    from driftlane.tasks.publishing import published_blocks

    return [block.provenance() for block in published_blocks(store, store.sessions())]


@app.command("show")
@command
def show(
    store: StoreOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the sessions of a store: model version, documents, metrics."""
    st = _existing_store(store)
    summary = store_summary(st)
    if as_json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    typer.echo(f"store {summary['store']}: {len(summary['sessions'])} session(s)")
    for s in summary["sessions"]:
        typer.echo(f"#{s['index']} {s['name']}  model {s['model_version']}  "
                   f"{s['n_docs']} docs  {s['n_queries']} queries  ({s['created_at']})")
        if s["n_clusters"] is not None:
            typer.echo(f"  {s['n_clusters']} clusters, memory {s['memory_size']}/"
                       f"{s['memory_budget']} documents")
        if s["metrics"]:
            _print_metrics(s["metrics"])
        if s["training_gain"] and s["training_gain"]["gain"]:
            _print_gain(s["training_gain"])
    _print_matrix(summary["stream"])
    if summary["index"]:
        typer.echo(f"\nindex of the latest session: {len(summary['index'])} block(s)")
        for b in summary["index"]:
            maps = ", ".join(b["maps"]) or "none"
            typer.echo(f"  {b['shard']}: {b['n_docs']} docs, vectors of model "
                       f"{b['model_version']}, alignment maps: {maps}")


def _print_matrix(stream: dict) -> None:
    """R[i][j] (nDCG@10 of session j after session i), then average and backward transfer."""
    names = stream["sessions"]
    if not names:
        return
    width = max(12, *(len(n) + 2 for n in names))
    typer.echo("\nnDCG@10 after each session (rows) on each session (columns):")
    typer.echo(" " * width + "".join(f"{n[:width - 2]:>{width}}" for n in names))
    for name, row in zip(names, stream["matrix"]["ndcg@10"], strict=True):
        cells = "".join(f"{'':>{width}}" if v is None else f"{v:>{width}.4f}" for v in row)
        typer.echo(f"{name[:width - 2]:<{width}}" + cells)
    for metric in ("ndcg@10", "success@5", "recall@10"):
        avg, bwt = stream["avg"][metric], stream["bwt"][metric]
        typer.echo(f"{metric:>10}: average {'-' if avg is None else f'{avg:.4f}'}  "
                   f"backward transfer {'-' if bwt is None else f'{bwt:+.4f}'}")


@app.command("make-stream")
@command
def make_stream(
    out: Annotated[Path, typer.Option("--out", help="Folder for the session folders and "
                                      "stream.json; must be empty unless --force.")],
    datasets: Annotated[list[str] | None, typer.Argument(
        help="BEIR collections in stream order: names under --datasets-dir, or paths/URLs. "
             "Default: scifact cosqa npl_vaswani cisi msmarco_agentset5k.",
        show_default=False)] = None,
    mode: Annotated[str, typer.Option("--mode", metavar="[domain|mixed]", help="domain: one "
                    "collection per session; mixed: every session draws from several, with "
                    "shifting proportions.")] = "domain",
    docs_per_session: Annotated[int | None, typer.Option(
        "--docs-per-session", min=1, help="Documents per session (default: whole collections "
        "in domain mode; every document once, spread over the sessions, in mixed mode).")] = None,
    queries_per_session: Annotated[int | None, typer.Option(
        "--queries-per-session", min=1, help="Most judged queries per session "
        "(default: as many as fit).")] = None,
    sessions: Annotated[int | None, typer.Option(
        "--sessions", min=1, help="Sessions of a mixed stream (default: one per collection).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of every random choice.")] = 0,
    test_fraction: Annotated[float, typer.Option(
        "--test-fraction", min=0.0, max=1.0, help="Share of test queries for a collection "
        "whose qrels have a single split.")] = 0.5,
    datasets_dir: Annotated[str | None, typer.Option(
        "--datasets-dir", help="Where collection names are looked up (default: "
        "$DRIFTLANE_DATASETS, else ../shared/datasets next to the repository).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a stream already in --out.")
    ] = False,
) -> None:
    """Cut BEIR collections into numbered session folders: a continual stream."""
    from driftlane.tasks.stream_builder import build_stream

    manifest = build_stream(datasets or [], out, mode=mode, docs_per_session=docs_per_session,
                            queries_per_session=queries_per_session, n_sessions=sessions,
                            seed=seed, test_fraction=test_fraction,
                            datasets_dir=datasets_dir, force=force)
    for s in manifest["sessions"]:
        typer.echo(f"{s['name']}: {s['docs']} docs, {s['queries']} queries "
                   f"({', '.join(s['datasets'])})")
    typer.echo(f"{len(manifest['sessions'])} sessions written to {out} (see stream.json)")


def cluster_table(store: Store) -> pd.DataFrame:
    """doc_id, cluster_id, session of every document, as of the latest session."""
    from driftlane.infra.io import read_parquet

    manifests = [m for m in store.sessions() if "memory/assignments.parquet" in m.files]
    if not manifests:
        raise StoreError(f"{store.url}: no session with a clustered memory yet")
    table = read_parquet(store.session_url(manifests[-1], "memory/assignments.parquet"))
    prefix = table["session"].str.len() + 1
    doc_ids = [key[n:] for key, n in zip(table["doc_key"], prefix, strict=True)]
    return table.assign(doc_id=doc_ids)[["doc_id", "cluster_id", "session"]]


@app.command("export-clusters")
@command
def export_clusters(
    store: StoreOpt,
    out: Annotated[Path, typer.Option("--out", help="Output file: .csv or .parquet.")],
) -> None:
    """Write every document's stable cluster id (doc_id, cluster_id, session)."""
    if out.suffix not in (".csv", ".parquet"):
        fail(f"{out}: unknown output format {out.suffix!r} (use .csv or .parquet)")
    st = _existing_store(store)
    table = cluster_table(st)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        write_atomically(out, lambda tmp: table.to_csv(tmp, index=False))
    else:
        write_atomically(out, lambda tmp: table.to_parquet(tmp, index=False))
    typer.echo(f"{len(table)} documents in {table['cluster_id'].nunique()} clusters -> {out}")


@app.command("bench")
@command
def bench(
    config: Annotated[str, typer.Option("--config", metavar="[small|medium|gpu]", help="small: "
                      "4 sessions of 120 documents, 1 seed, within an hour on 2 CPU cores; "
                      "medium: 3 sessions of about 2,000 documents, 3 seeds, CPU (hours); "
                      "gpu: the full default stream, 3 seeds. With --datasets or --stream: "
                      "the settings only.")] = "small",
    datasets: Annotated[list[str] | None, typer.Option("--datasets", help="Benchmark these "
                        "BEIR collections (names under --datasets-dir, or paths), one session "
                        "each, in order: repeat the option or separate with commas.",
                        show_default=False)] = None,
    stream: Annotated[str | None, typer.Option("--stream", help="Benchmark a stream written by "
                      "`driftlane make-stream` (its folder).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of an ad-hoc run (default: "
                    "from the collections or the stream folder): writes "
                    "continual_<name>.*.")] = None,
    methods: Annotated[list[str] | None, typer.Option("--methods", help="Only these methods "
                       "(repeat or separate with commas; default: all).",
                       show_default=False)] = None,
    seeds: Annotated[list[int] | None, typer.Option("--seeds", help="Only these seeds (repeat "
                     "the option; default: the configuration's).", show_default=False)] = None,
    datasets_dir: Annotated[str | None, typer.Option("--datasets-dir", help="Where collection "
                            "names are looked up (default: $DRIFTLANE_DATASETS, else "
                            "../shared/datasets).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Where the JSON, Markdown "
                       "and PNG results go (default: benchmarks/results; an ad-hoc run: its "
                       "--work folder).")] = None,
    work: Annotated[Path | None, typer.Option("--work", help="Stream, stores, scratch and "
                    "logs (default: ~/.cache/driftlane/bench/<name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the method/seed runs an "
                      "interrupted run of the same configuration finished.")] = False,
) -> None:
    """Run the continual benchmark: driftlane against its baselines (benchmarks/continual.py)."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "benchmarks" / "continual.py").exists():
        fail("the benchmark ships with the source checkout (benchmarks/continual.py), not "
             "with the installed package; run it from a checkout")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from benchmarks.continual import BenchUsageError, request_from_argv, run_request

    argv = ["--config", config]
    for option, values in (("--datasets", datasets), ("--methods", methods),
                           ("--seeds", [str(s) for s in seeds or []])):
        argv += [option, *values] if values else []
    for option, value in (("--stream", stream), ("--name", name),
                          ("--datasets-dir", datasets_dir), ("--out-dir", out_dir),
                          ("--work", work)):
        argv += [option, str(value)] if value is not None else []
    argv += ["--resume"] if resume else []
    try:  # checked before anything starts: one line, exit code 2
        request = request_from_argv(argv)
    except BenchUsageError as exc:
        fail(str(exc))
    run_request(request, argv)


# Commands defined in their own modules register themselves on `app` when imported.
from driftlane.flows import cli_clusters, cli_model, cli_store  # noqa: E402,F401


def main() -> None:  # pragma: no cover - console entry point
    app()
