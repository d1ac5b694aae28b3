"""Search, export-model and the query-side options (alpha-QE, DBA).

Unit tests check `tasks.search` against brute-force numpy on a seeded synthetic fixture. The
store tests share one tiny store of two sessions: `alpha` fine-tunes (plain evaluation),
`beta` does not train (it keeps alpha's model) and is evaluated with alpha-QE and DBA on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from malformed_sessions import write_valid_session
from typer.testing import CliRunner

from driftlane.flows.api import open_store
from driftlane.flows.cli import app
from driftlane.infra.config import NeighbourAveraging, SessionConfig
from driftlane.infra.store import Store
from driftlane.tasks.indexing import build_index_from_factory
from driftlane.tasks.indexing import search as plain_search
from driftlane.tasks.models import model_version
from driftlane.tasks.search import (
    alpha_query_expansion,
    augment_database,
    database_side_augmentation,
    search_queries,
)


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


# --- alpha-QE and DBA against brute force ---


@pytest.fixture(scope="module")
def synthetic():
    """300 unit vectors in 16 dimensions (documents) and 7 queries, seeded."""
    rng = np.random.default_rng(7)
    docs = rng.standard_normal((300, 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return docs, queries


def reference_average(vector, docs, sims, rows, alpha):
    weights = np.maximum(sims[rows], 0.0) ** alpha
    mixed = vector.astype(np.float64) + weights @ docs[rows].astype(np.float64)
    return mixed / np.linalg.norm(mixed)


def reference_qe(docs, queries, n, alpha):
    out = []
    for q in queries:
        sims = docs @ q
        out.append(reference_average(q, docs, sims, np.argsort(-sims)[:n], alpha))
    return np.array(out)


def reference_dba(docs, n, alpha):
    out = []
    for i, d in enumerate(docs):
        sims = docs @ d
        sims_others = sims.copy()
        sims_others[i] = -np.inf  # never its own neighbour
        out.append(reference_average(d, docs, sims, np.argsort(-sims_others)[:n], alpha))
    return np.array(out)


@pytest.mark.parametrize(("n", "alpha"), [(1, 3.0), (3, 3.0), (5, 1.0), (4, 0.0)])
def test_alpha_query_expansion_matches_brute_force(synthetic, n, alpha):
    docs, queries = synthetic
    index = build_index_from_factory(docs, "Flat", nprobe=1)
    expanded = alpha_query_expansion(index, queries, NeighbourAveraging(n=n, alpha=alpha))
    np.testing.assert_allclose(expanded, reference_qe(docs, queries, n, alpha), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expanded, axis=1), 1.0, atol=1e-5)
    assert queries.flags.writeable and np.isfinite(queries).all()  # input left as it was


@pytest.mark.parametrize(("n", "alpha"), [(1, 3.0), (3, 3.0), (6, 0.5)])
def test_database_side_augmentation_matches_brute_force(synthetic, n, alpha):
    docs, _ = synthetic
    index = build_index_from_factory(docs, "Flat", nprobe=1)
    augmented = database_side_augmentation(index, NeighbourAveraging(n=n, alpha=alpha))
    np.testing.assert_allclose(augmented, reference_dba(docs, n, alpha), atol=1e-5)
    np.testing.assert_array_equal(index.reconstruct_n(0, index.ntotal), docs)  # unchanged


def test_options_work_on_an_ivf_index_too(synthetic):
    # an IVF index needs a direct map to hand back vectors; searching every list is exact
    docs, queries = synthetic
    index = build_index_from_factory(docs, "IVF4,Flat", nprobe=4)
    options = NeighbourAveraging(n=3, alpha=3.0)
    np.testing.assert_allclose(alpha_query_expansion(index, queries, options),
                               reference_qe(docs, queries, 3, 3.0), atol=1e-5)
    augmented = augment_database(index, options)
    assert type(augmented) is type(index) and augmented.ntotal == index.ntotal
    rows = np.arange(0, 300, 37)
    np.testing.assert_allclose(augmented.reconstruct_batch(rows),
                               reference_dba(docs, 3, 3.0)[rows], atol=1e-5)


def test_off_is_the_plain_search(synthetic):
    docs, queries = synthetic
    index = build_index_from_factory(docs, "Flat", nprobe=1)
    off = NeighbourAveraging()
    assert off.n == 0
    assert augment_database(index, off) is index
    assert alpha_query_expansion(index, queries, off) is queries
    for got, want in zip(search_queries(index, queries, 10, off),
                         plain_search(index, queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)


# --- a tiny store: search, the CLI, the API, export ---

BETA_OPTIONS = {"query_expansion": {"n": 2, "alpha": 3.0},
                "database_augmentation": {"n": 1, "alpha": 3.0}}


def revised(session: Path) -> Path:
    """The session with every text changed a little: no document of it has the same text
    (and so the same score, a tie) as alpha's."""
    corpus = session / "corpus.jsonl"
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    corpus.write_text("".join(json.dumps({**d, "text": d["text"] + " Revised edition."}) + "\n"
                              for d in docs))
    return session


@pytest.fixture(scope="module")
def store(prefect_harness, tmp_path_factory):
    """alpha (fine-tuned, plain evaluation), then beta (no training; alpha-QE and DBA)."""
    from driftlane.flows.session import session_flow

    root = tmp_path_factory.mktemp("search")
    quick = {"finetune": {"enabled": True, "max_steps": 2, "batch_size": 4,
                          "max_seq_length": 32}, "lock": {"global_limit": False}}
    with pytest.MonkeyPatch.context() as patch:  # this store's own scratch
        patch.setenv("DRIFTLANE_SCRATCH", str(root / "scratch"))
        session_flow(str(write_valid_session(root / "in" / "alpha", 6, "a")), str(root / "s"),
                     SessionConfig.model_validate(quick))
        beta = {**quick, "finetune": {"enabled": False}, "evaluation": BETA_OPTIONS}
        session_flow(str(revised(write_valid_session(root / "in" / "beta", 5, "b"))),
                     str(root / "s"), SessionConfig.model_validate(beta))
    return root / "s"


def manifests(store_dir: Path):
    return Store(str(store_dir)).sessions()


def query_file_of(tmp_path, store_dir: Path, session: str) -> Path:
    """The test queries `session` was evaluated on, as a BEIR queries.jsonl."""
    folder = next(m.folder for m in manifests(store_dir) if m.name == session)
    queries = pd.read_parquet(store_dir / "sessions" / folder / "queries.parquet")
    qrels = pd.read_parquet(store_dir / "sessions" / folder / "qrels.parquet")
    queries = queries[queries["query_id"].isin(qrels.loc[qrels["split"] == "test",
                                                          "query_id"])]
    path = tmp_path / f"{session}.jsonl"
    path.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                            for q, t in zip(queries["query_id"], queries["text"], strict=True)))
    return path


def published_top10(store_dir: Path, session_index: int, evaluated: str) -> pd.DataFrame:
    folder = manifests(store_dir)[session_index].folder
    runs = pd.read_parquet(store_dir / "sessions" / folder / "runs.parquet")
    runs = runs[(runs["evaluated_session"] == evaluated) & (runs["rank"] <= 10)]
    return runs.sort_values(["query_id", "rank"]).reset_index(drop=True)


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.mark.parametrize(("session", "evaluated"), [
    ("0", "alpha"),  # alpha's plain evaluation, with its fine-tuned model
    (None, "alpha"),  # beta's evaluation (alpha-QE + DBA) of alpha's queries
    (None, "beta"),
])
def test_search_queries_reproduces_the_published_run(tmp_path, store, scratch, session,
                                                      evaluated):
    queries = query_file_of(tmp_path, store, evaluated)
    before = tree_state(store)
    out = tmp_path / "run.parquet"
    args = ["search", "--store", str(store), "--queries", str(queries), "--out", str(out)]
    result = run_cli(*args, *(["--session", session] if session else []))
    assert result.exit_code == 0, result.output
    assert tree_state(store) == before  # nothing written to the store, not even the cache

    index = 0 if session == "0" else 1
    published = published_top10(store, index, evaluated)
    run = pd.read_parquet(out).sort_values(["query_id", "rank"]).reset_index(drop=True)
    assert len(published) > 0 and len(run) == len(published)
    assert list(run["query_id"]) == list(published["query_id"])
    assert list(run["session"] + "/" + run["doc_id"]) == list(published["doc_key"])
    np.testing.assert_allclose(run["score"], published["score"], atol=1e-5)

    # the same run in TREC format: qid Q0 docid rank score tag
    trec = tmp_path / "run.tsv"
    result = run_cli(*args[:-1], str(trec), *(["--session", session] if session else []))
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in trec.read_text().splitlines()]
    assert len(lines) == len(run)
    assert [(q, z, d, int(r)) for q, z, d, r, _s, _t in lines] == [
        (q, "Q0", f"{s}/{d}", r) for q, s, d, r in
        zip(run["query_id"], run["session"], run["doc_id"], run["rank"], strict=True)]
    assert {tag for *_, tag in lines} == {f"driftlane-{manifests(store)[index].model_version}"}


def test_the_api_and_the_cli_agree(store, scratch):
    texts = ["how do you keep a sourdough starter alive", "how is electricity generated from tides"]
    searchable = open_store(str(store))
    assert searchable.session == "beta" and searchable.index.ntotal == 11
    assert searchable.evaluation.query_expansion == NeighbourAveraging(n=2, alpha=3.0)
    hits = searchable.search(texts, k=3)
    assert list(hits.columns) == ["query", "rank", "session", "doc_id", "score", "snippet"]
    assert list(hits["rank"]) == [1, 2, 3, 1, 2, 3]
    assert hits["snippet"].str.len().gt(0).all()
    assert hits.iloc[0]["snippet"].startswith("Sourdough starters: ")

    result = run_cli("search", "--store", str(store), *texts, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["session"] == "beta" and shown["query_expansion"]["n"] == 2
    cli = pd.DataFrame(shown["hits"])
    pd.testing.assert_frame_equal(cli[["query", "rank", "session", "doc_id", "snippet"]],
                                  hits[["query", "rank", "session", "doc_id", "snippet"]])
    np.testing.assert_allclose(cli["score"], hits["score"], atol=1e-6)

    text = run_cli("search", "--store", str(store), texts[0], "-k", "2")
    assert text.exit_code == 0 and "session #1 beta" in text.output
    first = hits.iloc[0]
    assert f"{first['session']}/{first['doc_id']}" in text.output

    # options given to the API override the session's: off is the plain search
    plain = open_store(str(store), query_expansion={"n": 0}, database_augmentation={"n": 0})
    assert plain.evaluation.query_expansion.alpha == 3.0  # the session's alpha kept
    result = run_cli("search", "--store", str(store), texts[0], "-k", "3", "--json",
                     "--qe-n", "0", "--dba-n", "0")
    assert [h["doc_id"] for h in json.loads(result.stdout)["hits"]] == \
        list(plain.search(texts[0], k=3)["doc_id"])


def readme_code(export: Path) -> str:
    return re.search(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S)[1]


PLAIN_LOAD = """
import json, sys
{code}
print(json.dumps({{"rows": rows.tolist(), "scores": scores.tolist(),
                  "driftlane_imported": any(m.startswith("driftlane") for m in sys.modules)}}))
"""


@pytest.mark.parametrize("session", ["0", None])
def test_export_model_loads_without_driftlane(tmp_path, store, scratch, session):
    export = tmp_path / "export"
    args = ["export-model", "--store", str(store), "--out", str(export)]
    result = run_cli(*args, *(["--session", session] if session else []))
    assert result.exit_code == 0, result.output
    info = json.loads((export / "export.json").read_text())
    alpha = manifests(store)[0]
    # beta did not train: the current encoder is alpha's fine-tuned one, not the base model
    assert info["model_version"] == alpha.model_version != model_version("default")
    assert info["model_origin"] == "model of session alpha"
    assert model_version(str(export / "model")) == alpha.model_version
    ids = pd.read_parquet(export / "index_ids.parquet")
    assert list(ids.columns) == ["row", "session", "doc_id"]
    assert list(ids["row"]) == list(range(6 if session == "0" else 11))

    texts = ["how do you keep a sourdough starter alive", "how is electricity generated from tides"]
    code = readme_code(export).replace('queries = ["what causes the seasons"]',
                                       f"queries = {texts!r}")
    assert ("alpha-query expansion" in code) == (session is None)  # beta searched with it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD.format(code=code)], cwd=export,
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["driftlane_imported"] is False

    hits = open_store(str(store), session).search(texts, k=10)
    for q, text in enumerate(texts):
        mine = hits[hits["query"] == text]
        rows = loaded["rows"][q][:len(mine)]
        assert [f"{ids['session'][r]}/{ids['doc_id'][r]}" for r in rows] == \
            list(mine["session"] + "/" + mine["doc_id"])
        np.testing.assert_allclose(loaded["scores"][q][:len(mine)], mine["score"], atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["search", "--store", "{store}"], "give query text(s) or --queries"),
    (["search", "--store", "{store}", "x", "--out", "r.tsv"], "--out: only with --queries"),
    (["search", "--store", "{store}", "--queries", "{tmp}/q.jsonl", "--out", "r.csv"],
     "unknown run format '.csv'"),
    (["search", "--store", "{store}", "--queries", "{tmp}/none.jsonl"], "none.jsonl: no such"),
    (["search", "--store", "{store}", "--queries", "{tmp}/q.jsonl"], "q.jsonl:2: not valid JSON"),
    (["search", "--store", "{store}", "x", "--session", "7"], "no published session '7'"),
    (["search", "--store", "{tmp}/nothing", "x"], "no driftlane store here"),
    (["export-model", "--store", "{store}", "--out", "{tmp}/q.jsonl"], "not an empty folder"),
])
def test_bad_usage_ends_in_one_line_with_code_2(tmp_path, store, scratch, args, message):
    (tmp_path / "q.jsonl").write_text('{"_id": "1", "text": "ok"}\n{not json\n')
    args = [a.format(store=store, tmp=tmp_path) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
