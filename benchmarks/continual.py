"""The continual benchmark (issues 4, 13 and 14): driftlane against its baselines, and its
update modes against each other, on one stream.

Every method runs the same stream of sessions (built with `tasks.stream_builder`, or given),
with the same seeds, as one `stream_flow` per method and seed into its own store. A method is
a set of configuration overrides (METHODS) on top of the configuration's shared settings:

    zero_shot             no fine-tuning
    sequential            fine-tune on the new session only (no replay, mixed batches)
    random_replay         the same memory budget, reservoir eviction, random negatives, mixed
                          batches
    mir                   random_replay, replaying the buffered pairs whose loss a virtual
                          update on the session's new examples raises most (MIR,
                          `tasks.interference`)
    gss                   random_replay with a query buffer kept by gradient diversity
                          (GSS-Greedy, `tasks.gradient_diversity`) instead of a reservoir
    joint                 retrain from the base model on everything seen so far, then re-embed
                          the whole corpus (update mode full): the upper bound, in quality and
                          in cost
    driftlane_full        the defaults with update mode full: re-embed memory and the whole
                          corpus with each new model, one index over everything
    driftlane_compatible  the defaults with update mode compatible: a backward-compatibility
                          term in the training loss, new documents embedded with the new model,
                          stored vectors kept
    driftlane             the defaults: clustered memory, cluster-hard negatives, stratified
                          batches, update mode aligned (no corpus re-embedding: an orthogonal
                          map old -> new model fitted on the re-embedded memory, one index
                          shard per session over its new documents)
    driftlane_selfsup     the defaults with self-supervised (pseudo-positive) sampling
    driftlane_selfsup_docs  self-supervised, and every new document also trains as its own
                          positive anchored by a span of it (`document_example_ratio` 1.0)

The other baselines keep the default update mode (aligned). The `[update]` section is
infra.config.UpdateConfig.

Per method the benchmark reports, from each store: the final average nDCG@10 / Success@5 /
Recall@10 and the backward transfer of nDCG@10 (`tasks.evaluation.continual_summary` over the
published metrics.json of every session), the average nDCG@10 after each session; its cost in
units that do not depend on the machine's load (`continual_runs.WorkCounter`: texts, windows
and tokens encoded, training steps, examples = steps x batch size, tokens trained; the cost
targets compare forward-token equivalents, `continual_costs.COST_UNIT`), beside the CPU
seconds of the run (process time) and the wall seconds of each stage (the sessions'
timings.json; Prefect's task-run records as `time_s_prefect`); per session
(`session_costs`, issue 14): the embedding + training cost in that unit, the embedding +
indexing and embedding + training wall seconds, the bytes the session added to the store (its
session folder and the embedding-cache files written during it), their sums and the ratio of
the last session to the second; means over seeds with their standard deviation, and every
seed's values. Paired tests compare the methods query by query
on the last session's row of the matrix (every session's test queries, against the whole
corpus), pooled over seeds: a query's difference is its mean over the seeds, then a paired
t-test over the queries and a bootstrap 95% interval of the mean difference
(`continual_results.pooled_paired_tests`). The targets of issues 4, 13 and 14 are checked
against the means (`evaluate_targets`; issue 14's only when the methods they compare ran).

Configurations (CONFIGS):
    small   4 sessions (scifact, cosqa, npl_vaswani, cisi) of 120 documents, windows and
            training texts of 96 tokens, memory of 150 documents; 1 seed. Sized to finish the
            six methods of issue 4 within an hour on 2 otherwise idle CPU cores; the two
            update-mode methods of issue 14 (driftlane_full, driftlane_compatible) add to that
            (not yet timed).
    medium  3 sessions: cosqa, cisi, scifact, 2,000 documents each (cisi: all 1,460), every
            test query of each collection kept (500 + 38 + 300), so 1,120 and 1,333
            unjudged documents in the cosqa and scifact sessions and 5,460 documents searched
            after the last session; small's windows and training; memory of 1,000 documents;
            3 seeds.
            The cheapest session order for the methods in update mode full (joint,
            driftlane_full): they re-embed the corpus seen so far after each session, so the
            first session is encoded 4 times and the last 2.
    gpu     the full default stream (scifact, cosqa, npl_vaswani, cisi, msmarco_agentset5k),
            windows of 256 tokens, training texts of 256 tokens; 3 seeds; device auto.

Measured (continual_medium_subset.md, seed 0, the step cap on, a machine shared with other
work): zero_shot 9 min, random_replay 33 min, driftlane 18 min, driftlane_selfsup_docs 18 min
wall. The estimate below predates the step cap and the update modes.

Run time of medium, estimated from the committed small results (continual_small.json, mean
load 3.2 on 2 cores): the work of each method on each stream was counted as the flow does it
(tokens through the 96-token windows of every text encoded: the new documents, the corpus
seen so far after each new model, the queries; training examples: the train qrels pairs plus
30% replay, joint's growing buffer, one pseudo-positive per non-test query in
self-supervised mode), then priced at small's rates: embedding 2,005 tokens/s (411k tokens
per training method in 137-301 s), training 0.47 s per example (sampling included), the
other stages scaled with the documents (x11). Per seed: zero_shot 12 min (1.4M tokens),
sequential 55 min (3.7M tokens, 3,000 examples), random_replay and driftlane 63 min each
(4,100 examples), joint 75 min (5,600 examples), driftlane_selfsup 44 min, other stages
about 20 min: 5.5 hours per seed, about 17 hours for 3 seeds at that load (about 10 hours
on idle cores). That is far beyond 90 minutes: about half is training (cisi brings 1,600
training pairs, joint retrains on everything) and over a quarter the corpus re-embedding
after every session, which the update modes of issue 14 remove. The estimate predates them:
it priced every training method in mode full, as driftlane_full and joint still run (so
driftlane_full costs what driftlane did, 63 min per seed); the methods in mode aligned, and
driftlane_compatible, no longer re-embed the corpus, so they cost less than estimated. It runs in
three parts of one seed each: `--seeds 0`, then `--seeds 0 1 --resume`, then `--resume`
(each keeps the method/seed runs finished before, so an interrupted part resumes at the
method it stopped in).

Any stream (issue 13): `--datasets NAME_OR_PATH ...` (BEIR folders: names under
--datasets-dir, or paths; cut into sessions as the configuration cuts its own) or `--stream
DIR` (a stream written by `driftlane make-stream`) run the methods with the settings of
`--config` (default small) and write continual_<name>.* (name from --name, else from the
collections or the stream folder) into --out-dir (default: the run's --work folder).

Run:  python -m benchmarks.continual --config small
      python -m benchmarks.continual --config medium
      python -m benchmarks.continual --datasets ~/beir/a ~/beir/b --methods zero_shot driftlane
      (or `driftlane bench ...`)
Writes benchmarks/results/continual_<config>.json, .md and three PNG plots (`_curve`: average
nDCG@10 after each session per method; `_driftlane_matrix`: driftlane's matrix R as a heatmap;
`_session_cost`: each session's embedding + training cost, embedding + indexing seconds and
bytes added against the session index, one line per method); `--methods` or `--seeds` other
than the configuration's write continual_<config>_subset.* instead (the update modes alone:
`--methods zero_shot driftlane driftlane_full driftlane_compatible joint`). Stores, stream and
per-run logs go under --work (default ~/.cache/driftlane/bench/<name>); every store starts
fresh unless --resume keeps the method/seed runs that an interrupted run with the same
configuration finished. The configurations need a checkout of the repository: they read the
collections from ../shared/datasets next to the checkout (else --datasets-dir or
$DRIFTLANE_DATASETS) and write benchmarks/results/ (else --out-dir); a missing folder stops
the run with one line.

Code: this module holds the configurations, the command line (`request_from_argv`: what to
run, checked before anything starts) and the loop over methods and seeds;
`benchmarks.continual_runs` runs one method and seed and reads its store back,
`benchmarks.continual_results` computes the figures (summaries, means over seeds, targets,
pooled paired tests), `benchmarks.continual_costs` the work units, the per-session cost and
issue 14's targets, and `benchmarks.continual_report` writes the Markdown and the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.continual_costs import BYTES_COUNTED, COST_UNIT, per_session_times
from benchmarks.continual_report import plot_results, render_markdown
from benchmarks.continual_results import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    COST_STAGES,
    MAX_P,
    STAGES,
    aggregate_seeds,
    evaluate_targets,
    per_query_scores,
    pooled_paired_tests,
)
from benchmarks.continual_runs import (
    REPO_ROOT,
    LoadSampler,
    WorkCounter,
    build_bench_stream,
    last_row_qrels_and_run,
    load_finished_run,
    log_progress,
    machine_environment,
    read_store_run,
    run_method,
    save_finished_run,
    set_quiet_environment,
    temporary_prefect,
    warm_up,
)

DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_WORK_ROOT = Path("~/.cache/driftlane/bench")

# Method name -> overrides of the configuration's shared settings (nested like SessionConfig),
# in report order: baselines first, so that paired tests read "driftlane vs <baseline>".
METHODS: dict[str, dict[str, Any]] = {
    "zero_shot": {"finetune": {"enabled": False}},
    "sequential": {"sampling": {"replay_ratio": 0.0, "stratified_batches": False}},
    "random_replay": {
        "memory": {"eviction": "reservoir"},
        "sampling": {"stratified_batches": False, "easy_negative_ratio": 1.0},
    },
    # the L2R paper's strongest replay rules on random_replay's memory (issue 13)
    "mir": {"memory": {"eviction": "reservoir"},
            "sampling": {"stratified_batches": False, "easy_negative_ratio": 1.0,
                         "replay_selection": "mir"}},
    "gss": {"memory": {"eviction": "reservoir"},
            "sampling": {"stratified_batches": False, "easy_negative_ratio": 1.0,
                         "query_buffer_policy": "gss"}},
    "joint": {
        "finetune": {"start_from": "base"},
        "sampling": {"replay_all": True, "query_buffer_budget": 10_000_000},
        "memory": {"budget": 10_000_000},
        "update": {"mode": "full"},  # a model retrained from the base: every vector is stale
    },
    "driftlane_full": {"update": {"mode": "full"}},
    "driftlane_compatible": {"update": {"mode": "compatible"}},
    "driftlane": {},  # update mode aligned, the default
    "driftlane_selfsup": {"sampling": {"mode": "self_supervised"}},
    "driftlane_selfsup_docs": {"sampling": {"mode": "self_supervised",
                                            "document_example_ratio": 1.0}},
    # issue 15: the prototype roles against their dense counterparts
    "driftlane_prototypes": {"memory": {"representation": "prototypes"}},
    "driftlane_proto_negatives": {"sampling": {"negative_scoring": "prototypes"}},
    "driftlane_selfsup_proto_negatives": {"sampling": {"mode": "self_supervised",
                                                       "negative_scoring": "prototypes"}},
}

@dataclass(frozen=True)
class BenchConfig:
    """A benchmark configuration: the stream, the seeds and the settings every method shares.

    The stream is `datasets` cut into sessions (`docs_per_session`, `queries_per_session`,
    `stream_seed`), or `stream`, a folder written by `driftlane make-stream`.
    """

    name: str
    datasets: tuple[str, ...]
    docs_per_session: int | None
    queries_per_session: int | None
    seeds: tuple[int, ...]
    session: dict[str, Any] = field(default_factory=dict)
    stream_seed: int = 0
    description: str = ""
    stream: str | None = None


def cpu_session(memory_budget: int, query_buffer_budget: int, k_max: int,
                max_steps: int | None = None) -> dict[str, Any]:
    """Shared settings of the CPU configurations. Windows as long as the training texts:
    short enough for 2 CPU cores, and the same length whether or not a method has fine-tuned
    the encoder."""
    return {
        "embedding": {"device": "cpu", "batch_size": 32,
                      "chunking": {"window_tokens": 96, "overlap_tokens": 16}},
        "memory": {"budget": memory_budget, "k_max": k_max},
        "sampling": {"query_buffer_budget": query_buffer_budget},
        "finetune": {"device": "cpu", "max_seq_length": 96, "batch_size": 16, "epochs": 1.0,
                     **({} if max_steps is None else {"max_steps": max_steps})},
    }


# Every training method gets the same budget per medium session: uncapped, cisi's 1,600
# training pairs and joint's growing buffer made training half of a 5.5-hour seed.
MEDIUM_MAX_STEPS = 50

CONFIGS: dict[str, BenchConfig] = {
    "small": BenchConfig(
        name="small",
        datasets=("scifact", "cosqa", "npl_vaswani", "cisi"),
        docs_per_session=120,
        queries_per_session=None,
        seeds=(0,),
        session=cpu_session(memory_budget=150, query_buffer_budget=100, k_max=10),
        description="4 sessions of 120 documents (scifact, cosqa, npl_vaswani, cisi; "
        "msmarco_agentset5k left out: at this size it keeps 1-2 test queries), 96-token "
        "windows (overlap 16) and training texts, batch 16, 1 epoch per session, memory of 150 "
        "documents and 100 queries; 1 seed, CPU",
    ),
    "medium": BenchConfig(
        name="medium",
        datasets=("cosqa", "cisi", "scifact"),
        docs_per_session=2000,
        queries_per_session=None,
        seeds=(0, 1, 2),
        session=cpu_session(memory_budget=1000, query_buffer_budget=1000, k_max=20,
                            max_steps=MEDIUM_MAX_STEPS),
        description="3 sessions: cosqa, cisi, scifact, 2,000 documents each (cisi: its "
        "1,460), every test query kept (500 + 38 + 300; 1,120 and 1,333 unjudged documents in "
        "the cosqa and scifact sessions, 5,460 after the last), 96-token windows (overlap 16) "
        "and training texts, batch 16, 1 epoch per session capped at 50 steps (800 examples) "
        "for every method, memory of 1,000 documents and 1,000 queries; 3 seeds, CPU",
    ),
    "gpu": BenchConfig(
        name="gpu",
        datasets=("scifact", "cosqa", "npl_vaswani", "cisi", "msmarco_agentset5k"),
        docs_per_session=None,
        queries_per_session=None,
        seeds=(0, 1, 2),
        session={
            "embedding": {"batch_size": 128,
                          "chunking": {"window_tokens": 256, "overlap_tokens": 64}},
            "finetune": {"max_seq_length": 256, "batch_size": 32, "epochs": 1.0},
        },
        description="the full default stream (5 whole collections), 256-token windows and "
        "training texts, batch 32, 1 epoch per session, default memory; 3 seeds, device auto",
    ),
}


# --- configuration (pure) -------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A new nested dict: `overrides` on top of `base`, section by section (inputs unchanged)."""
    merged: dict[str, Any] = {key: value for key, value in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def method_settings(bench: BenchConfig, method: str, seed: int,
                    scratch_dir: str | None = None) -> dict[str, Any]:
    """The plain configuration dict of one method and seed (shared settings, method, seeds)."""
    seeds = {"memory": {"seed": seed}, "sampling": {"seed": seed}, "finetune": {"seed": seed}}
    settings = deep_merge(deep_merge(bench.session, METHODS[method]), seeds)
    if scratch_dir is not None:
        settings["scratch_dir"] = scratch_dir
    return settings


def method_config(bench: BenchConfig, method: str, seed: int, scratch_dir: str | None = None):
    """The validated SessionConfig of one method and seed; an unknown field fails loudly."""
    from driftlane.infra.config import SessionConfig

    return SessionConfig.model_validate(method_settings(bench, method, seed, scratch_dir))


# --- what to run: the command line, checked before anything starts ---------------------------


class BenchUsageError(ValueError):
    """A command line the benchmark cannot run; the message is one line."""


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark run: the configuration (or an ad-hoc one built on a configuration's
    settings), methods, seeds and folders, and the stem of its result files."""

    bench: BenchConfig
    settings_from: str  # the configuration whose settings the run uses
    ad_hoc: bool
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    work: Path
    out_dir: Path
    stem: str
    datasets_dir: str | None
    resume: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.continual",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small",
                        help=f"settings and stream: {', '.join(CONFIGS)} (default small); "
                             "with --datasets or --stream, the settings only")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="NAME_OR_PATH",
                        help="an ad-hoc stream of these BEIR collections (names under "
                             "--datasets-dir, or paths), one session each, in this order")
    parser.add_argument("--stream", default=None, metavar="DIR",
                        help="an ad-hoc run on a stream written by `driftlane make-stream`")
    parser.add_argument("--name", default=None,
                        help="an ad-hoc run's name (default: from the collections or the "
                             "stream folder); it writes continual_<name>.*")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the results go (default: benchmarks/results for a "
                             "configuration, the --work folder for an ad-hoc run)")
    parser.add_argument("--work", type=Path, default=None,
                        help="stream, stores, scratch and logs (default "
                             "~/.cache/driftlane/bench/<name>)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"a subset of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="default: the configuration's seeds")
    parser.add_argument("--datasets-dir", default=None,
                        help="where the collections are (default: $DRIFTLANE_DATASETS, else "
                             "../shared/datasets)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the method/seed runs an interrupted run of the same "
                             "configuration finished (their figures and times are from then)")
    return parser


def split_values(values: Sequence[str] | None) -> list[str]:
    """Values given one by one, repeated or comma-separated ("a,b" "c" -> a, b, c)."""
    return [v for value in values or [] for v in value.split(",") if v.strip()]


def ad_hoc_name(datasets: Sequence[str], stream: str | None) -> str:
    """An ad-hoc run's name: the stream folder's name, else the collections' folder names
    joined by '-'; characters other than letters, digits, '_', '-', '.' become '_', and a name
    longer than 60 characters keeps 51 of them and a digest of the whole."""
    parts = [Path(stream).expanduser().resolve().name] if stream is not None else [
        d.rstrip("/").rsplit("/", 1)[-1] for d in datasets]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)).strip("._-") or "adhoc"
    if len(name) > 60:
        name = f"{name[:51]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def _checked_name(name: str, given: bool) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise BenchUsageError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it "
                              "names the result files)")
    taken = {c for c in CONFIGS} | {f"{c}_subset" for c in CONFIGS}
    if name in taken:
        how = "choose another --name" if given else "pass --name"
        raise BenchUsageError(f"the name {name!r} belongs to a configuration's results "
                              f"(continual_{name}.*); {how}")
    return name


def _stream_problem(stream: str) -> str | None:
    folder = Path(stream).expanduser()
    if not folder.is_dir():
        return f"--stream {folder}: no such folder"
    manifest = folder / "stream.json"
    if not manifest.is_file():
        return (f"--stream {folder}: no stream.json (it takes a folder written by "
                "`driftlane make-stream`)")
    try:
        names = [s["name"] for s in json.loads(manifest.read_text())["sessions"]]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest}: not a stream manifest ({type(exc).__name__}: {exc})"
    absent = [n for n in names if not (folder / n).is_dir()]
    if not names or absent:
        return f"{manifest}: session folders missing: {', '.join(absent) or '(none listed)'}"
    return None


def missing_folder_error(out_dir: Path | None, datasets_dir: str | None,
                         datasets: Sequence[str]) -> str | None:
    """What keeps a run from starting, in one line, or None. Checked: the results folder (when
    --out-dir is not given: benchmarks/results of this checkout), the datasets folder with the
    collections named by a bare name (when it is local), and collections given as local
    paths."""
    from driftlane.tasks.stream_builder import default_datasets_dir

    if out_dir is None and not DEFAULT_OUT_DIR.is_dir():
        return (f"no results folder {DEFAULT_OUT_DIR}: the benchmarks run from a checkout of "
                "the repository (see benchmarks/README.md), or pass --out-dir")
    paths = [Path(d.removeprefix("file://")).expanduser() for d in datasets
             if "/" in d and ("://" not in d or d.startswith("file://"))]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        return f"no collection folder {', '.join(missing)}"
    bare = [name for name in datasets if "/" not in name]
    if not bare:
        return None
    folder = datasets_dir or default_datasets_dir()
    if "://" in folder and not folder.startswith("file://"):
        return None  # a remote folder is read (and checked) when the stream is built
    local = Path(folder.removeprefix("file://")).expanduser().resolve()
    if not local.is_dir():
        return (f"no datasets folder {local}: the benchmarks read ../shared/datasets next to "
                "a checkout of the repository; pass --datasets-dir or set $DRIFTLANE_DATASETS")
    absent = [name for name in bare if not (local / name).is_dir()]
    if absent:
        return f"the datasets folder {local} has no {', '.join(absent)}"
    return None


def request_from_argv(argv: Sequence[str] | None = None) -> BenchRequest:
    """What a command line asks to run; BenchUsageError (one line) for what cannot run.

    Nothing is written: the folders are checked, not created.
    """
    args = build_parser().parse_args(argv)
    if args.config not in CONFIGS:
        raise BenchUsageError(f"--config must be one of {', '.join(CONFIGS)}, got "
                              f"{args.config!r}")
    base = CONFIGS[args.config]
    datasets = split_values(args.datasets)
    if args.datasets is not None and not datasets:
        raise BenchUsageError("--datasets needs at least one collection")
    if datasets and args.stream is not None:
        raise BenchUsageError("--datasets and --stream both give the stream; pass one")
    ad_hoc = bool(datasets) or args.stream is not None
    if args.name is not None and not ad_hoc:
        raise BenchUsageError("--name names an ad-hoc run (--datasets or --stream); a "
                              "configuration's results are continual_<config>.*")
    if args.stream is not None and args.datasets_dir is not None:
        raise BenchUsageError("--datasets-dir does not apply to --stream (its sessions are "
                              "built already)")
    unknown = [m for m in split_values(args.methods) if m not in METHODS]
    if unknown:
        raise BenchUsageError(f"unknown method {unknown[0]!r}; the methods are "
                              f"{', '.join(METHODS)}")
    chosen = set(split_values(args.methods)) or set(METHODS)
    methods = tuple(m for m in METHODS if m in chosen)  # report order
    seeds = tuple(dict.fromkeys(args.seeds)) if args.seeds else base.seeds
    if any(seed < 0 for seed in seeds):
        raise BenchUsageError("--seeds must be non-negative")

    if not ad_hoc:
        bench = base
        complete = methods == tuple(METHODS) and seeds == base.seeds
        stem = f"continual_{bench.name}" + ("" if complete else "_subset")
    else:
        name = _checked_name(args.name or ad_hoc_name(datasets, args.stream),
                             given=args.name is not None)
        source = (f"the stream {Path(args.stream).expanduser().resolve()}"
                  if args.stream is not None else
                  f"{', '.join(datasets)}, one session each, cut as the {base.name} "
                  "configuration cuts its collections")
        bench = dataclasses.replace(
            base, name=name, datasets=tuple(datasets),
            stream=None if args.stream is None else
            str(Path(args.stream).expanduser().resolve()),
            description=f"ad-hoc: {source}; settings of the {base.name} configuration "
                        f"({base.description})")
        stem = f"continual_{name}"
    work = (args.work or DEFAULT_WORK_ROOT / bench.name).expanduser().resolve()
    out_dir = args.out_dir or (work if ad_hoc else None)  # None: DEFAULT_OUT_DIR
    problem = (_stream_problem(args.stream) if args.stream is not None else
               missing_folder_error(out_dir, args.datasets_dir, bench.datasets))
    if problem:
        raise BenchUsageError(problem)
    return BenchRequest(bench=bench, settings_from=base.name, ad_hoc=ad_hoc, methods=methods,
                        seeds=seeds, work=work,
                        out_dir=(out_dir or DEFAULT_OUT_DIR).expanduser().resolve(),
                        stem=stem, datasets_dir=args.datasets_dir, resume=args.resume)


# --- running ------------------------------------------------------------------------------


def run_benchmark(bench: BenchConfig, methods: Sequence[str], seeds: Sequence[int],
                  work: Path, datasets_dir: str | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """Run every method and seed; return the results dict (without `command`)."""
    configs = {(method, seed): method_config(bench, method, seed, str(work / "scratch"))
               for seed in seeds for method in methods}  # validate all before any work
    from driftlane.flows.stream import stream_flow

    first = configs[(methods[0], seeds[0])]
    warm_up(first)
    counter = WorkCounter(first.embedding.model, first.embedding.chunking)

    environment = machine_environment()
    log_progress(f"building the stream under {work / 'stream'}" if bench.stream is None
                 else f"reading the stream {bench.stream}")
    if not resume:  # stage outputs of earlier runs must not leak into fresh stores
        for folder in ("stores", "scratch", "logs", "runs"):
            shutil.rmtree(work / folder, ignore_errors=True)
    session_urls = build_bench_stream(bench, work, datasets_dir)
    log_progress(f"{len(session_urls)} sessions: {', '.join(Path(u).name for u in session_urls)}")
    per_method: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    # method -> seed -> metric -> {query: score} on the last session's row
    scores: dict[str, dict[str, dict[str, dict[str, float]]]] = {m: {} for m in methods}
    errors: dict[str, str] = {}
    with LoadSampler() as load, temporary_prefect():
        for seed in seeds:
            for method in methods:
                key = f"{method}/seed{seed}"
                store = work / "stores" / f"{method}_seed{seed}"
                run = load_finished_run(work, method, seed, configs[(method, seed)],
                                        len(session_urls)) if resume else None
                if run is not None:
                    log_progress(f"{key}: kept from an earlier run ({store})")
                else:
                    run = run_method(stream_flow, session_urls, store, configs[(method, seed)],
                                     work / "logs" / f"{method}_seed{seed}.log", errors, key)
                    if run is None:
                        continue
                if run.get("time_s_per_session") is None:  # kept from older code
                    run["time_s_per_session"] = summarize_run_times(store)
                if "per_session" not in (run.get("work") or {}):  # new, or older code
                    run["work"] = _work_of(counter, store, errors, key)
                    save_finished_run(work, method, seed, configs[(method, seed)], run)
                per_method[method][seed] = run
                pair = last_row_qrels_and_run(str(store))
                if pair is not None:
                    scores[method][str(seed)] = per_query_scores(*pair)
    methods_out = {m: aggregate_seeds(per_method[m]) for m in methods if per_method[m]}
    significance = _significance({m: s for m, s in scores.items() if s})
    environment["load_average_during_run"] = load.summary()
    return {
        "config": {"name": bench.name, "description": bench.description,
                   "datasets": list(bench.datasets), "stream": bench.stream,
                   "docs_per_session": bench.docs_per_session,
                   "queries_per_session": bench.queries_per_session,
                   "stream_seed": bench.stream_seed, "seeds": list(seeds),
                   "methods": list(methods), "shared_settings": bench.session,
                   "method_overrides": {m: METHODS[m] for m in methods},
                   "session_config": {m: configs[(m, seeds[0])].model_dump(
                       mode="json", exclude={"scratch_dir"}) for m in methods},
                   "cost_unit": COST_UNIT, "cost_stages_wall": list(COST_STAGES),
                   "bytes_added": BYTES_COUNTED},
        "environment": environment,
        "sessions": [Path(u).name for u in session_urls],
        "methods": methods_out,
        "targets": evaluate_targets(methods_out, significance),
        "significance": significance,
        "errors": errors,
    }


def summarize_run_times(store: Path) -> dict[str, Any] | None:
    """Stage seconds per session of a finished store (its sessions' timings.json)."""
    return per_session_times(read_store_run(str(store))[1], STAGES)


def _work_of(counter: WorkCounter, store: Path, errors: dict[str, str],
             key: str) -> dict[str, Any] | None:
    """The store's work units; a failure to count is recorded, never fatal to the run."""
    try:
        return counter.work_of_store(str(store))
    except Exception as exc:  # noqa: BLE001 - a benchmark of hours must not end here
        errors[f"{key}/work"] = f"{type(exc).__name__}: {exc}"
        return None


def _significance(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "test": "two-sided paired Student's t-test over queries; a query's score is its mean "
                "over the seeds both methods ran",
        "bootstrap": {"interval": 0.95, "resamples": BOOTSTRAP_RESAMPLES,
                      "seed": BOOTSTRAP_SEED, "of": "the mean difference (queries resampled)"},
        "max_p": MAX_P,
        "unit": "query (every session's test queries, pooled) after the last session",
    }
    if len(scores) < 2:
        return {**out, "pairs": {}, "note": "Not computed: fewer than two methods published "
                "runs.parquet for their last session."}
    return {**out, **pooled_paired_tests(scores)}


def write_results(results: Mapping[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """<stem>.json, <stem>.md and the PNG plots into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(render_markdown(results))
    return [json_path, md_path, *plot_results(results, out_dir, stem)]


def run_request(request: BenchRequest, words: Sequence[str]) -> dict[str, Any]:
    """Run what `request_from_argv` checked; write and return the results."""
    set_quiet_environment()
    request.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_benchmark(request.bench, request.methods, request.seeds, request.work,
                            request.datasets_dir, request.resume)
    results = {"command": shlex.join(["python", "-m", "benchmarks.continual", *words]),
               "wall_s_all": round(time.perf_counter() - started, 1), **results}
    results["config"].update({"kind": "ad hoc" if request.ad_hoc else "configuration",
                              "settings_from": request.settings_from})
    for path in write_results(results, request.out_dir, request.stem):
        log_progress(f"wrote {path}")
    sys.__stdout__.write(render_markdown(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        request = request_from_argv(words)
    except BenchUsageError as exc:
        build_parser().exit(2, f"python -m benchmarks.continual: error: {exc}\n")
    return run_request(request, words)


if __name__ == "__main__":
    main()
