"""Running the continual benchmark's methods: the stream, a temporary Prefect, one stream
flow per method and seed into a fresh store, its timings, CPU time and load, the records
`--resume` keeps, and reading a finished store back (metrics, runs, and its work in
load-independent units: `WorkCounter`).

Everything here touches files, Prefect or the machine; the figures computed from what it
reads are in `benchmarks.continual_results`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.continual_costs import (
    cost_token_equivalents,
    encoding_units,
    file_time,
    owners_by_time,
    per_session_work,
    training_units,
    window_token_counts,
)
from benchmarks.continual_report import format_score
from benchmarks.continual_results import (
    run_from_frame,
    stage_times_from_task_runs,
    stream_qrels,
    summarize_run,
    task_function_name,
)
from benchmarks.continual_sampling import sampling_diagnostics

if TYPE_CHECKING:
    from benchmarks.continual import BenchConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_bench_stream(bench: BenchConfig, work: Path, datasets_dir: str | None) -> list[str]:
    """The stream's session folders: a stream given as `bench.stream` (a folder written by
    `driftlane make-stream`), else one built under work/stream and reused while its arguments
    stay the same. Stores made from another stream are removed (their sessions would clash)."""
    from driftlane.tasks.stream_builder import build_stream

    if bench.stream is not None:
        folder = Path(bench.stream).expanduser().resolve()
        manifest_bytes = (folder / "stream.json").read_bytes()
        wanted = {"stream": str(folder),
                  "stream_json_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    else:
        folder = work / "stream"
        wanted = {"datasets": list(bench.datasets), "docs_per_session": bench.docs_per_session,
                  "queries_per_session": bench.queries_per_session, "seed": bench.stream_seed,
                  "datasets_dir": datasets_dir}
    marker = work / "stream-arguments.json"
    manifest_path = folder / "stream.json"
    if not (manifest_path.exists() and marker.exists()
            and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(work / "stores", ignore_errors=True)
        if bench.stream is None:
            build_stream(list(bench.datasets), folder, mode="domain",
                         docs_per_session=bench.docs_per_session,
                         queries_per_session=bench.queries_per_session, seed=bench.stream_seed,
                         datasets_dir=datasets_dir, force=True)
        marker.write_text(json.dumps(wanted, indent=2) + "\n")
    manifest = json.loads(manifest_path.read_text())
    return [str(folder / s["name"]) for s in manifest["sessions"]]


def read_store_run(store_url: str) -> tuple[list[tuple[str, dict]], list[dict | None], Any]:
    """(rows for continual_summary, each session's timings.json or None, the Store)."""
    from driftlane.infra.store import Store

    store = Store(store_url)
    rows, timings = [], []
    for manifest in store.sessions():
        rows.append((manifest.name, store.read_json(manifest, "metrics.json")))
        timings.append(store.read_json(manifest, "timings.json")
                       if "timings.json" in manifest.files else None)
    return rows, timings, store


def last_row_qrels_and_run(store_url: str) -> tuple[dict, dict] | None:
    """Qrels of every session's test queries and the last session's run (None without
    runs.parquet)."""
    from driftlane.infra.io import read_parquet
    from driftlane.infra.store import Store

    store = Store(store_url)
    manifests = store.sessions()
    if not manifests or "runs.parquet" not in manifests[-1].files:
        return None
    qrels = stream_qrels({m.name: read_parquet(store.session_url(m, "qrels.parquet"))
                          for m in manifests})
    runs = read_parquet(store.session_url(manifests[-1], "runs.parquet"))
    return qrels, run_from_frame(runs, qrels)


def prefect_stage_times(stream_run_id: Any) -> dict[str, Any]:
    """Stage seconds of one stream run, from the task runs of its session subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        sessions = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[stream_run_id])))
        task_runs, offset = [], 0
        while True:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in sessions])),
                limit=200, offset=offset)
            task_runs += page
            offset += len(page)
            if len(page) < 200:
                break
    return stage_times_from_task_runs(
        [(task_function_name(t.task_key), t.total_run_time.total_seconds()) for t in task_runs],
        [r.total_run_time.total_seconds() for r in sessions])


def run_method(stream_flow: Any, session_urls: list[str], store: Path, config: Any,
               log_path: Path, errors: dict[str, str], key: str) -> dict[str, Any] | None:
    """Run the stream into a fresh store; the run's summary, or None (error recorded)."""
    shutil.rmtree(store, ignore_errors=True)
    log_progress(f"{key}: running {len(session_urls)} sessions into {store}")
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with LoadSampler(period_s=15.0) as load, _quiet(log_path):
            state = stream_flow(session_urls, str(store), config, return_state=True)
            state.result()  # raises the flow's exception when it failed
            stage_times = prefect_stage_times(state.state_details.flow_run_id)
    except Exception as exc:  # one failed method must not lose the others
        errors[key] = f"{type(exc).__name__}: {exc}"
        with open(log_path, "a", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        log_progress(f"{key}: FAILED ({errors[key]}); see {log_path}")
        return None
    wall = time.perf_counter() - started
    # CPU seconds of this process, all its threads (torch's included): unlike the wall time,
    # other work on the machine does not add to them
    cpu = time.process_time() - cpu_started
    rows, timings, _ = read_store_run(str(store))
    run = summarize_run(rows, timings, stage_times, wall)
    run["cpu_s"] = round(cpu, 1)
    run["store"] = str(store)
    run["load_average"] = load.summary()  # other work on the machine slows a run down
    run["sampling"] = sampling_diagnostics(str(store))
    log_progress(f"{key}: done in {wall:.0f} s ({cpu:.0f} CPU s): avg nDCG@10 "
                 f"{format_score(run['avg_ndcg@10'])}, bwt {format_score(run['bwt_ndcg@10'])}")
    return run


class WorkCounter:
    """A finished store's work in load-independent units, in all and per session, and the
    bytes each session added to the store (`continual_costs.per_session_work`), read back from
    the store.

    Encoding: every text the store's embedding cache holds was encoded once by the run (each
    stage embeds only what the cache lacks: new documents, memory re-embedded after a new
    model, the corpus too in update mode full, training, buffered and test queries). The
    cache keeps each text's digest and window count
    (`cache/<model version>/<chunking>/<shard>.digests.parquet`, see infra.embedding_cache);
    the tokens come from the stream's documents and queries, tokenized and cut into windows
    as the encoder does. Training: per trained session, its
    steps (training/training.json), batch size and training length (config.json) and the
    mean tokens of its examples (training/examples.parquet: anchor, positive and, when the
    loss used them, negative texts, each cut at the training length).
    """

    def __init__(self, model: str, chunking: Any):
        from driftlane.tasks.chunking import special_tokens_of
        from driftlane.tasks.embedding import effective_window_tokens
        from driftlane.tasks.models import load_encoder

        encoder = load_encoder(model, "cpu")
        self.tokenizer = encoder.tokenizer
        self.n_special = special_tokens_of(self.tokenizer).count
        self.window_tokens = effective_window_tokens(encoder, chunking)
        self.overlap_tokens = chunking.overlap_tokens
        # per published session (name, content digest): text digest -> (kind, tokens
        # encoded), and doc key -> content tokens
        self._sessions: dict[tuple[str, str], tuple[dict, dict]] = {}

    def _content_tokens(self, texts: list[str]) -> np.ndarray:
        from driftlane.tasks.chunking import tokenize_content

        return np.array([len(ids) for ids in tokenize_content(self.tokenizer, texts)],
                        dtype=np.int64)

    def _session_texts(self, store: Any, manifest: Any) -> tuple[dict, dict]:
        from driftlane.infra.io import read_parquet
        from driftlane.tasks.texts import document_text, text_digest

        key = (manifest.name, manifest.digest)
        if key not in self._sessions:
            known: dict[str, tuple[str, int]] = {}
            docs = read_parquet(store.session_url(manifest, "docs.parquet"))
            queries = read_parquet(store.session_url(manifest, "queries.parquet"))
            doc_texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"],
                                                              strict=True)]
            doc_content = self._content_tokens(doc_texts)
            query_texts = queries["text"].astype(str).tolist()
            for kind, texts, content in (
                    ("query", query_texts, self._content_tokens(query_texts)),
                    ("document", doc_texts, doc_content)):
                encoded = window_token_counts(content, self.window_tokens,
                                              self.overlap_tokens, self.n_special)
                known.update({text_digest(text): (kind, int(n))
                              for text, n in zip(texts, encoded.tolist(), strict=True)})
            doc_keys = manifest.name + "/" + docs["doc_id"].astype(str)
            self._sessions[key] = (known, dict(zip(doc_keys, doc_content.tolist(),
                                                   strict=True)))
        return self._sessions[key]

    def _tokens_per_example(self, examples: Any, doc_content: dict[str, int],
                            max_length: int, with_negatives: bool) -> float:
        """Mean tokens of an example's training texts, each cut at `max_length`."""
        if not len(examples):
            return 0.0

        def cut(content: np.ndarray) -> np.ndarray:
            return np.minimum(content + self.n_special, max_length)

        def docs(keys: Any) -> np.ndarray:
            # a key whose text is unknown counts the full training length
            return np.array([doc_content.get(str(k), max_length) for k in keys], np.int64)

        tokens = cut(self._content_tokens(examples["anchor"].astype(str).tolist()))
        tokens = tokens + cut(docs(examples["positive_key"]))
        if with_negatives:
            has = examples["negative_key"].notna().to_numpy()
            tokens[has] += cut(docs(examples["negative_key"][has]))
        return float(tokens.mean())

    def work_of_store(self, store_url: str) -> dict[str, Any]:
        """{"encoded": `encoding_units`, "trained": `training_units`,
        "cost_token_equivalents", "per_session": `per_session_work`} of the store's
        published sessions and cache (a cache shard belongs to the session whose manifest was
        the first written after it: the time in its name)."""
        from driftlane.infra.io import read_parquet
        from driftlane.infra.store import Store

        store = Store(store_url)
        manifests = store.sessions()
        known: dict[str, tuple[str, int]] = {}
        doc_content: dict[str, int] = {}
        for manifest in manifests:
            texts, content = self._session_texts(store, manifest)
            known.update(texts)
            doc_content.update(content)
        paths = sorted(store.fs.glob(store.path("cache", "*", "*", "*.digests.parquet")))
        shards = [read_parquet(store.fs.unstrip_protocol(path)) for path in paths]
        shard_units = [encoding_units(shard["digest"].astype(str).tolist(),
                                      shard["n_windows"].to_numpy(np.int64), known,
                                      self.window_tokens) for shard in shards]
        digests = [d for shard in shards for d in shard["digest"].astype(str)]
        windows = np.concatenate([shard["n_windows"].to_numpy(np.int64) for shard in shards]) \
            if shards else np.zeros(0, np.int64)
        trained: dict[int, dict[str, float]] = {}
        for i, manifest in enumerate(manifests):
            if "training/training.json" not in manifest.files:
                continue  # this session did not train
            training = store.read_json(manifest, "training/training.json")
            finetune = store.read_json(manifest, "config.json")["finetune"]
            examples = read_parquet(store.session_url(manifest, "training/examples.parquet"))
            trained[i] = {"steps": training["steps"], "batch_size": finetune["batch_size"],
                          "tokens_per_example": self._tokens_per_example(
                              examples, doc_content, finetune["max_seq_length"],
                              bool(training.get("hard_negatives", True)))}
        work: dict[str, Any] = {
            "encoded": encoding_units(digests, windows, known, self.window_tokens),
            "trained": training_units(list(trained.values()))}
        work["cost_token_equivalents"] = cost_token_equivalents(work)
        if manifests:
            published = [_published_at(store, m) for m in manifests]
            files = _files_with_times(store, store.path("cache"))
            work["per_session"] = per_session_work(
                len(manifests), owners_by_time([file_time(p) for p in paths], published),
                shard_units, trained,
                [sum(size for size, _ in _files_with_times(
                    store, store.path("sessions", m.folder))) for m in manifests],
                owners_by_time([t for _, t in files], published), [b for b, _ in files])
        return work


def _files_with_times(store: Any, folder: str) -> list[tuple[int, float]]:
    """(bytes, when written: `continual_costs.file_time`) of every file under `folder`."""
    found = store.fs.find(folder, detail=True) if store.fs.exists(folder) else {}
    return [(int(info.get("size") or 0), file_time(path, info.get("mtime")))
            for path, info in found.items()]


def _published_at(store: Any, manifest: Any) -> float:
    """When the session's manifest was written: its modification time, else the end of the
    second its created_at names."""
    info = store.fs.info(store.path("sessions", manifest.folder, "manifest.json"))
    return file_time("manifest.json", info.get("mtime"),
                     datetime.fromisoformat(manifest.created_at).timestamp() + 1.0)


class LoadSampler:
    """Samples the 1-minute load average every `period_s` in a daemon thread."""

    def __init__(self, period_s: float = 30.0):
        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.period_s)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {"mean": round(statistics.fmean(self.samples), 2),
                "max": round(max(self.samples), 2), "samples": len(self.samples)}


@contextlib.contextmanager
def _quiet(log_path: Path) -> Iterator[None]:
    """Send the run's prints and progress bars (stdout, stderr) to a log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        yield


@contextlib.contextmanager
def temporary_prefect() -> Iterator[None]:
    """A temporary local Prefect (SQLite database in a temporary folder), heartbeats off."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}), \
            prefect_test_harness(server_startup_timeout=None):
        yield


def set_quiet_environment() -> None:
    """Environment defaults for a long unattended run (an explicit setting wins)."""
    # As infra/cli.py: models from local folders only, no analytics from the temporary
    # server, and time for its first database migration on 2 cores.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Per-task INFO logs and progress bars of every run would bury the benchmark's own lines.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def warm_up(config: Any) -> None:
    """Pay the one-off costs of the process before any timed run, so that the first method
    is not charged for them: ranx's numba compilation and loading the base encoder."""
    from driftlane.tasks.evaluation import retrieval_metrics
    from driftlane.tasks.models import load_encoder

    retrieval_metrics({"q": {"d": 1}}, {"q": {"d": 1.0, "e": 0.5}})
    load_encoder(config.embedding.model, config.embedding.device)


def machine_environment() -> dict[str, Any]:
    """The machine, torch, the load at the start and the code version, for the results."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "device_name": torch.cuda.get_device_name() if cuda
        else (platform.processor() or platform.machine()),
        "cuda": cuda,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        **_code_version(),
    }


def _code_version() -> dict[str, Any]:
    """The commit the pipeline ran from, and whether its code differed from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--", "flows", "tasks", "infra", "benchmarks/*.py")
        return {"git_commit": git("rev-parse", "HEAD"),
                "code_changed_since_commit": sorted(line[3:] for line in changed.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None}


def log_progress(message: str) -> None:
    """A time-stamped progress line on the real stdout (runs redirect sys.stdout to logs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.__stdout__, flush=True)
