"""Clustering benchmarks: warm-up cost and chosen k, cluster-ID survival across re-clusterings.

Data: synthetic, not real embeddings (embedding 50k documents takes too long on 2 CPU cores).
`--topics` random directions in 384 dimensions (MiniLM's width), topic sizes drawn from a
Dirichlet (`--topic-concentration`; the default 5 gives unequal sizes), each document its
topic's direction plus Gaussian noise, L2-normalized; with the default noise a document's
cosine to its topic direction is about 0.65. Sizes from `--large-from` on use a narrower
k range (`--large-k-max`) to keep the whole run near 10 minutes on 2 cores.

For each size in `--sizes`:
  - warmup: `choose_k_and_cluster` wall time and chosen k over k in [k_min, k_max], seed 0
    (adjusted Rand index against the generating topics for reference);
  - survival: the same data re-clustered as the memory stage re-clusters (`tasks.recluster`:
    the previous clusters refined unless a fresh warm-up beats their silhouette by --margin)
    with another seed; clusters matched to the first run's IDs by `match_clusters` (Hungarian
    on Jaccard overlap); the fraction of documents whose cluster ID survives (target: at least
    0.99). For reference: the same for a fresh second warm-up (the re-cluster before issue
    15), the fraction a plain re-run of k-means (same k, another seed, no matching) keeps
    under the same label, and the raw agreement of the two warm-ups before matching.

Then the same warm-up and survival figures on real documents: the first --real-docs of each
--real collection (default cisi, npl_vaswani, cosqa: short documents, three domains), embedded
with the packaged all-MiniLM-L6-v2 through 96-token windows on the CPU (a few minutes; cached
in --embeddings-cache when given).

Run:  python -m benchmarks.clustering --out benchmarks/results/clustering_cpu.json
Writes the JSON to --out and a Markdown table beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def synthetic_embeddings(
    n: int, dim: int, topics: int, noise: float, concentration: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors around `topics` random directions, and (n,) topic labels."""
    from driftlane.tasks.warmup import unit_rows

    rng = np.random.default_rng(seed)
    directions = unit_rows(rng.standard_normal((topics, dim)))
    shares = rng.dirichlet(np.full(topics, concentration))
    labels = rng.choice(topics, size=n, p=shares)
    vectors = directions[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return unit_rows(vectors), labels


def measure_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up timing and ID survival for one corpus size."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from driftlane.tasks.cluster_ids import apply_mapping, match_clusters
    from driftlane.tasks.recluster import recluster
    from driftlane.tasks.warmup import choose_k_and_cluster

    vectors, topics = synthetic_embeddings(n, args.dim, args.topics, args.noise,
                                           args.topic_concentration, args.data_seed)
    k_max = args.large_k_max if n >= args.large_from else args.k_max
    started, cpu_started = time.perf_counter(), time.process_time()
    first = choose_k_and_cluster(vectors, args.k_min, k_max,
                                 sample_size=args.silhouette_sample, seed=0)
    warmup_s = time.perf_counter() - started
    warmup_cpu_s = time.process_time() - cpu_started  # all threads: load does not add to it

    started = time.perf_counter()
    second = choose_k_and_cluster(vectors, args.k_min, k_max,
                                  sample_size=args.silhouette_sample, seed=1)
    rewarmup_s = time.perf_counter() - started
    keys = pd.Index([f"d{i}" for i in range(n)])
    started = time.perf_counter()
    mapping, next_id = match_clusters(pd.Series(first.labels, index=keys),
                                      pd.Series(second.labels, index=keys), next_id=first.k)
    match_s = time.perf_counter() - started
    survival = float((apply_mapping(second.labels, mapping) == first.labels).mean())
    started = time.perf_counter()
    chosen = recluster(vectors, first.labels, args.k_min, k_max, args.silhouette_sample,
                       seed=1, margin=args.margin)
    recluster_s = time.perf_counter() - started

    kmeans = [KMeans(first.k, n_init=1, random_state=seed).fit_predict(vectors)
              for seed in (0, 1)]
    return {
        "n_docs": n,
        "k_range": [args.k_min, k_max],
        "warmup_wall_s": round(warmup_s, 2),
        "warmup_cpu_s": round(warmup_cpu_s, 2),
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "chosen_k": first.k,
        "true_topics": args.topics,
        "ari_vs_topics": round(float(adjusted_rand_score(topics, first.labels)), 4),
        "silhouette_by_k": {k: round(v, 4) for k, v in first.silhouette_by_k.items()},
        "rewarmup_seed1_wall_s": round(rewarmup_s, 2),
        "rewarmup_chosen_k": second.k,
        "hungarian_match_wall_s": round(match_s, 3),
        "fresh_ids_after_match": next_id - first.k,
        "id_survival_matched": round(survival, 4),
        **recluster_figures(first.labels, chosen, recluster_s),
        "label_agreement_warmup_rerun_unmatched": round(
            float((first.labels == second.labels).mean()), 4),
        "label_agreement_kmeans_rerun_unmatched": round(
            float((kmeans[0] == kmeans[1]).mean()), 4),
        "survival_target": 0.99,
    }


def id_survival(before: np.ndarray, after: np.ndarray) -> float:
    """Share of documents whose id survives when `after`'s clusters are matched to `before`'s
    (Hungarian on Jaccard overlap, as the memory stage matches)."""
    from driftlane.tasks.cluster_ids import apply_mapping, match_clusters

    keys = pd.Index([f"d{i}" for i in range(len(before))])
    mapping, _ = match_clusters(pd.Series(before, index=keys), pd.Series(after, index=keys),
                                next_id=int(before.max()) + 1)
    return float((apply_mapping(after, mapping) == before).mean())


def recluster_figures(first: np.ndarray, chosen: Any, seconds: float) -> dict[str, Any]:
    """The memory stage's re-cluster of the same data (another seed) against the first run."""
    return {"recluster_wall_s": round(seconds, 2), "recluster_kept_previous": chosen.kept,
            "recluster_k": chosen.result.k, "recluster_fresh_k": chosen.fresh_k,
            "recluster_kept_silhouette": _rounded(chosen.kept_silhouette),
            "recluster_fresh_silhouette": _rounded(chosen.fresh_silhouette),
            "id_survival_recluster": round(id_survival(first, chosen.result.labels), 4)}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def measure_real(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up and re-cluster survival on real documents: the first --real-docs of each
    collection in --real, embedded with the packaged encoder (cached in --embeddings-cache)."""
    from driftlane.tasks.recluster import recluster
    from driftlane.tasks.warmup import choose_k_and_cluster

    vectors = real_embeddings(args)
    started = time.perf_counter()
    first = choose_k_and_cluster(vectors, args.k_min, args.k_max, args.silhouette_sample, seed=0)
    warmup_s = time.perf_counter() - started
    fresh = choose_k_and_cluster(vectors, args.k_min, args.k_max, args.silhouette_sample, seed=1)
    started = time.perf_counter()
    chosen = recluster(vectors, first.labels, args.k_min, args.k_max, args.silhouette_sample,
                       seed=1, margin=args.margin)
    recluster_s = time.perf_counter() - started
    return {"collections": args.real, "n_docs": len(vectors), "k_range": [args.k_min, args.k_max],
            "warmup_wall_s": round(warmup_s, 2), "chosen_k": first.k,
            "rewarmup_chosen_k": fresh.k,
            "id_survival_matched": round(id_survival(first.labels, fresh.labels), 4),
            **recluster_figures(first.labels, chosen, recluster_s), "survival_target": 0.99}


def real_embeddings(args: argparse.Namespace) -> np.ndarray:
    """(n, 384) document vectors of the --real collections, from the cache when it matches."""
    from driftlane.infra.config import ChunkingConfig
    from driftlane.tasks.embedding import embed_texts
    from driftlane.tasks.ingest import read_session
    from driftlane.tasks.models import load_encoder
    from driftlane.tasks.texts import document_text

    texts: list[str] = []
    for name in args.real:
        corpus = read_session(args.datasets_dir / name).corpus.iloc[: args.real_docs]
        texts += [document_text(t, x) for t, x in zip(corpus["title"], corpus["text"],
                                                       strict=True)]
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    cache = args.embeddings_cache
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as cached:
            if str(cached["digest"]) == digest:
                return cached["vectors"]
    chunking = ChunkingConfig(window_tokens=96, overlap_tokens=16)
    vectors = embed_texts(load_encoder("default", "cpu"), texts, chunking, 32).vectors
    if cache is not None:
        np.savez(cache, digest=np.array(digest), vectors=vectors)
    return vectors


def markdown_table(results: dict[str, Any]) -> str:
    """The headline numbers of `results` as a Markdown table."""
    lines = [
        f"# Clustering benchmark ({results['environment']['machine']}, "
        f"{results['environment']['cpu_count']} CPUs)",
        "",
        f"Command: `{results['command']}`. Data: {results['data']['description']}",
        "",
        "Re-cluster: the memory stage's (`tasks.recluster`, margin "
        f"{results['recluster_margin']}) on the same data with seed 1, against the seed-0 "
        "warm-up; fresh warm-up: a second warm-up with seed 1, matched the same way (the "
        "re-cluster before issue 15).",
        "",
        "Warm-up: wall seconds, then CPU seconds of the process (all threads; 2 threads on 2 "
        "idle cores give about twice the wall time) and the 1-minute load average after it: "
        "other work on the machine stretches the wall time, not the CPU time.",
        "",
        "| docs | k range | warm-up s (CPU s, load) | chosen k (true) | ARI vs topics | "
        "ID survival, re-cluster (target >= 0.99) | re-cluster kept / k / s | "
        "fresh warm-up k | ID survival, fresh warm-up | warm-up re-run, unmatched | "
        "k-means re-run, unmatched |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["sizes"]:
        lines.append(
            f"| {row['n_docs']} | {row['k_range'][0]}-{row['k_range'][1]} | "
            f"{row['warmup_wall_s']} ({row.get('warmup_cpu_s', 'n/a')}, "
            f"{row.get('load_average_after', ['n/a'])[0]}) | "
            f"{row['chosen_k']} ({row['true_topics']}) | "
            f"{row['ari_vs_topics']} | {row['id_survival_recluster']} | "
            f"{row['recluster_kept_previous']} / {row['recluster_k']} / "
            f"{row['recluster_wall_s']} | {row['rewarmup_chosen_k']} | "
            f"{row['id_survival_matched']} | {row['label_agreement_warmup_rerun_unmatched']} | "
            f"{row['label_agreement_kmeans_rerun_unmatched']} |")
    real = results.get("real")
    if real:
        lines += ["", f"Real documents: the first {results['real_docs']} of "
                  f"{', '.join(real['collections'])} ({real['n_docs']} documents), embedded "
                  "with all-MiniLM-L6-v2 (96-token windows).", "",
                  "| docs | k range | warm-up (s) | chosen k | ID survival, re-cluster (target "
                  ">= 0.99) | re-cluster kept / k / s | fresh warm-up k | ID survival, fresh "
                  "warm-up |", "|---|---|---|---|---|---|---|---|",
                  f"| {real['n_docs']} | {real['k_range'][0]}-{real['k_range'][1]} | "
                  f"{real['warmup_wall_s']} | {real['chosen_k']} | "
                  f"{real['id_survival_recluster']} | {real['recluster_kept_previous']} / "
                  f"{real['recluster_k']} / {real['recluster_wall_s']} | "
                  f"{real['rewarmup_chosen_k']} | {real['id_survival_matched']} |"]
    return "\n".join(lines) + "\n"


def _environment() -> dict[str, Any]:
    import sklearn
    from threadpoolctl import threadpool_info

    return {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "blas_openmp_threads": sorted({pool["num_threads"] for pool in threadpool_info()}),
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000, 50_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--topics", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.06,
                        help="per-dimension noise std (0.06: cosine to topic about 0.65)")
    parser.add_argument("--topic-concentration", type=float, default=5.0,
                        help="Dirichlet parameter of the topic sizes (large: equal sizes)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--k-min", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=16)
    parser.add_argument("--large-from", type=int, default=50_000,
                        help="sizes from here on use --large-k-max (keeps the run short)")
    parser.add_argument("--large-k-max", type=int, default=12)
    parser.add_argument("--silhouette-sample", type=int, default=2000)
    parser.add_argument("--margin", type=float, default=0.05,
                        help="the re-cluster's silhouette margin ([memory] recluster_margin)")
    parser.add_argument("--real", nargs="*", default=["cisi", "npl_vaswani", "cosqa"],
                        help="real collections (BEIR folders under --datasets-dir) to embed "
                             "and re-cluster; none: skip")
    parser.add_argument("--real-docs", type=int, default=2000,
                        help="documents taken from the start of each real collection")
    parser.add_argument("--datasets-dir", type=Path, default=Path(os.environ.get(
        "DRIFTLANE_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets")))
    parser.add_argument("--embeddings-cache", type=Path,
                        help="npz of the real documents' vectors, reused when it matches")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (and .md)")
    args = parser.parse_args(argv)

    command = " ".join(["python -m benchmarks.clustering",
                        *(argv if argv is not None else sys.argv[1:])])
    results: dict[str, Any] = {
        "command": command,
        "environment": _environment(),
        "data": {
            "description": (f"synthetic, not real embeddings: {args.topics} random topic "
                            f"directions in {args.dim} dimensions, "
                            f"Dirichlet({args.topic_concentration}) topic sizes, "
                            f"Gaussian noise {args.noise} per dimension, L2-normalized."),
            "dim": args.dim, "topics": args.topics, "noise": args.noise,
            "topic_concentration": args.topic_concentration,
            "seed": args.data_seed,
        },
        "recluster_margin": args.margin,
        "sizes": [measure_size(n, args) for n in args.sizes],
        "real_docs": args.real_docs,
        "real": measure_real(args) if args.real else None,
    }
    text = json.dumps(results, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".md").write_text(markdown_table(results))
    print(text)
    return results


if __name__ == "__main__":
    main()
