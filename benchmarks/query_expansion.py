"""alpha-query expansion and database-side augmentation against plain search.

A small real stream (default: scifact, cisi, npl_vaswani, 1000 documents a session, built by
`tasks.stream_builder.build_stream`) is embedded with the zero-shot base encoder (no
fine-tuning: the options act on the retrieval side only) into one exact index over every
session's documents, the index a session flow builds at this size. Each session's test queries
are encoded with `tasks.search.encode_queries` and searched with `tasks.search` exactly as the
evaluation does, once per variant: plain, alpha-QE for a few (n, alpha), DBA, DBA + alpha-QE.

Reported per variant: nDCG@10 per session and on average over sessions (ranx, as the
evaluation), the per-query difference to plain (pooled over sessions) with a paired bootstrap
95% interval of its mean and a Wilcoxon signed-rank p-value (Holm-corrected over the variants),
and latency: query encoding and search, per query, one query at a time, plus the one-off DBA
cost. A variant "helps significantly" when its Holm-corrected p < 0.05, its interval lies
above 0 and no session's mean drops significantly.

Run:  python -m benchmarks.query_expansion --out benchmarks/results/query_expansion_cpu.json
Writes the JSON to --out and a Markdown report beside it (same name, .md). About 5 minutes
on 2 CPU cores (most of it embedding 3000 documents; a re-run reads them from its cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATASETS = ("scifact", "cisi", "npl_vaswani")
# (label, query expansion (n, alpha), database augmentation (n, alpha)); n = 0 is off
VARIANTS = (
    ("plain", (0, 3.0), (0, 3.0)),
    ("aQE n=1 a=3", (1, 3.0), (0, 3.0)),
    ("aQE n=2 a=3", (2, 3.0), (0, 3.0)),
    ("aQE n=3 a=3", (3, 3.0), (0, 3.0)),
    ("aQE n=5 a=3", (5, 3.0), (0, 3.0)),
    ("aQE n=10 a=3", (10, 3.0), (0, 3.0)),
    ("aQE n=3 a=1", (3, 1.0), (0, 3.0)),
    ("DBA n=1 a=3", (0, 3.0), (1, 3.0)),
    ("DBA n=3 a=3", (0, 3.0), (3, 3.0)),
    ("DBA n=1 + aQE n=2", (2, 3.0), (1, 3.0)),
)
BOOTSTRAP = 10_000
LATENCY_QUERIES = 100  # queries encoded one at a time for the encoding latency


def load_stream(args: argparse.Namespace) -> list[Any]:
    """The stream's sessions (tasks.ingest.SessionData), building it when missing."""
    from driftlane.tasks.ingest import read_session
    from driftlane.tasks.stream_builder import build_stream

    stream = args.work / "stream"
    wanted = {"datasets": list(args.datasets), "docs_per_session": args.docs_per_session,
              "queries_per_session": args.queries_per_session, "seed": args.seed}
    marker = args.work / "stream_args.json"
    if not (stream / "stream.json").exists() or not marker.exists() or \
            json.loads(marker.read_text()) != wanted:
        build_stream(args.datasets, stream, docs_per_session=args.docs_per_session,
                     queries_per_session=args.queries_per_session, seed=args.seed,
                     datasets_dir=args.datasets_dir, force=True)
        marker.write_text(json.dumps(wanted))
    manifest = json.loads((stream / "stream.json").read_text())
    return [read_session(stream / s["name"]) for s in manifest["sessions"]]


def judged_test_qrels(session: Any) -> dict[str, dict[str, int]]:
    from driftlane.tasks.evaluation import qrels_dict

    qrels = qrels_dict(session.qrels, session.name, "test")
    return {q: docs for q, docs in qrels.items() if any(s > 0 for s in docs.values())}


def per_query_ndcg(qrels: dict[str, dict[str, int]],
                   run: dict[str, dict[str, float]]) -> dict[str, float]:
    """nDCG@10 of every judged query (ranx, as `tasks.evaluation.retrieval_metrics`)."""
    from ranx import Qrels, Run, evaluate

    judged = Qrels.from_dict(qrels)
    ranking = Run.from_dict({q: run.get(q) or {"__none__": 0.0} for q in qrels})
    values = evaluate(judged, ranking, "ndcg@10", return_mean=False, make_comparable=True)
    return dict(zip(list(judged.keys()), map(float, values), strict=True))


def paired_comparison(diff: np.ndarray, seed: int) -> dict[str, float]:
    """Mean of per-query differences, its paired bootstrap 95% interval, Wilcoxon p."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (BOOTSTRAP, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    p = 1.0 if not np.any(diff) else float(wilcoxon(diff, zero_method="wilcox").pvalue)
    return {"mean_diff": float(diff.mean()), "ci95": [float(low), float(high)],
            "wilcoxon_p": p, "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()),
            "ties": int((diff == 0).sum())}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values."""
    order = np.argsort(pvalues)
    adjusted = np.empty(len(pvalues))
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted.tolist()


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import torch

    from driftlane.infra.config import EmbeddingConfig, NeighbourAveraging
    from driftlane.infra.embedding_cache import EmbeddingCache
    from driftlane.tasks.embedding_stage import embed_with_cache
    from driftlane.tasks.evaluation import global_doc_key, ranking_from_search, retrieval_metrics
    from driftlane.tasks.indexing import build_exact_index
    from driftlane.tasks.models import load_encoder, model_version, resolve_model_path
    from driftlane.tasks.search import augment_database, encode_queries, search_queries
    from driftlane.tasks.texts import document_text

    # One setting for both: on a shared 2-core machine two OpenMP pools (torch's and
    # Faiss') oversubscribe the cores, and encoding one query gets ten times slower.
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    sessions = load_stream(args)
    stream_s = time.perf_counter() - started

    model = resolve_model_path("default")
    embedding = EmbeddingConfig(model=model, device="cpu")
    cache = EmbeddingCache(str(args.work / "cache"), model_version(model), embedding.chunking)
    started = time.perf_counter()
    blocks, doc_keys = [], []
    for s in sessions:
        texts = [document_text(t, x) for t, x in zip(s.corpus["title"], s.corpus["text"],
                                                     strict=True)]
        embedded, _ = embed_with_cache(lambda: load_encoder(model, "cpu"), texts,
                                       embedding.chunking, cache, embedding.batch_size)
        blocks.append(embedded.vectors)
        print(f"{s.name}: {len(texts)} documents embedded ({time.perf_counter() - started:.0f} "
              "s so far)", file=sys.stderr)
        doc_keys += [global_doc_key(s.name, d) for d in s.corpus["doc_id"]]
    index = build_exact_index(np.concatenate(blocks))
    embed_docs_s = time.perf_counter() - started

    queries = {}  # session -> (query ids, texts, vectors, judged qrels)
    started = time.perf_counter()
    for s in sessions:
        qrels = judged_test_qrels(s)
        table = s.queries[s.queries["query_id"].isin(qrels)]
        texts = list(table["text"])
        queries[s.name] = (list(table["query_id"]), texts, encode_queries(texts, embedding),
                           qrels)
    encode_batch_s = time.perf_counter() - started
    n_queries = sum(len(q[0]) for q in queries.values())
    sample = [t for q in queries.values() for t in q[1]][:LATENCY_QUERIES]
    started = time.perf_counter()
    for text in sample:
        encode_queries([text], embedding)
    encode_one_ms = 1000 * (time.perf_counter() - started) / len(sample)

    results = []
    plain_scores: dict[str, dict[str, float]] = {}
    for label, (qe_n, qe_alpha), (dba_n, dba_alpha) in VARIANTS:
        expansion = NeighbourAveraging(n=qe_n, alpha=qe_alpha)
        started = time.perf_counter()
        searched = augment_database(index, NeighbourAveraging(n=dba_n, alpha=dba_alpha))
        dba_s = time.perf_counter() - started
        per_session, per_query, search_s = {}, {}, 0.0
        search_queries(searched, blocks[0][:1], args.top_k, expansion)  # warm-up
        for name, (qids, _texts, vectors, qrels) in queries.items():
            started = time.perf_counter()
            for i in range(len(qids)):  # one query at a time, as a server answers
                search_queries(searched, vectors[i:i + 1], args.top_k, expansion)
            search_s += time.perf_counter() - started
            scores, rows = search_queries(searched, vectors, args.top_k, expansion)
            run = ranking_from_search(qids, scores, rows, doc_keys)
            ndcg = per_query_ndcg(qrels, run)
            mean = retrieval_metrics(qrels, run)["ndcg@10"]
            assert abs(mean - np.mean(list(ndcg.values()))) < 1e-9  # same figure as ranx's
            per_session[name] = {"ndcg@10": mean, "n_queries": len(ndcg)}
            per_query[name] = ndcg
        entry = {"variant": label, "query_expansion": {"n": qe_n, "alpha": qe_alpha},
                 "database_augmentation": {"n": dba_n, "alpha": dba_alpha},
                 "sessions": per_session,
                 "avg_ndcg@10": float(np.mean([v["ndcg@10"] for v in per_session.values()])),
                 "search_ms_per_query": 1000 * search_s / n_queries,
                 "dba_build_s": dba_s if dba_n else 0.0}
        if label == "plain":
            plain_scores = per_query
        else:
            diffs = {name: np.array([per_query[name][q] - plain_scores[name][q]
                                     for q in plain_scores[name]]) for name in per_query}
            entry["vs_plain"] = paired_comparison(np.concatenate(list(diffs.values())),
                                                  args.seed)
            entry["vs_plain_by_session"] = {name: paired_comparison(d, args.seed)
                                            for name, d in diffs.items()}
        results.append(entry)
        print(f"{label:>20}: avg nDCG@10 {entry['avg_ndcg@10']:.4f}", file=sys.stderr)

    compared = [r for r in results if "vs_plain" in r]
    for r, p in zip(compared, holm([r["vs_plain"]["wilcoxon_p"] for r in compared]),
                    strict=True):
        r["vs_plain"]["wilcoxon_p_holm"] = p
        low = r["vs_plain"]["ci95"][0]
        hurts = any(c["ci95"][1] < 0 and c["wilcoxon_p"] < 0.05
                    for c in r["vs_plain_by_session"].values())
        r["helps_significantly"] = bool(p < 0.05 and low > 0 and not hurts)
    helpful = [r for r in compared if r["helps_significantly"]]
    best = max(helpful, key=lambda r: r["avg_ndcg@10"]) if helpful else None
    return {
        "command": " ".join(["python -m benchmarks.query_expansion", *args.argv]),
        "machine": {"platform": platform.machine(), "cpus": os.cpu_count(),
                    "threads": args.threads, "loadavg_start": list(load_start),
                    "loadavg_end": list(os.getloadavg())},
        "stream": {"datasets": list(args.datasets), "docs_per_session": args.docs_per_session,
                   "queries_per_session": args.queries_per_session, "seed": args.seed,
                   "sessions": [{"name": s.name, "docs": len(s.corpus),
                                 "test_queries": len(queries[s.name][0])} for s in sessions],
                   "n_docs": int(index.ntotal), "n_queries": n_queries},
        "encoder": {"model": "packaged all-MiniLM-L6-v2 (zero-shot)",
                    "version": model_version(model),
                    "chunking": embedding.chunking.model_dump(mode="json")},
        "index": "exact (IndexFlatIP), as a session builds below 50000 documents",
        "top_k": args.top_k,
        "timings_s": {"stream": stream_s, "embed_documents": embed_docs_s,
                      "encode_queries_batch": encode_batch_s},
        "encode_ms_per_query": encode_one_ms,
        "variants": results,
        "recommendation": {
            "default": "off" if best is None else best["variant"],
            "reason": ("No variant improves nDCG@10 significantly over plain search "
                       "(Holm-corrected Wilcoxon p < 0.05, bootstrap interval above 0, no "
                       "session significantly worse)") if best is None else
                      (f"{best['variant']} improves nDCG@10 significantly "
                       f"({best['vs_plain']['mean_diff']:+.4f})"),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The report: command, machine load, figures, recommendation."""
    names = [s["name"] for s in result["stream"]["sessions"]]
    sessions = ", ".join(f"{s['name']} ({s['docs']} docs, {s['test_queries']} test queries)"
                         for s in result["stream"]["sessions"])
    machine = result["machine"]
    lines = [
        f"# alpha-QE and DBA against plain search ({machine['platform']}, "
        f"{machine['cpus']} CPUs)", "",
        f"Command: `{result['command']}`", "",
        f"Machine load (os.getloadavg, 1/5/15 min): start "
        f"{', '.join(f'{v:.2f}' for v in machine['loadavg_start'])}; end "
        f"{', '.join(f'{v:.2f}' for v in machine['loadavg_end'])}. Threads (torch and "
        f"Faiss): {machine['threads']}.", "",
        f"Stream: {sessions}; one exact "
        f"index over all {result['stream']['n_docs']} documents; encoder "
        f"{result['encoder']['model']}, version {result['encoder']['version']}; every "
        f"session's test queries searched against the whole corpus (the last row of R).", "",
        "## nDCG@10", "",
        "| variant | " + " | ".join(names) + " | average | mean diff vs plain (95% CI) "
        "| Wilcoxon p (Holm) | wins/losses | search ms/query | DBA build s |",
        "|---" * (len(names) + 7) + "|",
    ]
    for r in result["variants"]:
        cells = [f"{r['sessions'][n]['ndcg@10']:.4f}" for n in names]
        if "vs_plain" in r:
            c = r["vs_plain"]
            compare = (f"{c['mean_diff']:+.4f} ({c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f})",
                       f"{c['wilcoxon_p']:.3g} ({c['wilcoxon_p_holm']:.3g})"
                       + (" **helps**" if r["helps_significantly"] else ""),
                       f"{c['wins']}/{c['losses']}")
        else:
            compare = ("", "", "")
        dba = f"{r['dba_build_s']:.2f}" if r["dba_build_s"] else ""
        lines.append(f"| {r['variant']} | " + " | ".join(cells)
                     + f" | {r['avg_ndcg@10']:.4f} | " + " | ".join(compare)
                     + f" | {r['search_ms_per_query']:.3f} | {dba} |")
    rec = result["recommendation"]
    t = result["timings_s"]
    lines += [
        "", "Per-query differences are pooled over the sessions' test queries "
        f"({result['stream']['n_queries']} queries); the interval is a paired bootstrap "
        f"({BOOTSTRAP} resamples) of the mean difference. Latency: encoding one query "
        f"{result['encode_ms_per_query']:.1f} ms (same for every variant); search per query, "
        "one query at a time, in the table (alpha-QE adds one search of n neighbours and a "
        "weighted sum); DBA is paid once per index (per search process, or per evaluation).",
        *few_queries_note(result),
        "", f"Timings: stream {t['stream']:.0f} s, embedding documents "
        f"{t['embed_documents']:.0f} s, encoding queries {t['encode_queries_batch']:.0f} s.",
        "", "## Recommendation", "",
        f"Default: **{rec['default']}**. {rec['reason']}.",
    ]
    worse = [f"{r['variant']} ({r['vs_plain']['mean_diff']:+.4f}, Holm p "
             f"{r['vs_plain']['wilcoxon_p_holm']:.3g})" for r in result["variants"]
             if "vs_plain" in r and r["vs_plain"]["wilcoxon_p_holm"] < 0.05
             and r["vs_plain"]["ci95"][1] < 0]
    if worse:
        lines += ["", f"Significantly worse than plain search: {', '.join(worse)}."]
    return "\n".join(lines) + "\n"


def few_queries_note(result: dict[str, Any]) -> list[str]:
    """A caveat when some sessions bring few test queries to the pooled test."""
    few = [f"{s['name']} {s['test_queries']}" for s in result["stream"]["sessions"]
           if s["test_queries"] < 30]
    if not few:
        return []
    return ["", f"Few test queries in {', '.join(few)}: subsampling keeps the judged documents "
            "of the queries it keeps, so collections with many judged documents per query keep "
            "few queries. They weigh little in the pooled test; the per-session paired figures "
            "are in the JSON (`vs_plain_by_session`)."]


def main(argv: Sequence[str] | None = None) -> None:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path,
                        default=repo / "benchmarks" / "results" / "query_expansion_cpu.json")
    parser.add_argument("--work", type=Path,
                        default=Path.home() / ".cache" / "driftlane" / "bench" / "qe")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    parser.add_argument("--datasets-dir", default=None)
    parser.add_argument("--docs-per-session", type=int, default=1000)
    parser.add_argument("--queries-per-session", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="Threads of torch and Faiss (1: fastest on a loaded 2-core box).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
