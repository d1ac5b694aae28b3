"""LSH prototype (MUVERA FDE) fidelity and speed against exact MaxSim, on real data.

For one BEIR collection: documents and test queries are embedded with the packaged encoder
(`embed_texts(..., keep_token_embeddings=True)`, overlapping windows), then every query is
scored against every document (all documents are the candidates) by

* exact MaxSim over L2-normalized token embeddings (`tasks.scoring`), the reference,
* the inner product of LSH prototypes (`tasks.prototypes`), one row per configuration of a
  small grid (bits, repetitions, optional inner projection), and
* the inner product of the mean-pooled dense document vectors (the encoder's own vectors).

Per ranking: the share of exact MaxSim's top 10 found in that ranking's top 100 (target for the
default prototype configuration: at least 0.95), nDCG@10 / Success@5 / Recall@10 / Recall@100
against the collection's test qrels (ranx), and the scoring time over the same candidates in
the same run. Exact MaxSim is timed twice: `maxsim_matrix` on the stored float16 token arrays
(normalizing and padding included), and against documents normalized and padded beforehand
(only the matmuls and maxima). The speed-up (target: at least 20) divides the second, the
stronger baseline, by the prototype time (query encoding + one matmul; the document prototypes
are built once, beforehand, like an index). Times are medians over `--repeats` runs.

Run:  python -m benchmarks.prototypes --out benchmarks/results/prototypes_cpu.json
      python -m benchmarks.prototypes --dataset scifact --max-docs 5000 --device cuda \\
          --out <gpu results .json>
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = Path(
    os.environ.get("DRIFTLANE_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)

# (n_bits, n_repetitions, projection_dim); output_dim = reps * 2**bits * (proj or 384).
DEFAULT_GRID: tuple[tuple[int, int, int | None], ...] = (
    (2, 5, None),
    (2, 10, None),
    (3, 5, None),
    (3, 10, None),
    (4, 5, None),
    (3, 20, None),
    (4, 10, None),
    (3, 20, 64),
    (4, 20, 32),
    (5, 20, 16),
    (4, 20, 64),
    (5, 20, 32),
    (4, 40, 32),
    (6, 20, 32),
)
EXACT_TOP, CANDIDATE_TOP = 10, 100
RECALL_KEY = f"exact_top{EXACT_TOP}_in_top{CANDIDATE_TOP}"
TARGET_RECALL, TARGET_SPEEDUP = 0.95, 20.0


def parse_config(text: str) -> tuple[int, int, int | None]:
    """'3x10' -> (3, 10, None); '4x20p64' -> (4, 20, 64): bits x repetitions [p projection]."""
    bits, _, rest = text.partition("x")
    reps, _, proj = rest.partition("p")
    return int(bits), int(reps), int(proj) if proj else None


def config_name(bits: int, reps: int, proj: int | None) -> str:
    return f"{bits}x{reps}" + (f"p{proj}" if proj else "")


def median_time(run: Callable[[], object], repeats: int,
                warm_up: bool = True) -> tuple[float, Any]:
    """Median wall time of `repeats` calls (after one warm-up call), and the last result."""
    result = run() if warm_up else None
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), result


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(n_queries, k) column indices of the k highest scores per row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def overlap_at(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over queries of |reference top-k ∩ other top-K| / k (rows of column indices)."""
    hits = [len(set(r.tolist()) & set(o.tolist())) / len(r)
            for r, o in zip(reference, other, strict=True)]
    return float(np.mean(hits))


def ranking_quality(scores: np.ndarray, exact_top: np.ndarray, query_ids: Sequence[str],
                    doc_keys: Sequence[str], qrels: dict) -> dict[str, float]:
    """Fidelity to exact MaxSim plus ranx metrics of the top-100 ranking of `scores`."""
    from driftlane.tasks.evaluation import retrieval_metrics

    top = top_k(scores, CANDIDATE_TOP)  # (n_queries, 100)
    run = {qid: {doc_keys[j]: float(scores[i, j]) for j in row}
           for i, (qid, row) in enumerate(zip(query_ids, top, strict=True))}
    return {f"exact_top{EXACT_TOP}_in_top{CANDIDATE_TOP}": overlap_at(exact_top, top),
            **retrieval_metrics(qrels, run)}


def load_collection(args: argparse.Namespace) -> dict[str, Any]:
    """Documents (first --max-docs), judged test queries and their qrels, embedded."""
    from driftlane.infra.config import ChunkingConfig
    from driftlane.tasks.embedding import embed_texts
    from driftlane.tasks.evaluation import global_doc_key, qrels_dict
    from driftlane.tasks.ingest import read_session
    from driftlane.tasks.models import load_encoder
    from driftlane.tasks.texts import document_text

    session = read_session(args.datasets / args.dataset)
    corpus = session.corpus.iloc[: args.max_docs] if args.max_docs else session.corpus
    doc_keys = [global_doc_key(args.dataset, d) for d in corpus["doc_id"]]
    kept = set(doc_keys)
    qrels = {q: {d: s for d, s in docs.items() if d in kept}
             for q, docs in qrels_dict(session.qrels, args.dataset, args.split).items()}
    qrels = {q: docs for q, docs in qrels.items() if any(s > 0 for s in docs.values())}
    queries = session.queries[session.queries["query_id"].isin(qrels)]
    if args.max_queries:
        queries = queries.iloc[: args.max_queries]
        qrels = {q: qrels[q] for q in queries["query_id"]}

    collection = {"doc_keys": doc_keys, "query_ids": list(queries["query_id"]), "qrels": qrels}
    if args.embeddings_cache and args.embeddings_cache.exists():
        with np.load(args.embeddings_cache, allow_pickle=False) as cached:
            if cached["doc_keys"].tolist() != doc_keys or \
                    cached["query_ids"].tolist() != collection["query_ids"]:
                raise ValueError(f"{args.embeddings_cache} holds other documents or queries")
            return {**collection, "embed_s": None, **_split_tokens(cached)}

    model = load_encoder(args.model, args.device)
    chunking = ChunkingConfig(window_tokens=args.window_tokens, overlap_tokens=args.overlap_tokens)
    texts = [document_text(t, x) for t, x in zip(corpus["title"], corpus["text"], strict=True)]
    started = time.perf_counter()
    docs = embed_texts(model, texts, chunking, args.batch_size, keep_token_embeddings=True)
    queries_embedded = embed_texts(model, list(queries["text"]), chunking, args.batch_size,
                                   keep_token_embeddings=True)
    embed_s = time.perf_counter() - started
    if args.embeddings_cache:
        np.savez(args.embeddings_cache, doc_keys=np.array(doc_keys),
                 query_ids=np.array(collection["query_ids"]),
                 doc_vectors=docs.vectors, query_vectors=queries_embedded.vectors,
                 **_joined_tokens("doc", docs.token_embeddings),
                 **_joined_tokens("query", queries_embedded.token_embeddings))
    return {**collection, "embed_s": embed_s,
            "doc_vectors": docs.vectors, "doc_tokens": docs.token_embeddings,
            "query_vectors": queries_embedded.vectors,
            "query_tokens": queries_embedded.token_embeddings}


def _joined_tokens(side: str, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return {f"{side}_tokens": np.concatenate(arrays), f"{side}_lengths": lengths}


def _split_tokens(cached: Any) -> dict[str, Any]:
    out = {}
    for side in ("doc", "query"):
        bounds = np.cumsum(cached[f"{side}_lengths"])[:-1]
        out[f"{side}_tokens"] = np.split(cached[f"{side}_tokens"], bounds)
        out[f"{side}_vectors"] = cached[f"{side}_vectors"]
    return out


def time_exact_maxsim(query_tokens: Sequence[np.ndarray], doc_tokens: Sequence[np.ndarray],
                      device: str, repeats: int) -> tuple[float, float, np.ndarray]:
    """Median seconds of exact MaxSim as called on stored arrays, and against documents
    normalized and padded beforehand; and the (n_queries, n_docs) scores."""
    from driftlane.tasks.scoring import maxsim_against_batches, maxsim_matrix, prepare_doc_batches

    exact_s, exact = median_time(lambda: maxsim_matrix(query_tokens, doc_tokens, device=device),
                                 repeats, warm_up=False)
    batches = prepare_doc_batches(doc_tokens, device=device)
    prepared_s, prepared = median_time(
        lambda: maxsim_against_batches(query_tokens, batches, len(doc_tokens)), repeats,
        warm_up=device != "cpu")
    if not np.allclose(exact, prepared, atol=1e-4):
        raise AssertionError("prepared and plain exact MaxSim disagree")
    return exact_s, prepared_s, exact


def time_inner_products(queries: np.ndarray, docs: np.ndarray, device: str,
                        repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of queries (n_q, D) @ docs (n_d, D).T with docs already on `device`."""
    doc_tensor = torch.as_tensor(docs, device=device)
    return median_time(
        lambda: (torch.as_tensor(queries, device=device) @ doc_tensor.T).cpu().numpy(), repeats)


def time_prototypes(query_tokens: Sequence[np.ndarray], doc_protos: np.ndarray, spec: Any,
                    planes: dict[str, np.ndarray], device: str, repeats: int) -> dict[str, float]:
    """Median seconds of prototype scoring: query encoding + one matmul against the document
    prototypes (already on `device`), and the matmul alone."""
    from driftlane.tasks.prototypes import query_prototypes

    doc_tensor = torch.as_tensor(doc_protos, device=device)  # (n_docs, output_dim)

    def score() -> np.ndarray:
        queries = torch.as_tensor(query_prototypes(query_tokens, spec, planes), device=device)
        return (queries @ doc_tensor.T).cpu().numpy()  # (n_queries, n_docs)

    scoring_s, _ = median_time(score, repeats)
    matmul_s, _ = time_inner_products(query_prototypes(query_tokens, spec, planes), doc_tensor,
                                      device, repeats)
    return {"scoring_s": scoring_s, "matmul_only_s": matmul_s}


def recommend(rows: Sequence[dict[str, Any]], tolerance: float = 0.01) -> dict[str, Any]:
    """The smallest configuration whose mean fidelity and mean nDCG@10 are both within
    `tolerance` of the best means (differences below that are seed noise on cisi)."""
    best_recall = max(r[RECALL_KEY] for r in rows)
    best_ndcg = max(r["ndcg@10"] for r in rows)
    close = [r for r in rows
             if r[RECALL_KEY] >= best_recall - tolerance and r["ndcg@10"] >= best_ndcg - tolerance]
    chosen = min(close, key=lambda r: (r["output_dim"], -r[RECALL_KEY]))
    return {"config": chosen["config"], RECALL_KEY: chosen[RECALL_KEY],
            "ndcg@10": chosen["ndcg@10"], "output_dim": chosen["output_dim"],
            "best_" + RECALL_KEY: best_recall, "best_ndcg@10": best_ndcg,
            "rule": f"smallest output_dim with mean {RECALL_KEY} and mean nDCG@10 both within "
                    f"{tolerance} of the best prototype configuration"}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from driftlane.tasks.models import resolve_device
    from driftlane.tasks.prototypes import (
        PrototypeSpec,
        document_prototypes,
        make_hyperplanes,
        query_prototypes,
    )

    device = resolve_device(args.device)
    data = load_collection(args)
    doc_tokens, query_tokens = data["doc_tokens"], data["query_tokens"]
    n_docs, dim = len(doc_tokens), int(doc_tokens[0].shape[1])

    doc_lengths = np.array([len(t) for t in doc_tokens])  # (n_docs,)

    def quality(scores: np.ndarray) -> dict[str, float]:
        # Mean token count of the top 10: MaxSim favours long documents, averaging does not.
        return {**ranking_quality(scores, exact_top, data["query_ids"], data["doc_keys"],
                                  data["qrels"]),
                "top10_doc_tokens_mean": float(doc_lengths[top_k(scores, EXACT_TOP)].mean())}

    exact_s, prepared_s, exact = time_exact_maxsim(query_tokens, doc_tokens, device,
                                                   args.exact_repeats)
    exact_top = top_k(exact, EXACT_TOP)
    results: dict[str, Any] = {
        "exact_maxsim": {"scoring_s": exact_s, "scoring_prepared_s": prepared_s,
                         **quality(exact)},
    }

    dense_s, dense = time_inner_products(data["query_vectors"], data["doc_vectors"], device,
                                         args.repeats)
    results["dense_mean_pooled"] = {"dim": int(data["doc_vectors"].shape[1]),
                                    "scoring_s": dense_s,
                                    "speedup_vs_exact_prepared": prepared_s / dense_s,
                                    **quality(dense)}

    default = PrototypeSpec(dim=dim)
    default_config = (default.n_bits, default.n_repetitions, default.projection_dim)
    grid = list(dict.fromkeys([*args.grid, default_config]))
    seeds = list(range(args.seed, args.seed + args.seeds))
    rows = []
    for bits, reps, proj in grid:
        per_seed = []
        for seed in seeds:
            spec = PrototypeSpec(n_bits=bits, n_repetitions=reps, projection_dim=proj,
                                 seed=seed, dim=dim)
            planes = make_hyperplanes(spec)
            started = time.perf_counter()
            doc_protos = document_prototypes(doc_tokens, spec, planes)  # (n_docs, output_dim)
            doc_encoding_s = time.perf_counter() - started
            if seed == seeds[0]:  # timed once per configuration
                timing = time_prototypes(query_tokens, doc_protos, spec, planes, device,
                                         args.repeats)
            scores = query_prototypes(query_tokens, spec, planes) @ doc_protos.T
            per_seed.append({"seed": seed, "doc_encoding_s": doc_encoding_s, **quality(scores)})
            del doc_protos
        rows.append({
            "config": config_name(bits, reps, proj), "n_bits": bits, "n_repetitions": reps,
            "projection_dim": proj, "output_dim": spec.output_dim,
            "bytes_per_doc_float32": 4 * spec.output_dim,
            "is_default": (bits, reps, proj) == default_config,
            **{name: float(np.mean([r[name] for r in per_seed])) for name in per_seed[0]
               if name != "seed"},
            f"{RECALL_KEY}_std": float(np.std([r[RECALL_KEY] for r in per_seed])),
            **timing,
            "speedup_vs_exact_prepared": prepared_s / timing["scoring_s"],
            "speedup_vs_exact": exact_s / timing["scoring_s"],
            "per_seed": per_seed,
        })
    results["prototypes"] = rows
    results["recommended"] = recommend(rows)
    chosen = next(r for r in rows if r["is_default"])
    results["default"] = {
        "config": chosen["config"], RECALL_KEY: chosen[RECALL_KEY],
        "recall_target": TARGET_RECALL, "recall_target_met": chosen[RECALL_KEY] >= TARGET_RECALL,
        "speedup_vs_exact_prepared": chosen["speedup_vs_exact_prepared"],
        "speedup_target": TARGET_SPEEDUP,
        "speedup_target_met": chosen["speedup_vs_exact_prepared"] >= TARGET_SPEEDUP,
        "dense_mean_pooled_" + RECALL_KEY: results["dense_mean_pooled"][RECALL_KEY],
    }
    results["data"] = {
        "dataset": args.dataset, "split": args.split, "n_docs": n_docs,
        "n_queries": len(query_tokens),
        "doc_tokens_mean": float(doc_lengths.mean()),
        "query_tokens_mean": float(np.mean([len(t) for t in query_tokens])),
        "embed_s": data["embed_s"],
    }
    return results


def _environment(device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else (
        platform.processor() or platform.machine())
    return {"device": device, "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def markdown_table(results: dict[str, Any]) -> str:
    """A short Markdown summary of `results`."""
    data, exact, dense = results["data"], results["exact_maxsim"], results["dense_mean_pooled"]
    env = results["environment"]
    lines = [
        f"# Prototype fidelity: {data['dataset']} ({data['n_docs']} docs, "
        f"{data['n_queries']} {data['split']} queries, {env['device']} {env['device_name']}, "
        f"{env['torch_threads']} torch threads)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Exact MaxSim over all {data['n_queries']} x {data['n_docs']} pairs: "
        f"{exact['scoring_s']:.1f} s as called on stored float16 arrays, "
        f"{exact['scoring_prepared_s']:.1f} s with documents normalized and padded beforehand "
        "(the baseline of the speed-ups below).",
        "",
        "| ranking | dim | top10 in top100 (mean ± sd over seeds) | nDCG@10 | R@100 "
        "| top10 doc tokens | scoring s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| exact MaxSim | - | 1.000 | {exact['ndcg@10']:.4f} | {exact['recall@100']:.4f} "
        f"| {exact['top10_doc_tokens_mean']:.0f} | {exact['scoring_prepared_s']:.2f} | 1 |",
        f"| dense mean-pooled | {dense['dim']} | {dense[RECALL_KEY]:.3f} "
        f"| {dense['ndcg@10']:.4f} | {dense['recall@100']:.4f} "
        f"| {dense['top10_doc_tokens_mean']:.0f} | {dense['scoring_s']:.4f} "
        f"| {dense['speedup_vs_exact_prepared']:.0f} |",
    ]
    for row in results["prototypes"]:
        name = f"**{row['config']} (default)**" if row["is_default"] else row["config"]
        lines.append(
            f"| {name} | {row['output_dim']} | {row[RECALL_KEY]:.3f} ± "
            f"{row[RECALL_KEY + '_std']:.3f} | {row['ndcg@10']:.4f} | {row['recall@100']:.4f} "
            f"| {row['top10_doc_tokens_mean']:.0f} | {row['scoring_s']:.3f} "
            f"| {row['speedup_vs_exact_prepared']:.0f} |")
    chosen, recommended = results["default"], results["recommended"]
    n_seeds = len(results["prototypes"][0]["per_seed"])
    lines += [
        "",
        f"Config `BxR[pP]`: B SimHash bits (2^B buckets), R repetitions, inner projection to P "
        f"dims per bucket; fidelity and nDCG averaged over {n_seeds} seeds. Scoring s: query "
        "encoding + one matmul against prebuilt document prototypes (median of repeats); "
        "speed-up against exact MaxSim on prepared documents, same run. Top10 doc tokens: mean "
        f"token count of the top-10 documents (corpus mean {data['doc_tokens_mean']:.0f}).",
        "",
        f"Recommended ({recommended['rule']}): {recommended['config']}.",
        "",
        f"Default {chosen['config']}: top10-in-top100 {chosen[RECALL_KEY]:.3f} (target "
        f"{TARGET_RECALL}: {'met' if chosen['recall_target_met'] else 'NOT met'}; dense "
        f"mean-pooled {dense[RECALL_KEY]:.3f}), speed-up "
        f"{chosen['speedup_vs_exact_prepared']:.0f}x "
        f"(target {TARGET_SPEEDUP:.0f}x: {'met' if chosen['speedup_target_met'] else 'NOT met'}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cisi")
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-docs", type=int, default=None, help="first N documents")
    parser.add_argument("--max-queries", type=int, default=None, help="first N judged queries")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--overlap-tokens", type=int, default=64)
    parser.add_argument("--grid", type=parse_config, nargs="+", default=list(DEFAULT_GRID),
                        help="configurations BITSxREPS[pPROJ], e.g. 3x10 4x20p64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds per configuration (fidelity is averaged over them)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of fast scorers")
    parser.add_argument("--exact-repeats", type=int, default=1,
                        help="timed runs of exact MaxSim (no warm-up on the CPU)")
    parser.add_argument("--embeddings-cache", type=Path, default=None,
                        help="npz of the embeddings: read if present, else written after embedding")
    parser.add_argument("--out", type=Path, help="write JSON here, and a .md table beside it")
    args = parser.parse_args(argv)

    from driftlane.tasks.models import resolve_device

    command = " ".join(["python -m benchmarks.prototypes",
                        *(argv if argv is not None else sys.argv[1:])])
    results = {"command": command, "environment": _environment(resolve_device(args.device)),
               **run_benchmark(args)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown_table(results))
    print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
