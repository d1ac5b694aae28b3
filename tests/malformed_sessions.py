"""A catalogue of malformed session folders, each with the error message it must produce.

Every builder starts from a valid session (``write_valid_session``) and breaks one thing, so a
case fails for exactly the reason its id names. Other tests import ``MALFORMED`` and
``write_valid_session``.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SESSION = "session"  # folder name every builder uses, so messages can be matched

# (title, text, query): short English documents on distinct topics; query i asks about doc i.
_TOPICS = [
    (
        "Sourdough starters",
        "A sourdough starter is a culture of wild yeast and lactic acid bacteria kept alive "
        "by regular feedings of flour and water.",
        "how do you keep a sourdough starter alive",
    ),
    (
        "Tidal energy",
        "Tidal power stations turn the rise and fall of the sea into electricity, using "
        "barrages or underwater turbines placed in strong currents.",
        "how is electricity generated from tides",
    ),
    (
        "Honeybee communication",
        "Forager bees perform a waggle dance whose angle and duration tell other workers the "
        "direction and distance of a food source.",
        "what does the waggle dance of bees mean",
    ),
    (
        "Roman concrete",
        "Roman builders mixed volcanic ash with lime and seawater, producing a concrete that "
        "grew stronger over centuries in harbour walls.",
        "why has roman concrete lasted so long",
    ),
    (
        "Sleep and memory",
        "During deep sleep the brain replays recent experiences, which helps move new "
        "memories from the hippocampus into long-term storage.",
        "does sleep help memory consolidation",
    ),
    (
        "Glacier retreat",
        "Mountain glaciers in the Alps have lost more than half of their volume since 1900, "
        "changing the water supply of the valleys below.",
        "how fast are alpine glaciers shrinking",
    ),
    (
        "Chess openings",
        "The Sicilian Defence answers the king's pawn opening with an early c5 pawn move, "
        "leading to sharp and unbalanced positions.",
        "what is the sicilian defence in chess",
    ),
    (
        "Coffee roasting",
        "Light roasts keep more of the bean's acidity and fruit flavours, while dark roasts "
        "develop bitter, smoky notes from caramelised sugars.",
        "difference between light and dark coffee roast",
    ),
    (
        "Octopus intelligence",
        "Octopuses can open jars, escape from tanks and recognise individual keepers, "
        "although most of their neurons sit in their arms.",
        "how intelligent are octopuses",
    ),
    (
        "Printing press",
        "Gutenberg's movable type press, built around 1450, made books cheaper and helped "
        "spread literacy across Europe within a few decades.",
        "what impact did the printing press have",
    ),
    (
        "Volcanic soils",
        "Ash from old eruptions weathers into soils rich in minerals, which is why farms "
        "often crowd the slopes of active volcanoes.",
        "why are volcanic soils fertile",
    ),
    (
        "Marathon training",
        "Most marathon plans build weekly mileage slowly and include one long run per week "
        "to teach the body to burn fat efficiently.",
        "how should i train for a marathon",
    ),
]
_ASPECTS = [
    "",
    " Researchers are still debating the details.",
    " The idea was first written down in the nineteenth century.",
    " Beginners often underestimate how much patience this takes.",
    " Local conditions change the outcome considerably.",
    " Several museums now run exhibitions on the subject.",
]


def write_valid_session(folder: Path, n_docs: int = 6, name_prefix: str = "d") -> Path:
    """Write a small valid session into ``folder`` (created if needed) and return it.

    Doc ids are ``{name_prefix}0..``; query ``q-{doc id}`` is about that doc. Qrels: the
    query's own doc with score 2 (test for even docs, train for odd), plus its next doc with
    score 1 in test. Texts are distinct for up to len(_TOPICS) * len(_ASPECTS) docs.
    """
    if n_docs < 1:
        raise ValueError("a valid session needs at least one document")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    docs, queries = [], []
    test_rows, train_rows = [], []
    for i in range(n_docs):
        title, text, question = _TOPICS[i % len(_TOPICS)]
        round_ = i // len(_TOPICS)
        aspect = _ASPECTS[round_ % len(_ASPECTS)]
        if round_ >= len(_ASPECTS):
            aspect += f" (Part {round_ // len(_ASPECTS) + 1}.)"
        doc_id = f"{name_prefix}{i}"
        docs.append({"_id": doc_id, "title": title, "text": text + aspect})
        queries.append({"_id": f"q-{doc_id}", "text": question})
        (test_rows if i % 2 == 0 else train_rows).append((f"q-{doc_id}", doc_id, 2))
        if n_docs > 1:
            test_rows.append((f"q-{doc_id}", f"{name_prefix}{(i + 1) % n_docs}", 1))
    _write_jsonl(folder / "corpus.jsonl", docs)
    _write_jsonl(folder / "queries.jsonl", queries)
    _write_qrels(folder / "qrels" / "test.tsv", test_rows)
    _write_qrels(folder / "qrels" / "train.tsv", train_rows)
    return folder


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _write_qrels(path: Path, rows: list[tuple[str, str, int]]) -> None:
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _replace_line(path: Path, line_number: int, new_line: bytes) -> None:
    """Replace 1-based line ``line_number`` (which must exist) by raw bytes."""
    lines = path.read_bytes().split(b"\n")
    lines[line_number - 1] = new_line
    path.write_bytes(b"\n".join(lines))


def _append_line(path: Path, new_line: str) -> int:
    """Append a line; return its 1-based number."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text + new_line + "\n", encoding="utf-8")
    return text.count("\n") + 1


@dataclass(frozen=True)
class Malformed:
    """One broken session: ``build(tmp)`` writes it under ``tmp`` and returns its folder;
    the SessionFormatError message must match the regex ``match`` (re.search)."""

    id: str
    build: Callable[[Path], Path]
    match: str


def _valid(tmp: Path) -> Path:
    return write_valid_session(tmp / SESSION)


def _replacing_line(relative: str, line: int, data: bytes) -> Callable[[Path], Path]:
    """A builder: a valid session whose file `relative` has line `line` replaced by `data`."""
    def build(tmp: Path) -> Path:
        session = _valid(tmp)
        _replace_line(session / relative, line, data)
        return session

    return build


_broken_json = _replacing_line("corpus.jsonl", 3, b'{"_id": "d2" "text": "a missing comma"}')


_doc_id_with_slash = _replacing_line("corpus.jsonl", 2, b'{"_id": "a/../b", "text": "Some text."}')


_doc_id_with_newline = _replacing_line("corpus.jsonl", 3, b'{"_id": "d\\nx", "text": "Some text."}')


_query_id_with_nul = _replacing_line("queries.jsonl", 1, b'{"_id": "q\\u0000", "text": "a query"}')


def _oversized_document(tmp: Path) -> Path:
    session = _valid(tmp)
    big = json.dumps({"_id": "huge", "text": "word " * 200_001}).encode()
    _replace_line(session / "corpus.jsonl", 4, big)
    return session


_missing_id = _replacing_line("corpus.jsonl", 2, b'{"title": "No id", "text": "Some text."}')


_duplicate_doc_id = _replacing_line("corpus.jsonl", 4, b'{"_id": "d1", "text": "Another doc."}')


_duplicate_query_id = _replacing_line("queries.jsonl", 3, b'{"_id": "q-d0", "text": "again"}')


def _qrels_unknown_doc(tmp: Path) -> Path:
    session = _valid(tmp)
    assert _append_line(session / "qrels" / "test.tsv", "q-d0\tx9\t1") == 11
    return session


def _qrels_unknown_query(tmp: Path) -> Path:
    session = _valid(tmp)
    assert _append_line(session / "qrels" / "train.tsv", "q-zz\td1\t1") == 5
    return session


def _qrels_unknown_query_no_queries_file(tmp: Path) -> Path:
    session = _valid(tmp)
    (session / "queries.jsonl").unlink()
    return session


_non_integer_score = _replacing_line("qrels/test.tsv", 2, b"q-d0\td0\t1.5")


_negative_score = _replacing_line("qrels/test.tsv", 3, b"q-d0\td1\t-1")


_wrong_column_count = _replacing_line("qrels/test.tsv", 4, b"q-d1\td2")


def _missing_qrels_header(tmp: Path) -> Path:
    session = _valid(tmp)
    path = session / "qrels" / "test.tsv"
    path.write_bytes(path.read_bytes().split(b"\n", 1)[1])
    return session


_wrong_qrels_header = _replacing_line("qrels/train.tsv", 1, b"qid\tdocid\trel")


def _duplicate_qrels_pair(tmp: Path) -> Path:
    session = _valid(tmp)
    assert _append_line(session / "qrels" / "train.tsv", "q-d1\td1\t1") == 5
    return session


_non_utf8 = _replacing_line("corpus.jsonl", 5, b'{"_id": "d4", "text": "caf\xe9 latte"}')


_not_an_object = _replacing_line("corpus.jsonl", 2, b'["d1", "a list, not an object"]')


_id_not_string = _replacing_line("corpus.jsonl", 6, b'{"_id": 5.5, "text": "float id"}')


_empty_id = _replacing_line("corpus.jsonl", 2, b'{"_id": "", "text": "no id"}')


_text_not_string = _replacing_line("corpus.jsonl", 3, b'{"_id": "d2", "text": ["a", "list"]}')


_missing_text = _replacing_line("corpus.jsonl", 3, b'{"_id": "d2", "title": "Only a title"}')


_empty_query_text = _replacing_line("queries.jsonl", 2, b'{"_id": "q-d1", "text": "  "}')


def _empty_corpus(tmp: Path) -> Path:
    session = _valid(tmp)
    (session / "corpus.jsonl").write_text("\n\n", encoding="utf-8")
    return session


def _empty_text_everywhere(tmp: Path) -> Path:
    session = _valid(tmp)
    _write_jsonl(
        session / "corpus.jsonl",
        [{"_id": f"d{i}", "title": "", "text": " " if i % 2 else ""} for i in range(6)],
    )
    return session


def _corpus_symlink_escapes(tmp: Path) -> Path:
    session = _valid(tmp)
    outside = tmp / "outside"
    outside.mkdir()
    (session / "corpus.jsonl").rename(outside / "corpus.jsonl")
    (session / "corpus.jsonl").symlink_to(outside / "corpus.jsonl")
    return session


def _qrels_folder_symlink_escapes(tmp: Path) -> Path:
    session = _valid(tmp)
    (session / "qrels").rename(tmp / "elsewhere")
    (session / "qrels").symlink_to(Path(os.path.relpath(tmp / "elsewhere", session)))
    return session


def _missing_corpus(tmp: Path) -> Path:
    session = _valid(tmp)
    (session / "corpus.jsonl").unlink()
    return session


def _plain_and_gz_corpus(tmp: Path) -> Path:
    session = _valid(tmp)
    data = (session / "corpus.jsonl").read_bytes()
    (session / "corpus.jsonl.gz").write_bytes(gzip.compress(data))
    return session


def _corrupt_gzip(tmp: Path) -> Path:
    session = _valid(tmp)
    data = gzip.compress((session / "queries.jsonl").read_bytes())
    (session / "queries.jsonl").unlink()
    (session / "queries.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated download
    return session


def _missing_folder(tmp: Path) -> Path:
    return tmp / SESSION


def _folder_is_a_file(tmp: Path) -> Path:
    (tmp / SESSION).write_text("not a folder", encoding="utf-8")
    return tmp / SESSION


_S = rf"{SESSION}/"  # every message names a file inside the session folder (or the folder)

MALFORMED: list[Malformed] = [
    Malformed("broken_json", _broken_json,
              _S + r"corpus\.jsonl:3: invalid JSON at column 14 \(Expecting ',' delimiter\)"),
    Malformed("doc_id_with_slash", _doc_id_with_slash,
              _S + r"corpus\.jsonl:2: doc id 'a/\.\./b' contains '/'"),
    Malformed("doc_id_with_newline", _doc_id_with_newline,
              _S + r"corpus\.jsonl:3: doc id 'd\\nx' contains the control character U\+000A"),
    Malformed("query_id_with_nul", _query_id_with_nul,
              _S + r"queries\.jsonl:1: query id 'q\\x00' contains the control character "
                   r"U\+0000"),
    Malformed("oversized_document", _oversized_document,
              _S + r"corpus\.jsonl:4: document 'huge' has 1,000,005 characters, more than the "
                   r"limit of 1,000,000 \(\[ingest\] max_document_chars\)"),
    Malformed("missing_id", _missing_id, _S + r"corpus\.jsonl:2: missing '_id'"),
    Malformed(
        "duplicate_doc_id",
        _duplicate_doc_id,
        _S + r"corpus\.jsonl:4: duplicate doc id 'd1' \(first seen on line 2\)",
    ),
    Malformed(
        "duplicate_query_id",
        _duplicate_query_id,
        _S + r"queries\.jsonl:3: duplicate query id 'q-d0' \(first seen on line 1\)",
    ),
    Malformed(
        "qrels_unknown_doc",
        _qrels_unknown_doc,
        _S + r"qrels/test\.tsv:11: unknown corpus-id 'x9' \(not in corpus\.jsonl\)",
    ),
    Malformed(
        "qrels_unknown_query",
        _qrels_unknown_query,
        _S + r"qrels/train\.tsv:5: unknown query-id 'q-zz' \(not in queries\.jsonl\)",
    ),
    Malformed(
        "qrels_unknown_query_no_queries_file",
        _qrels_unknown_query_no_queries_file,
        _S + r"qrels/test\.tsv:2: unknown query-id 'q-d0' \(there is no queries file\)",
    ),
    Malformed(
        "non_integer_score",
        _non_integer_score,
        _S + r"qrels/test\.tsv:2: score '1\.5' is not an integer",
    ),
    Malformed("negative_score", _negative_score, _S + r"qrels/test\.tsv:3: negative score -1"),
    Malformed(
        "wrong_column_count",
        _wrong_column_count,
        _S + r"qrels/test\.tsv:4: expected 3 tab-separated columns, got 2",
    ),
    Malformed(
        "missing_qrels_header", _missing_qrels_header, _S + r"qrels/test\.tsv:1: missing header"
    ),
    Malformed(
        "wrong_qrels_header",
        _wrong_qrels_header,
        _S + r"qrels/train\.tsv:1: header must be 'query-id<TAB>corpus-id<TAB>score'",
    ),
    Malformed(
        "duplicate_qrels_pair",
        _duplicate_qrels_pair,
        _S + r"qrels/train\.tsv:5: duplicate pair \('q-d1', 'd1'\) \(first seen on line 2\)",
    ),
    Malformed("non_utf8", _non_utf8, _S + r"corpus\.jsonl:5: not valid UTF-8 \(byte 0xe9"),
    Malformed(
        "not_an_object",
        _not_an_object,
        _S + r"corpus\.jsonl:2: expected a JSON object, got array",
    ),
    Malformed(
        "id_not_string",
        _id_not_string,
        _S + r"corpus\.jsonl:6: '_id' must be a string or an integer, got number",
    ),
    Malformed("empty_id", _empty_id, _S + r"corpus\.jsonl:2: empty doc id"),
    Malformed(
        "text_not_string",
        _text_not_string,
        _S + r"corpus\.jsonl:3: 'text' must be a string, got array",
    ),
    Malformed("missing_text", _missing_text, _S + r"corpus\.jsonl:3: missing 'text'"),
    Malformed(
        "empty_query_text",
        _empty_query_text,
        _S + r"queries\.jsonl:2: empty text for query 'q-d1'",
    ),
    Malformed("empty_corpus", _empty_corpus, _S + r"corpus\.jsonl: no documents$"),
    Malformed(
        "empty_text_everywhere",
        _empty_text_everywhere,
        _S + r"corpus\.jsonl: every document has an empty title and text$",
    ),
    Malformed(
        "corpus_symlink_escapes",
        _corpus_symlink_escapes,
        _S + r"corpus\.jsonl: resolves outside the session folder$",
    ),
    Malformed(
        "qrels_folder_symlink_escapes",
        _qrels_folder_symlink_escapes,
        _S + r"qrels: resolves outside the session folder$",
    ),
    Malformed(
        "missing_corpus",
        _missing_corpus,
        rf"{SESSION}: no corpus\.jsonl or corpus\.jsonl\.gz in the session folder$",
    ),
    Malformed(
        "plain_and_gz_corpus",
        _plain_and_gz_corpus,
        rf"{SESSION}: both corpus\.jsonl and corpus\.jsonl\.gz are present",
    ),
    Malformed("corrupt_gzip", _corrupt_gzip, _S + r"queries\.jsonl\.gz: corrupt gzip data"),
    Malformed("missing_folder", _missing_folder, rf"{SESSION}: session folder does not exist$"),
    Malformed("folder_is_a_file", _folder_is_a_file, rf"{SESSION}: session path is not a folder$"),
]
