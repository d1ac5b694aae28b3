"""The searchable index as shards written once, combined when read (issue 14).

A session in `full` update mode writes one shard over the whole corpus (every vector
re-embedded with its model). In `aligned` and `compatible` modes it writes a shard over its own
new documents only and keeps the earlier shards as they are, so the bytes a session adds to the
store follow its new data. `index_blocks.json` in each session lists the blocks its searches
combine (`stage_results.IndexBlock`: the shard, the model that made its vectors, the alignment
maps that carry them to the session's model).

`open_searchable` turns that list into something `tasks.indexing.search` takes: the shard
itself when there is one block without maps (the `full` mode: exactly one Faiss index, as
before), else a `ShardedIndex`. A ShardedIndex searches every shard with the query turned back
through the shard's maps (orthogonal, so q . (v M) = (q M^T) . v: exact scores, nothing
rewritten) and merges the top k by score. Rows are numbered shard after shard, in block order,
like the concatenated id tables.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd

from driftlane.infra.io import read_npy, read_parquet
from driftlane.infra.store import DamagedStore
from driftlane.tasks.alignment import compose_maps
from driftlane.tasks.stage_results import SearchableIndex

try:
    import faiss
except ImportError as exc:  # pragma: no cover - faiss is a declared dependency
    raise ImportError("driftlane needs Faiss: pip install 'driftlane[cpu]'") from exc

__all__ = ["ShardedIndex", "open_searchable", "read_index", "reconstruct"]


def read_index(url: str) -> faiss.Index:
    """A Faiss index from any fsspec URL (read into memory, so object stores work too)."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise DamagedStore(f"{url}: damaged Faiss index ({str(exc).splitlines()[0]})") from None


def reconstruct(index: faiss.Index, rows: np.ndarray) -> np.ndarray:
    """The vectors (len(rows), d) float32 a Faiss index holds at `rows` (1-d, all >= 0). An IVF
    index gets a direct map (row -> list position) first; a refined index answers from its
    exact vectors."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        ivf = None
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))


class ShardedIndex:
    """Faiss indexes searched as one; shard i's vectors count as v @ transforms[i]."""

    def __init__(self, shards: list[faiss.Index], transforms: list[np.ndarray | None]):
        if not shards or len(shards) != len(transforms):
            raise ValueError("a ShardedIndex needs one transform (or None) per shard")
        self.shards = shards
        self.transforms = transforms
        self.offsets = np.cumsum([0] + [s.ntotal for s in shards]).astype(np.int64)
        self.ntotal = int(self.offsets[-1])
        self.d = int(shards[0].d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows), each (m, min(k, ntotal)), over all shards; best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.ntotal)
        scores, rows = [], []
        for shard, transform, offset in zip(self.shards, self.transforms, self.offsets,
                                            strict=False):
            if shard.ntotal == 0:
                continue
            q = queries if transform is None else queries @ transform.T  # (m, d)
            s, r = shard.search(np.ascontiguousarray(q, dtype=np.float32),
                                min(k, shard.ntotal))
            rows.append(np.where(r >= 0, r + offset, -1))
            scores.append(np.where(r >= 0, s, -np.inf).astype(np.float32))
        all_scores, all_rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
        best = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]  # (m, k)
        top_scores = np.take_along_axis(all_scores, best, axis=1)
        top_rows = np.take_along_axis(all_rows, best, axis=1)
        return np.where(np.isfinite(top_scores), top_scores, -1.0).astype(np.float32), top_rows

    def reconstruct_batch(self, rows: np.ndarray) -> np.ndarray:
        """The vectors (len(rows), d) at `rows` (1-d, all >= 0), carried through the maps."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for i, (shard, transform) in enumerate(zip(self.shards, self.transforms, strict=True)):
            chosen = np.flatnonzero(shard_of == i)
            if len(chosen):
                vectors = reconstruct(shard, rows[chosen] - self.offsets[i])
                out[chosen] = vectors if transform is None else vectors @ transform
        return out

    def merged(self) -> faiss.Index:
        """One exact inner-product index over every (mapped) vector, row for row."""
        index = faiss.IndexFlatIP(self.d)
        for i in range(len(self.shards)):
            rows = np.arange(self.offsets[i], self.offsets[i + 1])
            if len(rows):
                index.add(self.reconstruct_batch(rows))
        return index


def open_searchable(searchable: SearchableIndex) -> tuple[faiss.Index | ShardedIndex,
                                                          pd.DataFrame]:
    """The index of `searchable`'s blocks and its row -> (session, doc_id) table."""
    shards, transforms, tables = [], [], []
    for block in searchable.blocks:
        shard = read_index(block.index_url)
        ids = read_parquet(block.ids_url)
        if len(ids) != shard.ntotal:
            raise DamagedStore(f"{block.ids_url}: {len(ids)} rows for an index of "
                               f"{shard.ntotal} documents")
        shards.append(shard)
        transforms.append(compose_maps([read_npy(url) for url in block.map_urls], shard.d))
        tables.append(ids[["session", "doc_id"]])
    ids = pd.concat(tables, ignore_index=True)
    if len(shards) == 1 and transforms[0] is None:
        return shards[0], ids
    return ShardedIndex(shards, transforms), ids
