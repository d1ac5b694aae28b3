"""The compatible update mode (tasks/compatibility_loss.py through tasks/finetune.py), MiniLM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from driftlane.infra.config import FinetuneConfig
from driftlane.tasks.compatibility_loss import (
    BackwardCompatibleLoss,
    CompatibilityTargets,
    compatibility_loss,
)
from driftlane.tasks.finetune import _build_trainer, _training_frame, fine_tune

# Arbitrary query -> document pairings: training must move the space to learn them.
EXAMPLES = pd.DataFrame({
    "anchor": ["ticket 101 status", "ticket 202 status", "ticket 303 status", "ticket 404 status",
               "order alpha", "order beta", "order gamma", "order delta"],
    "positive": ["the printer on floor two is jammed", "password reset link expired",
                 "vpn drops every hour", "laptop battery swelling", "blue ceramic mug set",
                 "cast iron frying pan", "wool hiking socks", "noise cancelling headphones"],
    "negative": ["quarterly revenue report", "team lunch on friday", "parking lot repaving",
                 "new hire orientation", "garden hose nozzle", "desk lamp bulb",
                 "yoga mat strap", "phone charging cable"],
})
CONFIG = FinetuneConfig(batch_size=4, max_seq_length=32, learning_rate=1e-4, warmup_ratio=0.0,
                        log_every_steps=1)
ORDER = [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
SCALE = 20.0


def embed(model_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit query vectors (n, d) and document vectors (n, 2, d): positive, negative."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
    model.max_seq_length = CONFIG.max_seq_length
    queries, positives, negatives = (
        model.encode(EXAMPLES[c].tolist(), normalize_embeddings=True)
        for c in ("anchor", "positive", "negative"))
    return queries, np.stack([positives, negatives], axis=1)


@pytest.fixture(scope="module")
def old_vectors(minilm_path) -> np.ndarray:
    """The start model's document vectors; two documents were never embedded (NaN rows)."""
    _, docs = embed(minilm_path)
    docs[5, 1] = np.nan
    docs[6, 0] = np.nan
    return docs


@pytest.fixture(scope="module")
def plain(minilm_path, tmp_path_factory):
    """The full update: the same examples, order and seed without the compatibility term."""
    return fine_tune(minilm_path, EXAMPLES, CONFIG, tmp_path_factory.mktemp("plain"),
                     batch_order=ORDER, seed=0)


def agreement_with_old_vectors(model_path: str, old: np.ndarray) -> tuple[float, float]:
    """KL(softmax(s_new) || softmax(s_old)) per query, mean, and MRR of positives on old vectors.

    s_new: new queries against the new model's document vectors, s_old: against the stored
    ones, over every document with a stored vector.
    """
    queries, new = embed(model_path)
    stored = ~np.isnan(old).any(axis=2).reshape(-1)
    s_old = SCALE * queries @ old.reshape(-1, old.shape[2])[stored].T
    s_new = SCALE * queries @ new.reshape(-1, new.shape[2])[stored].T
    log_p_old = torch.log_softmax(torch.from_numpy(s_old), dim=1)
    log_p_new = torch.log_softmax(torch.from_numpy(s_new), dim=1)
    kl = float((log_p_new.exp() * (log_p_new - log_p_old)).sum(dim=1).mean())
    column = np.cumsum(stored) - 1  # of each document among the stored ones
    ranks = [1 + int((s_old[i] > s_old[i, column[2 * i]]).sum())
             for i in range(len(queries)) if stored[2 * i]]
    return kl, float(np.mean(1.0 / np.array(ranks)))


def test_the_term_keeps_new_queries_comparable_with_old_vectors(plain, old_vectors,
                                                                minilm_path, tmp_path):
    """Same start, examples, order and seed: with the term, new queries score the stored
    vectors much as the fully updated model scores its own document vectors."""
    targets = CompatibilityTargets(old_vectors, weight=1.0)
    compatible = fine_tune(minilm_path, EXAMPLES, CONFIG, tmp_path, batch_order=ORDER, seed=0,
                           compatibility=targets)
    assert compatible["loss"] == "BackwardCompatibleLoss"
    assert compatible["compatibility"] == {"weight": 1.0, "n_examples_with_stored_vectors": 8}
    kl_plain, mrr_plain = agreement_with_old_vectors(plain["model_path"], old_vectors)
    kl_compatible, mrr_compatible = agreement_with_old_vectors(compatible["model_path"],
                                                               old_vectors)
    # measured: KL 0.183 plain, 0.069 compatible; MRR 0.55 plain, 0.71 compatible
    assert kl_compatible < 0.6 * kl_plain
    assert mrr_compatible >= mrr_plain


def test_weight_zero_trains_exactly_as_the_ranking_loss(plain, old_vectors, minilm_path,
                                                        tmp_path):
    targets = CompatibilityTargets(old_vectors, weight=0.0)
    result = fine_tune(minilm_path, EXAMPLES, CONFIG, tmp_path, batch_order=ORDER, seed=0,
                       compatibility=targets)
    assert result["model_version"] == plain["model_version"]
    assert plain["loss"] == "MultipleNegativesRankingLoss" and "compatibility" not in plain


def test_stored_vectors_reach_the_loss_as_labels_in_batch_order(old_vectors, minilm_path,
                                                                tmp_path):
    frame, _ = _training_frame(EXAMPLES, use_negatives=True)
    order = [[6, 1, 5], [0]]
    _, trainer = _build_trainer(minilm_path, frame, CONFIG, tmp_path, order, 2, seed=0,
                                compatibility=CompatibilityTargets(old_vectors))
    labels = [batch["label"].numpy() for batch in trainer.get_train_dataloader()]
    for batch, rows in zip(labels, order, strict=True):
        np.testing.assert_array_equal(batch, old_vectors[rows].reshape(len(rows), -1))


def test_wrong_targets_and_gradcache_are_refused(old_vectors, minilm_path, tmp_path):
    cached = CONFIG.model_copy(update={"mini_batch_size": 2})
    with pytest.raises(ValueError, match="mini_batch_size"):
        fine_tune(minilm_path, EXAMPLES, cached, tmp_path,
                  compatibility=CompatibilityTargets(old_vectors))
    with pytest.raises(ValueError, match="examples"):
        fine_tune(minilm_path, EXAMPLES, CONFIG, tmp_path,
                  compatibility=CompatibilityTargets(old_vectors[:3]))
    with pytest.raises(ValueError, match="dimensions"):
        fine_tune(minilm_path, EXAMPLES, CONFIG, tmp_path,
                  compatibility=CompatibilityTargets(old_vectors[:, :, :8]))
    with pytest.raises(ValueError, match="shape"):
        CompatibilityTargets(old_vectors[:, 0])
    with pytest.raises(ValueError, match="weight"):
        CompatibilityTargets(old_vectors, weight=-1.0)


def reference_term(queries: np.ndarray, docs: np.ndarray, old: np.ndarray) -> float:
    """compatibility_loss, one query and one candidate at a time. docs, old: (b, k, d)."""
    batch, k, _ = docs.shape
    # candidates in MNRL's order: all positives, then all negatives
    candidates = [(j, c) for c in range(k) for j in range(batch) if not np.isnan(old[j, c]).any()]

    def unit(v):
        return v / np.linalg.norm(v)

    kl, ce = [], []
    for i in range(batch):
        s_old = np.array([SCALE * unit(queries[i]) @ unit(old[j, c]) for j, c in candidates])
        s_new = np.array([SCALE * unit(queries[i]) @ unit(docs[j, c]) for j, c in candidates])
        log_p_old = s_old - np.log(np.exp(s_old).sum())
        log_p_new = s_new - np.log(np.exp(s_new).sum())
        kl.append((np.exp(log_p_new) * (log_p_new - log_p_old)).sum())
        if (i, 0) in candidates:
            ce.append(-log_p_old[candidates.index((i, 0))])
    return float(np.mean(kl) + (np.mean(ce) if ce else 0.0))


def test_the_term_masks_documents_without_stored_vectors(minilm_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    generator = torch.Generator().manual_seed(0)
    batch, dim = 5, 16
    queries = torch.randn(batch, dim, dtype=torch.float64, generator=generator,
                          requires_grad=True)
    docs = torch.randn(batch, 2, dim, dtype=torch.float64, generator=generator)
    old = docs + 0.5 * torch.randn(batch, 2, dim, dtype=torch.float64, generator=generator)
    old[1, 0] = old[3, 1] = old[4, 0] = old[4, 1] = float("nan")
    term = compatibility_loss(queries, [docs[:, 0], docs[:, 1]], old, SCALE)
    expected = reference_term(queries.detach().numpy(), docs.numpy(), old.numpy())
    assert term.item() == pytest.approx(expected, rel=1e-9)
    term.backward()
    assert torch.isfinite(queries.grad).all() and queries.grad.abs().sum() > 0
    # with only the positive column, the negatives' vectors are not candidates at all
    assert compatibility_loss(queries, [docs[:, 0]], old, SCALE).item() == pytest.approx(
        reference_term(queries.detach().numpy(), docs[:, :1].numpy(), old[:, :1].numpy()),
        rel=1e-9)

    # a batch with no stored vectors: exactly the ranking loss, through the real forward
    model = SentenceTransformer(minilm_path, device="cpu", local_files_only=True).eval()
    features = [model.preprocess(EXAMPLES[c][:4].tolist())
                for c in ("anchor", "positive", "negative")]
    labels = torch.full((4, 2 * model.get_embedding_dimension()), float("nan"))
    loss = BackwardCompatibleLoss(model, scale=SCALE, weight=3.0)
    with torch.no_grad():
        parts = loss(features, labels)
        ranking = MultipleNegativesRankingLoss(model, scale=SCALE)(features, None)
    assert float(parts["compatibility"]) == 0.0
    assert torch.equal(sum(parts.values()), ranking)
