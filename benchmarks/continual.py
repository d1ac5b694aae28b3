"""The continual benchmark (issues 4, 13 and 14): driftlane against its baselines, and its
update modes against each other, on one stream.

Every method (`benchmarks.continual_configs.METHODS`) runs the same stream of sessions (built
with `tasks.stream_builder`, or given), with the same seeds, as one `stream_flow` per method
and seed into its own store.

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


Code: this module holds the loop over methods and seeds and `main`;
`benchmarks.continual_configs` the methods and configurations, `benchmarks.continual_request`
the command line (`request_from_argv`: what to run, checked before anything starts),
`benchmarks.continual_runs` runs one method and seed and reads its store back,
`benchmarks.continual_results` computes the figures (summaries, means over seeds, targets,
pooled paired tests), `benchmarks.continual_costs` the work units, the per-session cost and
issue 14's targets, and `benchmarks.continual_report` writes the Markdown and the plots.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.continual_configs import (
    CONFIGS,
    MEDIUM_MAX_STEPS,
    METHODS,
    BenchConfig,
    deep_merge,
    method_config,
    method_settings,
)
from benchmarks.continual_costs import BYTES_COUNTED, COST_UNIT, per_session_times
from benchmarks.continual_report import plot_results, render_markdown
from benchmarks.continual_request import (
    DEFAULT_OUT_DIR,
    DEFAULT_WORK_ROOT,
    BenchRequest,
    BenchUsageError,
    ad_hoc_name,
    build_parser,
    missing_folder_error,
    request_from_argv,
)
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
from benchmarks.continual_resume import load_finished_run, save_finished_run
from benchmarks.continual_runs import (
    LoadSampler,
    WorkCounter,
    build_bench_stream,
    last_row_qrels_and_run,
    log_progress,
    machine_environment,
    read_store_run,
    run_method,
    set_quiet_environment,
    temporary_prefect,
    warm_up,
)
from benchmarks.continual_sampling import sampling_diagnostics

__all__ = ["CONFIGS", "DEFAULT_OUT_DIR", "DEFAULT_WORK_ROOT", "MEDIUM_MAX_STEPS", "METHODS",
           "BenchConfig", "BenchRequest", "BenchUsageError", "ad_hoc_name", "deep_merge",
           "main", "method_config", "method_settings", "missing_folder_error",
           "request_from_argv", "run_benchmark", "run_request"]


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
                if "sampling" not in run:  # kept from older code
                    run["sampling"] = sampling_diagnostics(str(store))
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
