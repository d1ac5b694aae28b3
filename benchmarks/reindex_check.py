"""After a continual benchmark run: re-index each update mode's store and compare it with `full`.

Issue 14's "nothing is lost" target: a store written in any update mode, re-indexed with
`driftlane reindex` (every document re-embedded with the latest model, one full index), then
evaluates like the store that ran `full` throughout, within 0.5 point of average nDCG@10.
An aligned store trains exactly the models a full one trains (the index is not a training
input), so its re-index should match to the last digit; a compatible store trains with a
compatibility term, so its models differ and so may its figure.

The stores are copied first: the benchmark's own stores stay as the run left them.

Run:  python -m benchmarks.reindex_check --work ~/.cache/driftlane/bench/small \
          --out benchmarks/results/reindex_small.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOLERANCE_POINTS = 0.5


def average_ndcg(metrics: dict) -> float:
    return float(np.mean([v["ndcg@10"] for v in metrics.values()]))


def last_metrics(store: Path) -> dict:
    last = sorted((store / "sessions").iterdir())[-1]
    return json.loads((last / "metrics.json").read_text())


def reindexed_metrics(store: Path) -> dict:
    """Copy `store`, run `driftlane reindex` on the copy, return the re-index's metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / store.name
        shutil.copytree(store, copy)
        driftlane = str(Path(sys.executable).parent / "driftlane")
        env = {**os.environ, "DRIFTLANE_SCRATCH": str(Path(tmp) / "scratch")}
        done = subprocess.run([driftlane, "reindex", "--store", str(copy)], env=env,
                              capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"reindex of {store} failed: {done.stderr[-2000:]}")
        folder = next((copy / "reindex").iterdir())
        return json.loads((folder / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the benchmark's --work folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="Markdown report to write")
    args = parser.parse_args(argv)
    stores = args.work / "stores"
    full = average_ndcg(last_metrics(stores / f"driftlane_full_seed{args.seed}"))
    rows = []
    for method, mode in (("driftlane", "aligned"), ("driftlane_compatible", "compatible")):
        store = stores / f"{method}_seed{args.seed}"
        published = average_ndcg(last_metrics(store))
        reindexed = average_ndcg(reindexed_metrics(store))
        gap = 100 * (reindexed - full)
        rows.append(f"| {method} | {mode} | {published:.4f} | {reindexed:.4f} | {full:.4f} | "
                    f"{gap:+.2f} | {'met' if abs(gap) <= TOLERANCE_POINTS else 'not met'} |")
        print(rows[-1], flush=True)
    load = os.getloadavg()
    text = "\n".join([
        "# Re-index to full, against the store that ran full throughout", "",
        f"Command: `python -m benchmarks.reindex_check --work {args.work} --out {args.out}` "
        f"(after `python -m benchmarks.continual --config small`). Seed {args.seed}. "
        f"Load average at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (2 CPUs).", "",
        "Average nDCG@10 over every session's test queries after the last session: as the "
        "mode published it, after `driftlane reindex` of a copy of its store, and the "
        "`driftlane_full` store's. Target: re-indexed within 0.5 point of full.", "",
        "| method | update mode | published | re-indexed | full throughout | re-indexed - "
        "full (points) | within 0.5 point |", "|---|---|---|---|---|---|---|", *rows, ""])
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
