"""What the stages of a session hand each other: small frozen models, one per stage result.

A stage returns paths (in scratch or in the store), counts and version strings, never big
arrays. Prefect persists these models as JSON (its serializer records the class and
round-trips it), and they are the parameters of the next stage, so they are part of its cache
key: `StageResult.cache_identity` leaves the wall-clock fields out of the key, which therefore
depends on content digests and versions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from driftlane.infra.caching import StageResult


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Frozen):
    """One session's documents, their vectors and the model that made them, with its queries."""

    session: str
    docs_url: str
    vectors_url: str
    model_version: str
    queries_url: str
    qrels_url: str
    # set for published sessions: content digests for cache keys, and the session's metrics
    vectors_sha256: str | None = None
    qrels_sha256: str | None = None
    metrics_url: str | None = None


class PreviousMemory(_Frozen):
    """Where the latest published session's memory state lies, with its digests."""

    url: str
    session: str
    state_sha256: str
    memory_sha256: str


class PreviousModel(_Frozen):
    """The latest fine-tuned model in the store."""

    url: str
    version: str
    session: str


class PreviousTraining(_Frozen):
    """The latest query buffer and its reservoir counter."""

    query_buffer_url: str
    query_buffer_sha256: str
    buffer_seen: int


class IndexBlock(_Frozen):
    """One shard of the searchable index and where its vectors come from (provenance).

    The shard (index.faiss and index_ids.parquet in the store folder `shard`, e.g.
    "sessions/00001_b" or "reindex/00003_d") was written once by `session` and holds vectors of
    `model_version`. `maps` are the sessions whose alignment maps (`map_files`, store-relative;
    `map_urls` where they lie now) carry those vectors to the model queries are encoded with,
    in order: a stored vector v counts as v @ M1 @ M2 ... (`tasks.alignment`).
    """

    session: str
    shard: str
    index_url: str
    ids_url: str
    n_docs: int
    model_version: str
    factory: str
    maps: list[str] = []
    map_files: list[str] = []
    map_urls: list[str] = []

    def provenance(self) -> dict:
        """What index_blocks.json records of the block (store-relative paths only)."""
        return {"session": self.session, "shard": self.shard, "n_docs": self.n_docs,
                "model_version": self.model_version, "factory": self.factory,
                "maps": list(self.maps), "map_files": list(self.map_files)}


class SessionPlan(_Frozen):
    """What a run has to do: `published` (nothing) or `new`, with what earlier sessions left."""

    name: str
    digest: str
    store_url: str
    status: Literal["new", "published"]
    index: int
    published_as: str | None = None
    previous: list[Source] = []
    previous_memory: PreviousMemory | None = None
    previous_model: PreviousModel | None = None
    previous_training: PreviousTraining | None = None
    previous_blocks: list[IndexBlock] = []
    scratch_dir: str = ""


class IngestedSession(StageResult):
    """The session's tables as parquet files in scratch."""

    name: str
    digest: str
    docs_path: str
    queries_path: str
    qrels_path: str
    n_docs: int
    n_queries: int
    n_qrels: int


class EncoderModel(_Frozen):
    """A model folder on local disk and its version (digest of its files)."""

    path: str
    version: str
    origin: str = ""


class EmbeddedSession(StageResult):
    """The session's document vectors (and token embeddings when kept) in scratch."""

    vectors_path: str
    n_docs: int
    n_embedded: int
    dim: int
    n_windows: int
    tokens_path: str | None = None
    token_offsets_path: str | None = None


class StoredMemory(StageResult):
    """The clustered memory after the session: its files by store-relative name."""

    timing_fields: ClassVar[frozenset[str]] = frozenset({"seconds", "reembed_seconds"})

    files: dict[str, str]
    n_clusters: int
    memory_size: int
    memory_budget: int
    n_assigned: int
    reembed_seconds: float = 0.0

    @property
    def state_dir(self) -> str:
        return str(Path(self.files["memory/state.json"]).parent)

    @property
    def cluster_report_path(self) -> str:
        return self.files["cluster_report.json"]

    def member_vectors(self) -> KnownVectors:
        """The members' ids and vectors (after re-embedding: vectors of the new model)."""
        return KnownVectors(keys_url=self.files["memory/memory.parquet"],
                            vectors_url=self.files["memory/vectors.npy"])


class KnownVectors(_Frozen):
    """Documents already embedded with the final model (the re-embedded memory)."""

    keys_url: str
    vectors_url: str


class SampledTraining(StageResult):
    """The session's training examples, their texts and the planned batches."""

    n_examples: int
    steps: int
    n_stratified_batches: int
    examples_by_source_and_negative: dict[str, int]
    fallback: str | None
    notes: list[str]
    query_buffer_size: int
    buffer_seen: int
    examples_path: str
    texts_path: str
    batches_path: str
    batch_sizes_path: str
    query_buffer_path: str
    summary_path: str
    stored_vectors_path: str | None = None
    diagnostics: dict = {}


class TrainedModel(StageResult):
    """The model a session trained (or the starting model when there was nothing to train)."""

    model_path: str
    model_version: str
    trained: bool
    steps: int
    final_loss: float | None = None
    summary_path: str | None = None
    tensorboard_dir: str | None = None


class ReembeddedSources(StageResult):
    """Every source with vectors of the session's final model."""

    sources: list[Source]


class BuiltIndex(StageResult):
    """The Faiss index over every session's documents and its row -> document table."""

    index_path: str
    ids_path: str
    n_docs: int
    factory: str


class SearchableIndex(_Frozen):
    """The index a session searches: its blocks, in row order."""

    blocks: list[IndexBlock]

    @property
    def n_docs(self) -> int:
        return sum(b.n_docs for b in self.blocks)


class Alignment(StageResult):
    """The old -> new model map of an aligned update and how well it fits."""

    map_path: str
    summary_path: str
    n_docs: int
    cosine_unmapped: float
    cosine_mapped: float


class SessionEvaluation(StageResult):
    """Metrics of every evaluated session (by name) and the runs behind them."""

    metrics_path: str
    runs_path: str
    metrics: dict[str, dict[str, int | float]]


class SessionReport(_Frozen):
    """The report files (matrix, timings, heatmap, Markdown) and the matrix summary."""

    files: dict[str, str]
    summary: dict
