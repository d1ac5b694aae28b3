"""Use what a store learned from Python: search it, export its encoder and index.

    from driftlane.flows.api import open_store

    lab = open_store("~/stores/lab")            # as of the latest published session
    hits = lab.search(["how do vaccines work"], k=10)
    # pandas: query, rank, session, doc_id, score, snippet

`open_store(url, session=2)` searches as of session #2: its encoder, and its index over the
documents of sessions 0..2. Queries are encoded and ranked as that session's evaluation ranked
its test queries (`tasks.search`, the same functions), so searching them reproduces the
session's published `runs.parquet`. The alpha-QE and DBA options default to what the session
was evaluated with (`[evaluation]` in its config.json). Nothing is written to the store, so a
read-only store can be searched (a model in a remote store is copied to local scratch once).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import fsspec
import numpy as np
import pandas as pd
from pydantic import ValidationError

from driftlane.infra.caching import scratch_for
from driftlane.infra.config import (
    EmbeddingConfig,
    EvaluationConfig,
    NeighbourAveraging,
    SessionConfig,
)
from driftlane.infra.io import read_parquet
from driftlane.infra.store import DamagedStore, SessionManifest, Store, StoreError
from driftlane.tasks.index_shards import ShardedIndex, open_searchable
from driftlane.tasks.models import local_model_folder, model_version, resolve_model_path
from driftlane.tasks.publishing import MODEL_WEIGHTS, previous_model, published_blocks
from driftlane.tasks.search import augment_database, encode_queries, search_queries
from driftlane.tasks.session_files import SessionFormatError
from driftlane.tasks.stage_results import SearchableIndex

__all__ = ["SearchableStore", "SessionEncoder", "export_model", "open_store", "read_query_file",
           "session_encoder"]

SNIPPET_CHARS = 120
Options = NeighbourAveraging | dict[str, Any] | None


@dataclass
class SearchableStore:
    """One published session of a store, ready to answer queries (see `open_store`)."""

    store: Store
    manifest: SessionManifest  # the session searched "as of"
    embedding: EmbeddingConfig  # the query encoder: the session's model folder and chunking
    evaluation: EvaluationConfig  # its alpha-QE and DBA options, as used here
    model_origin: str  # "model of session <name>" or "base model <path>"
    # the session's index: one Faiss index, or its shards searched as one
    # (tasks.index_shards); DBA vectors when database_augmentation.n > 0
    index: faiss.Index | ShardedIndex
    ids: pd.DataFrame  # row of the index -> session, doc_id
    _docs: dict[str, pd.Series] = field(default_factory=dict, repr=False)

    @property
    def session(self) -> str:
        return self.manifest.name

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors (n, dim): the evaluation's encoding, nothing written anywhere."""
        return encode_queries(texts, self.embedding)

    def ranking(self, vectors: np.ndarray, k: int = 10) -> pd.DataFrame:
        """Top-k of query `vectors` (n, dim): query_row, rank (1-based), session, doc_id,
        score; best first within each query.

        Searched as deep as the evaluation (`top_k`), then cut: Faiss breaks ties between
        equal scores (a document published twice) differently for another k, and an IVF-PQ
        index re-ranks a k-dependent number of candidates."""
        depth = max(k, self.evaluation.top_k)
        scores, rows = search_queries(self.index, vectors, depth,
                                      self.evaluation.query_expansion)
        scores, rows = scores[:, :k], rows[:, :k]
        query_row, position = np.nonzero(rows >= 0)  # row-major: query by query, best first
        found = rows[query_row, position]
        return pd.DataFrame({"query_row": query_row, "rank": position + 1,
                             "session": self.ids["session"].to_numpy()[found],
                             "doc_id": self.ids["doc_id"].to_numpy()[found],
                             "score": scores[query_row, position].astype(np.float32)})

    def search(self, texts: str | Sequence[str], k: int = 10) -> pd.DataFrame:
        """The top k documents of each query text: query, rank, session, doc_id, score,
        snippet (the start of title and text)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        hits = self.ranking(self.encode(texts), k)
        hits.insert(0, "query", np.asarray(texts, dtype=object)[hits["query_row"].to_numpy()])
        hits["snippet"] = self.snippets(hits["session"], hits["doc_id"])
        return hits.drop(columns="query_row")

    def run(self, query_ids: Sequence[str], texts: Sequence[str], k: int = 10) -> pd.DataFrame:
        """A run over identified queries: query_id, rank, session, doc_id, score."""
        if len(query_ids) != len(texts):
            raise ValueError(f"{len(query_ids)} query ids for {len(texts)} texts")
        hits = self.ranking(self.encode(texts), k)
        hits.insert(0, "query_id",
                    np.asarray(query_ids, dtype=object)[hits["query_row"].to_numpy()])
        return hits.drop(columns="query_row")

    def snippets(self, sessions: Sequence[str], doc_ids: Sequence[str],
                 width: int = SNIPPET_CHARS) -> list[str]:
        """The start of each document's title and text, whitespace collapsed."""
        out = []
        for session, doc_id in zip(sessions, doc_ids, strict=True):
            text = " ".join(str(self._documents(session).get(doc_id, "")).split())
            out.append(text if len(text) <= width else text[:width - 1].rstrip() + "…")
        return out

    def export(self, out: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the encoder, index and id table for serving without driftlane into `out`
        (a new or empty folder), with export.json and a README.md (see `export_model`)."""
        return export_model(self, out)

    def _documents(self, session: str) -> pd.Series:
        """doc_id -> "title: text" of one session, read once."""
        if session not in self._docs:
            manifest = next(m for m in self.store.sessions() if m.name == session)
            docs = read_parquet(self.store.session_url(manifest, "docs.parquet"))
            titles = docs["title"].fillna("").astype(str)
            texts = docs["text"].fillna("").astype(str)
            joined = np.where(titles.str.strip() != "", titles + ": " + texts, texts)
            self._docs[session] = pd.Series(joined, index=docs["doc_id"].astype(str))
        return self._docs[session]


def open_store(url: str, session: int | str | None = None, *, device: str | None = None,
               query_expansion: Options = None,
               database_augmentation: Options = None) -> SearchableStore:
    """The store at `url` as of `session` (its index #N or name; None: the latest).

    device: where queries are encoded (default: the session's `[embedding] device`).
    query_expansion, database_augmentation: alpha-QE and DBA settings (`NeighbourAveraging`,
    or a dict such as {"n": 3} over the session's); None keeps the session's evaluation ones.
    """
    store = Store(url)
    if not store.exists():
        raise StoreError(f"{store.url}: no driftlane store here (no store.json)")
    manifest, config, embedding, origin = session_encoder(store, session, device=device)
    evaluation = config.evaluation.model_copy(update={
        "query_expansion": _options(query_expansion, config.evaluation.query_expansion),
        "database_augmentation": _options(database_augmentation,
                                          config.evaluation.database_augmentation)})
    manifests = store.sessions()
    as_of = next(i for i, m in enumerate(manifests) if m.folder == manifest.folder)
    blocks = published_blocks(store, manifests[:as_of + 1])
    searchable, ids = open_searchable(SearchableIndex(blocks=blocks))
    index = augment_database(searchable, evaluation.database_augmentation)
    ids = ids.assign(doc_id=ids["doc_id"].astype(str))[["session", "doc_id"]]
    return SearchableStore(store=store, manifest=manifest, embedding=embedding,
                           evaluation=evaluation, model_origin=origin, index=index, ids=ids)


class SessionEncoder(NamedTuple):
    """A published session, its config, and its encoder (see `session_encoder`)."""

    manifest: SessionManifest
    config: SessionConfig
    embedding: EmbeddingConfig  # model: the encoder's local folder; token embeddings off
    origin: str  # "model of session <name>" or "base model <path>"


def session_encoder(store: Store, session: int | str | None = None, *,
                    device: str | None = None) -> SessionEncoder:
    """`session` of `store` (its index #N or name; None: the latest), its config, and the
    encoder it published with its embedding settings (`device`: default the session's).
    Reads the manifests and the session's config.json only (a remote model is copied to
    local scratch once); writes nothing to the store."""
    manifests = store.sessions()
    if not manifests:
        raise StoreError(f"{store.url}: no published session yet")
    position = _session_position(store, manifests, session)
    manifest = manifests[position]
    try:
        config = SessionConfig.model_validate(store.read_json(manifest, "config.json"))
    except ValidationError as exc:
        raise StoreError(f"{store.session_url(manifest, 'config.json')}: not a config this "
                         f"version of driftlane reads ({exc.errors()[0]['msg']})") from None
    model_path, origin = _session_model(store, manifests[:position + 1], config)
    embedding = config.embedding.model_copy(update={
        "model": model_path, "keep_token_embeddings": False,
        "device": device or config.embedding.device})
    return SessionEncoder(manifest, config, embedding, origin)


def _session_position(store: Store, manifests: list[SessionManifest],
                      session: int | str | None) -> int:
    if session is None:
        return len(manifests) - 1
    for matches in (lambda m: str(m.index) == str(session), lambda m: m.name == str(session)):
        for position, m in enumerate(manifests):  # an index first, then a name
            if matches(m):
                return position
    held = ", ".join(f"#{m.index} {m.name}" for m in manifests)
    raise StoreError(f"{store.url}: no published session {session!r} (it holds {held})")


def _session_model(store: Store, manifests: list[SessionManifest],
                   config: SessionConfig) -> tuple[str, str]:
    """The local folder of the encoder the last of `manifests` published, and its origin."""
    manifest = manifests[-1]
    trained = previous_model(store, manifests)
    if trained is not None:
        owner = next(m for m in manifests if m.name == trained.session)
        if MODEL_WEIGHTS in store.removed_files(owner):
            raise StoreError(f"{store.session_url(owner, 'model')}: this encoder was removed by "
                             "`driftlane gc --keep-models`; use a later session (--session)")
        try:
            folder = local_model_folder(trained.url, trained.version, scratch_for(store, None))
        except ValueError as exc:  # the files digest to another version
            raise DamagedStore(str(exc)) from None
        return folder, f"model of session {trained.session}"
    # no session up to this one trained: the configured base model embedded everything
    path = resolve_model_path(config.embedding.model)
    if model_version(path) != manifest.model_version:
        raise StoreError(f"session {manifest.name} was embedded with base model "
                         f"{config.embedding.model!r}, version {manifest.model_version}, but "
                         f"{path} is version {model_version(path)}")
    return path, f"base model {path}"


def _options(given: Options, default: NeighbourAveraging) -> NeighbourAveraging:
    """`given` (a dict may set only n or alpha: the rest is the session's), else `default`."""
    if given is None:
        return default
    if isinstance(given, NeighbourAveraging):
        return given
    return NeighbourAveraging.model_validate({**default.model_dump(), **given})


def read_query_file(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Queries of a JSONL file ({"_id", "text"} per line, BEIR queries.jsonl; .gz too):
    query_id, text. A bad line raises SessionFormatError naming the file and line."""
    url = os.fspath(path)
    ids, texts = [], []
    with fsspec.open(url, "rt", encoding="utf-8", compression="infer") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SessionFormatError(url, number, f"not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SessionFormatError(url, number, 'expected {"_id": ..., "text": "..."}')
            ids.append(str(record.get("_id", number)))
            texts.append(record["text"])
    if not texts:
        raise SessionFormatError(url, None, "no queries in the file")
    return pd.DataFrame({"query_id": ids, "text": texts})


def write_trec_run(run: pd.DataFrame, path: str | os.PathLike[str] | None, tag: str) -> str:
    """The run (query_id, rank, session, doc_id, score) in TREC format, one line per hit:
    `qid Q0 <session>/<doc_id> rank score tag`, tab-separated; written to `path` when given."""
    keys = run["session"].astype(str) + "/" + run["doc_id"].astype(str)
    lines = [f"{q}\tQ0\t{d}\t{r}\t{s:.6f}\t{tag}" for q, d, r, s in
             zip(run["query_id"], keys, run["rank"], run["score"], strict=True)]
    text = "".join(line + "\n" for line in lines)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


# --- export for serving ---

EXPORT_README = """\
# {session}: encoder and index exported by driftlane

Exported from `{store}`, session #{index} `{session}` (model version `{version}`, {origin}).

- `model/`: a sentence-transformers model folder
- `index.faiss`: a Faiss inner-product index over {n_docs} documents ({kind}){dba}
- `index_ids.parquet`: `row` of the index -> `session`, `doc_id`
- `export.json`: where it came from, and the settings below

Load and search without driftlane (sentence-transformers, faiss, pandas), in this folder:

```python
import faiss
import numpy as np
import pandas as pd
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("model", device="cpu")
index = faiss.read_index("index.faiss")
ids = pd.read_parquet("index_ids.parquet").set_index("row")

queries = ["what causes the seasons"]
vectors = model.encode(queries, normalize_embeddings=True)  # (n, {dim}) float32
{qe}scores, rows = index.search(vectors, min(10, index.ntotal))  # top 10, best first
for score, row in zip(scores[0], rows[0]):
    print(f"{{score:.4f}}  {{ids.session[row]}}/{{ids.doc_id[row]}}")
```

driftlane embeds a query like a document: a query longer than {window} tokens is cut into
overlapping windows whose vectors are averaged, where `model.encode` truncates it. Shorter
queries get the same vectors, so the same top 10 as `driftlane search`.
"""

QE_SNIPPET = """\
# alpha-query expansion, as driftlane searched this session (n={n}, alpha={alpha}):
# each query averaged with its top n documents, weighted by similarity ** alpha
{direct_map}near_scores, near_rows = index.search(vectors, {n})
neighbours = index.reconstruct_batch(near_rows.ravel()).reshape(len(vectors), {n}, -1)
weights = np.where(near_scores > 0, np.maximum(near_scores, 0) ** {alpha}, 0)
vectors = vectors + np.einsum("qn,qnd->qd", weights, neighbours)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
"""


def export_model(searchable: SearchableStore, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the session's encoder, index (DBA vectors when that option is on), id table,
    export.json and a README.md into `out` (new or empty). Returns export.json's content."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        summary = _write_export(searchable, partial)
        if out.exists():
            out.rmdir()
        partial.replace(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def _write_export(searchable: SearchableStore, folder: Path) -> dict[str, Any]:
    manifest, evaluation = searchable.manifest, searchable.evaluation
    shutil.copytree(searchable.embedding.model, folder / "model",
                    ignore=shutil.ignore_patterns(".*"))
    index = searchable.index
    if isinstance(index, ShardedIndex):  # shards in other models' spaces: one exact index
        index = index.merged()
    faiss.write_index(index, str(folder / "index.faiss"))
    ids = searchable.ids.reset_index(drop=True)
    ids.insert(0, "row", np.arange(len(ids), dtype=np.int64))
    ids.to_parquet(folder / "index_ids.parquet", index=False)
    window = _window_tokens(folder / "model", searchable.embedding)
    summary = {
        "store": searchable.store.url, "session": manifest.name, "session_index": manifest.index,
        "model_version": manifest.model_version, "model_origin": searchable.model_origin,
        "n_docs": int(index.ntotal), "dim": int(index.d),
        "index_kind": type(index).__name__, "query_window_tokens": window,
        "chunking": searchable.embedding.chunking.model_dump(mode="json"),
        "query_expansion": evaluation.query_expansion.model_dump(mode="json"),
        "database_augmentation": evaluation.database_augmentation.model_dump(mode="json"),
    }
    (folder / "export.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    qe, dba = evaluation.query_expansion, evaluation.database_augmentation
    readme = EXPORT_README.format(
        session=manifest.name, store=searchable.store.url, index=manifest.index,
        version=manifest.model_version, origin=searchable.model_origin,
        n_docs=summary["n_docs"], kind=summary["index_kind"], dim=summary["dim"],
        window=window,
        dba=(f"; its vectors are database-side augmented (n={dba.n}, alpha={dba.alpha})"
             if dba.n else ""),
        qe=QE_SNIPPET.format(n=qe.n, alpha=qe.alpha, direct_map=_direct_map_line(
            searchable.index)) if qe.n else "")
    (folder / "README.md").write_text(readme)
    return summary


def _direct_map_line(index: faiss.Index) -> str:
    """An IVF index reconstructs vectors only with a direct map (a refined one need not)."""
    if isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return "faiss.extract_index_ivf(index).make_direct_map()\n"
    return ""


def _window_tokens(model_folder: Path, embedding: EmbeddingConfig) -> int:
    """Tokens per query window: the chunking's window, capped at the model's max length."""
    config = model_folder / "sentence_bert_config.json"
    limit = json.loads(config.read_text()).get("max_seq_length") if config.exists() else None
    window = embedding.chunking.window_tokens
    return min(window, int(limit)) if limit else window
