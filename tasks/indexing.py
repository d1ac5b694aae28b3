"""Faiss index over the corpus seen so far (DESIGN step 9; exact search for now).

Vectors are L2-normalized, so inner product is cosine similarity. Row i of the index is
the document `ids[i]` (session name, doc id); the id table is stored beside the index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from infra.caching import cache_key_for, stage_output_dir
from infra.faults import crash_point
from infra.io import read_npy, read_parquet

try:
    import faiss
except ImportError as exc:  # faiss-cpu and faiss-gpu are extras: exactly one is wanted
    raise ImportError("driftlane needs Faiss: pip install 'driftlane[cpu]' "
                      "(or 'driftlane[gpu]' for faiss-gpu)") from exc

INDEX_VERSION = "1"


def build_exact_index(vectors: np.ndarray) -> faiss.Index:
    """Flat inner-product index over `vectors` (n, dim) float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, row ids), each (n_queries, min(k, ntotal)); row id -1 never returned."""
    k = min(k, index.ntotal)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows


# --- Prefect task wrappers ---


@task(cache_key_fn=cache_key_for("index", INDEX_VERSION), persist_result=True,
      result_serializer="json", task_run_name="index {session_name}")
def build_index(session_name: str, sources: list[dict], scratch_dir: str) -> dict:
    """Build the exact index over every session's document vectors."""
    out = stage_output_dir("index", INDEX_VERSION, scratch_dir)
    blocks, ids = [], []
    for src in sources:
        vectors = read_npy(src["vectors_url"])
        doc_ids = read_parquet(src["docs_url"])["doc_id"]
        if len(doc_ids) != len(vectors):
            raise ValueError(f"{src['vectors_url']}: {len(vectors)} vectors for "
                             f"{len(doc_ids)} documents")
        blocks.append(vectors)
        ids.append(pd.DataFrame({"session": src["session"], "doc_id": doc_ids}))
    index = build_exact_index(np.concatenate(blocks))
    crash_point("index.write")
    _write_index(index, out / "index.faiss")
    pd.concat(ids, ignore_index=True).to_parquet(out / "index_ids.parquet", index=False)
    get_run_logger().info("exact index over %d documents from %d sessions",
                          index.ntotal, len(sources))
    return {"index_path": str(out / "index.faiss"), "ids_path": str(out / "index_ids.parquet"),
            "n_docs": int(index.ntotal)}


def _write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
