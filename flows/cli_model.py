"""Commands that use what the pipeline learned: search, export-model.

Both work on one published session (the latest, or `--session N`): its encoder and its index
over every document seen up to it (`flows.api`). Neither writes to the store.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from driftlane.flows.cli import StoreOpt, app
from driftlane.flows.cli_errors import command, fail

if TYPE_CHECKING:
    from driftlane.flows.api import SearchableStore

SessionOpt = Annotated[str | None, typer.Option(
    "--session", help="Published session to use: its index (#N in `show`) or its name "
    "(default: the latest).", show_default=False)]
QeNOpt = Annotated[int | None, typer.Option(
    "--qe-n", min=0, max=1000, show_default=False, help="alpha-query expansion: average "
    "each query with its top N documents (0: off; default: as the session was evaluated).")]
QeAlphaOpt = Annotated[float | None, typer.Option(
    "--qe-alpha", min=0.0, max=100.0, show_default=False, help="alpha-QE: a neighbour weighs "
    "similarity^ALPHA (default: as the session was evaluated).")]
DbaNOpt = Annotated[int | None, typer.Option(
    "--dba-n", min=0, max=1000, show_default=False, help="Database-side augmentation: average each "
    "document with its top N neighbours before searching (0: off; default: as evaluated).")]
DbaAlphaOpt = Annotated[float | None, typer.Option(
    "--dba-alpha", min=0.0, max=100.0, show_default=False, help="DBA: a neighbour weighs "
    "similarity^ALPHA (default: as the session was evaluated).")]


def _environment() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _open(store: str, session: str | None, device: str | None = None,
          qe_n: int | None = None, qe_alpha: float | None = None, dba_n: int | None = None,
          dba_alpha: float | None = None) -> SearchableStore:
    """The searchable session; option flags override the session's evaluation settings."""
    _environment()
    from driftlane.flows.api import open_store

    def given(n: int | None, alpha: float | None) -> dict | None:
        chosen = {k: v for k, v in (("n", n), ("alpha", alpha)) if v is not None}
        return chosen or None

    return open_store(store, session, device=device, query_expansion=given(qe_n, qe_alpha),
                      database_augmentation=given(dba_n, dba_alpha))


@app.command("search")
@command
def search(
    store: StoreOpt,
    texts: Annotated[list[str] | None, typer.Argument(
        help="Query text(s).", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=10_000,
                                   help="Documents per query.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    session: SessionOpt = None,
    queries: Annotated[Path | None, typer.Option(
        "--queries", help="A JSONL file of queries ({\"_id\", \"text\"} per line, like BEIR "
        "queries.jsonl), searched as one batch.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="With --queries: write the run to .tsv (TREC: qid Q0 docid rank score "
        "tag; docid is <session>/<doc id>) or .parquet (query_id, rank, session, doc_id, "
        "score). Default: TREC lines on stdout.", show_default=False)] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="Where queries are encoded: auto, cpu, cuda (default: the "
        "session's embedding device).", show_default=False)] = None,
    qe_n: QeNOpt = None,
    qe_alpha: QeAlphaOpt = None,
    dba_n: DbaNOpt = None,
    dba_alpha: DbaAlphaOpt = None,
) -> None:
    """Search a store with its latest encoder and index (or --session N's)."""
    if bool(texts) == (queries is not None):
        fail("search: give query text(s) or --queries FILE.jsonl (one of the two)")
    if out is not None and queries is None:
        fail("--out: only with --queries (a batch run)")
    if out is not None and out.suffix not in (".tsv", ".parquet"):
        fail(f"{out}: unknown run format {out.suffix!r} (use .tsv or .parquet)")
    if queries is not None and not queries.is_file():
        fail(f"{queries}: no such file")
    searchable = _open(str(store), session, device, qe_n, qe_alpha, dba_n, dba_alpha)
    if queries is not None:
        _search_batch(searchable, queries, out, k, as_json)
        return
    hits = searchable.search(texts or [], k)
    if as_json:
        json.dump({**_searched(searchable),
                   "hits": hits.astype({"score": float}).to_dict(orient="records")},
                  sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    typer.echo(f"session #{searchable.manifest.index} {searchable.session}: model "
               f"{searchable.model_version} ({searchable.model_origin}), "
               f"{searchable.index.ntotal} documents")
    for query, group in hits.groupby("query", sort=False):
        typer.echo(f"\n{query}")
        for hit in group.itertuples():
            typer.echo(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.session}/{hit.doc_id}  "
                       f"{hit.snippet}")


def _searched(searchable: SearchableStore) -> dict:
    evaluation = searchable.evaluation
    return {"store": searchable.store.url, "session": searchable.session,
            "session_index": searchable.manifest.index,
            "model_version": searchable.model_version,
            "query_expansion": evaluation.query_expansion.model_dump(mode="json"),
            "database_augmentation": evaluation.database_augmentation.model_dump(mode="json")}


def _search_batch(searchable: SearchableStore, queries: Path, out: Path | None, k: int,
                  as_json: bool) -> None:
    from driftlane.flows.api import read_query_file, write_trec_run
    from driftlane.infra.io import write_atomically

    table = read_query_file(queries)
    run = searchable.run(list(table["query_id"]), list(table["text"]), k)
    tag = f"driftlane-{searchable.model_version}"
    if out is None:
        sys.stdout.write(write_trec_run(run, None, tag))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        write_atomically(out, lambda tmp: run.to_parquet(tmp, index=False))
    else:
        write_atomically(out, lambda tmp: write_trec_run(run, tmp, tag))
    summary = {**_searched(searchable), "queries": len(table), "rows": len(run),
               "out": str(out)}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(f"{len(table)} queries, top {k} each, with session #"
                   f"{searchable.manifest.index} {searchable.session} -> {out}")


@app.command("export-model")
@command
def export_model(
    store: StoreOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder to write (new or empty): model/, "
                                      "index.faiss, index_ids.parquet, export.json, README.md.")],
    session: SessionOpt = None,
    qe_n: QeNOpt = None,
    qe_alpha: QeAlphaOpt = None,
    dba_n: DbaNOpt = None,
    dba_alpha: DbaAlphaOpt = None,
) -> None:
    """Export the current encoder and index for serving without driftlane."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out}: exists and is not an empty folder")
    summary = _open(str(store), session, None, qe_n, qe_alpha, dba_n, dba_alpha).export(out)
    typer.echo(f"session #{summary['session_index']} {summary['session']}: model "
               f"{summary['model_version']} ({summary['model_origin']}), index of "
               f"{summary['n_docs']} documents -> {out} (see {out / 'README.md'})")
