"""The continual benchmark's methods and configurations (`benchmarks.continual` runs them).

Every method runs the same stream of sessions (built with `tasks.stream_builder`, or given),
with the same seeds, as one `stream_flow` per method and seed into its own store. A method is
a set of configuration overrides (METHODS) on top of the configuration's shared settings:

    zero_shot             no fine-tuning
    sequential            fine-tune on the new session only (no replay, mixed batches)
    random_replay         the same memory budget, reservoir eviction, random negatives, mixed
                          batches
    mir                   random_replay, replaying the buffered pairs whose loss a virtual
                          update on the session's new examples raises most (MIR,
                          `tasks.interference`)
    gss                   random_replay with a query buffer kept by gradient diversity
                          (GSS-Greedy, `tasks.gradient_diversity`) instead of a reservoir
    joint                 retrain from the base model on everything seen so far, then re-embed
                          the whole corpus (update mode full): the upper bound, in quality and
                          in cost
    driftlane_full        the defaults with update mode full: re-embed memory and the whole
                          corpus with each new model, one index over everything
    driftlane_compatible  the defaults with update mode compatible: a backward-compatibility
                          term in the training loss, new documents embedded with the new model,
                          stored vectors kept
    driftlane             the defaults: clustered memory, cluster-hard negatives, stratified
                          batches, update mode aligned (no corpus re-embedding: an orthogonal
                          map old -> new model fitted on the re-embedded memory, one index
                          shard per session over its new documents)
    driftlane_selfsup     the defaults with self-supervised (pseudo-positive) sampling
    driftlane_selfsup_docs  self-supervised, and every new document also trains as its own
                          positive anchored by a span of it (`document_example_ratio` 1.0)
    driftlane_selfsup_fusion  self-supervised, pseudo-positives by reciprocal-rank fusion of
                          MaxSim and BM25 (`pseudo_positive_scoring` fusion)

The other baselines keep the default update mode (aligned). The `[update]` section is
infra.config.UpdateConfig.


Configurations (CONFIGS):
    small   4 sessions (scifact, cosqa, npl_vaswani, cisi) of 120 documents, windows and
            training texts of 96 tokens, memory of 150 documents; 1 seed. Sized to finish the
            six methods of issue 4 within an hour on 2 otherwise idle CPU cores; the two
            update-mode methods of issue 14 (driftlane_full, driftlane_compatible) add to that
            (not yet timed).
    medium  3 sessions: cosqa, cisi, scifact, 2,000 documents each (cisi: all 1,460), every
            test query of each collection kept (500 + 38 + 300), so 1,120 and 1,333
            unjudged documents in the cosqa and scifact sessions and 5,460 documents searched
            after the last session; small's windows and training; memory of 1,000 documents;
            3 seeds.
            The cheapest session order for the methods in update mode full (joint,
            driftlane_full): they re-embed the corpus seen so far after each session, so the
            first session is encoded 4 times and the last 2.
    gpu     the full default stream (scifact, cosqa, npl_vaswani, cisi, msmarco_agentset5k),
            windows of 256 tokens, training texts of 256 tokens; 3 seeds; device auto.

Measured (continual_medium_subset.md, seed 0, the step cap on; wall minutes, machine load in
brackets): zero_shot 9 (4.2), random_replay 33 (4.9), mir 23 (1.9), gss 22 (1.8), driftlane 18
(2.6), driftlane_selfsup_docs 18 (1.7), driftlane_selfsup_fusion 17 (1.8); CPU minutes 8, 26,
33, 32, 24, 30, 28. The estimate below predates the step cap and the update modes.

Run time of medium, estimated from the committed small results (continual_small.json, mean
load 3.2 on 2 cores): the work of each method on each stream was counted as the flow does it
(tokens through the 96-token windows of every text encoded: the new documents, the corpus
seen so far after each new model, the queries; training examples: the train qrels pairs plus
30% replay, joint's growing buffer, one pseudo-positive per non-test query in
self-supervised mode), then priced at small's rates: embedding 2,005 tokens/s (411k tokens
per training method in 137-301 s), training 0.47 s per example (sampling included), the
other stages scaled with the documents (x11). Per seed: zero_shot 12 min (1.4M tokens),
sequential 55 min (3.7M tokens, 3,000 examples), random_replay and driftlane 63 min each
(4,100 examples), joint 75 min (5,600 examples), driftlane_selfsup 44 min, other stages
about 20 min: 5.5 hours per seed, about 17 hours for 3 seeds at that load (about 10 hours
on idle cores). That is far beyond 90 minutes: about half is training (cisi brings 1,600
training pairs, joint retrains on everything) and over a quarter the corpus re-embedding
after every session, which the update modes of issue 14 remove. The estimate predates them:
it priced every training method in mode full, as driftlane_full and joint still run (so
driftlane_full costs what driftlane did, 63 min per seed); the methods in mode aligned, and
driftlane_compatible, no longer re-embed the corpus, so they cost less than estimated. It runs in
three parts of one seed each: `--seeds 0`, then `--seeds 0 1 --resume`, then `--resume`
(each keeps the method/seed runs finished before, so an interrupted part resumes at the
method it stopped in).

"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Method name -> overrides of the configuration's shared settings (nested like SessionConfig),
# in report order: baselines first, so that paired tests read "driftlane vs <baseline>".
METHODS: dict[str, dict[str, Any]] = {
    "zero_shot": {"finetune": {"enabled": False}},
    "sequential": {"sampling": {"replay_ratio": 0.0, "stratified_batches": False}},
    "random_replay": {
        "memory": {"eviction": "reservoir"},
        "sampling": {"stratified_batches": False, "easy_negative_ratio": 1.0},
    },
    # the L2R paper's strongest replay rules on random_replay's memory (issue 13)
    "mir": {"memory": {"eviction": "reservoir"},
            "sampling": {"stratified_batches": False, "easy_negative_ratio": 1.0,
                         "replay_selection": "mir"}},
    "gss": {"memory": {"eviction": "reservoir"},
            "sampling": {"stratified_batches": False, "easy_negative_ratio": 1.0,
                         "query_buffer_policy": "gss"}},
    "joint": {
        "finetune": {"start_from": "base"},
        "sampling": {"replay_all": True, "query_buffer_budget": 10_000_000},
        "memory": {"budget": 10_000_000},
        "update": {"mode": "full"},  # a model retrained from the base: every vector is stale
    },
    "driftlane_full": {"update": {"mode": "full"}},
    "driftlane_compatible": {"update": {"mode": "compatible"}},
    "driftlane": {},  # update mode aligned, the default
    "driftlane_selfsup": {"sampling": {"mode": "self_supervised"}},
    "driftlane_selfsup_docs": {"sampling": {"mode": "self_supervised",
                                            "document_example_ratio": 1.0}},
    "driftlane_selfsup_fusion": {"sampling": {"mode": "self_supervised",
                                              "pseudo_positive_scoring": "fusion"}},
    # issue 15: the prototype roles against their dense counterparts
    "driftlane_prototypes": {"memory": {"representation": "prototypes"}},
    "driftlane_proto_negatives": {"sampling": {"negative_scoring": "prototypes"}},
    "driftlane_selfsup_proto_negatives": {"sampling": {"mode": "self_supervised",
                                                       "negative_scoring": "prototypes"}},
}

@dataclass(frozen=True)
class BenchConfig:
    """A benchmark configuration: the stream, the seeds and the settings every method shares.

    The stream is `datasets` cut into sessions (`docs_per_session`, `queries_per_session`,
    `stream_seed`), or `stream`, a folder written by `driftlane make-stream`.
    """

    name: str
    datasets: tuple[str, ...]
    docs_per_session: int | None
    queries_per_session: int | None
    seeds: tuple[int, ...]
    session: dict[str, Any] = field(default_factory=dict)
    stream_seed: int = 0
    description: str = ""
    stream: str | None = None


def cpu_session(memory_budget: int, query_buffer_budget: int, k_max: int,
                max_steps: int | None = None) -> dict[str, Any]:
    """Shared settings of the CPU configurations. Windows as long as the training texts:
    short enough for 2 CPU cores, and the same length whether or not a method has fine-tuned
    the encoder."""
    return {
        "embedding": {"device": "cpu", "batch_size": 32,
                      "chunking": {"window_tokens": 96, "overlap_tokens": 16}},
        "memory": {"budget": memory_budget, "k_max": k_max},
        "sampling": {"query_buffer_budget": query_buffer_budget},
        "finetune": {"device": "cpu", "max_seq_length": 96, "batch_size": 16, "epochs": 1.0,
                     **({} if max_steps is None else {"max_steps": max_steps})},
    }


# Every training method gets the same budget per medium session: uncapped, cisi's 1,600
# training pairs and joint's growing buffer made training half of a 5.5-hour seed.
MEDIUM_MAX_STEPS = 50

CONFIGS: dict[str, BenchConfig] = {
    "small": BenchConfig(
        name="small",
        datasets=("scifact", "cosqa", "npl_vaswani", "cisi"),
        docs_per_session=120,
        queries_per_session=None,
        seeds=(0,),
        session=cpu_session(memory_budget=150, query_buffer_budget=100, k_max=10),
        description="4 sessions of 120 documents (scifact, cosqa, npl_vaswani, cisi; "
        "msmarco_agentset5k left out: at this size it keeps 1-2 test queries), 96-token "
        "windows (overlap 16) and training texts, batch 16, 1 epoch per session, memory of 150 "
        "documents and 100 queries; 1 seed, CPU",
    ),
    "medium": BenchConfig(
        name="medium",
        datasets=("cosqa", "cisi", "scifact"),
        docs_per_session=2000,
        queries_per_session=None,
        seeds=(0, 1, 2),
        session=cpu_session(memory_budget=1000, query_buffer_budget=1000, k_max=20,
                            max_steps=MEDIUM_MAX_STEPS),
        description="3 sessions: cosqa, cisi, scifact, 2,000 documents each (cisi: its "
        "1,460), every test query kept (500 + 38 + 300; 1,120 and 1,333 unjudged documents in "
        "the cosqa and scifact sessions, 5,460 after the last), 96-token windows (overlap 16) "
        "and training texts, batch 16, 1 epoch per session capped at 50 steps (800 examples) "
        "for every method, memory of 1,000 documents and 1,000 queries; 3 seeds, CPU",
    ),
    "gpu": BenchConfig(
        name="gpu",
        datasets=("scifact", "cosqa", "npl_vaswani", "cisi", "msmarco_agentset5k"),
        docs_per_session=None,
        queries_per_session=None,
        seeds=(0, 1, 2),
        session={
            "embedding": {"batch_size": 128,
                          "chunking": {"window_tokens": 256, "overlap_tokens": 64}},
            "finetune": {"max_seq_length": 256, "batch_size": 32, "epochs": 1.0},
        },
        description="the full default stream (5 whole collections), 256-token windows and "
        "training texts, batch 32, 1 epoch per session, default memory; 3 seeds, device auto",
    ),
}


# --- configuration (pure) -------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A new nested dict: `overrides` on top of `base`, section by section (inputs unchanged)."""
    merged: dict[str, Any] = {key: value for key, value in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def method_settings(bench: BenchConfig, method: str, seed: int,
                    scratch_dir: str | None = None) -> dict[str, Any]:
    """The plain configuration dict of one method and seed (shared settings, method, seeds)."""
    seeds = {"memory": {"seed": seed}, "sampling": {"seed": seed}, "finetune": {"seed": seed}}
    settings = deep_merge(deep_merge(bench.session, METHODS[method]), seeds)
    if scratch_dir is not None:
        settings["scratch_dir"] = scratch_dir
    return settings


def method_config(bench: BenchConfig, method: str, seed: int, scratch_dir: str | None = None):
    """The validated SessionConfig of one method and seed; an unknown field fails loudly."""
    from driftlane.infra.config import SessionConfig

    return SessionConfig.model_validate(method_settings(bench, method, seed, scratch_dir))
