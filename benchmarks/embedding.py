"""Embedding benchmarks.

Section "throughput": windowed `embed_texts` against plain `model.encode` on the same texts,
    1. on texts that fit in one window (both embed the same tokens: pure overhead), and
    2. on the corpus texts as they are (windows embed every token, `encode` truncates: compare
       tokens per second).

Section "cached_rerun": a real collection run as one session through the session flow; the
    first run fails at publish, the retry is all cache hits: its wall time as a fraction of the
    first run's (target: at most 0.1).

Run:  python -m benchmarks.embedding --out benchmarks/results/embedding_cpu.json
      python -m benchmarks.embedding --device cuda --docs 5000 --out <gpu results .json>

More sections go into SECTIONS: a function (args, model) -> dict, stored under its name.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = Path(
    os.environ.get("DRIFTLANE_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
)


def read_corpus_texts(folder: Path, limit: int | None = None) -> list[str]:
    """Texts (title + " " + text) of a BEIR corpus.jsonl or corpus.jsonl.gz, in file order."""
    from driftlane.tasks.texts import document_text

    path = folder / "corpus.jsonl"
    opener: Callable[..., Any] = open
    if not path.exists():
        path, opener = folder / "corpus.jsonl.gz", gzip.open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = (json.loads(line) for line in handle)
        return [document_text(row["title"], row["text"]) for row in islice(rows, limit)]


def _time_once(run: Callable[[], object], timings: list[float]) -> None:
    started = time.perf_counter()
    run()
    timings.append(time.perf_counter() - started)


def measure_throughput(
    texts: Sequence[str], model: Any, chunking: Any, batch_size: int, repeats: int = 3
) -> dict[str, Any]:
    """Time plain `model.encode` (max_seq_length = window) and `embed_texts` on `texts`.

    Both get one warm-up call, then run `repeats` times interleaved (ABBA order) and the median
    time counts. Tokens are those fed to the model, special tokens included, padding excluded:
    encode truncates each text to one window, embed_texts feeds every window.
    """
    from driftlane.tasks.chunking import special_tokens_of, tokenize_content, window_table
    from driftlane.tasks.embedding import effective_window_tokens, embed_texts

    texts = list(texts)
    special = special_tokens_of(model.tokenizer)
    window = effective_window_tokens(model, chunking)
    per_window = window - special.count
    n_content = np.array([ids.shape[0] for ids in tokenize_content(model.tokenizer, texts)])
    table = window_table(n_content, per_window, chunking.overlap_tokens)
    plain_tokens = int(np.minimum(n_content, per_window).sum() + special.count * len(texts))
    ours_tokens = int((table.end - table.start).sum() + special.count * len(table))

    saved_max = model.max_seq_length
    model.max_seq_length = window
    try:

        def plain(subset: Sequence[str] = texts) -> object:
            return model.encode(list(subset), batch_size=batch_size, normalize_embeddings=True)

        def ours(subset: Sequence[str] = texts) -> object:
            return embed_texts(model, subset, chunking, batch_size=batch_size)

        warm = texts[: 2 * batch_size]
        plain(warm)
        ours(warm)
        plain_times: list[float] = []
        ours_times: list[float] = []
        for repeat in range(repeats):
            order = [(plain, plain_times), (ours, ours_times)]
            for run, timings in order if repeat % 2 == 0 else order[::-1]:
                _time_once(run, timings)
    finally:
        model.max_seq_length = saved_max

    plain_s, ours_s = statistics.median(plain_times), statistics.median(ours_times)
    return {
        "docs": len(texts),
        "window_tokens": window,
        "overlap_tokens": chunking.overlap_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "windows": len(table),
        "content_tokens": int(n_content.sum()),
        "content_tokens_seen_by_encode": int(np.minimum(n_content, per_window).sum()),
        "plain": {
            "seconds": plain_s,
            "all_seconds": plain_times,
            "docs_per_s": len(texts) / plain_s,
            "tokens": plain_tokens,
            "tokens_per_s": plain_tokens / plain_s,
        },
        "ours": {
            "seconds": ours_s,
            "all_seconds": ours_times,
            "docs_per_s": len(texts) / ours_s,
            "tokens": ours_tokens,
            "tokens_per_s": ours_tokens / ours_s,
        },
        "ratio_docs_per_s": plain_s / ours_s,
        "ratio_tokens_per_s": (ours_tokens / ours_s) / (plain_tokens / plain_s),
    }


def throughput_section(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """Overhead on one-window texts, and tokens/s on the corpus texts as they are."""
    from driftlane.infra.config import ChunkingConfig
    from driftlane.tasks.chunking import special_tokens_of, tokenize_content
    from driftlane.tasks.embedding import effective_window_tokens

    chunking = ChunkingConfig(window_tokens=args.window_tokens, overlap_tokens=args.overlap_tokens)
    corpus = read_corpus_texts(args.datasets / args.dataset)
    per_window = effective_window_tokens(model, chunking) - special_tokens_of(model.tokenizer).count
    lengths = [ids.shape[0] for ids in tokenize_content(model.tokenizer, corpus)]
    one_window = [text for text, n in zip(corpus, lengths, strict=True) if 0 < n <= per_window]
    natural = corpus[: args.docs]
    return {
        "dataset": args.dataset,
        "one_window_texts": measure_throughput(
            one_window[: args.docs], model, chunking, args.batch_size, args.repeats
        ),
        "natural_texts": measure_throughput(
            natural, model, chunking, args.batch_size, args.repeats
        ),
    }


def cached_rerun_section(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """Wall time of a retried session run (all stages cached) against the first run.

    The first run does all the work (ingest, embed, index, evaluate) into a fresh store and
    fails on purpose when it starts publishing; the second run is the retry a user starts
    from the UI, and a third feeds the published session again (the no-op path).
    """
    import tempfile

    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    from driftlane.flows.session import session_flow
    from driftlane.infra.config import ChunkingConfig, EmbeddingConfig, SessionConfig

    session = args.datasets / args.rerun_dataset
    config = SessionConfig(embedding=EmbeddingConfig(
        model=args.model, device=args.device, batch_size=args.batch_size,
        chunking=ChunkingConfig(window_tokens=args.window_tokens,
                                overlap_tokens=args.overlap_tokens)))
    with tempfile.TemporaryDirectory() as tmp, \
            temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                PREFECT_SERVER_ANALYTICS_ENABLED: False}), \
            prefect_test_harness():
        store = str(Path(tmp) / "store")
        os.environ["DRIFTLANE_SCRATCH"] = str(Path(tmp) / "scratch")
        timings = {}
        os.environ["DRIFTLANE_FAIL_AT"] = "publish.stage"
        start = time.perf_counter()
        first = session_flow(str(session), store, config, return_state=True)
        timings["first_run_s"] = time.perf_counter() - start
        del os.environ["DRIFTLANE_FAIL_AT"]
        if not first.is_failed():
            raise RuntimeError("the first run was meant to fail at publish")
        start = time.perf_counter()
        summary = session_flow(str(session), store, config)
        timings["cached_retry_s"] = time.perf_counter() - start
        start = time.perf_counter()
        again = session_flow(str(session), store, config)
        timings["republish_noop_s"] = time.perf_counter() - start
        del os.environ["DRIFTLANE_SCRATCH"]
    assert summary["status"] == "published" and again["status"] == "already-published"
    return {
        "dataset": args.rerun_dataset,
        **timings,
        "retry_fraction_of_first": timings["cached_retry_s"] / timings["first_run_s"],
        "target_fraction": 0.1,
        "metrics": summary["metrics"],
    }


SECTIONS: dict[str, Callable[[argparse.Namespace, Any], dict[str, Any]]] = {
    "throughput": throughput_section,
    "cached_rerun": cached_rerun_section,
}


def _environment(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from driftlane.tasks.models import model_version

    device = str(model.device)
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "device": device,
        "device_name": device_name,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "model_version": model_version(args.model),
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--rerun-dataset", default="cisi",
                        help="collection run as one session for the cached-rerun section")
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--docs", type=int, default=300, help="texts per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--overlap-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from driftlane.tasks.models import load_encoder

    model = load_encoder(args.model, args.device)
    command = " ".join(["python -m benchmarks.embedding", *(argv if argv is not None
                                                             else sys.argv[1:])])
    results: dict[str, Any] = {"command": command, "environment": _environment(model, args)}
    for name in args.sections:
        results[name] = SECTIONS[name](args, model)
    text = json.dumps(results, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
