"""Tests for tasks.ingest: the session data contract, digests, and the malformed catalogue."""

from __future__ import annotations

import gzip
import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from malformed_sessions import MALFORMED, write_valid_session

from driftlane.tasks.ingest import SessionData, SessionFormatError, read_session, validate_session
from driftlane.tasks.session_files import session_digest

REQUIRED_CASES = {
    "broken_json",
    "missing_id",
    "duplicate_doc_id",
    "duplicate_query_id",
    "qrels_unknown_doc",
    "qrels_unknown_query",
    "non_integer_score",
    "wrong_column_count",
    "missing_qrels_header",
    "non_utf8",
    "empty_corpus",
    "empty_text_everywhere",
    "corpus_symlink_escapes",
    "missing_corpus",
}
SESSION_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv")


# --- helpers --------------------------------------------------------------------------------


def expected_frames(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Reference reading with plain json/str.split, for comparison with read_session."""
    docs = [json.loads(x) for x in (folder / "corpus.jsonl").read_text().splitlines() if x]
    queries = [json.loads(x) for x in (folder / "queries.jsonl").read_text().splitlines() if x]
    rows = []
    for split in ("test", "train"):
        for line in (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
            query_id, doc_id, score = line.split("\t")
            rows.append((query_id, doc_id, int(score), split))
    corpus = pd.DataFrame(
        {
            "doc_id": [str(d["_id"]) for d in docs],
            "title": [d.get("title", "") for d in docs],
            "text": [d["text"] for d in docs],
        }
    )
    query_frame = pd.DataFrame(
        {"query_id": [str(q["_id"]) for q in queries], "text": [q["text"] for q in queries]}
    )
    qrels = pd.DataFrame(rows, columns=["query_id", "doc_id", "score", "split"])
    return corpus, query_frame, qrels.astype({"score": "int64"})


def assert_matches_folder(session: SessionData, folder: Path) -> None:
    corpus, queries, qrels = expected_frames(folder)
    pd.testing.assert_frame_equal(session.corpus, corpus)
    pd.testing.assert_frame_equal(session.queries, queries)
    pd.testing.assert_frame_equal(session.qrels, qrels)


def assert_schema(session: SessionData) -> None:
    assert list(session.corpus.columns) == ["doc_id", "title", "text"]
    assert list(session.queries.columns) == ["query_id", "text"]
    assert list(session.qrels.columns) == ["query_id", "doc_id", "score", "split"]
    for frame in (session.corpus, session.queries, session.qrels):
        for column in frame.columns:
            if column == "score":
                assert frame[column].dtype == "int64"
            else:
                assert pd.api.types.is_string_dtype(frame[column].dtype), column


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under folder: file bytes, or the target of a symlink."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            entries[rel] = str(path.readlink())
        elif path.is_file():
            entries[rel] = path.read_bytes()
        else:
            entries[rel] = "<dir>"
    return entries


def gzip_copy(source: Path, target: Path, names: tuple[str, ...]) -> Path:
    """Copy a session, gzipping the files in ``names``."""
    shutil.copytree(source, target)
    for name in names:
        plain = target / name
        Path(f"{plain}.gz").write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    return target


@pytest.fixture
def valid_session(tmp_path: Path) -> Path:
    return write_valid_session(tmp_path / "sess-01")


@pytest.fixture
def memory_session(valid_session: Path):
    """The valid session copied into fsspec's memory filesystem; removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/driftlane-test-{uuid.uuid4().hex}/sess-01"
    for name in SESSION_FILES:
        fs.pipe_file(f"{root}/{name}", (valid_session / name).read_bytes())
    yield f"memory://{root}"
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


# --- the malformed catalogue ----------------------------------------------------------------


def test_catalogue_covers_the_required_cases():
    ids = [case.id for case in MALFORMED]
    assert len(ids) == len(set(ids))
    assert REQUIRED_CASES <= set(ids)


@pytest.mark.parametrize("case", MALFORMED, ids=lambda case: case.id)
def test_malformed_session_is_rejected(case, tmp_path: Path):
    session = case.build(tmp_path)
    with pytest.raises(SessionFormatError, match=case.match) as caught:
        read_session(str(session))
    err = caught.value
    where = err.file if err.line is None else f"{err.file}:{err.line}"
    assert str(err) == f"{where}: {err.problem}"
    assert err.file.startswith(str(tmp_path))


@pytest.mark.parametrize(
    "case",
    [c for c in MALFORMED if c.id in {"missing_corpus", "corpus_symlink_escapes"}],
    ids=lambda case: case.id,
)
def test_session_digest_checks_layout(case, tmp_path: Path):
    session = case.build(tmp_path)
    with pytest.raises(SessionFormatError, match=case.match):
        session_digest(str(session))


@pytest.mark.parametrize("case", MALFORMED, ids=lambda case: case.id)
def test_validate_session_rejects_the_same(case, tmp_path: Path):
    with pytest.raises(SessionFormatError, match=case.match):
        validate_session(case.build(tmp_path))


def test_error_attributes(tmp_path: Path):
    folder = write_valid_session(tmp_path / "s")
    (folder / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n\n{"_id": "a", "text": "y"}\n')
    with pytest.raises(SessionFormatError) as caught:
        read_session(str(folder))
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.file, err.line) == (f"{folder}/corpus.jsonl", 3)  # blank line 2 still counts
    assert err.problem == "duplicate doc id 'a' (first seen on line 1)"


def test_malformed_gz_names_the_gz_file(tmp_path: Path):
    folder = write_valid_session(tmp_path / "s")
    path = folder / "corpus.jsonl"
    path.write_bytes(path.read_bytes() + b"{broken\n")
    gz = gzip_copy(folder, tmp_path / "gz", ("corpus.jsonl",))
    with pytest.raises(SessionFormatError, match=r"gz/corpus\.jsonl\.gz:7: invalid JSON"):
        read_session(str(gz))


# --- valid sessions from every kind of URL --------------------------------------------------


def test_reads_local_path(valid_session: Path):
    session = read_session(str(valid_session))
    assert session.name == "sess-01"
    assert session.url == str(valid_session)
    assert_schema(session)
    assert_matches_folder(session, valid_session)
    assert len(session.corpus) == 6
    assert set(session.qrels["split"]) == {"test", "train"}
    assert len(session.digest) == 64


def test_reads_file_url(valid_session: Path):
    url = f"file://{valid_session}/"
    session = read_session(url)
    assert session.url == f"file://{valid_session}"  # trailing slash dropped
    assert session.name == "sess-01"
    assert_matches_folder(session, valid_session)
    assert session.digest == read_session(str(valid_session)).digest


def test_reads_home_relative_path(tmp_path: Path, monkeypatch):
    home = tmp_path / "home"
    folder = write_valid_session(home / "sessions" / "day-3")
    monkeypatch.setenv("HOME", str(home))
    session = read_session("~/sessions/day-3")
    assert session.url == str(folder)
    assert session.name == "day-3"
    assert_matches_folder(session, folder)
    assert session_digest("~/sessions/day-3") == session.digest


def test_reads_memory_url(memory_session: str, valid_session: Path):
    session = read_session(memory_session)
    assert session.url == memory_session
    assert session.name == "sess-01"
    assert_matches_folder(session, valid_session)
    assert session.digest == read_session(str(valid_session)).digest
    assert session_digest(memory_session) == session.digest


def test_memory_error_names_memory_url(memory_session: str):
    fsspec.filesystem("memory").pipe_file(
        memory_session.removeprefix("memory://") + "/queries.jsonl", b'{"_id": "q"}\n'
    )
    with pytest.raises(SessionFormatError) as caught:
        read_session(memory_session)
    assert str(caught.value) == f"{memory_session}/queries.jsonl:1: missing 'text'"


def test_dotdot_is_resolved_locally_and_refused_in_remote_urls(memory_session: str,
                                                               valid_session: Path):
    local = read_session(f"{valid_session}/../{valid_session.name}")
    assert local.url == str(valid_session)
    parent, name = memory_session.rsplit("/", 1)
    with pytest.raises(SessionFormatError, match=r"must not contain '\.\.' components$"):
        read_session(f"{parent}/x/../{name}")


def test_corpus_only_session_gives_empty_frames_with_schema(tmp_path: Path):
    folder = tmp_path / "corpus-only"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text('{"_id": 7, "text": "Integer ids become strings."}\n')
    session = read_session(str(folder))
    assert session.corpus["doc_id"].tolist() == ["7"]
    assert session.corpus["title"].tolist() == [""]
    assert session.queries.empty and session.qrels.empty
    assert_schema(session)


def test_queries_without_qrels_and_some_empty_docs_are_fine(valid_session: Path):
    shutil.rmtree(valid_session / "qrels")
    with (valid_session / "corpus.jsonl").open("a") as corpus:
        corpus.write('{"_id": "empty", "title": "", "text": ""}\n')
    session = read_session(str(valid_session))
    assert len(session.queries) == 6 and session.qrels.empty
    assert session.corpus["doc_id"].iloc[-1] == "empty"


def test_symlink_inside_the_folder_is_allowed(valid_session: Path):
    (valid_session / "data").mkdir()
    (valid_session / "corpus.jsonl").rename(valid_session / "data" / "corpus.jsonl")
    (valid_session / "corpus.jsonl").symlink_to(Path("data") / "corpus.jsonl")
    assert len(read_session(str(valid_session)).corpus) == 6


# --- gzip and digests -----------------------------------------------------------------------


def test_gz_files_read_like_plain_ones_with_the_same_digest(valid_session: Path, tmp_path):
    gz = gzip_copy(valid_session, tmp_path / "gz", SESSION_FILES)
    plain, packed = read_session(str(valid_session)), read_session(str(gz))
    pd.testing.assert_frame_equal(packed.corpus, plain.corpus)
    pd.testing.assert_frame_equal(packed.queries, plain.queries)
    pd.testing.assert_frame_equal(packed.qrels, plain.qrels)
    assert packed.digest == plain.digest
    assert session_digest(str(gz)) == plain.digest == session_digest(str(valid_session))


def test_digest_covers_each_byte_and_the_file_names(valid_session: Path, tmp_path: Path):
    before = read_session(str(valid_session)).digest
    train = valid_session / "qrels" / "train.tsv"
    original = train.read_bytes()
    train.write_bytes(original.replace(b"\t2\n", b"\t3\n", 1))  # one byte
    changed = read_session(str(valid_session)).digest
    assert changed != before and session_digest(str(valid_session)) == changed

    train.write_bytes(original)
    assert read_session(str(valid_session)).digest == before
    # The same bytes under another split name are another session.
    test = valid_session / "qrels" / "test.tsv"
    test_bytes = test.read_bytes()
    test.write_bytes(original)
    train.write_bytes(test_bytes)
    assert session_digest(str(valid_session)) != before


# --- real data ------------------------------------------------------------------------------


def test_reads_cisi(datasets_dir: Path):
    session = read_session(str(datasets_dir / "cisi"))
    assert (len(session.corpus), len(session.queries)) == (1460, 76)
    assert (session.qrels["split"] == "test").sum() == 3114
    assert session.corpus["doc_id"].iloc[0] == "1"
    assert session.corpus["title"].iloc[0].startswith("18 Editions of the Dewey")
    assert_schema(session)
    assert session_digest(str(datasets_dir / "cisi")) == session.digest
    assert validate_session(str(datasets_dir / "cisi")) == session.digest


def test_reads_gzipped_fire2017(datasets_dir: Path):
    folder = datasets_dir / "fire2017_irled_task2"
    before = snapshot(folder)
    session = read_session(str(folder))
    assert (len(session.corpus), len(session.queries), len(session.qrels)) == (2000, 200, 1000)
    empty = session.corpus[(session.corpus["title"] == "") & (session.corpus["text"] == "")]
    assert len(empty) == 6  # kept by the converter; see stats.json
    assert_schema(session)
    assert snapshot(folder) == before


# --- reading leaves the input alone ---------------------------------------------------------


def test_reading_does_not_modify_the_folder(valid_session: Path, tmp_path: Path):
    gz = gzip_copy(valid_session, tmp_path / "gz", ("corpus.jsonl", "qrels/train.tsv"))
    for folder in (valid_session, gz):
        before = snapshot(folder)
        read_session(str(folder))
        session_digest(str(folder))
        assert snapshot(folder) == before
