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
  - survival: the same data re-clustered by a second warm-up with another seed; new clusters
    matched to the first run's IDs by `match_clusters` (Hungarian on Jaccard overlap); the
    fraction of documents whose cluster ID survives (target: at least 0.99), against the
    fraction of documents a plain re-run of k-means (same k, another seed, no matching) keeps
    under the same label, and the same raw agreement for the two warm-ups before matching.

Run:  python -m benchmarks.clustering --out benchmarks/results/clustering_cpu.json
Writes the JSON to --out and a Markdown table beside it (same name, .md).
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
    from driftlane.tasks.warmup import choose_k_and_cluster

    vectors, topics = synthetic_embeddings(n, args.dim, args.topics, args.noise,
                                           args.topic_concentration, args.data_seed)
    k_max = args.large_k_max if n >= args.large_from else args.k_max
    started = time.perf_counter()
    first = choose_k_and_cluster(vectors, args.k_min, k_max,
                                 sample_size=args.silhouette_sample, seed=0)
    warmup_s = time.perf_counter() - started

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

    kmeans = [KMeans(first.k, n_init=1, random_state=seed).fit_predict(vectors)
              for seed in (0, 1)]
    return {
        "n_docs": n,
        "k_range": [args.k_min, k_max],
        "warmup_wall_s": round(warmup_s, 2),
        "chosen_k": first.k,
        "true_topics": args.topics,
        "ari_vs_topics": round(float(adjusted_rand_score(topics, first.labels)), 4),
        "silhouette_by_k": {k: round(v, 4) for k, v in first.silhouette_by_k.items()},
        "rewarmup_seed1_wall_s": round(rewarmup_s, 2),
        "rewarmup_chosen_k": second.k,
        "hungarian_match_wall_s": round(match_s, 3),
        "fresh_ids_after_match": next_id - first.k,
        "id_survival_matched": round(survival, 4),
        "label_agreement_warmup_rerun_unmatched": round(
            float((first.labels == second.labels).mean()), 4),
        "label_agreement_kmeans_rerun_unmatched": round(
            float((kmeans[0] == kmeans[1]).mean()), 4),
        "survival_target": 0.99,
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The headline numbers of `results` as a Markdown table."""
    lines = [
        f"# Clustering benchmark ({results['environment']['machine']}, "
        f"{results['environment']['cpu_count']} CPUs)",
        "",
        f"Command: `{results['command']}`. Data: {results['data']['description']}",
        "",
        "| docs | k range | warm-up (s) | chosen k (true) | ARI vs topics | re-warm-up k | "
        "ID survival, matched (target >= 0.99) | warm-up re-run, unmatched | "
        "k-means re-run, unmatched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["sizes"]:
        lines.append(
            f"| {row['n_docs']} | {row['k_range'][0]}-{row['k_range'][1]} | "
            f"{row['warmup_wall_s']} | {row['chosen_k']} ({row['true_topics']}) | "
            f"{row['ari_vs_topics']} | {row['rewarmup_chosen_k']} | "
            f"{row['id_survival_matched']} | {row['label_agreement_warmup_rerun_unmatched']} | "
            f"{row['label_agreement_kmeans_rerun_unmatched']} |")
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
        "sizes": [measure_size(n, args) for n in args.sizes],
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
