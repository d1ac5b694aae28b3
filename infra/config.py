"""Typed configuration: one pydantic model per stage, nested in `SessionConfig`.

A config file (TOML, YAML or JSON) holds any subset of the fields; the rest keep their
defaults. Prefect renders `SessionConfig` as a form in the UI because it is a typed flow
parameter.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_MODEL = "default"


class WindowPooling(StrEnum):
    """How a document vector is pooled from its window vectors."""

    mean = "mean"
    max = "max"
    first = "first"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Stable digest of the settings, used in cache keys."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class IngestConfig(_Section):
    """Limits on what a session may hold, checked before anything is embedded."""

    max_document_chars: int = Field(
        default=1_000_000, ge=1, le=1_000_000_000,
        description="Longest document accepted (title plus text, in characters); a longer "
                    "one rejects the session, naming its file and line.")


class ChunkingConfig(_Section):
    """Overlapping token windows for documents longer than the encoder's window."""

    window_tokens: int = Field(
        default=256, ge=8, le=8192, description="Tokens per window, special tokens included."
    )
    overlap_tokens: int = Field(
        default=64, ge=0, le=8000, description="Tokens shared by consecutive windows."
    )
    pooling: WindowPooling = Field(
        default=WindowPooling.mean, description="How window vectors become one document vector."
    )

    @model_validator(mode="after")
    def _overlap_leaves_room(self) -> ChunkingConfig:
        # Two slots per window go to special tokens ([CLS] ... [SEP] for BERT-style models);
        # each window must still advance by at least one content token.
        if self.overlap_tokens >= self.window_tokens - 2:
            raise ValueError(
                f"overlap_tokens={self.overlap_tokens} must be smaller than "
                f"window_tokens - 2 = {self.window_tokens - 2}"
            )
        return self


class EmbeddingConfig(_Section):
    """Which encoder embeds documents, and how."""

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Path of a sentence-transformers model, or 'default' for the packaged "
        "all-MiniLM-L6-v2.",
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda'.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Windows per forward pass.")
    keep_token_embeddings: bool = Field(
        default=False, description="Also keep float16 token embeddings (for term-based scoring)."
    )
    chunking: ChunkingConfig = ChunkingConfig()


class IndexKind(StrEnum):
    """Faiss index family (DESIGN step 9)."""

    auto = "auto"
    exact = "exact"
    ivf = "ivf"
    ivfpq = "ivfpq"


class IndexConfig(_Section):
    """Faiss index over the corpus seen so far."""

    kind: IndexKind = Field(default=IndexKind.auto,
                            description="auto: chosen from the corpus size.")
    exact_below: int = Field(default=50_000, ge=0, description="auto: exact search below this "
                             "many documents, IVF-Flat above.")
    pq_from: int = Field(default=1_000_000, ge=1, description="auto: IVF-PQ fast-scan with "
                         "exact re-ranking from this many documents on.")
    nlist_per_sqrt_n: float = Field(default=8.0, ge=4.0, le=16.0,
                                    description="IVF lists = this * sqrt(N) (4..16).")
    nprobe: int = Field(default=32, ge=1, le=65_536, description="IVF lists searched.")


class NeighbourAveraging(_Section):
    """A vector replaced by the L2-normalized weighted mean of itself (weight 1) and its `n`
    nearest documents (weights similarity^alpha): alpha-query expansion on queries,
    database-side augmentation on documents (Faiss tips; Radenovic et al., TPAMI 2018)."""

    n: int = Field(default=0, ge=0, le=1000, description="Neighbours averaged in; 0: off.")
    alpha: float = Field(default=3.0, ge=0.0, le=100.0,
                         description="A neighbour weighs its similarity ** alpha.")


class EvaluationConfig(_Section):
    """Zero-shot evaluation of every session seen so far."""

    top_k: int = Field(default=100, ge=10, le=10000, description="Documents retrieved per query.")
    split: str = Field(default="test", pattern="^(test|train)$", description="Which qrels to use.")
    query_expansion: NeighbourAveraging = Field(
        default=NeighbourAveraging(), description="alpha-QE: each query averaged with its top "
        "n documents (n = 0: off, plain search).")
    database_augmentation: NeighbourAveraging = Field(
        default=NeighbourAveraging(), description="DBA: each indexed document averaged with "
        "its top n neighbours before searching (n = 0: off).")


class ClusterRepresentation(StrEnum):
    """What the clusters are computed on."""

    dense = "dense"
    prototypes = "prototypes"


class EvictionStrategy(StrEnum):
    """How memory is brought back under its budget (see tasks.eviction.evict)."""

    cluster_aware = "cluster_aware"
    reservoir = "reservoir"
    prototypes_only = "prototypes_only"


class MatchMethod(StrEnum):
    """How a re-clustering is matched to the previous cluster ids."""

    jaccard = "jaccard"
    centroid = "centroid"


class PrototypeConfig(_Section):
    """SimHash prototypes (fixed-dimensional encodings) of token embeddings (DESIGN step 4)."""

    n_bits: int = Field(default=4, ge=1, le=12, description="Hyperplanes per repetition.")
    n_repetitions: int = Field(default=20, ge=1, le=256, description="Independent partitions.")
    projection_dim: int | None = Field(
        default=64, ge=1, le=4096, description="Random projection per bucket; null keeps 384.")
    seed: int = Field(default=0, ge=0, description="Seed of the hyperplanes and projection.")


class MemoryConfig(_Section):
    """Clustered memory: warm-up, streaming assignment, stable ids, eviction (DESIGN 3-6)."""

    enabled: bool = Field(default=True, description="Keep a clustered memory at all.")
    budget: int = Field(default=1000, ge=0, le=10_000_000,
                        description="Documents kept in memory across all clusters.")
    eviction: EvictionStrategy = Field(default=EvictionStrategy.cluster_aware)
    representation: ClusterRepresentation = Field(
        default=ClusterRepresentation.dense,
        description="Cluster on mean-pooled dense vectors or on token prototypes.")
    z: float = Field(default=2.0, ge=0.0, le=10.0,
                     description="Cluster boundary: mean + z * std of member distances.")
    min_cluster_size: int = Field(default=5, ge=1, le=10_000,
                                  description="Below this a cluster uses the pooled boundary.")
    min_per_cluster: int = Field(default=2, ge=0, le=1000,
                                 description="Members each cluster keeps under eviction.")
    max_new_clusters: int = Field(default=64, ge=1, le=10_000,
                                  description="Clusters one session may open.")
    k_min: int = Field(default=2, ge=2, le=1000, description="Smallest k of the warm-up.")
    k_max: int = Field(default=20, ge=2, le=1000, description="Largest k of the warm-up.")
    silhouette_sample: int = Field(default=2000, ge=50, le=1_000_000,
                                   description="Rows the silhouette is computed on.")
    recluster: bool = Field(default=False, description="Force a new warm-up this session; "
                            "ids are kept by matching to the previous clusters.")
    recluster_margin: float = Field(
        default=0.05, ge=-2.0, le=2.0,
        description="A re-cluster keeps the previous clusters (refined by k-means from their "
                    "centroids, plus clusters of documents that had none) unless a fresh "
                    "warm-up's silhouette is higher by more than this; 2 keeps them always, "
                    "-2 takes the fresh warm-up always.")
    match_method: MatchMethod = Field(default=MatchMethod.jaccard)
    min_jaccard: float = Field(default=0.5, ge=0.0, le=1.0,
                               description="Below this overlap a cluster gets a fresh id.")
    max_centroid_distance: float = Field(default=0.1, ge=0.0, le=2.0,
                                         description="Centroid matching: farther is fresh.")
    seed: int = Field(default=0, ge=0, description="Seed of the warm-up and reservoir.")
    prototypes: PrototypeConfig = PrototypeConfig()

    @model_validator(mode="after")
    def _k_range(self) -> MemoryConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        return self


class SamplingMode(StrEnum):
    """Where the positives of new training examples come from (DESIGN step 7)."""

    labeled = "labeled"
    self_supervised = "self_supervised"


class NegativeScoring(StrEnum):
    """How the hard negatives of the session's query examples are scored (tasks.negatives)."""

    dense = "dense"
    prototypes = "prototypes"


class PseudoPositiveScoring(StrEnum):
    """How a self-supervised query's pseudo-positive is picked among its clusters' members."""

    maxsim = "maxsim"
    fusion = "fusion"


class ReplaySelection(StrEnum):
    """Which buffered (query, positive) pairs replay in a session (tasks.replay)."""

    uniform = "uniform"
    mir = "mir"


class BufferPolicy(StrEnum):
    """Which pairs the query buffer keeps when it is full (tasks.replay)."""

    reservoir = "reservoir"
    gss = "gss"


class SamplingConfig(_Section):
    """Training examples from the session and from memory (DESIGN step 7, tasks.sampling)."""

    mode: SamplingMode = Field(
        default=SamplingMode.labeled,
        description="labeled: positives from qrels/train.tsv; self_supervised: the best "
        "term-scored document in the query's nearest clusters.")
    n_probe: int = Field(default=2, ge=1, le=1024,
                         description="Nearest clusters searched for a pseudo-positive.")
    pseudo_positive_scoring: PseudoPositiveScoring = Field(
        default=PseudoPositiveScoring.maxsim,
        description="maxsim: the best exact-MaxSim member of the query's clusters; fusion: the "
        "best by reciprocal-rank fusion of MaxSim and BM25 over the pool (a lexical teacher).")
    hard_negative_margin: float = Field(
        default=0.05, ge=0.0, le=2.0,
        description="Negatives must score at most (positive score - margin) against the query.")
    negative_scoring: NegativeScoring = Field(
        default=NegativeScoring.dense,
        description="dense: a query example's negatives are scored by cosine of dense vectors; "
        "prototypes: by the LSH token prototypes (term-based, approximating MaxSim), margin "
        "on their cosine.")
    easy_negative_ratio: float = Field(
        default=0.2, ge=0.0, le=1.0,
        description="Share of examples whose negative comes from another cluster.")
    singleton_examples: bool = Field(
        default=True, description="A singleton cluster's document trains as its own positive, "
        "anchored by a span of its text.")
    span_words: int = Field(default=64, ge=4, le=4096,
                            description="Words in the anchor span of a document example.")
    document_example_ratio: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of the session's other documents that also train as their own "
        "positive, anchored by a random span of their text (an inverse-cloze pseudo-query: "
        "a signal that needs no query at all); 0: off.")
    replay_ratio: float = Field(default=0.3, ge=0.0, le=0.95,
                                description="Share of replay examples in the mixed set.")
    query_buffer_budget: int = Field(default=1000, ge=0, le=10_000_000,
                                     description="Past training queries kept for replay.")
    replay_selection: ReplaySelection = Field(
        default=ReplaySelection.uniform,
        description="uniform: replayed pairs drawn uniformly from the query buffer; mir: the "
        "buffered pairs whose loss a virtual update on the session's new examples raises most "
        "(Maximally Interfered Retrieval, Aljundi et al. 2019).")
    mir_virtual_steps: int = Field(default=5, ge=1, le=1000,
                                   description="mir: optimizer steps of the virtual update.")
    query_buffer_policy: BufferPolicy = Field(
        default=BufferPolicy.reservoir,
        description="reservoir: every pair offered keeps the same chance; gss: greedy "
        "gradient-based sample selection (GSS-Greedy, Aljundi et al. 2019), pairs whose loss "
        "gradient differs from the buffer's enter.")
    gss_compared: int = Field(default=10, ge=1, le=10_000,
                              description="gss: buffered pairs each new pair is compared with.")
    replay_all: bool = Field(default=False, description="Replay every buffered query "
                             "instead of replay_ratio (the joint-retraining baseline).")
    stratified_batches: bool = Field(default=True,
                                     description="Batches drawn from one cluster each.")
    curriculum_mixed_fraction: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="Share of the session's batches that stay mixed before stratified ones.")
    seed: int = Field(default=0, ge=0, description="Seed of every random choice in sampling.")


class BudgetUnit(StrEnum):
    """How the training budget of a session is set."""

    steps = "steps"
    epochs = "epochs"


class StartModel(StrEnum):
    """Which weights a session's fine-tuning starts from."""

    previous = "previous"
    base = "base"


class FinetuneConfig(_Section):
    """Fine-tuning the encoder each session (DESIGN step 8, tasks.finetune)."""

    enabled: bool = Field(default=True, description="Train at all (off: zero-shot).")
    start_from: StartModel = Field(
        default=StartModel.previous, description="previous: the last session's model "
        "(continual); base: the configured encoder (joint retraining).")
    batch_size: int = Field(default=32, ge=1, le=65_536, description="Examples per step.")
    mini_batch_size: int | None = Field(
        default=None, ge=1, le=65_536,
        description="Set when a batch does not fit: CachedMultipleNegativesRankingLoss "
        "embeds this many texts at a time (GradCache).")
    learning_rate: float = Field(default=2e-5, gt=0.0, le=1.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0,
                                description="Share of the steps with a linear warm-up.")
    max_seq_length: int = Field(default=128, ge=8, le=8192,
                                description="Tokens per text while training (short on CPU).")
    budget_unit: BudgetUnit = Field(default=BudgetUnit.epochs,
                                    description="Budget in passes over the examples or steps.")
    epochs: float = Field(default=1.0, gt=0.0, le=1000.0, description="With budget_unit=epochs.")
    steps: int = Field(default=100, ge=1, le=10_000_000, description="With budget_unit=steps.")
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000,
                                  description="Cap on the steps of one session, any unit.")
    hard_negatives: bool = Field(default=True,
                                 description="Feed the sampled negative column to the loss.")
    scale: float = Field(default=20.0, gt=0.0, le=1000.0,
                         description="Inverse temperature of the ranking loss.")
    log_every_steps: int = Field(default=10, ge=1, le=100_000, description="Loss log period.")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda'.")
    seed: int = Field(default=0, ge=0, description="Seed of weights updates and dropout.")


class RunnerKind(StrEnum):
    """Where sharded work (embedding, query encoding) runs."""

    threads = "threads"
    dask = "dask"


class RunnerConfig(_Section):
    """The Prefect task runner that maps embedding and evaluation over shards.

    Operational only: it changes where the work runs, never its result, so it is left out of
    the config digest.
    """

    kind: RunnerKind = Field(default=RunnerKind.threads,
                             description="threads: in the flow's process; dask: prefect-dask's "
                             "DaskTaskRunner (a local cluster, or `dask_address`).")
    shard_docs: int = Field(default=1024, ge=1, le=10_000_000,
                            description="Texts per shard (the unit a worker embeds).")
    max_workers: int = Field(default=1, ge=1, le=1024,
                             description="threads: shards embedded at once in the process.")
    dask_address: str | None = Field(default=None, description="dask: scheduler address of "
                                     "an existing cluster (e.g. tcp://10.0.0.5:8786); unset "
                                     "starts a local cluster for the run.")
    dask_workers: int = Field(default=2, ge=1, le=1024,
                              description="dask, local cluster: worker processes.")
    dask_threads_per_worker: int = Field(default=1, ge=1, le=1024,
                                         description="dask, local cluster: threads per worker.")


class LockConfig(_Section):
    """One writer per store: the store lock and the Prefect global concurrency limit."""

    lease_seconds: float = Field(default=60.0, ge=1.0, le=86_400.0,
                                 description="Lease of the store lock, renewed by a heartbeat; "
                                 "a killed run blocks the store this long (plus 5 s grace).")
    wait_seconds: float = Field(default=90.0, ge=0.0, le=7 * 86_400.0,
                                description="How long a run waits for the store before it "
                                "fails with a message naming the holder (0: fail at once).")
    global_limit: bool = Field(default=True, description="Also hold a strict Prefect global "
                               "concurrency limit of 1 per store when a Prefect server is "
                               "configured (PREFECT_API_URL).")


class UpdateMode(StrEnum):
    """How stored document vectors follow a new encoder (docs/decisions.md, README)."""

    full = "full"
    aligned = "aligned"
    compatible = "compatible"


class UpdateConfig(_Section):
    """What a session does with the vectors earlier sessions stored once its model changed.

    full: re-embed memory and corpus with the new model and build one index over everything.
    aligned: fit an orthogonal map from the old model's vectors to the new model's on the
    re-embedded memory, and apply it to every stored vector at search time (no corpus pass).
    compatible: train the new model to stay comparable with the stored vectors (a
    compatibility term in the loss); stored vectors are kept as they are.
    """

    mode: UpdateMode = Field(default=UpdateMode.aligned,
                             description="full, aligned or compatible (see the README).")
    alignment_shrinkage: float = Field(
        default=1.0, ge=0.0, le=1e6,
        description="aligned: weight of the identity prior in the Procrustes fit (0: plain "
        "orthogonal Procrustes; needs many more memory documents than dimensions).")
    compatibility_weight: float = Field(
        default=1.0, ge=0.0, le=100.0,
        description="compatible: weight of the compatibility term in the training loss.")


# Sections that change how a run is carried out, not what it computes or publishes.
OPERATIONAL_SECTIONS = frozenset({"runner", "lock", "ingest"})


class SessionConfig(_Section):
    """Everything one session run needs to know besides its input and its store."""

    ingest: IngestConfig = IngestConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    memory: MemoryConfig = MemoryConfig()
    sampling: SamplingConfig = SamplingConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    index: IndexConfig = IndexConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    update: UpdateConfig = UpdateConfig()
    scratch_dir: str | None = Field(
        default=None,
        description="Local folder for work in progress (default: ~/.cache/driftlane/scratch).",
    )
    runner: RunnerConfig = RunnerConfig()
    lock: LockConfig = LockConfig()

    def digest(self) -> str:
        """Digest of the settings that shape results (the operational sections left out)."""
        payload = json.dumps(self.model_dump(mode="json", exclude=set(OPERATIONAL_SECTIONS)),
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A configuration file could not be read or holds invalid values."""


def load_config(path: str | Path | None) -> SessionConfig:
    """Read a session config from TOML, YAML or JSON; `None` gives the defaults."""
    if path is None:
        return SessionConfig()
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    data: Any
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(raw) or {}
        elif path.suffix == ".json":
            data = json.loads(raw)
        else:
            raise ConfigError(
                f"{path}: unknown config format {path.suffix!r} (use .toml, .yaml, .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError,
            UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return SessionConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
