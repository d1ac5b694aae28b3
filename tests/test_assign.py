"""`driftlane assign`: unseen documents get their nearest cluster's stable id.

The store tests share one tiny store of two sessions without fine-tuning: `alpha` (six
documents, the warm-up) and `beta` (twelve: alpha's six texts under other ids, and six new
topics), clustered by the streaming update. A document that joined a cluster in a streaming
session was assigned to its nearest centroid with the centroids held fixed, the centroids the
session publishes: so the same text must get the same id back.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from malformed_sessions import write_valid_session
from typer.testing import CliRunner

from driftlane.flows.cli import app
from driftlane.infra.config import (
    EmbeddingConfig,
    MemoryConfig,
    PrototypeConfig,
    SessionConfig,
)
from driftlane.infra.store import Store
from driftlane.tasks.cluster_lookup import assign_documents, nearest_cluster
from driftlane.tasks.embedding import embed_texts
from driftlane.tasks.ingest import read_corpus_file
from driftlane.tasks.memory import CentroidTable
from driftlane.tasks.memory_state import SavedCentroids, load_memory_state
from driftlane.tasks.memory_update import NewDocuments, update_memory
from driftlane.tasks.prototypes import make_hyperplanes
from driftlane.tasks.session_files import SessionFormatError
from driftlane.tasks.session_memory import prototype_spec_for
from driftlane.tasks.texts import document_text


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def with_new_ids(corpus: Path, out: Path, prefix: str = "new-") -> Path:
    """The corpus's documents under other ids: the same texts, never seen under these ids."""
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    out.write_text("".join(json.dumps({**d, "_id": prefix + d["_id"]}) + "\n" for d in docs))
    return out


def joined_existing(state, earlier_ids: np.ndarray, session: str) -> pd.Series:
    """doc id -> cluster id of the memory documents of `session` whose cluster existed before
    it (not one the session opened)."""
    rows = state.memory[(state.memory["session"] == session)
                        & state.memory["cluster_id"].isin(earlier_ids)]
    return pd.Series(rows["cluster_id"].to_numpy(np.int64),
                     index=rows["doc_key"].str.removeprefix(f"{session}/").to_numpy())


# --- nearest cluster and the prototype space, no store ---


def test_nearest_cluster_matches_brute_force():
    rng = np.random.default_rng(3)
    centroids = CentroidTable(np.array([4, 9, 2, 30]), rng.standard_normal((4, 8)))
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    ids, distances = nearest_cluster(vectors, centroids)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ centroids.vectors.T
    np.testing.assert_array_equal(ids, centroids.ids[sims.argmax(axis=1)])
    np.testing.assert_allclose(distances, 1.0 - sims.max(axis=1), atol=1e-6)
    with pytest.raises(ValueError, match="dim"):
        nearest_cluster(vectors[:, :4], centroids)


def test_a_prototype_memory_places_documents_on_prototypes(tmp_path, minilm_path, encoder):
    """Clusters on prototypes: assign builds the documents' prototypes with the saved spec."""
    embedding = EmbeddingConfig(model=minilm_path, device="cpu")
    spec = prototype_spec_for(PrototypeConfig(), encoder.get_embedding_dimension())
    planes = make_hyperplanes(spec)
    config = MemoryConfig(representation="prototypes", k_max=6)
    state = None
    for name, n_docs in (("s0", 6), ("s1", 12)):
        docs = read_corpus_file(write_valid_session(tmp_path / name, n_docs) / "corpus.jsonl")
        texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"], strict=True)]
        embedded = embed_texts(encoder, texts, embedding.chunking, keep_token_embeddings=True)
        new = NewDocuments((name + "/" + docs["doc_id"]).to_numpy(str), embedded.vectors,
                           *embedded.stacked_tokens())
        earlier = state.centroids.ids if state is not None else None
        state = update_memory(state, new, config, spec, planes, name).state
    assert state.centroids.dim == spec.output_dim
    saved = SavedCentroids(state.centroids, state.representation, spec, planes)
    got = assign_documents(docs, saved, embedding).set_index("doc_id")["cluster_id"]
    want = joined_existing(state, earlier, "s1")
    assert len(want) >= 6
    pd.testing.assert_series_equal(got.loc[want.index], want, check_names=False,
                                   check_index_type=False)


def test_documents_are_read_by_the_corpus_rules_gzipped_too(tmp_path):
    plain = write_valid_session(tmp_path / "s", 4) / "corpus.jsonl"
    packed = tmp_path / "docs.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    pd.testing.assert_frame_equal(read_corpus_file(packed), read_corpus_file(plain))
    assert read_corpus_file(plain)["doc_id"].tolist() == ["d0", "d1", "d2", "d3"]
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(SessionFormatError, match="folder.jsonl: is not a file"):
        read_corpus_file(tmp_path / "folder.jsonl")
    with pytest.raises(SessionFormatError, match=r"corpus.jsonl:1: document 'd0' has"):
        read_corpus_file(plain, max_document_chars=10)


# --- the command on a tiny store ---


QUICK = {"finetune": {"enabled": False}, "lock": {"global_limit": False}}


@pytest.fixture(scope="module")
def store(prefect_harness, tmp_path_factory):
    """alpha (warm-up), then beta (streaming: alpha's texts again, and six new topics)."""
    from driftlane.flows.session import session_flow

    root = tmp_path_factory.mktemp("assign")
    with pytest.MonkeyPatch.context() as patch:  # this store's own scratch
        patch.setenv("DRIFTLANE_SCRATCH", str(root / "scratch"))
        for name, n_docs in (("alpha", 6), ("beta", 12)):
            session_flow(str(write_valid_session(root / "in" / name, n_docs, name[0])),
                         str(root / "s"), SessionConfig.model_validate(QUICK))
    return root


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def states(root: Path):
    st = Store(str(root / "s"))
    return [load_memory_state(st.session_url(m, "memory"))[0] for m in st.sessions()]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_memory_document_gets_its_own_cluster_id(tmp_path, store, scratch, suffix):
    alpha, beta = states(store)
    docs = with_new_ids(store / "in" / "beta" / "corpus.jsonl", tmp_path / "docs.jsonl")
    before = tree_state(store / "s")
    out = tmp_path / f"ids{suffix}"
    result = run_cli("assign", "--store", str(store / "s"), "--in", str(docs), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "12 documents" in result.output and "session #1 beta" in result.output
    assert tree_state(store / "s") == before  # nothing published, nothing written

    table = (pd.read_csv(out, dtype={"doc_id": str}) if suffix == ".csv"
             else pd.read_parquet(out))
    assert list(table.columns) == ["doc_id", "cluster_id", "distance"]
    assert table["doc_id"].tolist() == [f"new-b{i}" for i in range(12)]  # input order
    assert set(table["cluster_id"]) <= set(beta.centroids.ids.tolist())
    assert ((table["distance"] >= -1e-5) & (table["distance"] <= 2 + 1e-5)).all()
    got = table.set_index(table["doc_id"].str.removeprefix("new-"))["cluster_id"]
    want = joined_existing(beta, alpha.centroids.ids, "beta")
    assert len(want) >= 6  # at least alpha's six texts joined alpha's clusters
    pd.testing.assert_series_equal(got.loc[want.index], want, check_names=False,
                                   check_index_type=False)
    # those texts are alpha's documents too: the same ids as alpha's documents now hold
    ids_now = beta.assignments.set_index("doc_key")["cluster_id"]
    for i in range(6):
        assert got[f"b{i}"] == ids_now[f"alpha/a{i}"]


def test_session_option_uses_that_session_s_memory(tmp_path, store, scratch):
    alpha, _ = states(store)
    docs = with_new_ids(store / "in" / "beta" / "corpus.jsonl", tmp_path / "docs.jsonl")
    out = tmp_path / "ids.parquet"
    result = run_cli("assign", "--store", str(store / "s"), "--in", str(docs), "--out", str(out),
                     "--session", "alpha")
    assert result.exit_code == 0, result.output
    assert "session #0 alpha" in result.output
    assert set(pd.read_parquet(out)["cluster_id"]) <= set(alpha.centroids.ids.tolist())


@pytest.mark.parametrize(("content", "args", "message"), [
    ('{"_id": "1", "text": "ok"}\n{not json\n', [], "docs.jsonl:2: invalid JSON"),
    ('{"_id": "1", "text": "a"}\n{"_id": "1", "text": "b"}\n', [],
     "docs.jsonl:2: duplicate doc id '1'"),
    ('{"_id": "1"}\n', [], "docs.jsonl:1: missing 'text'"),
    (None, [], "docs.jsonl: no such file"),
    ("", ["--out", "{tmp}/ids.txt"], "unknown output format '.txt'"),
    ("", ["--session", "7"], "no published session '7'"),
    ("", ["--store", "{tmp}/nothing"], "no driftlane store here"),
])
def test_bad_input_ends_in_one_line_with_code_2(tmp_path, store, scratch, content, args,
                                                message):
    docs = tmp_path / "docs.jsonl"
    if content is not None:
        docs.write_text(content or '{"_id": "1", "text": "fine"}\n')
    defaults = {"--store": str(store / "s"), "--in": str(docs),
                "--out": str(tmp_path / "ids.parquet")}
    given = dict(zip(args[::2], (a.format(tmp=tmp_path) for a in args[1::2]), strict=True))
    argv = ["assign", *(x for item in {**defaults, **given}.items() for x in item)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0  # one line
    assert message in result.output
    assert not (tmp_path / "ids.parquet").exists()
