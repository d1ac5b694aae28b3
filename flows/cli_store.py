"""Commands that look after a store: verify, gc, reindex.

`verify` reads every published file and compares its size and sha256 with its manifest. `gc`
removes what no published session needs (`tasks.housekeeping`), holding the store lock so it
never races a run. `reindex` re-embeds the corpus with the latest model (`flows.reindex`).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from driftlane.flows.cli import (
    ConfigOpt,
    StoreOpt,
    _existing_store,
    _print_metrics,
    app,
    flow_environment,
)
from driftlane.flows.cli_errors import EXIT_ENVIRONMENT, command, fail


def _bytes(n: int) -> str:
    """`1234567` -> `1,234,567 bytes (1.2 MB)`."""
    if n < 1000:
        return f"{n:,} bytes"
    size, units = n / 1000, ["kB", "MB", "GB", "TB"]
    while size >= 1000 and len(units) > 1:
        size, units = size / 1000, units[1:]
    return f"{n:,} bytes ({size:.1f} {units[0]})"


@app.command("verify")
@command
def verify(
    store: StoreOpt,
    cached: Annotated[bool, typer.Option(
        "--cached", help="Trust a digest this machine already read for a file whose size and "
        "modification time are unchanged (what runs do); default: read every file.")] = False,
) -> None:
    """Check every published file against its manifest (size and sha256); one line per
    mismatch, exit code 4 when any."""
    from driftlane.infra.integrity import DigestCache

    st = _existing_store(store)
    manifests = st.sessions()  # a damaged manifest ends the command here, naming it
    with DigestCache.local(reuse=cached) as digests:
        problems = st.damaged_files(manifests, digests)
        read = digests.reads
    for line in problems:
        typer.echo(line)
    if problems:
        fail(f"{st.url}: {len(problems)} published file(s) differ from their manifests "
             "(listed above)", EXIT_ENVIRONMENT)
    n_files = sum(len(set(m.files) - set(st.removed_files(m))) for m in manifests)
    typer.echo(f"store {st.url}: {n_files} files of {len(manifests)} session(s) match their "
               f"manifests (size and sha256; {read} read)")


@app.command("gc")
@command
def gc(
    store: StoreOpt,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print what would be removed, remove nothing.")] = False,
    keep_models: Annotated[int | None, typer.Option(
        "--keep-models", min=0, show_default=False, help="Also remove the model/ folders of "
        "sessions beyond the newest N that hold one (never a model a later session or the next "
        "run uses).")] = None,
    wait: Annotated[float, typer.Option(
        "--wait", min=0.0, help="Seconds to wait for a run that holds the store; then fail "
        "(exit code 3) having removed nothing.")] = 10.0,
) -> None:
    """Remove what no published session needs: stale embedding cache, old Prefect results,
    orphaned uploads and (--keep-models N) older sessions' models."""
    from driftlane.infra.config import LockConfig
    from driftlane.infra.writer import lease_seconds, store_writer
    from driftlane.tasks.housekeeping import CATEGORIES, freed_bytes, plan_gc, remove

    st = _existing_store(store)
    settings = LockConfig(wait_seconds=wait, global_limit=False)
    with store_writer(st.url, "driftlane gc", settings) as lock:
        manifests = st.sessions()
        removals = plan_gc(st, manifests, now=time.time(), lease_seconds=lease_seconds(settings),
                           keep_models=keep_models)
        if not dry_run:
            remove(st, removals, lock.check)
    freed = freed_bytes(removals)
    verb = "would free (dry run, nothing removed)" if dry_run else "freed"
    typer.echo(f"store {st.url}: {len(manifests)} session(s); gc {verb}:")
    for category, label in CATEGORIES.items():
        items = [r for r in removals if r.category == category]
        note = ("  (not asked: --keep-models N)" if category == "models" and keep_models is None
                else f"  {len(items)} item(s)")
        typer.echo(f"  {label:<20} {_bytes(freed[category])}{note}")
        if category != "results":  # results are many small files: counted, not listed
            for r in items:
                typer.echo(f"    {st.fs.unstrip_protocol(r.path)}: {r.why}")
    typer.echo(f"  {'total':<20} {_bytes(sum(freed.values()))}")


@app.command("reindex")
@command
def reindex(store: StoreOpt, config: ConfigOpt = None) -> None:
    """Re-embed every published document with the latest model and publish the latest
    session's full index beside it (after aligned or compatible sessions); --config gives
    the runner, lock and scratch settings."""
    from driftlane.flows.cli_errors import console_without_tracebacks
    from driftlane.flows.preflight import check_scratch, check_store
    from driftlane.infra.config import load_config

    st = _existing_store(store)
    flow_environment()
    settings = load_config(config)
    check_store(st.url)
    check_scratch(settings)
    console_without_tracebacks()
    from driftlane.flows.reindex import reindex_flow

    before = st.read_json(st.sessions()[-1], "metrics.json")
    summary = reindex_flow(st.url, settings.lock, settings.runner, settings.scratch_dir)
    if summary["status"] == "already-reindexed":
        typer.echo(f"{summary['session']}: already re-indexed ({summary['folder']}), "
                   "nothing to do")
        return
    typer.echo(f"{summary['session']}: re-indexed {summary['n_docs']} documents with model "
               f"{summary['model_version']} into {summary['folder']}")
    _print_metrics(summary["metrics"])
    for metric in ("ndcg@10",):
        old = [v[metric] for v in before.values()]
        new = [v[metric] for v in summary["metrics"].values()]
        if old and new:
            typer.echo(f"  average {metric}: {sum(old) / len(old):.4f} as published, "
                       f"{sum(new) / len(new):.4f} re-indexed")
