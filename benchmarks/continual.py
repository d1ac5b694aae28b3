"""The continual benchmark (issue 4, item 6): driftlane against its baselines on one stream.

Every method runs the same stream of sessions (built with `tasks.stream_builder`), with the same
seeds, as one `stream_flow` per method and seed into its own store. A method is a set of
configuration overrides (METHODS) on top of the configuration's shared settings:

    zero_shot          no fine-tuning
    sequential         fine-tune on the new session only (no replay, mixed batches)
    random_replay      the same memory budget, reservoir eviction, random negatives, mixed batches
    joint              retrain from the base model on everything seen so far (the upper bound)
    driftlane          the defaults: clustered memory, cluster-hard negatives, stratified batches
    driftlane_selfsup  the defaults with self-supervised (pseudo-positive) sampling

Per method the benchmark reports, from each store: the final average nDCG@10 / Success@5 /
Recall@10 and the backward transfer of nDCG@10 (`tasks.evaluation.continual_summary` over the
published metrics.json of every session), the average nDCG@10 after each session, and the
cumulative time of each stage over the stream; means over seeds with their standard deviation,
and every seed's values. Stage times (`time_s`) are the sums of the sessions' timings.json;
Prefect's own task-run records of the same session runs give an independent check beside them
(`time_s_prefect`, with `other` = ingest, report, publish and orchestration).
Paired significance tests compare the methods query by query on the last session's row of the
matrix (every session's test queries pooled, against the whole corpus): ranx `compare` with
Qrels and Runs rebuilt from the last session's runs.parquet and every session's qrels.parquet,
one test per seed. The issue's four targets are checked against the means
(`evaluate_targets`).

Configurations (CONFIGS):
    small  4 sessions (scifact, cosqa, npl_vaswani, cisi) of 120 documents, windows and
           training texts of 96 tokens, memory of 150 documents; 1 seed. Sized to finish all
           six methods within an hour on 2 otherwise idle CPU cores.
    gpu    the full default stream (scifact, cosqa, npl_vaswani, cisi, msmarco_agentset5k),
           windows of 256 tokens, training texts of 256 tokens; 3 seeds; device auto.

Run:  python -m benchmarks.continual --config small
      python -m benchmarks.continual --config gpu
      (or `driftlane bench --config small|gpu`)
Writes benchmarks/results/continual_<config>.json, .md and two PNG plots (average nDCG@10 after
each session per method; driftlane's matrix R as a heatmap). Stores, stream and per-run logs go
under --work (default ~/.cache/driftlane/bench/<config>); every store starts fresh unless --resume
keeps the method/seed runs that an interrupted run with the same configuration finished.
The benchmark needs a checkout of the repository: it reads the collections from
../shared/datasets next to the checkout (else --datasets-dir or $DRIFTLANE_DATASETS) and writes
benchmarks/results/ (else --out-dir); it stops with one line when either folder is missing.

Code: this module holds the configurations, the loop over methods and seeds and the command
line; `benchmarks.continual_runs` runs one method and seed and reads its store back,
`benchmarks.continual_results` computes the figures (summaries, means over seeds, targets,
paired tests) and `benchmarks.continual_report` writes the Markdown and the plots.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.continual_report import plot_results, render_markdown
from benchmarks.continual_results import (
    COST_STAGES,
    MAX_P,
    STAT_TEST,
    aggregate_seeds,
    evaluate_targets,
    paired_tests,
)
from benchmarks.continual_runs import (
    REPO_ROOT,
    LoadSampler,
    build_bench_stream,
    last_row_qrels_and_run,
    load_finished_run,
    log_progress,
    machine_environment,
    run_method,
    save_finished_run,
    set_quiet_environment,
    temporary_prefect,
    warm_up,
)

DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"

# Method name -> overrides of the configuration's shared settings (nested like SessionConfig).
METHODS: dict[str, dict[str, Any]] = {
    "zero_shot": {"finetune": {"enabled": False}},
    "sequential": {"sampling": {"replay_ratio": 0.0, "stratified_batches": False}},
    "random_replay": {
        "memory": {"eviction": "reservoir"},
        "sampling": {"stratified_batches": False, "easy_negative_ratio": 1.0},
    },
    "joint": {
        "finetune": {"start_from": "base"},
        "sampling": {"replay_all": True, "query_buffer_budget": 10_000_000},
        "memory": {"budget": 10_000_000},
    },
    "driftlane": {},
    "driftlane_selfsup": {"sampling": {"mode": "self_supervised"}},
}

@dataclass(frozen=True)
class BenchConfig:
    """A benchmark configuration: the stream, the seeds and the settings every method shares."""

    name: str
    datasets: tuple[str, ...]
    docs_per_session: int | None
    queries_per_session: int | None
    seeds: tuple[int, ...]
    session: dict[str, Any] = field(default_factory=dict)
    stream_seed: int = 0
    description: str = ""


CONFIGS: dict[str, BenchConfig] = {
    "small": BenchConfig(
        name="small",
        datasets=("scifact", "cosqa", "npl_vaswani", "cisi"),
        docs_per_session=120,
        queries_per_session=None,
        seeds=(0,),
        session={
            # Windows as long as the training texts: short enough for 2 CPU cores, and the
            # same length whether or not a method has fine-tuned the encoder.
            "embedding": {"device": "cpu", "batch_size": 32,
                          "chunking": {"window_tokens": 96, "overlap_tokens": 16}},
            "memory": {"budget": 150, "k_max": 10},
            "sampling": {"query_buffer_budget": 100},
            "finetune": {"device": "cpu", "max_seq_length": 96, "batch_size": 16,
                         "epochs": 1.0},
        },
        description="4 sessions of 120 documents (scifact, cosqa, npl_vaswani, cisi; "
        "msmarco_agentset5k left out: at this size it keeps 1-2 test queries), 96-token "
        "windows (overlap 16) and training texts, batch 16, 1 epoch per session, memory of 150 "
        "documents and 100 queries; 1 seed, CPU",
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


# --- running and the command line ------------------------------------------------------------


def run_benchmark(bench: BenchConfig, methods: Sequence[str], seeds: Sequence[int],
                  work: Path, datasets_dir: str | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """Run every method and seed; return the results dict (without `command`)."""
    configs = {(method, seed): method_config(bench, method, seed, str(work / "scratch"))
               for seed in seeds for method in methods}  # validate all before any work
    from driftlane.flows.stream import stream_flow

    warm_up(configs[(methods[0], seeds[0])])

    environment = machine_environment()
    log_progress(f"building the stream under {work / 'stream'}")
    session_urls = build_bench_stream(bench, work, datasets_dir)
    log_progress(f"{len(session_urls)} sessions: {', '.join(Path(u).name for u in session_urls)}")
    per_method: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    errors: dict[str, str] = {}
    significance: dict[str, Any] = {"stat_test": STAT_TEST, "max_p": MAX_P,
                                    "unit": "query (every session's test queries, pooled) "
                                            "after the last session",
                                    "by_seed": {}}
    if not resume:  # stage outputs of earlier runs must not leak into fresh stores
        for folder in ("stores", "scratch", "logs", "runs"):
            shutil.rmtree(work / folder, ignore_errors=True)
    with LoadSampler() as load, temporary_prefect():
        for seed in seeds:
            runs: dict[str, dict] = {}
            qrels: dict | None = None
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
                    save_finished_run(work, method, seed, configs[(method, seed)], run)
                per_method[method][seed] = run
                pair = last_row_qrels_and_run(str(store))
                if pair is not None:
                    qrels, runs[method] = pair[0], pair[1]
            if qrels is not None and len(runs) >= 2:
                significance["by_seed"][str(seed)] = paired_tests(qrels, runs)
    if not significance["by_seed"]:
        significance["note"] = ("Not computed: fewer than two methods published runs.parquet "
                                "for their last session.")
    methods_out = {m: aggregate_seeds(per_method[m]) for m in methods if per_method[m]}
    environment["load_average_during_run"] = load.summary()
    return {
        "config": {"name": bench.name, "description": bench.description,
                   "datasets": list(bench.datasets), "docs_per_session": bench.docs_per_session,
                   "queries_per_session": bench.queries_per_session,
                   "stream_seed": bench.stream_seed, "seeds": list(seeds),
                   "methods": list(methods), "shared_settings": bench.session,
                   "method_overrides": {m: METHODS[m] for m in methods},
                   "session_config": {m: configs[(m, seeds[0])].model_dump(
                       mode="json", exclude={"scratch_dir"}) for m in methods},
                   "cost_stages": list(COST_STAGES)},
        "environment": environment,
        "sessions": [Path(u).name for u in session_urls],
        "methods": methods_out,
        "targets": evaluate_targets(methods_out),
        "significance": significance,
        "errors": errors,
    }


def write_results(results: Mapping[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """<stem>.json, <stem>.md and the PNG plots into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(render_markdown(results))
    return [json_path, md_path, *plot_results(results, out_dir, stem)]


def missing_folder_error(out_dir: Path | None, datasets_dir: str | None,
                         datasets: Sequence[str]) -> str | None:
    """What keeps a run from starting, in one line, or None. Checked: the results folder (when
    --out-dir is not given: benchmarks/results of this checkout), and the datasets folder
    with the configuration's collections (when it is local)."""
    from driftlane.tasks.stream_builder import default_datasets_dir

    if out_dir is None and not DEFAULT_OUT_DIR.is_dir():
        return (f"no results folder {DEFAULT_OUT_DIR}: the benchmarks run from a checkout of "
                "the repository (see benchmarks/README.md), or pass --out-dir")
    folder = datasets_dir or default_datasets_dir()
    if "://" in folder and not folder.startswith("file://"):
        return None  # a remote folder is read (and checked) when the stream is built
    local = Path(folder.removeprefix("file://")).expanduser().resolve()
    if not local.is_dir():
        return (f"no datasets folder {local}: the benchmarks read ../shared/datasets next to "
                "a checkout of the repository; pass --datasets-dir or set $DRIFTLANE_DATASETS")
    absent = [name for name in datasets
              if "/" not in name and not (local / name).is_dir()]  # bare names only
    if absent:
        return f"the datasets folder {local} has no {', '.join(absent)}"
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--out-dir", type=Path, default=None)  # None: DEFAULT_OUT_DIR
    parser.add_argument("--work", type=Path, default=None,
                        help="stream, stores, scratch and logs (default "
                             "~/.cache/driftlane/bench/<config>)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="default: the configuration's seeds")
    parser.add_argument("--datasets-dir", default=None,
                        help="where the collections are (default: $DRIFTLANE_DATASETS, else "
                             "../shared/datasets)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the method/seed runs an interrupted run of the same "
                             "configuration finished (their figures and times are from then)")
    args = parser.parse_args(argv)
    bench = CONFIGS[args.config]
    problem = missing_folder_error(args.out_dir, args.datasets_dir, bench.datasets)
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    set_quiet_environment()
    seeds = tuple(args.seeds) if args.seeds else bench.seeds
    work = (args.work or Path.home() / ".cache" / "driftlane" / "bench" / bench.name)
    work = work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    words = sys.argv[1:] if argv is None else list(argv)
    started = time.perf_counter()
    results = run_benchmark(bench, args.methods, seeds, work, args.datasets_dir, args.resume)
    results = {"command": shlex.join(["python", "-m", "benchmarks.continual", *words]),
               "wall_s_all": round(time.perf_counter() - started, 1), **results}
    # Only a run of every method with the configuration's seeds is the configuration's result.
    complete = list(args.methods) == list(METHODS) and tuple(seeds) == bench.seeds
    stem = f"continual_{bench.name}" + ("" if complete else "_subset")
    for path in write_results(results, args.out_dir or DEFAULT_OUT_DIR, stem):
        log_progress(f"wrote {path}")
    sys.__stdout__.write(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
