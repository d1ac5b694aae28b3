"""The clustered memory after a session (`MemoryState`) and its files.

The state is plain arrays and tables: the memory table, dense vectors, float16 token embeddings of
the memory documents as one ragged array (every document's rows stacked, plus offsets; see
`split_tokens`, `take_ragged`, `concat_ragged`), centroids, statistics, every document's cluster
id, cluster prototypes (empty arrays for dense clusters), cluster sizes per session and how many
documents' cluster ids each session changed. `save_memory_state` writes it into a local folder
(parquet, npy without pickle, JSON), `load_memory_state` reads it from any fsspec URL
(`load_centroids` only what placing new documents needs), and `plot_cluster_sizes` draws the
cluster sizes and the share of changed ids across sessions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd

from driftlane.infra.io import read_npy, read_parquet
from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.prototypes import PrototypeSpec, load_prototype_spec, save_prototype_spec

STATE_FORMAT = 2  # 2: id_history
ID_HISTORY_COLUMNS = ("session", "n_assigned_before", "n_changed")


@dataclass(frozen=True)
class MemoryState:
    """The clustered memory after a session.

    memory: n rows, `tasks.memory.MEMORY_COLUMNS`; vectors: (n, d) float32 dense vectors of the
    memory documents; tokens: (T, d) float16 token embeddings of the memory documents, document i
    owning rows token_offsets[i]:token_offsets[i+1]; centroids: in the cluster representation's
    space; stats: per-cluster count/mean/std; assignments: every document seen (doc_key,
    cluster_id, session); prototype_sums (next_cluster_id, D) float64 and prototype_counts
    (next_cluster_id,) int64, indexed by stable id, when the clusters are computed on prototypes,
    and empty ((0, 0) and (0,): not computed) when they are dense; size_history: (session,
    cluster_id, n_documents) after every session so far; id_history: (session, n_assigned_before,
    n_changed) per session: of the documents assigned before the session, how many it gave another
    cluster id (the ID stability downstream models rely on).
    """

    memory: pd.DataFrame
    vectors: np.ndarray
    tokens: np.ndarray
    token_offsets: np.ndarray
    centroids: CentroidTable
    stats: pd.DataFrame
    assignments: pd.DataFrame
    prototype_sums: np.ndarray
    prototype_counts: np.ndarray
    size_history: pd.DataFrame
    id_history: pd.DataFrame
    next_cluster_id: int
    seen: int
    representation: str
    budget: int


def split_tokens(tokens: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Views of each document's token rows."""
    return [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def take_ragged(tokens: np.ndarray, offsets: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The token rows of documents `rows` (in that order) and their new offsets."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = offsets[rows], offsets[rows + 1]
    lengths = ends - starts
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # index of every kept token: its document's start plus its place inside the document
    within = np.arange(new_offsets[-1], dtype=np.int64) - np.repeat(new_offsets[:-1], lengths)
    return tokens[np.repeat(starts, lengths) + within], new_offsets


def take_ragged_parts(parts: tuple[tuple[np.ndarray, np.ndarray], ...],
                      rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`take_ragged` over the parts' documents stacked (part 0's first), without stacking the
    parts' tokens: the token rows of documents `rows` (in that order) and their offsets."""
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.zeros(len(rows), np.int64)
    starts = np.zeros(len(rows), np.int64)
    owner = np.zeros(len(rows), np.int64)
    first = 0
    for number, (_, offsets) in enumerate(parts):
        n_docs = len(offsets) - 1
        inside = (rows >= first) & (rows < first + n_docs)
        local = rows[inside] - first
        starts[inside], lengths[inside] = offsets[local], offsets[local + 1] - offsets[local]
        owner[inside] = number
        first += n_docs
    if ((rows < 0) | (rows >= first)).any():
        raise IndexError(f"document rows outside 0..{first - 1}")
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    width = next((t.shape[1] for t, _ in parts if t.ndim == 2), 0)
    dtype = np.result_type(*(t.dtype for t, _ in parts))
    out = np.empty((int(new_offsets[-1]), width), dtype)
    token_owner = np.repeat(owner, lengths)
    # index of every kept token in its part: its document's start plus its place inside
    source = np.repeat(starts, lengths) + (np.arange(new_offsets[-1], dtype=np.int64)
                                           - np.repeat(new_offsets[:-1], lengths))
    for number, (tokens, _) in enumerate(parts):
        mine = token_owner == number
        out[mine] = tokens[source[mine]]
    return out, new_offsets


def concat_ragged(a: tuple[np.ndarray, np.ndarray],
                  b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    (ta, oa), (tb, ob) = a, b
    return np.concatenate([ta, tb]), np.concatenate([oa, ob[1:] + oa[-1]]).astype(np.int64)


# --- saving and loading (parquet, npy without pickle, JSON; any fsspec URL) ---

_ARRAYS = ("vectors", "tokens", "token_offsets", "prototype_sums", "prototype_counts")
_TABLES = ("memory", "stats", "assignments", "size_history", "id_history")


def empty_id_history() -> pd.DataFrame:
    """An id history with no session yet, with the `ID_HISTORY_COLUMNS` dtypes."""
    return pd.DataFrame({"session": pd.Series(dtype=str),
                         "n_assigned_before": pd.Series(dtype=np.int64),
                         "n_changed": pd.Series(dtype=np.int64)})


def save_memory_state(folder: Path, state: MemoryState, spec: PrototypeSpec,
                      planes: dict[str, np.ndarray]) -> None:
    """Write `state` and the prototype spec into a local folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        np.save(folder / f"{name}.npy", getattr(state, name), allow_pickle=False)
    np.save(folder / "centroid_ids.npy", state.centroids.ids, allow_pickle=False)
    np.save(folder / "centroids.npy", state.centroids.vectors, allow_pickle=False)
    for name in _TABLES:
        getattr(state, name).to_parquet(folder / f"{name}.parquet", index=False)
    (folder / "state.json").write_text(json.dumps({
        "format": STATE_FORMAT, "next_cluster_id": state.next_cluster_id, "seen": state.seen,
        "representation": state.representation, "budget": state.budget,
        "memory_size": len(state.memory), "n_clusters": len(state.centroids),
    }, indent=2, sort_keys=True))
    save_prototype_spec(str(folder / "prototypes"), spec, planes)


@dataclass(frozen=True)
class SavedCentroids:
    """What placing a new document needs from a saved state: the centroids, the
    representation they live in (dense or prototypes), the prototype spec and hyperplanes."""

    centroids: CentroidTable
    representation: str
    spec: PrototypeSpec
    planes: dict[str, np.ndarray]


def _read_meta(url: str) -> dict:
    with fsspec.open(f"{url}/state.json", "r") as f:
        meta = json.load(f)
    if meta.get("format") not in (1, STATE_FORMAT):
        raise ValueError(f"{url}: memory state format {meta.get('format')}, "
                         f"this code reads formats 1 to {STATE_FORMAT}")
    return meta


def load_centroids(url: str) -> SavedCentroids:
    """The centroids of the state at `url` (any fsspec URL), without its members, tokens or
    assignment table."""
    url = url.rstrip("/")
    meta = _read_meta(url)
    centroids = CentroidTable(read_npy(f"{url}/centroid_ids.npy"),
                              read_npy(f"{url}/centroids.npy"))
    spec, planes = load_prototype_spec(f"{url}/prototypes")
    return SavedCentroids(centroids, meta["representation"], spec, planes)


def load_memory_state(url: str) -> tuple[MemoryState, PrototypeSpec, dict[str, np.ndarray]]:
    """Read what `save_memory_state` wrote, from any fsspec URL."""
    url = url.rstrip("/")
    meta = _read_meta(url)
    arrays = {name: read_npy(f"{url}/{name}.npy") for name in _ARRAYS}
    # format 1 kept no id history: it starts with the next session
    tables = {name: (empty_id_history() if name == "id_history" and meta["format"] == 1
                     else read_parquet(f"{url}/{name}.parquet")) for name in _TABLES}
    saved = load_centroids(url)
    state = MemoryState(**arrays, **tables, centroids=saved.centroids,
                        next_cluster_id=int(meta["next_cluster_id"]), seen=int(meta["seen"]),
                        representation=meta["representation"], budget=int(meta["budget"]))
    return state, saved.spec, saved.planes


def plot_cluster_sizes(size_history: pd.DataFrame, path: Path,
                       id_history: pd.DataFrame | None = None) -> None:
    """A PNG of cluster sizes across sessions: one stacked bar per session, one colour per id.

    With `id_history`, a second panel under it, session for session: the share of the
    documents assigned before each session whose cluster id that session changed, with the
    counts (n/a where none was assigned before: the first session, or sessions before the
    history was kept).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = size_history.pivot_table(index="session", columns="cluster_id",
                                     values="n_documents", aggfunc="sum", sort=False).fillna(0)
    width = max(4.0 if id_history is None else 6.0, 1.2 * len(table))
    if id_history is None:
        fig, ax = plt.subplots(figsize=(width, 4.0))
        bottom_ax = ax
    else:
        fig, (ax, bottom_ax) = plt.subplots(2, 1, sharex=True, figsize=(width, 6.0),
                                            height_ratios=(2, 1))
        _plot_id_changes(bottom_ax, id_history, list(table.index))
    bottom = np.zeros(len(table))
    cmap = plt.get_cmap("tab20")
    for i, cluster_id in enumerate(table.columns):
        values = table[cluster_id].to_numpy(float)
        ax.bar(range(len(table)), values, bottom=bottom, color=cmap(i % 20), width=0.7)
        bottom += values
    bottom_ax.set_xticks(range(len(table)), [str(s) for s in table.index], rotation=30,
                         ha="right")
    ax.set_ylabel("documents")
    ax.set_title(f"cluster sizes across sessions ({len(table.columns)} cluster ids)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_id_changes(ax, id_history: pd.DataFrame, sessions: list[str]) -> None:
    """Bars of the share (%) of earlier documents whose cluster id each session changed."""
    history = id_history.drop_duplicates("session", keep="last").set_index("session")
    history = history.reindex(sessions)
    before = history["n_assigned_before"].to_numpy(np.float64)  # NaN: no row for the session
    changed = history["n_changed"].to_numpy(np.float64)
    known = before > 0
    percent = np.where(known, 100.0 * changed / np.where(known, before, 1.0), 0.0)
    ax.bar(range(len(sessions)), percent, color="tab:red", width=0.7)
    top = max(1.0, float(percent.max(initial=0.0)))
    for x, (ok, p, n, of) in enumerate(zip(known, percent, changed, before, strict=True)):
        label = f"{int(n):,} of {int(of):,}" if ok else "n/a"
        ax.annotate(label, (x, p), xytext=(0, 2), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8)
    ax.set_ylim(0, 1.25 * top)
    ax.set_ylabel("ids changed (%)")
    ax.set_title("cluster ids changed, of the documents assigned before", fontsize=10)
