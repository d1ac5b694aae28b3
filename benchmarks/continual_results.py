"""The continual benchmark's figures, pure: from the sessions' metrics and timings to a
method's summary, means over seeds, the issue's four targets and paired significance tests.

Functions over plain dicts and frames, no file access: `benchmarks.continual_runs` reads the
stores and Prefect's records, `benchmarks.continual_report` turns the results into Markdown
and plots. Covered by tests/test_continual_bench.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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


def task_function_name(task_key: str) -> str:
    """Prefect's task key is `<function name>-<source digest>`."""
    return task_key.rsplit("-", 1)[0]


def summarize_run(rows: Sequence[tuple[str, dict[str, dict[str, float]]]],
                  timings: Sequence[Mapping[str, float] | None],
                  stage_times: Mapping[str, Any] | None = None,
                  wall_s: float | None = None) -> dict[str, Any]:
    """One method and seed: final averages, backward transfer, curve, matrix and stage times.

    rows: (session name, its metrics.json) in stream order; timings: each session's
    timings.json (None where missing); stage_times: `stage_times_from_task_runs`; wall_s: the
    stream's wall time measured outside.
    """
    from driftlane.tasks.evaluation import continual_summary

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
