"""The memory stage at scale (issue 15 item 5): one session of a million precomputed vectors,
and the number of clusters over a stream of sessions.

Data: synthetic, not real embeddings. A drifting topic mixture in 384 dimensions (MiniLM's
width): `--topics` random directions; session s draws its documents from a window of
`--window` topics that slides by `--shift` topics per session (old topics fade out, new ones
come in), with Dirichlet weights, and every direction also rotates a little each session
(`--rotation`); a document is its topic's direction plus Gaussian noise (`--noise`; the default
gives a cosine of about 0.65 to the direction), L2-normalized. Each document has one float16
token row (its vector): the dense configuration reads no token, but the memory keeps the tokens
of its members, so the ragged path is exercised.

Parts, each in its own process so that its peak memory is its own:
  a. million: a first session of `--first` documents (warm-up), then one session of
     `--million` documents through `update_memory` with the default `MemoryConfig`: wall
     seconds, the steps' seconds (`MemoryUpdate.seconds_by_step`) and the peak resident memory
     of the process during that update (Linux VmHWM, reset through /proc/self/clear_refs
     after the data are built and the first session is done; it includes the session's
     input arrays, about 2.3 GB at 1M). Without clear_refs, `ru_maxrss` of the whole process.
  b. stream: `--sessions` sessions of `--stream-size` documents with the default
     configuration: live clusters after each session, seconds per session, documents that
     found no room under the cap, retired clusters, ids changed, and the peak memory.
  c. uncapped (reference, `--uncapped`): the same stream with the cluster cap lifted, which is
     how the stage behaved before the cap (clusters only grow).
  d. reservoir (`--reservoir`): the same stream with reservoir eviction, where clusters lose
     all their members and the retirement rule frees room under the cap.

Targets: the 1M session in <= 120 s with peak <= 8 GB on 2 cores; live clusters bounded over
the stream (never above `max_live_clusters`, and no more after the last session than after the
first that reached the cap).

Run:  python -m benchmarks.memory_scale --out benchmarks/results/memory_scale_cpu.json
Writes the JSON to --out and a Markdown summary beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM = 384
TARGET_SECONDS = 120.0
TARGET_PEAK_GB = 8.0


# --- data ---


def topic_directions(n_topics: int, dim: int, seed: int) -> np.ndarray:
    """(n_topics, dim) float32 random unit directions."""
    from driftlane.tasks.warmup import unit_rows

    return unit_rows(np.random.default_rng(seed).standard_normal((n_topics, dim)))


def session_documents(session: int, n: int, directions: np.ndarray, args: argparse.Namespace,
                      block: int = 65_536):
    """`NewDocuments` of session `session`: n unit vectors from the session's topic window,
    keys "s<session>/<i>", one float16 token per document."""
    from driftlane.tasks.memory_update import NewDocuments
    from driftlane.tasks.warmup import unit_rows

    rng = np.random.default_rng([args.seed, session])
    n_topics, dim = directions.shape
    active = (session * args.shift + np.arange(args.window)) % n_topics  # sliding window
    # every direction turns a little each session: drift inside a topic too
    turned = unit_rows(directions + args.rotation * session
                       * topic_directions(n_topics, dim, args.seed + 1))
    weights = rng.dirichlet(np.full(len(active), 2.0))
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, block):  # in blocks: no (n, dim) float64 temporary
        size = min(block, n - start)
        topic = active[rng.choice(len(active), size=size, p=weights)]
        noise = rng.standard_normal((size, dim), dtype=np.float32)
        vectors[start:start + size] = unit_rows(turned[topic] + args.noise * noise)
    keys = np.char.add(f"s{session}/", np.arange(n).astype(str))
    return NewDocuments(keys, vectors, vectors.astype(np.float16),
                        np.arange(n + 1, dtype=np.int64))


# --- memory measurement ---


def reset_peak() -> bool:
    """Reset the process's peak RSS (Linux VmHWM); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_gb(reset_worked: bool) -> tuple[float, str]:
    """Peak RSS since the reset (VmHWM) or of the whole process (ru_maxrss), in GB."""
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9, "VmHWM since reset"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "ru_maxrss"


def current_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def reference_searches(vectors: np.ndarray, centroids: np.ndarray) -> dict[str, float]:
    """Seconds of a plain nearest-centroid search of `vectors` (unit rows): Faiss flat inner
    product (when installed) and one float32 BLAS product with argmax, in blocks."""
    seconds = {}
    started = time.perf_counter()
    step = 65_536
    for start in range(0, len(vectors), step):
        np.argmax(vectors[start:start + step] @ centroids.T, axis=1)
    seconds["blas"] = round(time.perf_counter() - started, 2)
    try:
        import faiss
    except ImportError:
        return seconds
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    started = time.perf_counter()
    for start in range(0, len(vectors), step):
        index.search(vectors[start:start + step], 1)
    seconds["faiss_flat"] = round(time.perf_counter() - started, 2)
    return seconds


# --- parts ---


def _setup(**config_changes):
    from driftlane.infra.config import MemoryConfig
    from driftlane.tasks.prototypes import PrototypeSpec, make_hyperplanes

    spec = PrototypeSpec(dim=DIM)
    return MemoryConfig(**config_changes), spec, make_hyperplanes(spec)


def part_million(args: argparse.Namespace) -> dict[str, Any]:
    from driftlane.tasks.memory_update import update_memory

    config, spec, planes = _setup()
    directions = topic_directions(args.topics, DIM, args.seed)
    first = session_documents(0, args.first, directions, args)
    started = time.perf_counter()
    warm = update_memory(None, first, config, spec, planes, "s0")
    warm_seconds = time.perf_counter() - started
    del first
    big = session_documents(1, args.million, directions, args)
    rss_before = current_gb()
    reset_worked = reset_peak()
    started = time.perf_counter()
    update = update_memory(warm.state, big, config, spec, planes, "s1")
    seconds = time.perf_counter() - started
    peak, how = peak_gb(reset_worked)
    report = update.report
    search = reference_searches(big.vectors, warm.state.centroids.vectors)
    return {
        "reference_search_seconds": search,
        "first_session": {"documents": args.first, "seconds": round(warm_seconds, 2),
                          "clusters": warm.report["n_clusters"],
                          "seconds_by_step": warm.seconds_by_step},
        "documents": args.million,
        "seconds": round(seconds, 2),
        "seconds_by_step": update.seconds_by_step,
        "peak_gb": round(peak, 2),
        "peak_measured_by": how,
        "rss_before_update_gb": round(rss_before, 2),
        "clusters_before": warm.report["n_clusters"],
        "clusters_after": report["n_clusters"],
        "new_clusters": report["n_new_clusters"],
        "capped_documents": report["capped_documents"],
        "report_sample_size": report["sample_size"],
        "memory_size": report["memory_size"],
        "silhouette_sampled": report["silhouette"],
    }


def part_stream(args: argparse.Namespace, uncapped: bool = False,
                eviction: str = "cluster_aware") -> dict[str, Any]:
    from driftlane.tasks import memory_update

    config, spec, planes = _setup(eviction=eviction)
    capped = memory_update.max_live_clusters
    if uncapped:  # the stage as it was before the cap: clusters only grow
        memory_update.max_live_clusters = lambda config: 1_000_000
    try:
        return _stream(args, config, spec, planes, uncapped)
    finally:
        memory_update.max_live_clusters = capped


def _stream(args: argparse.Namespace, config, spec, planes, uncapped: bool) -> dict[str, Any]:
    from driftlane.tasks import memory_update

    directions = topic_directions(args.topics, DIM, args.seed)
    reset_worked = reset_peak()
    state, sessions = None, []
    for s in range(args.sessions):
        new = session_documents(s, args.stream_size, directions, args)
        started = time.perf_counter()
        update = memory_update.update_memory(state, new, config, spec, planes, f"s{s}")
        seconds = time.perf_counter() - started
        state = update.state
        report = update.report
        sessions.append({"session": f"s{s}", "seconds": round(seconds, 2),
                         "clusters": report["n_clusters"],
                         "new_clusters": report["n_new_clusters"],
                         "retired_clusters": len(report["retired_clusters"]),
                         "capped_documents": report["capped_documents"],
                         "id_changed": report["id_changed"],
                         "cluster_ids_issued": state.next_cluster_id,
                         "seconds_by_step": update.seconds_by_step})
        del new
    peak, how = peak_gb(reset_worked)
    return {"documents_per_session": args.stream_size, "sessions": sessions,
            "eviction": config.eviction.value,
            "max_live_clusters": None if uncapped else memory_update.max_live_clusters(config),
            "peak_gb": round(peak, 2), "peak_measured_by": how}


# --- orchestration ---


def _run_part(part: str, argv: list[str]) -> dict[str, Any]:
    """Run one part in a fresh process (its own peak memory) and read its JSON."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_scale", "--part", part,
                          *argv], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"part {part} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    million, stream = result["million"], result["stream"]
    clusters = [s["clusters"] for s in stream["sessions"]]
    cap = stream["max_live_clusters"]
    reached = next((i for i, c in enumerate(clusters) if c >= cap), None)
    bounded = max(clusters) <= cap and (reached is None or clusters[-1] <= clusters[reached])
    return [
        {"target": f"{million['documents']:,}-document session in <= {TARGET_SECONDS:.0f} s",
         "figure": f"{million['seconds']:.1f} s", "met": million["seconds"] <= TARGET_SECONDS},
        {"target": f"peak memory <= {TARGET_PEAK_GB:.0f} GB",
         "figure": f"{million['peak_gb']:.2f} GB ({million['peak_measured_by']})",
         "met": million["peak_gb"] <= TARGET_PEAK_GB},
        {"target": "live clusters bounded over the stream",
         "figure": " -> ".join(str(c) for c in clusters) + f" (cap {cap})", "met": bounded},
    ]


def write_markdown(result: dict[str, Any], path: Path) -> None:
    million = result["million"]
    lines = [
        "# Memory stage at scale (synthetic 384-d vectors, default MemoryConfig)", "",
        f"Command: `{result['command']}`  ", f"Machine: {result['machine']['platform']}, "
        f"{result['machine']['cpus']} CPUs; load average before "
        f"{result['machine']['loadavg_before']}, after {result['machine']['loadavg_after']}  ",
        f"Written {result['written']}", "", "## Targets", "",
        "| target | figure | met |", "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['figure']} | {'met' if t['met'] else 'NOT met'} |"
              for t in result["targets"]]
    lines += ["", f"## a. One session of {million['documents']:,} documents", "",
              f"After a first session of {million['first_session']['documents']:,} documents "
              f"(warm-up, {million['first_session']['seconds']} s, "
              f"{million['first_session']['clusters']} clusters). `update_memory` on the big "
              f"session: {million['seconds']} s, peak {million['peak_gb']} GB "
              f"({million['peak_measured_by']}; the process held "
              f"{million['rss_before_update_gb']} GB before the update, the session's input "
              f"arrays included); clusters {million['clusters_before']} -> "
              f"{million['clusters_after']} ({million['new_clusters']} opened, "
              f"{million['capped_documents']:,} documents found no room under the cap); "
              f"quality report on a sample of {million['report_sample_size']:,}.", "",
              "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in million["seconds_by_step"].items()]
    search = million["reference_search_seconds"]
    lines += ["", "For reference, a bare nearest-centroid search of the same vectors against the "
              "session's starting centroids: " + ", ".join(f"{k} {v} s" for k, v in
                                                             search.items())
              + ". The assign step adds the outliers' grouping (on a sample of at most "
              "20,000) and their assignment to the groups."]
    for name, title in (("stream", "b. Stream"),
                        ("uncapped", "c. Same stream, cap lifted (the stage before this "
                                     "change)"),
                        ("reservoir", "d. Same stream, reservoir eviction (memberless "
                                      "clusters retire)")):
        if name not in result:
            continue
        part = result[name]
        lines += ["", f"## {title}: {len(part['sessions'])} sessions of "
                      f"{part['documents_per_session']:,} documents", "",
                  f"Peak {part['peak_gb']} GB ({part['peak_measured_by']}); eviction "
                  f"{part['eviction']}; cap on live clusters: {part['max_live_clusters']}.",
                  "",
                  "| session | seconds | live clusters | opened | retired | no room (docs) "
                  "| ids changed | ids issued |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['session']} | {s['seconds']} | {s['clusters']} | {s['new_clusters']} "
                  f"| {s['retired_clusters']} | {s['capped_documents']:,} | {s['id_changed']} "
                  f"| {s['cluster_ids_issued']} |" for s in part["sessions"]]
        if name == "reservoir":
            lines += ["", "A cluster retires once it has no member in memory and no new "
                      "document for 3 sessions; documents that find no room under the cap "
                      "join their nearest cluster and count as new documents, so wherever the "
                      "cap is reached the old clusters keep being fed."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/"
                                                         "memory_scale_cpu.json"))
    parser.add_argument("--first", type=int, default=100_000)
    parser.add_argument("--million", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--stream-size", type=int, default=100_000)
    parser.add_argument("--topics", type=int, default=60)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--shift", type=int, default=5)
    parser.add_argument("--rotation", type=float, default=0.05)
    parser.add_argument("--noise", type=float, default=0.06)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uncapped", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reservoir", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--part", choices=("million", "stream", "uncapped", "reservoir"),
                        default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part is not None:  # a child process: one part, its JSON on the last stdout line
        result = (part_million(args) if args.part == "million"
                  else part_stream(args, uncapped=args.part == "uncapped",
                                   eviction="reservoir" if args.part == "reservoir"
                                   else "cluster_aware"))
        print(json.dumps(result))
        return

    raw = sys.argv[1:] if argv is None else argv
    child = list(raw)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.memory_scale " + " ".join(raw),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
        "data": {k: getattr(args, k) for k in ("topics", "window", "shift", "rotation",
                                               "noise", "seed")},
    }
    result["million"] = _run_part("million", child)
    result["stream"] = _run_part("stream", child)
    if args.uncapped:
        result["uncapped"] = _run_part("uncapped", child)
    if args.reservoir:
        result["reservoir"] = _run_part("reservoir", child)
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["written"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["targets"] = _targets(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out.with_suffix(".md"))
    for target in result["targets"]:
        print(f"{'met    ' if target['met'] else 'NOT met'}  {target['target']}: "
              f"{target['figure']}")


if __name__ == "__main__":
    main()
