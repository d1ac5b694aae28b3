"""The whole pipeline against the published reference figures (shared/docs/REFERENCE.md).

With the first window only (`pooling = first`, 256 tokens), the chunked embedding is exactly
what `SentenceTransformer.encode` gives with truncation at 256, so cisi evaluated alone must
reproduce the zero-shot figures measured with plain sentence-transformers + ranx (about
two minutes of CPU encoding).
"""

from __future__ import annotations

import pytest

from driftlane.flows.session import session_flow
from driftlane.infra.config import (
    ChunkingConfig,
    EmbeddingConfig,
    FinetuneConfig,
    MemoryConfig,
    SessionConfig,
    WindowPooling,
)

pytestmark = pytest.mark.usefixtures("prefect_harness", "scratch")

# REFERENCE.md, cisi: all-MiniLM-L6-v2, max_seq_length 256, exact inner product, ranx.
CISI_REFERENCE = {"ndcg@10": 0.4207, "success@5": 0.8289, "recall@10": 0.1282,
                  "recall@100": 0.4707}


def test_cisi_zero_shot_matches_the_reference(tmp_path, datasets_dir):
    # zero-shot: no memory, no fine-tuning, as REFERENCE.md measured it
    config = SessionConfig(
        embedding=EmbeddingConfig(batch_size=64, chunking=ChunkingConfig(
            window_tokens=256, pooling=WindowPooling.first)),
        memory=MemoryConfig(enabled=False), finetune=FinetuneConfig(enabled=False))
    summary = session_flow(str(datasets_dir / "cisi"), str(tmp_path / "store"), config)
    metrics = summary["metrics"]["cisi"]
    assert metrics["n_queries"] == 76
    for name, expected in CISI_REFERENCE.items():
        assert metrics[name] == pytest.approx(expected, abs=0.002), name
