"""Stable cluster ids for documents no session has clustered (`driftlane assign`).

A downstream model that uses the cluster id as a feature needs the id of a new document before
any session has seen it. `nearest_cluster` gives each row its nearest centroid's stable id and
its cosine distance `1 - x . c` to it, the distance the memory measures (`tasks.memory`).
`assign_documents` places documents as a session would: their text as the pipeline builds it
(`tasks.texts.document_text`), embedded with the session's encoder and chunking
(`tasks.embedding.embed_texts`), in the space the memory clusters on (dense vectors, or
document prototypes from the memory's saved spec and hyperplanes:
`tasks.memory_update.cluster_space`). No cluster is opened: a document far from every cluster
still gets the nearest id, and its distance says how far. Plain functions: no Prefect, and the
only file read is the encoder's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from driftlane.infra.config import ClusterRepresentation, EmbeddingConfig
from driftlane.tasks.embedding import embed_texts
from driftlane.tasks.memory import CentroidTable, distances_to_centroids
from driftlane.tasks.memory_state import SavedCentroids
from driftlane.tasks.memory_update import cluster_space
from driftlane.tasks.models import load_encoder
from driftlane.tasks.pseudo_positives import nearest_clusters
from driftlane.tasks.texts import document_text

__all__ = ["ASSIGNED_COLUMNS", "assign_documents", "nearest_cluster"]

ASSIGNED_COLUMNS = ("doc_id", "cluster_id", "distance")
# (block, k) similarities at a time, so a large batch never holds (m, k) at once
_BLOCK_ROWS = 65_536


def nearest_cluster(space: np.ndarray, centroids: CentroidTable) -> tuple[np.ndarray, np.ndarray]:
    """The nearest cluster of each row of `space` (m, d), in the centroids' space.

    Returns (m,) int64 stable ids (cosine; ties go to the smaller id) and (m,) float32 cosine
    distances to those centroids.
    """
    if not len(centroids):
        raise ValueError("the memory holds no cluster to assign documents to")
    if space.shape[1] != centroids.dim:
        raise ValueError(f"vectors have dim {space.shape[1]}, centroids {centroids.dim}")
    ids = np.empty(len(space), np.int64)
    distances = np.empty(len(space), np.float32)
    for start in range(0, len(space), _BLOCK_ROWS):
        block = space[start:start + _BLOCK_ROWS]  # (b, d)
        nearest = nearest_clusters(block, centroids, 1)[:, 0]  # (b,)
        ids[start:start + len(block)] = nearest
        distances[start:start + len(block)] = distances_to_centroids(block, nearest, centroids)
    return ids, distances


def assign_documents(docs: pd.DataFrame, saved: SavedCentroids,
                     embedding: EmbeddingConfig) -> pd.DataFrame:
    """doc_id, cluster_id, distance of each document of `docs` (doc_id, title, text), in order.

    embedding: the session's encoder (`model`, a local folder), device, batch size and chunking.
    Token embeddings are computed only when the memory clusters on prototypes.
    """
    texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"], strict=True)]
    on_prototypes = saved.representation != ClusterRepresentation.dense
    model = load_encoder(embedding.model, embedding.device)
    embedded = embed_texts(model, texts, embedding.chunking, embedding.batch_size,
                           keep_token_embeddings=on_prototypes)
    if on_prototypes:
        space = cluster_space(embedded.vectors, *embedded.stacked_tokens(), saved.representation,
                              saved.spec, saved.planes)
    else:
        space = embedded.vectors  # (m, dim)
    ids, distances = nearest_cluster(space, saved.centroids)
    return pd.DataFrame({"doc_id": docs["doc_id"].astype(str).to_numpy(),
                         "cluster_id": ids, "distance": distances})
