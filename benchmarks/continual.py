"""The continual benchmark (issue 4, item 6): driftlane against its baselines on one stream.

Every method runs the same stream of sessions (built with `infra.stream_builder`), with the same
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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
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

# Stages of the sessions' timings.json, in report order ("total": the sum of the others).
STAGES = ("embedding", "clustering", "training", "indexing", "evaluation", "total")
# The cross-check from Prefect's task-run records: run time of each task, grouped by task
# function as below; "other" is the rest of the session runs (ingest, plan, report, publish,
# orchestration between tasks) and "total" the session runs' time.
PREFECT_STAGES = ("embedding", "clustering", "training", "indexing", "evaluation", "other",
                  "total")
TASK_STAGES = {
    "embed_documents": "embedding",
    "reembed_sources": "embedding",  # a new model makes every stored vector stale
    "reembed_memory": "embedding",
    "update_session_memory": "clustering",
    "sample_training": "training",
    "fine_tune_session": "training",
    "build_index": "indexing",
    "evaluate_sessions": "evaluation",
}
# The cost the joint-retraining target compares: training plus all the encoding work (the
# corpus re-embedding after each new model included, paid by every method that trains).
COST_STAGES = ("embedding", "training")
SUMMARY_METRICS = ("ndcg@10", "success@5", "recall@10", "recall@100")
# Our metric name -> ranx metric name (as tasks.evaluation.METRICS) for the paired tests.
TEST_METRICS = {"ndcg@10": "ndcg@10", "success@5": "hit_rate@5", "recall@10": "recall@10"}
STAT_TEST = "student"
MAX_P = 0.05
POINTS = 100.0  # a "point" of nDCG is 0.01


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
    from infra.config import SessionConfig

    return SessionConfig.model_validate(method_settings(bench, method, seed, scratch_dir))


# --- results of one store (pure) -------------------------------------------------------------


def average_after_each_session(matrix: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Mean of R[i][0..i] for each row i: the average score over the sessions seen so far."""
    curve: list[float | None] = []
    for i, row in enumerate(matrix):
        seen = [v for v in row[: i + 1] if v is not None and math.isfinite(v)]
        curve.append(float(np.mean(seen)) if seen else None)
    return curve


def sum_stage_times(timings: Sequence[Mapping[str, float] | None]) -> dict[str, float] | None:
    """Cumulative seconds per stage of the sessions' timings.json (None when one is missing)."""
    if not timings or any(t is None for t in timings):
        return None
    return {stage: float(sum(t.get(stage, 0.0) for t in timings))
            for stage in STAGES}


def stage_times_from_task_runs(task_runs: Sequence[tuple[str, float]],
                               session_seconds: Sequence[float]) -> dict[str, Any]:
    """Cumulative seconds per stage (PREFECT_STAGES) from task runs and session run times.

    task_runs: (task function name, run seconds) of every task run of the stream's sessions;
    session_seconds: run time of each session's flow run. Returns the stages plus `by_task`
    (seconds per task function).
    """
    by_task: dict[str, float] = {}
    for name, seconds in task_runs:
        by_task[name] = by_task.get(name, 0.0) + float(seconds)
    stages = {stage: 0.0 for stage in PREFECT_STAGES}
    for name, seconds in by_task.items():
        stage = TASK_STAGES.get(name)
        if stage is not None:
            stages[stage] += seconds
    stages["total"] = float(sum(session_seconds))
    stages["other"] = max(0.0, stages["total"] - sum(
        stages[s] for s in PREFECT_STAGES if s not in ("other", "total")))
    return {**stages, "by_task": dict(sorted(by_task.items()))}


def summarize_run(rows: Sequence[tuple[str, dict[str, dict[str, float]]]],
                  timings: Sequence[Mapping[str, float] | None],
                  stage_times: Mapping[str, Any] | None = None,
                  wall_s: float | None = None) -> dict[str, Any]:
    """One method and seed: final averages, backward transfer, curve, matrix and stage times.

    rows: (session name, its metrics.json) in stream order; timings: each session's
    timings.json (None where missing); stage_times: `stage_times_from_task_runs`; wall_s: the
    stream's wall time measured outside.
    """
    from tasks.evaluation import continual_summary

    summary = continual_summary(rows, SUMMARY_METRICS)
    out: dict[str, Any] = {f"avg_{m}": summary["avg"][m] for m in SUMMARY_METRICS}
    out.update({f"bwt_{m}": summary["bwt"][m] for m in SUMMARY_METRICS})
    out["curve_ndcg@10"] = average_after_each_session(summary["matrix"]["ndcg@10"])
    out["matrix_ndcg@10"] = summary["matrix"]["ndcg@10"]
    out["sessions"] = summary["sessions"]
    out["time_s"] = sum_stage_times(timings)
    out["time_s_prefect"] = dict(stage_times) if stage_times is not None else None
    out["wall_s"] = wall_s
    return out


# --- over seeds and methods (pure) -----------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not known or len(known) < len(values):
        return None, None
    return statistics.fmean(known), (statistics.stdev(known) if len(known) > 1 else None)


def _elementwise_mean(arrays: Sequence[Any]) -> Any:
    """Mean of equally shaped nested lists (None stays None if any seed lacks the value)."""
    if any(a is None for a in arrays):
        return None
    if isinstance(arrays[0], list):
        return [_elementwise_mean([a[i] for a in arrays]) for i in range(len(arrays[0]))]
    mean, _ = _mean_std(arrays)
    return mean


HEADLINE = ("avg_ndcg@10", "avg_success@5", "avg_recall@10", "bwt_ndcg@10")
SCALARS = (*(f"avg_{m}" for m in SUMMARY_METRICS), *(f"bwt_{m}" for m in SUMMARY_METRICS),
           "wall_s")


def aggregate_seeds(per_seed: Mapping[int | str, Mapping[str, Any]]) -> dict[str, Any]:
    """Means over seeds (`avg_ndcg@10`, ..., `time_s` per stage), their sample std (`std`,
    None with one seed) and the per-seed values (`seeds`, keyed by the seed as a string)."""
    runs = list(per_seed.values())
    out: dict[str, Any] = {}
    std: dict[str, float | None] = {}
    for key in SCALARS:
        out[key], std[key] = _mean_std([run.get(key) for run in runs])
    for key, stages in (("time_s", STAGES), ("time_s_prefect", PREFECT_STAGES)):
        times = [run.get(key) for run in runs]
        if runs and all(t is not None for t in times):
            out[key] = {s: _mean_std([t[s] for t in times])[0] for s in stages}
            std[key] = {s: _mean_std([t[s] for t in times])[1] for s in stages}
        else:
            out[key] = None
    out["std"] = std
    out["curve_ndcg@10"] = _elementwise_mean([run.get("curve_ndcg@10") for run in runs]) \
        if runs else None
    out["matrix_ndcg@10"] = _elementwise_mean([run.get("matrix_ndcg@10") for run in runs]) \
        if runs else None
    out["sessions"] = runs[0].get("sessions") if runs else None
    out["n_seeds"] = len(runs)
    out["seeds"] = {str(seed): dict(run) for seed, run in per_seed.items()}
    return out


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((a - b) * POINTS, 3)


def cost_seconds(time_s: Mapping[str, float] | None) -> float | None:
    """Training plus embedding work (COST_STAGES) of a method, in seconds."""
    if time_s is None:
        return None
    return float(sum(time_s[s] for s in COST_STAGES))


def _all_known(*values: Any) -> bool:
    return all(v is not None for v in values)


def evaluate_targets(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's four targets, from the means over seeds; `met` is None when a figure is
    missing (a method not run, or failed). Differences are in nDCG points (0.01)."""

    def get(method: str, key: str) -> Any:
        return methods.get(method, {}).get(key)

    ours = get("driftlane", "avg_ndcg@10")
    vs_zero = _points(ours, get("zero_shot", "avg_ndcg@10"))
    vs_replay = _points(ours, get("random_replay", "avg_ndcg@10"))
    bwt = get("driftlane", "bwt_ndcg@10")
    bwt_seq = get("sequential", "bwt_ndcg@10")
    vs_joint = _points(ours, get("joint", "avg_ndcg@10"))
    our_cost, joint_cost = cost_seconds(get("driftlane", "time_s")), \
        cost_seconds(get("joint", "time_s"))
    ratio = our_cost / joint_cost if _all_known(our_cost, joint_cost) and joint_cost else None
    selfsup = _points(get("driftlane_selfsup", "avg_ndcg@10"), get("zero_shot", "avg_ndcg@10"))

    def met(ok: bool, *figures: Any) -> bool | None:
        return bool(ok) if _all_known(*figures) else None

    return {
        "driftlane_above_baselines": {
            "target": "driftlane avg nDCG@10 >= zero_shot + 3 points and >= random_replay "
                      "+ 1 point",
            "measured": {"driftlane_minus_zero_shot_points": vs_zero,
                         "driftlane_minus_random_replay_points": vs_replay},
            "met": met(_all_known(vs_zero, vs_replay) and vs_zero >= 3 and vs_replay >= 1,
                       vs_zero, vs_replay),
        },
        "driftlane_backward_transfer": {
            "target": "driftlane bwt nDCG@10 >= -0.5 points (sequential expected to forget "
                      "more)",
            "measured": {"driftlane_bwt_points": _points(bwt, 0.0),
                         "sequential_bwt_points": _points(bwt_seq, 0.0)},
            "met": met(bwt is not None and bwt * POINTS >= -0.5, bwt),
        },
        "driftlane_close_to_joint": {
            "target": "driftlane avg nDCG@10 >= joint - 1 point, with training+embedding time "
                      f"({'+'.join(COST_STAGES)}) at most 40% of joint's",
            "measured": {"driftlane_minus_joint_points": vs_joint,
                         "driftlane_cost_s": None if our_cost is None else round(our_cost, 1),
                         "joint_cost_s": None if joint_cost is None else round(joint_cost, 1),
                         "cost_ratio": None if ratio is None else round(ratio, 4)},
            "met": met(_all_known(vs_joint, ratio) and vs_joint >= -1 and ratio <= 0.4,
                       vs_joint, ratio),
        },
        "selfsup_above_zero_shot": {
            "target": "driftlane_selfsup avg nDCG@10 >= zero_shot + 1 point",
            "measured": {"driftlane_selfsup_minus_zero_shot_points": selfsup},
            "met": met(selfsup is not None and selfsup >= 1, selfsup),
        },
    }


# --- paired significance tests -------------------------------------------------------------


def query_key(session: str, query_id: str) -> str:
    """Query ids repeat across collections ("1", "2", ...): a query is `<session>/<id>`."""
    return f"{session}/{query_id}"


def stream_qrels(qrels_by_session: Mapping[str, Any], split: str = "test"
                 ) -> dict[str, dict[str, int]]:
    """{query key: {doc key: score}} of every session's judged `split` queries (score > 0).

    qrels_by_session: session name -> its qrels.parquet frame (query_id, doc_id, score, split).
    """
    out: dict[str, dict[str, int]] = {}
    for session, frame in qrels_by_session.items():
        rows = frame[(frame["split"] == split) & (frame["score"] > 0)]
        for qid, did, score in zip(rows["query_id"], rows["doc_id"], rows["score"], strict=True):
            out.setdefault(query_key(session, str(qid)), {})[f"{session}/{did}"] = int(score)
    return out


def run_from_frame(runs: Any, qrels: Mapping[str, Mapping[str, int]]
                   ) -> dict[str, dict[str, float]]:
    """{query key: {doc key: score}} from a runs.parquet frame (evaluated_session, query_id,
    doc_key, score, rank); a judged query that retrieved nothing gets one dummy document, so
    that it counts as a 0 (as in tasks.evaluation.retrieval_metrics)."""
    run: dict[str, dict[str, float]] = {}
    for session, qid, doc, score in zip(runs["evaluated_session"], runs["query_id"],
                                        runs["doc_key"], runs["score"], strict=True):
        run.setdefault(query_key(str(session), str(qid)), {})[str(doc)] = float(score)
    return {q: run.get(q) or {"__none__": 0.0} for q in qrels}


def paired_tests(qrels: Mapping[str, Mapping[str, int]],
                 runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """ranx `compare` of every pair of methods, per query, on the same judged queries.

    runs: method -> its run. Returns the per-method means over the pooled queries, and per
    pair ("a vs b") and metric: p-value, significant (p <= MAX_P), and a's wins / ties /
    losses against b.
    """
    from ranx import Qrels, Run, compare

    names = list(runs)
    report = compare(Qrels.from_dict({q: dict(d) for q, d in qrels.items()}),
                     [Run.from_dict({q: dict(d) for q, d in runs[n].items()}, name=n)
                      for n in names],
                     metrics=list(TEST_METRICS.values()), stat_test=STAT_TEST, max_p=MAX_P,
                     make_comparable=True)
    ours = {theirs: mine for mine, theirs in TEST_METRICS.items()}
    means = {n: {ours[m]: float(v) for m, v in report.results[n].items()} for n in names}
    pairs: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            tests = report.comparisons[frozenset([a, b])]
            pairs[f"{a} vs {b}"] = {
                ours[m]: {"p_value": _finite(tests[m]["p_value"]),
                          "significant": bool(tests[m]["significant"]),
                          **{k.lower(): v for k, v in report.win_tie_loss[(a, b)][m].items()}}
                for m in TEST_METRICS.values()}
    return {"n_queries": len(qrels), "means": means, "pairs": pairs}


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# --- Markdown (pure) -------------------------------------------------------------------------


def _fmt(value: float | None, std: float | None = None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def _fmt_met(met: bool | None) -> str:
    return {True: "met", False: "not met", None: "n/a"}[met]


def _fmt_measured(measured: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {'n/a' if v is None else v}" for k, v in measured.items())


def render_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results dict (as written to continual_<config>.json)."""
    methods: Mapping[str, Mapping[str, Any]] = results["methods"]
    config = results["config"]
    env = results.get("environment", {})
    lines = [f"# Continual benchmark, `{config['name']}` configuration", "",
             f"Command: `{results['command']}`. Stream: {config['description']}. "
             f"Seeds: {', '.join(str(s) for s in config['seeds'])}.", ""]
    if env:
        load = env.get("load_average_during_run")
        lines += [f"Machine: {env.get('device_name', '?')}, {env.get('cpu_count', '?')} CPUs, "
                  f"torch {env.get('torch', '?')} ({env.get('torch_threads', '?')} threads)"
                  + (f"; load average during the run: mean {load['mean']:.1f}, max "
                     f"{load['max']:.1f} (other work shared the machine)" if load else "")
                  + ".", ""]
    lines += ["Final average over the sessions' test queries after the last session (mean over "
              "seeds ± sample std); BWT = backward transfer of nDCG@10 (negative: forgetting). "
              "Times: cumulative wall seconds per stage over the stream, the sum of the "
              "sessions' timings.json (embedding = the new documents + re-embedding corpus and "
              "memory with each new model; training = sampling + fine-tuning). Prefect's "
              "task-run records of the same runs are in the JSON (`time_s_prefect`).", ""]
    stage_cols = [s for s in STAGES]
    lines.append("| method | nDCG@10 | Success@5 | Recall@10 | BWT nDCG@10 | "
                 + " | ".join(f"{s} s" for s in stage_cols) + " |")
    lines.append("|---" * (5 + len(stage_cols)) + "|")
    for name, m in methods.items():
        std = m.get("std", {})
        times = m.get("time_s")
        cells = [_fmt(m.get(k), std.get(k)) for k in HEADLINE]
        cells += [_fmt(None if times is None else times[s], digits=0) for s in stage_cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 4)", "", "| target | measured | met |", "|---|---|---|"]
    for target in results["targets"].values():
        lines.append(f"| {target['target']} | {_fmt_measured(target['measured'])} | "
                     f"{_fmt_met(target['met'])} |")
    lines += _significance_lines(results.get("significance"))
    lines += _curve_lines(methods)
    ours = methods.get("driftlane")
    if ours and ours.get("matrix_ndcg@10"):
        sessions = ours["sessions"]
        lines += ["", "## driftlane: nDCG@10 matrix R (row: after session i; column: session j)",
                  "", "| after \\ on | " + " | ".join(sessions) + " |",
                  "|---" * (len(sessions) + 1) + "|"]
        for name, row in zip(sessions, ours["matrix_ndcg@10"], strict=True):
            lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in row) + " |")
    lines += ["", "## Per seed", "", "| method | seed | nDCG@10 | Success@5 | Recall@10 | "
              "BWT nDCG@10 | wall s | mean load during the run |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        for seed, run in m.get("seeds", {}).items():
            load = (run.get("load_average") or {}).get("mean")
            lines.append(f"| {name} | {seed} | " + " | ".join(_fmt(run.get(k)) for k in HEADLINE)
                         + f" | {_fmt(run.get('wall_s'), digits=0)} | {_fmt(load, digits=1)} |")
    errors = results.get("errors") or {}
    if errors:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {key}: {message}" for key, message in errors.items()]
    return "\n".join(lines) + "\n"


def _significance_lines(significance: Mapping[str, Any] | None) -> list[str]:
    if not significance or not significance.get("by_seed"):
        return ["", "## Paired significance tests", "",
                (significance or {}).get("note", "Not computed.")]
    lines = ["", "## Paired significance tests", "",
             f"Two-sided paired Student's t-test per query (ranx `compare`, p <= "
             f"{significance['max_p']} counts as significant) on the last session's row: every "
             "session's test queries pooled, each query once. Pairs with driftlane; the mean is "
             "over the pooled queries (weights sessions by their number of test queries). "
             "W/T/L: driftlane wins / ties / losses per query.", "",
             "| seed | queries | pair | nDCG@10 p | Success@5 p | Recall@10 p | nDCG@10 W/T/L |",
             "|---|---|---|---|---|---|---|"]
    for seed, tests in significance["by_seed"].items():
        for pair, metrics in tests["pairs"].items():
            first, second = pair.split(" vs ")
            if "driftlane" not in (first, second):
                continue
            other = second if first == "driftlane" else first
            cells = []
            for m in TEST_METRICS:
                p = metrics[m]["p_value"]
                cells.append("n/a" if p is None else
                             f"{p:.3g}" + (" *" if metrics[m]["significant"] else ""))
            wtl = metrics["ndcg@10"]
            wins, losses = (wtl["w"], wtl["l"]) if first == "driftlane" else (wtl["l"], wtl["w"])
            lines.append(f"| {seed} | {tests['n_queries']} | driftlane vs {other} | "
                         + " | ".join(cells) + f" | {wins}/{wtl['t']}/{losses} |")
    return lines


def _curve_lines(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    sessions = next((m["sessions"] for m in methods.values() if m.get("sessions")), None)
    if not sessions:
        return []
    lines = ["", "## Average nDCG@10 over the sessions seen, after each session", "",
             "| method | " + " | ".join(sessions) + " |", "|---" * (len(sessions) + 1) + "|"]
    for name, m in methods.items():
        curve = m.get("curve_ndcg@10") or [None] * len(sessions)
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in curve) + " |")
    return lines


# --- plots ---------------------------------------------------------------------------------


def plot_results(results: Mapping[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """PNG plots: average nDCG@10 after each session per method; driftlane's R heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    written: list[Path] = []
    sessions = next((m["sessions"] for m in methods.values() if m.get("sessions")), None)
    if sessions:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, m in methods.items():
            curve = m.get("curve_ndcg@10")
            if curve:
                ax.plot(range(len(curve)), [np.nan if v is None else v for v in curve],
                        marker="o", label=name)
        ax.set_xticks(range(len(sessions)), sessions, rotation=20, ha="right")
        ax.set_ylabel("average nDCG@10 over sessions seen")
        ax.set_title(f"Continual benchmark ({results['config']['name']}): after each session")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}_curve.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    ours = methods.get("driftlane", {})
    if ours.get("matrix_ndcg@10"):
        matrix = np.array([[np.nan if v is None else v for v in row]
                           for row in ours["matrix_ndcg@10"]])
        names = ours["sessions"]
        fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 1.1 * len(names) + 1.8))
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(np.nanmax(matrix), 1e-9))
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center",
                            color="white" if matrix[i, j] < 0.6 * np.nanmax(matrix) else "black",
                            fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("evaluated session j")
        ax.set_ylabel("after training on session i")
        ax.set_title("driftlane: nDCG@10 R[i][j]")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"{stem}_driftlane_matrix.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# --- running (file access, Prefect) ----------------------------------------------------------


def build_bench_stream(bench: BenchConfig, work: Path, datasets_dir: str | None) -> list[str]:
    """The stream's session folders under work/stream, built once and reused while its
    arguments stay the same (a different stream would clash with the stores' sessions)."""
    from infra.stream_builder import build_stream

    folder = work / "stream"
    wanted = {"datasets": list(bench.datasets), "docs_per_session": bench.docs_per_session,
              "queries_per_session": bench.queries_per_session, "seed": bench.stream_seed,
              "datasets_dir": datasets_dir}
    marker = work / "stream-arguments.json"
    manifest_path = folder / "stream.json"
    if not (manifest_path.exists() and marker.exists()
            and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(work / "stores", ignore_errors=True)
        build_stream(list(bench.datasets), folder, mode="domain",
                     docs_per_session=bench.docs_per_session,
                     queries_per_session=bench.queries_per_session, seed=bench.stream_seed,
                     datasets_dir=datasets_dir, force=True)
        marker.write_text(json.dumps(wanted, indent=2) + "\n")
    manifest = json.loads(manifest_path.read_text())
    return [str(folder / s["name"]) for s in manifest["sessions"]]


def read_store_run(store_url: str) -> tuple[list[tuple[str, dict]], list[dict | None], Any]:
    """(rows for continual_summary, each session's timings.json or None, the Store)."""
    from infra.store import Store

    store = Store(store_url)
    rows, timings = [], []
    for manifest in store.sessions():
        rows.append((manifest.name, store.read_json(manifest, "metrics.json")))
        timings.append(store.read_json(manifest, "timings.json")
                       if "timings.json" in manifest.files else None)
    return rows, timings, store


def last_row_qrels_and_run(store_url: str) -> tuple[dict, dict] | None:
    """Qrels of every session's test queries and the last session's run (None without
    runs.parquet)."""
    from infra.io import read_parquet
    from infra.store import Store

    store = Store(store_url)
    manifests = store.sessions()
    if not manifests or "runs.parquet" not in manifests[-1].files:
        return None
    qrels = stream_qrels({m.name: read_parquet(store.session_url(m, "qrels.parquet"))
                          for m in manifests})
    runs = read_parquet(store.session_url(manifests[-1], "runs.parquet"))
    return qrels, run_from_frame(runs, qrels)


def task_function_name(task_key: str) -> str:
    """Prefect's task key is `<function name>-<source digest>`."""
    return task_key.rsplit("-", 1)[0]


def prefect_stage_times(stream_run_id: Any) -> dict[str, Any]:
    """Stage seconds of one stream run, from the task runs of its session subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        sessions = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[stream_run_id])))
        task_runs, offset = [], 0
        while True:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in sessions])),
                limit=200, offset=offset)
            task_runs += page
            offset += len(page)
            if len(page) < 200:
                break
    return stage_times_from_task_runs(
        [(task_function_name(t.task_key), t.total_run_time.total_seconds()) for t in task_runs],
        [r.total_run_time.total_seconds() for r in sessions])


def _run_method(stream_flow: Any, session_urls: list[str], store: Path, config: Any,
                log_path: Path, errors: dict[str, str], key: str) -> dict[str, Any] | None:
    """Run the stream into a fresh store; the run's summary, or None (error recorded)."""
    shutil.rmtree(store, ignore_errors=True)
    _log(f"{key}: running {len(session_urls)} sessions into {store}")
    started = time.perf_counter()
    try:
        with LoadSampler(period_s=15.0) as load, _quiet(log_path):
            state = stream_flow(session_urls, str(store), config, return_state=True)
            state.result()  # raises the flow's exception when it failed
            stage_times = prefect_stage_times(state.state_details.flow_run_id)
    except Exception as exc:  # one failed method must not lose the others
        errors[key] = f"{type(exc).__name__}: {exc}"
        with open(log_path, "a", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        _log(f"{key}: FAILED ({errors[key]}); see {log_path}")
        return None
    wall = time.perf_counter() - started
    rows, timings, _ = read_store_run(str(store))
    run = summarize_run(rows, timings, stage_times, wall)
    run["store"] = str(store)
    run["load_average"] = load.summary()  # other work on the machine slows a run down
    _log(f"{key}: done in {wall:.0f} s: avg nDCG@10 {_fmt(run['avg_ndcg@10'])}, "
         f"bwt {_fmt(run['bwt_ndcg@10'])}")
    return run


def _save_finished_run(work: Path, method: str, seed: int, config: Any,
                       run: dict[str, Any]) -> None:
    path = work / "runs" / f"{method}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config_digest": config.digest(), "run": run}, indent=2))


def _finished_run(work: Path, method: str, seed: int, config: Any,
                  n_sessions: int) -> dict[str, Any] | None:
    """The summary an earlier run saved for this method and seed, if its store is complete
    and was made with the same configuration (--resume)."""
    from infra.store import Store

    path = work / "runs" / f"{method}_seed{seed}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    manifests = Store(saved["run"]["store"]).sessions()
    if saved["config_digest"] != config.digest() or len(manifests) != n_sessions:
        return None
    return saved["run"]


class LoadSampler:
    """Samples the 1-minute load average every `period_s` in a daemon thread."""

    def __init__(self, period_s: float = 30.0):
        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.period_s)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean": round(statistics.fmean(self.samples), 2),
                "max": round(max(self.samples), 2), "samples": len(self.samples)}


@contextlib.contextmanager
def _quiet(log_path: Path) -> Iterator[None]:
    """Send the run's prints and progress bars (stdout, stderr) to a log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        yield


@contextlib.contextmanager
def temporary_prefect() -> Iterator[None]:
    """A temporary local Prefect (SQLite database in a temporary folder), heartbeats off."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}), \
            prefect_test_harness(server_startup_timeout=None):
        yield


def _set_quiet_environment() -> None:
    # As infra/cli.py: models from local folders only, no analytics from the temporary
    # server, and time for its first database migration on 2 cores.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Per-task INFO logs and progress bars of every run would bury the benchmark's own lines.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _warm_up(config: Any) -> None:
    """Pay the one-off costs of the process before any timed run, so that the first method
    is not charged for them: ranx's numba compilation and loading the base encoder."""
    from tasks.embedding import load_encoder
    from tasks.evaluation import retrieval_metrics

    retrieval_metrics({"q": {"d": 1}}, {"q": {"d": 1.0, "e": 0.5}})
    load_encoder(config.embedding.model, config.embedding.device)


def _environment() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device_name": torch.cuda.get_device_name() if cuda
        else (platform.processor() or platform.machine()),
        "cuda": cuda,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        **_code_version(),
    }


def _code_version() -> dict[str, Any]:
    """The commit the pipeline ran from, and whether its code differed from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--", "flows", "tasks", "infra", "benchmarks/*.py")
        return {"git_commit": git("rev-parse", "HEAD"),
                "code_changed_since_commit": sorted(line[3:] for line in changed.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.__stdout__, flush=True)


def run_benchmark(bench: BenchConfig, methods: Sequence[str], seeds: Sequence[int],
                  work: Path, datasets_dir: str | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """Run every method and seed; return the results dict (without `command`)."""
    configs = {(method, seed): method_config(bench, method, seed, str(work / "scratch"))
               for seed in seeds for method in methods}  # validate all before any work
    from flows.stream import stream_flow

    _warm_up(configs[(methods[0], seeds[0])])

    environment = _environment()
    _log(f"building the stream under {work / 'stream'}")
    session_urls = build_bench_stream(bench, work, datasets_dir)
    _log(f"{len(session_urls)} sessions: {', '.join(Path(u).name for u in session_urls)}")
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
                run = _finished_run(work, method, seed, configs[(method, seed)],
                                    len(session_urls)) if resume else None
                if run is not None:
                    _log(f"{key}: kept from an earlier run ({store})")
                else:
                    run = _run_method(stream_flow, session_urls, store, configs[(method, seed)],
                                      work / "logs" / f"{method}_seed{seed}.log", errors, key)
                    if run is None:
                        continue
                    _save_finished_run(work, method, seed, configs[(method, seed)], run)
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="small")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
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
    _set_quiet_environment()
    bench = CONFIGS[args.config]
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
    for path in write_results(results, args.out_dir, stem):
        _log(f"wrote {path}")
    sys.__stdout__.write(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
