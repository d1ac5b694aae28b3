"""Backward-compatible fine-tuning: new query vectors stay comparable with stored document vectors.

The "compatible" update mode (issue 14). Documents embedded before this session keep the vectors
the OLD model (the one training starts from) gave them, so they never need re-embedding: the new
model's query vectors must still rank them. Two terms do this, added to the usual ranking loss:

- BCT's influence loss (Shen et al., "Towards Backward-Compatible Representation Learning",
  CVPR 2020): the new query embedding is classified by the OLD document vectors, cross-entropy
  with its own positive as the target.
- L2R's distillation (Cao et al., CIKM 2023): the full-update score distribution (new query vs
  new document embeddings, detached) is distilled onto the scores against the old vectors,
  KL(softmax(s_new) || softmax(s_old)).

For a batch of b examples with k document columns (positive[, negative]) and scale s:

    total    = MNRL(q, D_new)  (unchanged: same loss and scale as plain training)
               + weight * (KL(softmax(s_new) || softmax(s_old)) + CE(s_old, own positive))
    s_old    = s * cos(q_new, d_old)            (b, m), with gradients into q_new
    s_new    = s * cos(q_new, d_new), detached  (b, m)

over the m candidate documents of the batch (all positives and negatives, as in MNRL) that have a
stored vector. Documents without one (a NaN row) leave the candidate set; a query whose own
positive has none adds no cross-entropy term, and a batch without stored vectors gives exactly
the MNRL loss. Similarities are cosines, like MNRL's `cos_sim`.

How the stored vectors reach the loss: `tasks.finetune` adds them to the training dataset as its
`label` column, one row of 2*d float32 per example (positive's vector, then negative's; NaN kept).
sentence-transformers' data collator stacks that column into a (b, 2*d) tensor and the trainer
passes it to `loss.forward(sentence_features, labels)`. Texts and vectors are one dataset row, so
they stay together under any batch sampler; the no-duplicates sampler ignores label columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BackwardCompatibleLoss", "CompatibilityTargets", "compatibility_loss"]


@dataclass(frozen=True)
class CompatibilityTargets:
    """Stored old-model vectors of each training example's documents.

    vectors: float32 (n_examples, 2, d), row i of `examples`: [i, 0] its positive's stored
    vector, [i, 1] its negative's; a row of NaN where the document has no stored vector (or the
    example has no negative). weight: the compatibility term's weight (0 trains as without it).
    """

    vectors: np.ndarray
    weight: float = 1.0

    def __post_init__(self) -> None:
        vectors = np.asarray(self.vectors, dtype=np.float32)
        if vectors.ndim != 3 or vectors.shape[1] != 2 or vectors.shape[2] < 1:
            raise ValueError(f"vectors must have the shape (n_examples, 2, d), not {vectors.shape}")
        if not np.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"weight must be finite and >= 0, not {self.weight}")
        object.__setattr__(self, "vectors", vectors)

    @property
    def stored(self) -> np.ndarray:
        """(n_examples, 2) bool: which documents have a stored vector (no NaN in the row)."""
        return ~np.isnan(self.vectors).any(axis=2)

    def n_with_stored(self, documents: int = 2) -> int:
        """Examples with a stored vector among their first `documents` documents (1: positive)."""
        return int(self.stored[:, :documents].any(axis=1).sum())

    def label_rows(self) -> np.ndarray:
        """(n_examples, 2*d) float32: the dataset's label column, NaN kept."""
        return self.vectors.reshape(len(self.vectors), -1)


def compatibility_loss(queries: Tensor, docs: list[Tensor], old: Tensor, scale: float) -> Tensor:
    """KL(softmax(s_new) || softmax(s_old)) + CE(s_old, own positive) over stored candidates.

    queries: (b, d) new query embeddings. docs: k tensors (b, d), the new embeddings of each
    document column (positives first). old: (b, 2, d) stored vectors, NaN rows where none; only
    the first k columns are used. Returns a scalar; zero when no candidate has a stored vector.
    """
    batch_size, k = queries.size(0), len(docs)
    # candidates in MNRL's order: all positives, then all negatives
    new_docs = torch.cat(docs, dim=0)  # (k*b, d)
    old_docs = old[:, :k].transpose(0, 1).reshape(k * batch_size, -1).to(queries.dtype)
    stored = ~torch.isnan(old_docs).any(dim=1)  # (k*b,)
    if not bool(stored.any()):
        return queries.new_zeros(())
    q = F.normalize(queries, p=2, dim=1)
    s_old = scale * q @ F.normalize(old_docs[stored], p=2, dim=1).T  # (b, m)
    with torch.no_grad():  # the full-update scores are the teacher
        s_new = scale * q @ F.normalize(new_docs[stored], p=2, dim=1).T  # (b, m)
    log_p_old = F.log_softmax(s_old, dim=1)
    kl = F.kl_div(log_p_old, F.log_softmax(s_new, dim=1), reduction="batchmean", log_target=True)
    own = stored[:batch_size]  # queries whose own positive has a stored vector
    if not bool(own.any()):
        return kl
    # column of each query's positive among the stored candidates
    target = torch.cumsum(stored.long(), dim=0)[:batch_size] - 1
    return kl + F.cross_entropy(s_old[own], target[own])


class BackwardCompatibleLoss(nn.Module):
    """MultipleNegativesRankingLoss plus `weight` times the compatibility term (module docstring).

    model: the SentenceTransformer being trained. scale: MNRL's inverse temperature, shared by
    the compatibility scores. Inputs: (anchor, positive[, negative]) columns; labels (b, 2*d)
    stored vectors (NaN rows where none) or None (then exactly MNRL).

    `forward` returns {"ranking": MNRL, "compatibility": weight * term}; the trainer sums the
    parts and logs each (loss components in the log history and TensorBoard).
    """

    def __init__(self, model: Any, scale: float = 20.0, weight: float = 1.0) -> None:
        super().__init__()
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )

        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and >= 0, not {weight}")
        self.model = model
        self.ranking = MultipleNegativesRankingLoss(model, scale=scale)
        self.scale = scale
        self.weight = weight

    def forward(self, sentence_features: Iterable[dict[str, Tensor]],
                labels: Tensor | None) -> dict[str, Tensor]:
        from sentence_transformers.base.losses.merged_forward import embed_columns

        # the same forward passes as MNRL's own forward
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor],
                                     labels: Tensor | None) -> dict[str, Tensor]:
        """embeddings: per column (b, d), anchor first; labels: (b, 2*d) or None."""
        ranking = self.ranking.compute_loss_from_embeddings(embeddings, labels)
        if labels is None:
            return {"ranking": ranking, "compatibility": ranking.new_zeros(())}
        queries = embeddings[0]
        dim = queries.size(1)
        if labels.dim() != 2 or labels.size(1) != 2 * dim:
            raise ValueError(f"labels must be (batch, 2*{dim}) stored vectors, "
                             f"not {tuple(labels.shape)}")
        old = labels.reshape(labels.size(0), 2, dim)
        term = compatibility_loss(queries, list(embeddings[1:]), old, self.scale)
        return {"ranking": ranking, "compatibility": self.weight * term}

    def get_config_dict(self) -> dict[str, Any]:
        return {**self.ranking.get_config_dict(), "weight": self.weight}
