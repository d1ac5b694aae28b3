"""The first evaluation in a fresh process: ranx's numba compilation, before and after caching.

Each measurement is a fresh Python process that computes the session metrics (nDCG@10,
Success@5, Recall@10, Recall@100) of 8 judged queries with 100 ranked documents each, twice,
and reports how long ranx's import took (`import_s`), the first evaluation after it
(`first_evaluate_s`), both together (`first_s`) and the second evaluation.

- `before`: what `tasks.evaluation.retrieval_metrics` did until now: import ranx, evaluate.
  numba caches ranx's own kernels (`cache=True`), but compiles numba's typed-container helpers
  again in every process.
- `after`: `retrieval_metrics` as it is now: `infra.numba_cache.cache_compiled_kernels()` first.

Both modes start from an empty numba cache folder (`NUMBA_CACHE_DIR`, a temporary folder per
mode): the first process is "cold" (compiles everything and fills the cache), the next
`--repeats` are "warm" (what every later process on the machine pays).

Run:  python -m benchmarks.first_evaluation --out benchmarks/results/first_evaluation_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("before", "after")


def tiny_evaluation(seed: int = 0) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """8 judged queries, 2 relevant documents each, a ranking of 100 documents per query."""
    rng = random.Random(seed)
    qrels = {f"q{i}": {f"s/d{rng.randrange(200)}": 1 for _ in range(2)} for i in range(8)}
    run = {q: {f"s/d{j}": 1.0 - j / 100 + rng.random() / 1000 for j in rng.sample(range(200), 100)}
           for q in qrels}
    return qrels, run


def child(mode: str) -> dict[str, float]:
    """In a fresh process: the first and second evaluation's seconds, as JSON on stdout."""
    from driftlane.tasks.evaluation import METRICS, retrieval_metrics

    qrels, run = tiny_evaluation()

    def before() -> dict[str, float]:  # retrieval_metrics' body before the kernel cache
        from ranx import Qrels, Run, evaluate

        scores = evaluate(Qrels.from_dict(qrels), Run.from_dict(run), list(METRICS.values()),
                          make_comparable=True)
        return {ours: float(scores[theirs]) for ours, theirs in METRICS.items()}

    started = time.perf_counter()
    if mode == "after":
        from driftlane.infra.numba_cache import cache_compiled_kernels

        cache_compiled_kernels()  # what retrieval_metrics does first
    import ranx  # noqa: F401  (timed apart: in a session run pandas & co. are loaded already)

    times = [time.perf_counter() - started]
    evaluate_once = before if mode == "before" else (lambda: retrieval_metrics(qrels, run))
    for _ in range(2):
        started = time.perf_counter()
        metrics = evaluate_once()
        times.append(time.perf_counter() - started)
    return {"import_s": times[0], "first_evaluate_s": times[1], "first_s": times[0] + times[1],
            "second_evaluate_s": times[2], "ndcg@10": metrics["ndcg@10"]}


def _fresh_process(mode: str, cache_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "benchmarks.first_evaluation", "--child", mode],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_s": time.perf_counter() - started, "load_1min_before": load}


def measure(repeats: int) -> dict[str, Any]:
    """Per mode: one cold process, then `repeats` warm ones, each with its own timings."""
    results: dict[str, Any] = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory(prefix=f"numba-{mode}-") as cache_dir:
            runs = [_fresh_process(mode, Path(cache_dir)) for _ in range(1 + repeats)]
        results[mode] = {"cold": runs[0], "warm": runs[1:]} | {
            f"warm_{key}_median": statistics.median(r[key] for r in runs[1:])
            for key in ("import_s", "first_evaluate_s", "first_s") if repeats}
    return results


def _environment() -> dict[str, Any]:
    from importlib.metadata import version

    return {"cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "numba": version("numba"),
            "ranx": version("ranx"), "load_1_5_15_min": os.getloadavg()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--repeats", type=int, default=3, help="Warm processes per mode.")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return None
    command = "python -m benchmarks.first_evaluation " + " ".join(argv or sys.argv[1:])
    environment = _environment()
    results = {"command": command.strip(), "environment": environment,
               "measured": measure(args.repeats)}
    results["environment"]["load_1_5_15_min_after"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
