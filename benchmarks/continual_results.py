"""The continual benchmark's figures, pure: from the sessions' metrics, timings and work
counts to a method's summary, means over seeds, the issues' targets and paired significance
tests pooled over seeds.

Functions over plain dicts, arrays and frames, no file access: `benchmarks.continual_runs`
reads the stores and Prefect's records, `benchmarks.continual_report` turns the results into
Markdown and plots. The work units, the per-session cost and the targets of issue 14 (update
modes) are in `benchmarks.continual_costs`. Covered by tests/test_continual_bench.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks.continual_costs import (
    POINTS,
    per_session_times,
    session_costs,
    update_mode_targets,
)
from benchmarks.continual_costs import all_known as _all_known
from benchmarks.continual_costs import points as _points
from benchmarks.continual_costs import ratio as _ratio

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
    "align_models": "indexing",  # update mode aligned: the map old -> new model
    "evaluate_sessions": "evaluation",
}
# The wall-time stages behind the cost (informative only: the targets use
# continual_costs.COST_UNIT).
COST_STAGES = ("embedding", "training")
SUMMARY_METRICS = ("ndcg@10", "success@5", "recall@10", "recall@100")
# Our metric name -> ranx metric name (as tasks.evaluation.METRICS) for the paired tests.
TEST_METRICS = {"ndcg@10": "ndcg@10", "success@5": "hit_rate@5", "recall@10": "recall@10"}
MAX_P = 0.05
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


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
    """One method and seed: final averages, backward transfer, curve, matrix and stage times
    (summed over the stream: `time_s`; per session: `time_s_per_session`, {stage: seconds
    per session}).

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
    out["time_s_per_session"] = per_session_times(timings, STAGES)
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


def _mean_of_dicts(dicts: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """Key by key mean of equally shaped nested dicts of numbers and lists of numbers (None
    if any is missing)."""
    if not dicts or any(d is None for d in dicts):
        return None
    return {key: _mean_of_dicts([d.get(key) for d in dicts]) if isinstance(value, Mapping)
            else _elementwise_mean([d.get(key) for d in dicts]) if isinstance(value, list)
            else _mean_std([d.get(key) for d in dicts])[0]
            for key, value in dicts[0].items()}


SCALARS = (*(f"avg_{m}" for m in SUMMARY_METRICS), *(f"bwt_{m}" for m in SUMMARY_METRICS),
           "wall_s", "cpu_s")


def aggregate_seeds(per_seed: Mapping[int | str, Mapping[str, Any]]) -> dict[str, Any]:
    """Means over seeds (`avg_ndcg@10`, ..., `cpu_s`, `time_s` per stage, `work` counts, and
    per session index: `time_s_per_session`, `work.per_session` and the `session_costs` made
    of them), their sample std (`std`, None with one seed) and the per-seed values (`seeds`,
    keyed by the seed as a string)."""
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
    out["work"] = _mean_of_dicts([run.get("work") for run in runs])
    per_session = [run.get("time_s_per_session") for run in runs]
    out["time_s_per_session"] = _mean_of_dicts(per_session) if runs else None
    out["curve_ndcg@10"] = _elementwise_mean([run.get("curve_ndcg@10") for run in runs]) \
        if runs else None
    out["matrix_ndcg@10"] = _elementwise_mean([run.get("matrix_ndcg@10") for run in runs]) \
        if runs else None
    out["sessions"] = runs[0].get("sessions") if runs else None
    out["session_costs"] = session_costs(out["sessions"], out["time_s_per_session"],
                                         out["work"])
    out["n_seeds"] = len(runs)
    out["seeds"] = {str(seed): dict(run) for seed, run in per_seed.items()}
    return out


def cost_seconds(time_s: Mapping[str, float] | None) -> float | None:
    """Wall seconds of the embedding and training stages (COST_STAGES) of a method."""
    if time_s is None:
        return None
    return float(sum(time_s[s] for s in COST_STAGES))


# Methods whose name starts so are self-supervised variants (no qrels read for training).
SELFSUP_PREFIX = "driftlane_selfsup"

# Replay baselines driftlane must beat, with the margin in points (those not run are skipped).
REPLAY_BASELINES = {"random_replay": 1.0, "mir": 0.0, "gss": 0.0}


def evaluate_targets(methods: Mapping[str, Mapping[str, Any]],
                     significance: Mapping[str, Any] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """The targets of issues 4 and 13, from the means over seeds and the pooled paired tests
    (`pooled_paired_tests`), then those of issue 14 on the update modes
    (`continual_costs.update_mode_targets`, each only when the methods it needs ran); `met`
    is None when a figure is missing (a method not run or failed, no test). Differences are
    in nDCG points (0.01); the cost is in continual_costs.COST_UNIT."""

    def get(method: str, key: str) -> Any:
        return methods.get(method, {}).get(key)

    def work(method: str, *path: str) -> Any:
        value: Any = get(method, "work")
        for key in path:
            value = None if value is None else value.get(key)
        return value

    def met(ok: Any, *figures: Any) -> bool | None:
        return bool(ok) if _all_known(*figures) else None

    ours = get("driftlane", "avg_ndcg@10")
    vs_zero = _points(ours, get("zero_shot", "avg_ndcg@10"))
    test = ((significance or {}).get("pairs") or {}).get("driftlane vs zero_shot") or {}
    p_zero = (test.get("ndcg@10") or {}).get("p_value")
    vs_replay = {name: _points(ours, get(name, "avg_ndcg@10")) for name in REPLAY_BASELINES
                 if name == "random_replay" or name in methods}
    replay_ok = all(v is not None and v >= REPLAY_BASELINES[n] for n, v in vs_replay.items())
    bwt = get("driftlane", "bwt_ndcg@10")
    vs_joint = _points(ours, get("joint", "avg_ndcg@10"))
    ratio = _ratio(work("driftlane", "cost_token_equivalents"),
                   work("joint", "cost_token_equivalents"))
    # every self-supervised variant that ran (driftlane_selfsup alone when none did)
    variants = [m for m in methods if m.startswith(SELFSUP_PREFIX)] or ["driftlane_selfsup"]
    selfsup = {m: _points(get(m, "avg_ndcg@10"), get("zero_shot", "avg_ndcg@10"))
               for m in variants}
    targets = {
        "driftlane_above_zero_shot": {
            "target": "driftlane avg nDCG@10 >= zero_shot + 3 points, significant at "
                      f"p < {MAX_P} (paired t-test per query, pooled over seeds)",
            "measured": {"driftlane_minus_zero_shot_points": vs_zero, "p_value": p_zero},
            "met": met(_all_known(vs_zero, p_zero) and vs_zero >= 3 and p_zero < MAX_P,
                       vs_zero, p_zero),
        },
        "driftlane_above_replay": {
            "target": "driftlane avg nDCG@10 >= random_replay + 1 point, and >= mir and gss "
                      "(when run)",
            "measured": {f"driftlane_minus_{n}_points": v for n, v in vs_replay.items()},
            "met": met(replay_ok, *vs_replay.values()),
        },
        "driftlane_backward_transfer": {
            "target": "driftlane bwt nDCG@10 >= -0.5 points (sequential expected to forget "
                      "more)",
            "measured": {"driftlane_bwt_points": _points(bwt, 0.0),
                         "sequential_bwt_points": _points(get("sequential", "bwt_ndcg@10"),
                                                          0.0)},
            "met": met(bwt is not None and bwt * POINTS >= -0.5, bwt),
        },
        "driftlane_close_to_joint": {
            "target": "driftlane avg nDCG@10 >= joint - 1 point, at most 0.40 of joint's "
                      "embedding + training cost in forward-token equivalents",
            "measured": {
                "driftlane_minus_joint_points": vs_joint,
                "cost_ratio": ratio,
                "encoded_tokens_ratio": _ratio(work("driftlane", "encoded", "tokens"),
                                               work("joint", "encoded", "tokens")),
                "trained_tokens_ratio": _ratio(work("driftlane", "trained", "tokens"),
                                               work("joint", "trained", "tokens")),
                # load-dependent, for comparison only
                "cpu_s_ratio": _ratio(get("driftlane", "cpu_s"), get("joint", "cpu_s")),
                "wall_s_ratio": _ratio(cost_seconds(get("driftlane", "time_s")),
                                       cost_seconds(get("joint", "time_s"))),
            },
            "met": met(_all_known(vs_joint, ratio) and vs_joint >= -1 and ratio <= 0.4,
                       vs_joint, ratio),
        },
        "selfsup_above_zero_shot": {
            "target": "driftlane_selfsup avg nDCG@10 >= zero_shot + 1 point (no qrels read; "
                      "each self-supervised variant that ran, met by any)",
            "measured": {f"{m}_minus_zero_shot_points": v for m, v in selfsup.items()},
            "met": (None if all(v is None for v in selfsup.values())
                    else any(v is not None and v >= 1 for v in selfsup.values())),
        },
    }
    return {**targets, **update_mode_targets(methods)}


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


def per_query_scores(qrels: Mapping[str, Mapping[str, int]],
                     run: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{our metric name: {query key: score}} of one run on the judged queries (ranx, as
    tasks.evaluation computes the metrics)."""
    from ranx import Qrels, Run, evaluate

    ranx_run = Run.from_dict({q: dict(d) for q, d in run.items()})
    evaluate(Qrels.from_dict({q: dict(d) for q, d in qrels.items()}), ranx_run,
             list(TEST_METRICS.values()), make_comparable=True)
    return {ours: {q: float(v) for q, v in ranx_run.scores[theirs].items()}
            for ours, theirs in TEST_METRICS.items()}


def pooled_paired_test(a: Mapping[str, Mapping[str, float]],
                       b: Mapping[str, Mapping[str, float]],
                       resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Paired comparison of two methods per query, pooled over seeds.

    a, b: seed -> {query key: score} of one metric. Over the seeds both methods ran, each
    query's difference d_q is the mean over seeds of a - b (the query is the unit: seeds are
    repeated measures of it, not more queries). Returns the mean difference and a two-sided
    paired Student's t-test over the d_q (t = mean / (sd / sqrt(n)), n - 1 degrees of
    freedom), a percentile bootstrap 95% interval of the mean difference (queries resampled
    with replacement, seeded), and wins / ties / losses of a over the queries.
    """
    from scipy import stats

    seeds = [s for s in a if s in b]
    if not seeds:
        raise ValueError("no seed run by both methods")
    queries = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    diff = np.array([[a[s][q] - b[s][q] for q in queries] for s in seeds]).mean(axis=0)  # (n,)
    n = len(diff)
    mean = float(diff.mean()) if n else 0.0
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    if sd > 1e-12:  # scores lie in [0, 1]; below this the spread is rounding
        t = mean / (sd / math.sqrt(n))
        p = float(2.0 * stats.t.sf(abs(t), df=n - 1))
    else:  # every query moved by the same amount (or there is one query)
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    low, high = _bootstrap_interval(diff, resamples, seed)
    wins, losses = int((diff > 1e-12).sum()), int((diff < -1e-12).sum())
    return {"n_queries": n, "seeds": [str(s) for s in seeds],
            "mean_a": _mean_over(a, seeds, queries), "mean_b": _mean_over(b, seeds, queries),
            "mean_difference": mean, "t": _finite(t), "p_value": p, "significant": p < MAX_P,
            "ci95": [low, high], "wins": wins, "ties": n - wins - losses, "losses": losses}


def _bootstrap_interval(diff: np.ndarray, resamples: int, seed: int,
                        chunk: int = 1000) -> tuple[float, float]:
    """Percentile 95% interval of the mean of `diff` (n,) over `resamples` seeded resamples
    of its entries with replacement (drawn `chunk` resamples at a time)."""
    if not len(diff):
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        diff[rng.integers(0, len(diff), size=(min(chunk, resamples - done), len(diff)))]
        .mean(axis=1) for done in range(0, resamples, chunk)])  # (resamples,)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _mean_over(scores: Mapping[str, Mapping[str, float]], seeds: Sequence[str],
               queries: Sequence[str]) -> float:
    return float(np.mean([[scores[s][q] for q in queries] for s in seeds])) if queries else 0.0


def pooled_paired_tests(scores: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]
                        ) -> dict[str, Any]:
    """`pooled_paired_test` of every pair of methods on every TEST_METRICS metric.

    scores: method -> seed -> metric -> {query key: score} (`per_query_scores`), methods in
    report order. A pair is "a vs b" with a the later method in that order (the baselines come
    first, so differences read as driftlane minus baseline).
    """
    names = list(scores)
    pairs: dict[str, dict[str, Any]] = {}
    for j, a in enumerate(names):
        for b in names[:j]:
            if not set(scores[a]) & set(scores[b]):
                continue
            pairs[f"{a} vs {b}"] = {
                metric: pooled_paired_test({s: m[metric] for s, m in scores[a].items()},
                                           {s: m[metric] for s, m in scores[b].items()})
                for metric in TEST_METRICS}
    return {"pairs": pairs}


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
