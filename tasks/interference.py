"""Maximally Interfered Retrieval for replay (issue 13; Aljundi et al. 2019, MIR).

MIR replays the memory samples that the coming update would hurt most: it takes a virtual
optimizer step on the incoming data, then retrieves the buffered samples whose loss rose most.
Here the update is a session's, so the virtual update is `steps` AdamW steps (the session's
learning rate and batch size) on the session's new examples, on a copy of the starting model
that is then thrown away; every buffered pair with its mined negative is a candidate, and its
score is loss after - loss before, the loss being the pair's InfoNCE term against its own
negative, -log softmax(scale * [cos(q, p), cos(q, n)])[0] (no negative: 0). Both losses come
from the same code path (texts encoded with `max_seq_length` tokens), so the difference
measures the update and not a change of encoder settings.

Cost: `steps` training steps plus two encodings of the candidates' distinct texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from driftlane.infra.config import FinetuneConfig
from driftlane.tasks.models import resolve_device

if TYPE_CHECKING:
    import torch

__all__ = ["interference_scores", "pair_losses"]

ENCODE_BATCH = 64


def pair_losses(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                has_negative: torch.Tensor, scale: float) -> torch.Tensor:
    """(n,) per-pair InfoNCE loss against its own negative on unit vectors; 0 without one."""
    import torch

    pos = (anchors * positives).sum(dim=1)
    neg = (anchors * negatives).sum(dim=1)
    loss = torch.nn.functional.softplus(scale * (neg - pos))  # -log softmax([pos, neg])[0]
    return torch.where(has_negative, loss, torch.zeros_like(loss))


def interference_scores(model_path: str, new_texts: pd.DataFrame, candidates: pd.DataFrame,
                        config: FinetuneConfig, steps: int, seed: int) -> np.ndarray:
    """(len(candidates),) float64 loss increase of each candidate under a virtual update.

    new_texts and candidates: DataFrame(anchor, positive, negative) of texts
    (`tasks.sampling.training_texts`; negative None where there is none). The virtual update
    trains a fresh copy of the model at `model_path` for `steps` steps on batches of
    `config.batch_size` new examples (in-batch negatives plus each one's own), seeded by
    `seed`; the model on disk is never written.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    if not len(candidates):
        return np.zeros(0)
    if not len(new_texts):
        raise ValueError("a virtual update needs new examples")
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SentenceTransformer(model_path, device=device, local_files_only=True)
        model.max_seq_length = config.max_seq_length
        before = _candidate_losses(model, candidates, config.scale)
        _virtual_update(model, new_texts, config, steps, np.random.default_rng(seed))
        after = _candidate_losses(model, candidates, config.scale)
    return (after - before).astype(np.float64)


def _embed(model, texts: list[str], grad: bool) -> torch.Tensor:
    import torch

    prepare = getattr(model, "preprocess", None) or model.tokenize  # renamed in ST 5
    features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                for k, v in prepare(texts).items()}
    with torch.set_grad_enabled(grad):
        out = model(features)["sentence_embedding"]
    return torch.nn.functional.normalize(out, dim=1)


def _candidate_losses(model, candidates: pd.DataFrame, scale: float) -> np.ndarray:
    import torch

    model.eval()
    has = candidates["negative"].notna().to_numpy().copy()
    texts = pd.unique(np.concatenate([
        candidates["anchor"].to_numpy(dtype=object), candidates["positive"].to_numpy(dtype=object),
        candidates["negative"].to_numpy(dtype=object)[has]]))
    vectors = torch.cat([_embed(model, list(texts[i:i + ENCODE_BATCH]), grad=False)
                         for i in range(0, len(texts), ENCODE_BATCH)])
    row = pd.Index(texts)
    anchors = vectors[row.get_indexer(candidates["anchor"])]
    positives = vectors[row.get_indexer(candidates["positive"])]
    negatives = torch.zeros_like(anchors)
    negatives[torch.from_numpy(has).to(anchors.device)] = vectors[row.get_indexer(
        candidates["negative"].to_numpy(dtype=object)[has])]
    losses = pair_losses(anchors, positives, negatives,
                         torch.from_numpy(has).to(anchors.device), scale)
    return losses.double().cpu().numpy()


def _virtual_update(model, new_texts: pd.DataFrame, config: FinetuneConfig, steps: int,
                    rng: np.random.Generator) -> None:
    """`steps` AdamW steps of the in-batch InfoNCE loss (the training loss) on new examples."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    size = min(config.batch_size, len(new_texts))
    for _ in range(steps):
        batch = new_texts.iloc[np.sort(rng.choice(len(new_texts), size=size, replace=False))]
        anchors = _embed(model, batch["anchor"].astype(str).tolist(), grad=True)
        documents = batch["positive"].astype(str).tolist()
        if config.hard_negatives:
            documents += batch["negative"].dropna().astype(str).tolist()
        scores = config.scale * anchors @ _embed(model, documents, grad=True).T
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(batch),
                                                                    device=scores.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
