"""The index update of a session: what its new model means for the vectors already stored.

`[update] mode` (`infra.config.UpdateConfig`, README "Update modes"):

- full: every session so far is re-embedded with the session's model (the re-embedded memory
  is reused) and one shard over the whole corpus is built; the index is that shard alone.
- aligned: the new documents are embedded with the trained model into this session's shard
  (the memory's re-embedded vectors reused); an orthogonal map from the starting model to the
  trained one is fitted on the re-embedded memory (`tasks.alignment`) and every earlier block
  goes through it at search time. No corpus pass, no shard rewritten. (Mapping the new
  documents' starting-model vectors too, saving one pass over them, lost 2.3 points of average
  nDCG@10 against `full` on the small benchmark: the documents a session trains on are the ones
  whose vectors fine-tuning moves in ways one global map cannot follow.)
- compatible: the trained model learned to stay comparable with stored vectors (the
  compatibility term in fine-tuning); the new documents are embedded with it into this
  session's shard, earlier shards stay as they are.

In every mode the starting model's index for the "what training bought" evaluation costs no
corpus pass when shards are kept: the earlier blocks as they were plus the new documents'
starting-model shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import get_run_logger

from driftlane.infra.caching import StageResult
from driftlane.infra.config import EmbeddingConfig, SessionConfig, UpdateMode
from driftlane.tasks.alignment import align_models
from driftlane.tasks.indexing import build_index, reembed_sources
from driftlane.tasks.publishing import ALIGNMENT_MAP
from driftlane.tasks.stage_results import (
    BuiltIndex,
    EncoderModel,
    IndexBlock,
    KnownVectors,
    ReembeddedSources,
    SearchableIndex,
    SessionPlan,
    Source,
    StoredMemory,
)


@dataclass(frozen=True)
class IndexUpdate:
    """What the update stage produced for the evaluation, the report and publishing."""

    searchable: SearchableIndex  # what the trained model searches
    searchable_before: SearchableIndex  # what the starting model searched
    own_vectors: Source  # the session's doc_vectors.npy and the model that made them
    shard: BuiltIndex  # the shard this session writes (index.faiss)
    reembedded: ReembeddedSources | None  # corpus re-embedding (full, compatible)
    indexing: list[StageResult] = field(default_factory=list)  # cost of shards and maps
    files: dict[str, str] = field(default_factory=dict)  # published beside the shard


def block_of(plan: SessionPlan, index: BuiltIndex, model_version: str) -> IndexBlock:
    """The shard `plan`'s session writes, as a block (published into its session folder)."""
    return IndexBlock(session=plan.name, shard=session_folder(plan), index_url=index.index_path,
                      ids_url=index.ids_path, n_docs=index.n_docs, model_version=model_version,
                      factory=index.factory)


def session_folder(plan: SessionPlan) -> str:
    """Where the session will lie in the store (`infra.store.SessionManifest.folder`)."""
    return f"sessions/{plan.index:05d}_{plan.name}"


def mapped(block: IndexBlock, plan: SessionPlan, map_url: str) -> IndexBlock:
    """`block` carried one model further by `plan`'s session's alignment map."""
    return block.model_copy(update={
        "maps": [*block.maps, plan.name],
        "map_files": [*block.map_files, f"{session_folder(plan)}/{ALIGNMENT_MAP}"],
        "map_urls": [*block.map_urls, map_url]})


def update_index(plan: SessionPlan, config: SessionConfig, new_source: Source,
                 start: EncoderModel, final: EncoderModel, start_embedding: EmbeddingConfig,
                 final_embedding: EmbeddingConfig, clustered: StoredMemory | None,
                 known: KnownVectors | None, cache: str, results: object) -> IndexUpdate:
    """Run the update stage of `config.update.mode` (see the module docstring).

    clustered, known: the memory as clustered (starting-model vectors) and re-embedded
    (trained-model vectors); both set whenever the model changed (training needs memory).
    cache: the store's embedding cache; results: the tasks' result storage.
    """
    name, scratch = plan.name, plan.scratch_dir
    changed = final.version != start.version
    index_task = build_index.with_options(result_storage=results)
    reembed_task = reembed_sources.with_options(result_storage=results)
    mode = config.update.mode
    log = get_run_logger()

    if mode == UpdateMode.full:
        reembedded = reembed_task(name, [*plan.previous, new_source], final_embedding,
                                  final.version, cache, scratch, known)
        shard = index_task(name, reembedded.sources, config.index, scratch)
        searchable = SearchableIndex(blocks=[block_of(plan, shard, final.version)])
        before, indexing = searchable, [shard]
        if changed:
            start_sources = reembed_task(name, [*plan.previous, new_source], start_embedding,
                                         start.version, cache, scratch)
            start_index = index_task(name, start_sources.sources, config.index, scratch)
            before = SearchableIndex(blocks=[block_of(plan, start_index, start.version)])
        log.info("update mode full: corpus re-embedded, index rebuilt over %d documents",
                 shard.n_docs)
        return IndexUpdate(searchable=searchable, searchable_before=before,
                           own_vectors=reembedded.sources[-1], shard=shard,
                           reembedded=reembedded, indexing=indexing)

    # aligned and compatible keep every stored block; the new documents' starting-model
    # vectors (from the embed stage) make the "before" index's shard
    start_shard = index_task(name, [new_source], config.index, scratch)
    start_block = block_of(plan, start_shard, start.version)
    before = SearchableIndex(blocks=[*plan.previous_blocks, start_block])
    if not changed:
        return IndexUpdate(searchable=before, searchable_before=before,
                           own_vectors=new_source, shard=start_shard, reembedded=None,
                           indexing=[start_shard])
    # the new documents embedded with the trained model (memory members reused): the
    # session's shard, true vectors in both modes
    reembedded = reembed_task(name, [new_source], final_embedding, final.version, cache,
                              scratch, known)
    own = reembedded.sources[-1]
    shard = index_task(name, [own], config.index, scratch)
    previous, files, indexing = plan.previous_blocks, {}, [start_shard, shard]
    if mode == UpdateMode.aligned and previous:
        alignment = align_models.with_options(result_storage=results)(
            name, clustered.member_vectors(), known, config.update.alignment_shrinkage,
            scratch)
        previous = [mapped(b, plan, alignment.map_path) for b in previous]
        files = {ALIGNMENT_MAP: alignment.map_path, "alignment.json": alignment.summary_path}
        indexing.append(alignment)
        log.info("update mode aligned: %d earlier shard(s) kept, mapped to model %s (mean "
                 "cosine %.4f -> %.4f on %d memory documents)", len(previous), final.version,
                 alignment.cosine_unmapped, alignment.cosine_mapped, alignment.n_docs)
    log.info("update mode %s: shard of %d new documents (model %s) added, %d earlier shard(s) "
             "kept", mode.value, shard.n_docs, final.version, len(previous))
    return IndexUpdate(searchable=SearchableIndex(blocks=[*previous,
                                                          block_of(plan, shard, final.version)]),
                       searchable_before=before, own_vectors=own, shard=shard,
                       reembedded=reembedded, indexing=indexing, files=files)
