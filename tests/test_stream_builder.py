"""Tests for tasks.stream_builder (`driftlane make-stream`) on the real collections, small N."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from driftlane.flows.cli import app
from driftlane.tasks.ingest import read_session, validate_session
from driftlane.tasks.stream_builder import build_stream, read_dataset_index
from driftlane.tasks.stream_plan import (
    DatasetIndex,
    StreamBuildError,
    assign_query_splits,
    largest_remainder,
    mixing_weights,
    plan_dataset,
    plan_stream,
)

DOMAIN = ["scifact", "cisi", "msmarco_agentset5k"]  # scifact has its own train split
MIXED = ["cosqa", "cisi", "msmarco_agentset5k"]
N = 80


def _sessions(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir())


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def domain_stream(tmp_path_factory, datasets_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("domain") / "stream"
    manifest = build_stream(DOMAIN, out, docs_per_session=N, seed=3,
                            datasets_dir=str(datasets_dir))
    return out, manifest


@pytest.fixture(scope="module")
def mixed_stream(tmp_path_factory, datasets_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mixed") / "stream"
    manifest = build_stream(MIXED, out, mode="mixed", docs_per_session=N, seed=3,
                            datasets_dir=str(datasets_dir))
    return out, manifest


# --- planning, pure -------------------------------------------------------------------------


def test_largest_remainder_sums_exactly():
    for total in (0, 1, 7, 300):
        counts = largest_remainder([0.57, 0.35, 0.08, 0.0], total)
        assert counts.sum() == total and (counts >= 0).all() and counts[3] == 0
    assert largest_remainder([1, 1, 1], 2).tolist() == [1, 1, 0]  # ties: earlier first


def test_mixing_weights_move_mass_from_first_to_last():
    weights = mixing_weights(n_sessions=5, n_datasets=4)
    assert weights.shape == (5, 4)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert (np.diff(weights[:, 0]) < 0).all() and (np.diff(weights[:, -1]) > 0).all()
    assert weights[0].argmax() == 0 and weights[-1].argmax() == 3
    assert ((weights > 0.05).sum(axis=1) >= 2).all()  # several collections per session


def _synthetic_index() -> DatasetIndex:
    """40 docs; q0 and q1 share d0; q2 is judged against 12 docs; q3..q9 one doc each."""
    rows = [("q0", "d0"), ("q0", "d1"), ("q1", "d0"), ("q1", "d2")]
    rows += [("q2", f"d{k}") for k in range(3, 15)]
    rows += [(f"q{k}", f"d{12 + k}") for k in range(3, 10)]
    qrels = pd.DataFrame([(q, d, 1, "test") for q, d in rows],
                         columns=["query_id", "doc_id", "score", "split"])
    return DatasetIndex("toy", [f"d{k}" for k in range(40)], [f"q{k}" for k in range(10)],
                        qrels)


def test_assign_query_splits_seeded_disjoint_and_sized():
    index = _synthetic_index()
    first, drawn = assign_query_splits(index.qrels, 0.3, seed=1, dataset="toy")
    again, _ = assign_query_splits(index.qrels, 0.3, seed=1, dataset="toy")
    other, _ = assign_query_splits(index.qrels, 0.3, seed=2, dataset="toy")
    assert drawn
    pd.testing.assert_frame_equal(first, again)
    test = set(first.loc[first.split == "test", "query_id"])
    train = set(first.loc[first.split == "train", "query_id"])
    assert not test & train and len(test | train) == 10 and len(test) == 3
    assert set(other.loc[other.split == "test", "query_id"]) != test  # the seed matters
    assert first.drop(columns="split").equals(index.qrels.drop(columns="split"))

    both = first  # a collection that already has both splits keeps them
    kept, drawn = assign_query_splits(both, 0.9, seed=5, dataset="toy")
    assert not drawn and kept is both


def test_plan_dataset_keeps_judged_docs_and_never_repeats_one():
    index = _synthetic_index()
    qrels, _ = assign_query_splits(index.qrels, 0.5, seed=0, dataset="toy")
    index = DatasetIndex(index.name, index.doc_ids, index.query_ids, qrels)
    parts = plan_dataset(index, doc_quota=[10, 0, 10, 30], query_quota=None, seed=0)
    assert parts[1] is None
    seen: set[str] = set()
    kept_queries: set[str] = set()
    for part, quota in zip([parts[0], parts[2], parts[3]], [10, 10, 20], strict=True):
        assert len(part.doc_ids) == quota  # the last one is capped: only 20 docs were left
        assert not part.doc_ids & seen
        seen |= part.doc_ids
        assert set(part.qrels["doc_id"]) <= part.doc_ids  # every judged doc came along
        assert set(part.qrels["query_id"]) == set(part.query_ids)
        assert not kept_queries & set(part.query_ids)
        kept_queries |= set(part.query_ids)
    assert seen == set(index.doc_ids)
    # q2's 12 judged docs exceed half of a 10-doc session; it fits only the one taking the rest
    assert "q2" not in parts[0].query_ids and "q2" not in parts[2].query_ids
    assert "q2" in parts[3].query_ids
    # a subsampled session keeps at least half distractors
    for part in parts[0], parts[2]:
        assert part.qrels["doc_id"].nunique() <= 5


def test_query_quota_limits_queries():
    index = _synthetic_index()
    parts = plan_dataset(index, doc_quota=[20], query_quota=[2], seed=0)
    assert len(parts[0].query_ids) == 2


def test_mixed_stream_without_size_sends_every_document_exactly_once(datasets_dir):
    indexes = [read_dataset_index(name, str(datasets_dir / name))
               for name in ("cisi", "msmarco_agentset5k")]
    plan = plan_stream(indexes, mode="mixed", n_sessions=4, seed=0)
    assert len(plan.sessions) == 4
    for index in indexes:
        arrived = [d for s in plan.sessions for p in s.parts if p.dataset == index.name
                   for d in p.doc_ids]
        assert len(arrived) == len(set(arrived)) == len(index.doc_ids)
        assert set(arrived) == set(index.doc_ids)


def test_bad_arguments_are_refused():
    index = _synthetic_index()
    with pytest.raises(StreamBuildError, match="given twice"):
        plan_stream([index, index])
    with pytest.raises(StreamBuildError, match="mixed streams"):
        plan_stream([index], n_sessions=3)
    with pytest.raises(StreamBuildError, match="no documents"):
        plan_stream([index], mode="mixed", docs_per_session=30, n_sessions=3)


# --- written streams ------------------------------------------------------------------------


def test_domain_stream_sessions_are_valid_and_complete(domain_stream, datasets_dir):
    out, manifest = domain_stream
    names = [p.name for p in _sessions(out)]
    assert names == ["00_scifact", "01_cisi", "02_msmarco_agentset5k"]
    assert not list(out.glob(".*"))  # no staging left
    assert json.loads((out / "stream.json").read_text()) == manifest
    assert manifest["mode"] == "domain" and manifest["seed"] == 3
    assert [d["query_split"] for d in manifest["datasets"]] == ["source", "seeded", "seeded"]
    for folder, dataset in zip(_sessions(out), DOMAIN, strict=True):
        validate_session(folder)
        session = read_session(folder)
        source = read_dataset_index(dataset, str(datasets_dir / dataset))
        assert len(session.corpus) == N and session.corpus["doc_id"].is_unique
        assert set(session.corpus["doc_id"]) <= set(source.doc_ids)  # raw ids in domain mode
        # every judged doc of a kept query is in the session, with its original judgments
        kept = set(session.queries["query_id"])
        original = source.qrels[source.qrels["query_id"].isin(kept)]
        assert set(map(tuple, original[["query_id", "doc_id", "score"]].values)) == set(
            map(tuple, session.qrels[["query_id", "doc_id", "score"]].values))
        test = set(session.qrels.loc[session.qrels.split == "test", "query_id"])
        train = set(session.qrels.loc[session.qrels.split == "train", "query_id"])
        assert test and train and not test & train and test | train == kept
        assert (folder / "qrels" / "train.tsv").exists()


def test_mixed_stream_prefixes_ids_and_shifts_proportions(mixed_stream):
    out, manifest = mixed_stream
    folders = _sessions(out)
    assert [p.name for p in folders] == ["00_mixed", "01_mixed", "02_mixed"]
    assert manifest["ids_prefixed"]
    all_docs: list[str] = []
    all_queries: list[str] = []
    shares = []
    for folder in folders:
        validate_session(folder)
        session = read_session(folder)
        assert len(session.corpus) == N
        prefixes = session.corpus["doc_id"].str.split(":", n=1).str[0]
        assert set(prefixes) <= set(MIXED) and prefixes.nunique() >= 2
        assert session.queries["query_id"].str.split(":", n=1).str[0].isin(MIXED).all()
        # a query's judgments stay within its own collection
        assert (session.qrels["query_id"].str.split(":").str[0]
                == session.qrels["doc_id"].str.split(":").str[0]).all()
        shares.append([(prefixes == name).mean() for name in MIXED])
        all_docs += session.corpus["doc_id"].tolist()
        all_queries += session.queries["query_id"].tolist()
    assert len(all_docs) == len(set(all_docs))  # every document arrives once
    assert len(all_queries) == len(set(all_queries))
    shares = np.array(shares)  # (session, collection)
    assert (np.diff(shares[:, 0]) < 0).all() and (np.diff(shares[:, -1]) > 0).all()
    assert [s["docs"] for s in manifest["sessions"]] == [N, N, N]


def test_same_arguments_give_byte_identical_streams(domain_stream, datasets_dir, tmp_path):
    out, _ = domain_stream
    first = _tree_bytes(out)
    copy = tmp_path / "stream"
    shutil.copytree(out, copy)
    build_stream(DOMAIN, out, docs_per_session=N, seed=3, datasets_dir=str(datasets_dir),
                 force=True)
    assert _tree_bytes(out) == first
    # another seed draws another stream
    build_stream(DOMAIN, copy, docs_per_session=N, seed=4, datasets_dir=str(datasets_dir),
                 force=True)
    assert _tree_bytes(copy)["01_cisi/corpus.jsonl"] != first["01_cisi/corpus.jsonl"]


def test_gzipped_collection_gives_the_same_sessions(datasets_dir, tmp_path):
    plain = tmp_path / "data" / "cisi"
    shutil.copytree(datasets_dir / "cisi", plain)
    zipped = tmp_path / "zipped" / "cisi"
    shutil.copytree(plain, zipped)
    for name in ("corpus.jsonl", "queries.jsonl"):
        (zipped / f"{name}.gz").write_bytes(gzip.compress((zipped / name).read_bytes()))
        (zipped / name).unlink()
    build_stream([str(plain)], tmp_path / "a", docs_per_session=50)
    build_stream([str(zipped)], tmp_path / "b", docs_per_session=50)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a.pop("stream.json") != b.pop("stream.json")  # sources differ
    assert a == b


def test_out_folder_rules(tmp_path, datasets_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StreamBuildError, match="not empty"):
        build_stream(["cisi"], out, docs_per_session=20, datasets_dir=str(datasets_dir))
    with pytest.raises(StreamBuildError, match="notes.txt"):
        build_stream(["cisi"], out, docs_per_session=20, datasets_dir=str(datasets_dir),
                     force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_make_stream_and_bad_dataset_path(tmp_path, datasets_dir):
    runner = CliRunner()
    missing = tmp_path / "no_such_collection"
    result = runner.invoke(app, ["make-stream", "cisi", str(missing), "--out",
                                 str(tmp_path / "s"), "--datasets-dir", str(datasets_dir)])
    assert result.exit_code == 2
    assert "error:" in result.output and str(missing) in result.output
    assert not (tmp_path / "s").exists()

    result = runner.invoke(app, ["make-stream", "cisi", "msmarco_agentset5k", "--out",
                                 str(tmp_path / "s"), "--mode", "mixed", "--sessions", "3",
                                 "--docs-per-session", "30", "--queries-per-session", "4",
                                 "--datasets-dir", str(datasets_dir)])
    assert result.exit_code == 0, result.output
    assert "02_mixed: 30 docs" in result.output
    manifest = json.loads((tmp_path / "s" / "stream.json").read_text())
    assert all(s["queries"] <= 4 for s in manifest["sessions"])
    assert "--mode mixed" in manifest["command"] and "--sessions 3" in manifest["command"]

    again = runner.invoke(app, ["make-stream", "cisi", "--out", str(tmp_path / "s"),
                                "--datasets-dir", str(datasets_dir)])
    assert again.exit_code == 2 and "--force" in again.output
