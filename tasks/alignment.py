"""Aligned updates: map vectors of the old encoder onto the new one (issue 14, `[update]`).

After a session fine-tunes the encoder, the memory is re-embedded anyway (DESIGN 9), so its
documents have vectors of both models. `fit_alignment` fits an orthogonal map W (d, d) from the
old model's vectors X to the new model's Y on those documents,

    W = argmin ||X W - Y||^2 + s ||W - I||^2  over orthogonal W
      = U V^T, where U S V^T is the SVD of X^T Y + s I

(orthogonal Procrustes, Schoenemann 1966, shrunk towards the identity by s =
`alignment_shrinkage`). Orthogonal, so a mapped unit vector stays a unit vector and an inner
product against it can be taken on either side: q . (v W) = (q W^T) . v. That is how the index
uses it (`tasks.index_shards`): stored vectors are never rewritten; a query is turned back
through the maps of the shards it searches.

Why shrunk: a fine-tuned encoder moves vectors little (cosine 0.997-0.998 between the base
model and the demo's trained ones), and the memory often holds fewer documents than the
vectors have dimensions (150 in the `small` benchmark, 384 dimensions): plain Procrustes fitted
on 150 demo documents mapped held-out documents to cosine 0.70, worse than no map at all
(0.9966), while s = 1 gave 0.9977 (docs/decisions.md).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from driftlane.infra.caching import cache_key_for, stage_output_dir
from driftlane.infra.faults import crash_point
from driftlane.infra.io import read_npy, read_parquet
from driftlane.tasks.stage_results import Alignment, KnownVectors

__all__ = ["ALIGN_VERSION", "align_models", "compose_maps", "fit_alignment",
           "mean_cosine"]

ALIGN_VERSION = "1"


def fit_alignment(old: np.ndarray, new: np.ndarray, shrinkage: float = 1.0) -> np.ndarray:
    """The orthogonal (d, d) float32 map W with old @ W closest to new (see the module doc).

    old, new: (n, d) vectors of the same n documents from the old and the new model.
    """
    old = np.asarray(old, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    if old.shape != new.shape or old.ndim != 2:
        raise ValueError(f"old {old.shape} and new {new.shape} must be the same (n, d) shape")
    cross = old.T @ new + shrinkage * np.eye(old.shape[1])  # (d, d)
    u, _, vt = np.linalg.svd(cross)
    return (u @ vt).astype(np.float32)


def compose_maps(maps: list[np.ndarray], dim: int) -> np.ndarray | None:
    """M = maps[0] @ maps[1] @ ... (what a stored vector goes through); None for no map."""
    if not maps:
        return None
    total = np.eye(dim, dtype=np.float64)
    for m in maps:
        total = total @ np.asarray(m, dtype=np.float64)
    return total.astype(np.float32)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of the rows of a and b (same shape)."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12))) if len(a) else float("nan")


def _paired(before: KnownVectors, after: KnownVectors) -> tuple[np.ndarray, np.ndarray]:
    """(old, new) vectors of the documents both hold, in the order of `after`."""
    old_keys = read_parquet(before.keys_url)["doc_key"].astype(str).to_numpy()
    new_keys = read_parquet(after.keys_url)["doc_key"].astype(str).to_numpy()
    rows = pd.Index(old_keys).get_indexer(new_keys)
    found = rows >= 0
    return read_npy(before.vectors_url)[rows[found]], read_npy(after.vectors_url)[found]


# --- Prefect task wrapper ---


@task(cache_key_fn=cache_key_for("align", ALIGN_VERSION), persist_result=True,
      result_serializer="json", task_run_name="align models after {session_name}")
def align_models(session_name: str, before: KnownVectors, after: KnownVectors,
                 shrinkage: float, scratch_dir: str) -> Alignment:
    """Fit the map from the starting model's vectors (`before`: the memory as clustered) to
    the trained model's (`after`: the re-embedded memory) and write alignment.npy/.json."""
    started = time.perf_counter()
    out = stage_output_dir("align", ALIGN_VERSION, scratch_dir)
    old, new = _paired(before, after)
    if not len(old):
        raise ValueError(f"session {session_name}: no memory document has vectors of both "
                         "models; the aligned update needs the re-embedded memory")
    w = fit_alignment(old, new, shrinkage)
    summary = {"n_docs": len(old), "dim": int(w.shape[0]), "shrinkage": shrinkage,
               "cosine_unmapped": mean_cosine(old, new),
               "cosine_mapped": mean_cosine(old @ w, new)}
    crash_point("align.write")
    np.save(out / "alignment.npy", w, allow_pickle=False)
    (out / "alignment.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    get_run_logger().info(
        "session %s: old -> new model map fitted on %d memory documents: mean cosine %.4f "
        "unmapped, %.4f mapped", session_name, len(old), summary["cosine_unmapped"],
        summary["cosine_mapped"])
    return Alignment(map_path=str(out / "alignment.npy"),
                     summary_path=str(out / "alignment.json"), n_docs=len(old),
                     cosine_unmapped=summary["cosine_unmapped"],
                     cosine_mapped=summary["cosine_mapped"],
                     seconds=time.perf_counter() - started)
