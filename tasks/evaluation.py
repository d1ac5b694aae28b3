"""Evaluate every session seen so far against the whole corpus seen so far (DESIGN step 10).

Metrics come from ranx: nDCG@10, Success@5 (ranx's `hit_rate@5`), Recall@10, Recall@100.
A document is identified across sessions as `<session>/<doc id>`, since collections reuse
doc ids ("1", "2", ...); qrels of a session refer to that session's own documents.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from driftlane.infra.caching import cache_key_for, stage_output_dir
from driftlane.infra.config import EmbeddingConfig, EvaluationConfig
from driftlane.infra.embedding_cache import EmbeddingCache
from driftlane.infra.faults import crash_point
from driftlane.infra.io import read_parquet
from driftlane.infra.progress import artifact_key
from driftlane.tasks.index_shards import open_searchable
from driftlane.tasks.search import augment_database, encode_queries, search_queries
from driftlane.tasks.stage_results import SearchableIndex, SessionEvaluation, SessionReport, Source

TRAINING_GAIN = "training_gain.json"
EVALUATION_VERSION = "4"  # 4: searches the blocks of a SearchableIndex

# Our metric name -> ranx metric name.
METRICS = {
    "ndcg@10": "ndcg@10",
    "success@5": "hit_rate@5",
    "recall@10": "recall@10",
    "recall@100": "recall@100",
}


def global_doc_key(session: str, doc_id: str) -> str:
    return f"{session}/{doc_id}"


def ranking_from_search(query_ids: Sequence[str], scores: np.ndarray, rows: np.ndarray,
                        doc_keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Turn Faiss output (n_queries, k) into a ranx-style run {query: {doc key: score}}."""
    run: dict[str, dict[str, float]] = {}
    for qid, q_scores, q_rows in zip(query_ids, scores, rows, strict=True):
        run[qid] = {doc_keys[r]: float(s) for s, r in zip(q_scores, q_rows, strict=True) if r >= 0}
    return run


def retrieval_metrics(qrels: dict[str, dict[str, int]],
                      run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean metrics over the judged queries (those in `qrels`) with ranx."""
    from driftlane.infra.numba_cache import cache_compiled_kernels

    cache_compiled_kernels()  # before ranx's import: its compiled code is kept across processes
    from ranx import Qrels, Run, evaluate  # slow import (numba); only when evaluating

    judged = {q: docs for q, docs in qrels.items() if any(s > 0 for s in docs.values())}
    # A judged query that retrieved nothing scores 0; ranx needs an entry for it.
    ranking = {q: run.get(q) or {"__none__": 0.0} for q in judged}
    scores = evaluate(Qrels.from_dict(judged), Run.from_dict(ranking), list(METRICS.values()),
                      make_comparable=True)
    return {ours: float(scores[theirs]) for ours, theirs in METRICS.items()}


def metrics_matrix(rows: Sequence[tuple[str, dict[str, dict[str, float]]]],
                   metric: str) -> np.ndarray:
    """R (T, T): R[i][j] = `metric` on session j after session i; NaN where not evaluated.

    rows: (session name, metrics of that session's run keyed by evaluated session), in stream
    order, T rows.
    """
    names = [name for name, _ in rows]
    matrix = np.full((len(rows), len(rows)), np.nan)
    for i, (_, metrics) in enumerate(rows):
        for evaluated, values in metrics.items():
            if evaluated in names and metric in values:
                matrix[i, names.index(evaluated)] = values[metric]
    return matrix


def continual_summary(rows: Sequence[tuple[str, dict[str, dict[str, float]]]],
                      metrics: Sequence[str] = tuple(METRICS)) -> dict:
    """The evaluation matrix of a stream, average performance and backward transfer.

    avg = mean over j of R[T-1][j] (sessions with test queries); bwt = mean over j < T-1 of
    R[T-1][j] - R[j][j] (Lopez-Paz & Ranzato 2017, GEM): negative means forgetting. JSON-ready;
    NaN becomes None.
    """
    out: dict = {"sessions": [name for name, _ in rows], "matrix": {}, "avg": {}, "bwt": {}}
    for metric in metrics:
        r = metrics_matrix(rows, metric)
        last = r[-1] if len(r) else np.zeros(0)
        avg = float(np.nanmean(last)) if np.isfinite(last).any() else None
        diffs = [r[-1, j] - r[j, j] for j in range(len(r) - 1)
                 if np.isfinite(r[-1, j]) and np.isfinite(r[j, j])]
        out["matrix"][metric] = [[None if np.isnan(v) else float(v) for v in row] for row in r]
        out["avg"][metric] = avg
        out["bwt"][metric] = float(np.mean(diffs)) if diffs else None
    return out


def training_gain(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                  metrics: Sequence[str] = tuple(METRICS)) -> dict:
    """What a session's fine-tuning bought: the starting model's scores and the trained
    model's on the same sessions (the new one and every earlier one), their averages and the
    gain (after - before) per metric. JSON-ready.
    """
    common = [name for name in after if name in before]
    out: dict = {"sessions": common, "before": {n: before[n] for n in common},
                 "after": {n: after[n] for n in common}, "average_before": {},
                 "average_after": {}, "gain": {}}
    for metric in metrics:
        pairs = [(before[n][metric], after[n][metric]) for n in common
                 if metric in before[n] and metric in after[n]]
        if not pairs:
            continue
        b, a = (float(np.mean(v)) for v in zip(*pairs, strict=True))
        out["average_before"][metric], out["average_after"][metric] = b, a
        out["gain"][metric] = a - b
    return out


def qrels_dict(qrels: pd.DataFrame, session: str, split: str) -> dict[str, dict[str, int]]:
    """{query id: {global doc key: score}} for one split of a session's qrels table."""
    rows = qrels[qrels["split"] == split]
    out: dict[str, dict[str, int]] = {}
    for qid, did, score in zip(rows["query_id"], rows["doc_id"], rows["score"], strict=True):
        out.setdefault(qid, {})[global_doc_key(session, did)] = int(score)
    return out


# --- Prefect task wrappers ---


@task(cache_key_fn=cache_key_for("evaluate", EVALUATION_VERSION), persist_result=True,
      result_serializer="json", task_run_name="evaluate after {session_name}")
def evaluate_sessions(session_name: str, index: SearchableIndex, sessions: list[Source],
                      embedding: EmbeddingConfig, evaluation: EvaluationConfig,
                      model_version: str, cache_url: str, scratch_dir: str) -> SessionEvaluation:
    """Evaluate each session's test queries against the index of everything seen so far
    (its blocks: `tasks.index_shards`)."""
    started = time.perf_counter()
    logger = get_run_logger()
    out = stage_output_dir("evaluate", EVALUATION_VERSION, scratch_dir)
    searchable, ids = open_searchable(index)
    faiss_index = augment_database(searchable, evaluation.database_augmentation)
    doc_keys = [global_doc_key(s, d) for s, d in zip(ids["session"], ids["doc_id"], strict=True)]
    cache = EmbeddingCache(cache_url, model_version, embedding.chunking)

    metrics: dict[str, dict[str, float]] = {}
    rankings = []
    for src in sessions:
        qrels = qrels_dict(read_parquet(src.qrels_url), src.session, evaluation.split)
        if not qrels:
            logger.info("session %s has no %s qrels: not evaluated", src.session,
                        evaluation.split)
            continue
        queries = read_parquet(src.queries_url)
        queries = queries[queries["query_id"].isin(qrels)]
        vectors = encode_queries(list(queries["text"]), embedding, cache,
                                 label=f"queries {src.session}")
        scores, rows = search_queries(faiss_index, vectors, evaluation.top_k,
                                      evaluation.query_expansion)
        run = ranking_from_search(list(queries["query_id"]), scores, rows, doc_keys)
        metrics[src.session] = {**retrieval_metrics(qrels, run), "n_queries": len(queries)}
        rankings.append(ranking_rows(src.session, run))
        logger.info("after %s, session %s: %s", session_name, src.session,
                    {k: round(v, 4) for k, v in metrics[src.session].items()})
    crash_point("evaluate.write")
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    runs = (pd.concat(rankings, ignore_index=True) if rankings
            else ranking_rows("", {}))
    runs.to_parquet(out / "runs.parquet", index=False)
    return SessionEvaluation(metrics_path=str(path), runs_path=str(out / "runs.parquet"),
                             metrics=metrics, seconds=time.perf_counter() - started)


def ranking_rows(session: str, run: dict[str, dict[str, float]]) -> pd.DataFrame:
    """A ranx-style run as rows (evaluated_session, query_id, doc_key, score, rank)."""
    rows = [(qid, doc, score) for qid, docs in run.items() for doc, score in docs.items()]
    frame = pd.DataFrame(rows, columns=["query_id", "doc_key", "score"])
    frame["score"] = frame["score"].astype(np.float32)
    frame["rank"] = (frame.groupby("query_id")["score"].rank(method="first", ascending=False)
                     .astype(np.int32))
    frame.insert(0, "evaluated_session", session)
    return frame


def plot_matrix(summary: dict, metric: str, path: Path) -> None:
    """A PNG heatmap of R[i][j] for `metric`: rows after session i, columns session j."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["sessions"]
    r = np.array([[np.nan if v is None else v for v in row]
                  for row in summary["matrix"][metric]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(names), 1.2 + 0.8 * len(names)))
    image = ax.imshow(r, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(r[i, j]):
                ax.text(j, i, f"{r[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if r[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
    ax.set_title(f"{metric}: avg {summary['avg'][metric] or 0:.3f}, "
                 f"BWT {summary['bwt'][metric] or 0:+.3f}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_markdown(session_name: str, summary: dict, cluster: dict | None,
                    timings: dict[str, float], gain: dict | None = None) -> str:
    """The per-session report: metrics matrix, average and BWT, what training bought,
    cluster report, timings."""
    names = summary["sessions"]
    lines = [f"# driftlane session {session_name}", "", "## nDCG@10 matrix (row: after session)",
             "", "| after \\ on | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, summary["matrix"]["ndcg@10"], strict=True):
        cells = ["" if v is None else f"{v:.4f}" for v in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| metric | average after last | backward transfer |", "|---|---|---|"]
    for metric in summary["avg"]:
        avg, bwt = summary["avg"][metric], summary["bwt"][metric]
        lines.append(f"| {metric} | {'' if avg is None else f'{avg:.4f}'} | "
                     f"{'' if bwt is None else f'{bwt:+.4f}'} |")
    if gain is not None and gain["gain"]:
        lines += ["", "## What training bought (starting model -> trained model, same "
                  "sessions)", "", "| metric | before | after | gain |", "|---|---|---|---|"]
        for metric, delta in gain["gain"].items():
            lines.append(f"| {metric} | {gain['average_before'][metric]:.4f} | "
                         f"{gain['average_after'][metric]:.4f} | {delta:+.4f} |")
    if cluster is not None:
        lines += ["", "## Clusters", ""]
        for key in ("n_clusters", "n_new_clusters", "evictions", "memory_size",
                    "memory_budget", "id_changed_share", "silhouette", "davies_bouldin",
                    "calinski_harabasz", "dunn", "wcss"):
            lines.append(f"- {key}: {cluster.get(key)}")
    lines += ["", "## Timings (s)", ""] + [f"- {k}: {v:.1f}" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="report {session_name}")
def report_session(session_name: str, previous: list[Source], evaluation: SessionEvaluation,
                   cluster_report_path: str | None, timings: dict[str, float],
                   scratch_dir: str,
                   before: SessionEvaluation | None = None) -> SessionReport:
    """Matrix R over the stream so far, its heatmap, what training bought (`before`: the
    starting model's evaluation), timings and a Markdown report artifact."""
    out = Path(scratch_dir) / "report" / session_name
    out.mkdir(parents=True, exist_ok=True)
    rows = [(src.session, _read_json(src.metrics_url)) for src in previous]
    summary = continual_summary([*rows, (session_name, evaluation.metrics)])
    (out / "matrix.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    (out / "timings.json").write_text(json.dumps(timings, indent=2, sort_keys=True))
    plot_matrix(summary, "ndcg@10", out / "matrix_ndcg10.png")
    cluster = (json.loads(Path(cluster_report_path).read_text())
               if cluster_report_path else None)
    names = ["matrix.json", "timings.json", "matrix_ndcg10.png", "report.md"]
    gain = None
    if before is not None:
        gain = training_gain(before.metrics, evaluation.metrics)
        (out / TRAINING_GAIN).write_text(json.dumps(gain, indent=2, sort_keys=True))
        names.append(TRAINING_GAIN)
    markdown = report_markdown(session_name, summary, cluster, timings, gain)
    (out / "report.md").write_text(markdown)
    create_markdown_artifact(markdown=markdown, key=artifact_key(f"report {session_name}"),
                             description=f"driftlane report after session {session_name}")
    return SessionReport(files={name: str(out / name) for name in names},
                         summary=summary)


def _read_json(url: str) -> dict:
    with fsspec.open(url, "r") as f:
        return json.load(f)
