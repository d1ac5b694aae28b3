"""Small sessions cut from the real collections in ../shared/datasets, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cut_session(collection: Path, out: Path, n_queries: int, n_extra_docs: int) -> Path:
    """Write a session with the first `n_queries` judged test queries, all their judged
    documents, and the first `n_extra_docs` other documents as distractors."""
    rows = (collection / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = rows[0], [r.split("\t") for r in rows[1:] if r.strip()]
    keep_queries: list[str] = []
    for qid, _, _ in rows:
        if qid not in keep_queries:
            keep_queries.append(qid)
        if len(keep_queries) == n_queries:
            break
    kept_rows = [r for r in rows if r[0] in keep_queries]
    judged = {r[1] for r in kept_rows}
    corpus = _read_jsonl(collection / "corpus.jsonl")
    extra = [d["_id"] for d in corpus if d["_id"] not in judged][:n_extra_docs]
    keep_docs = judged | set(extra)

    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in corpus:
            if doc["_id"] in keep_docs:
                f.write(json.dumps(doc) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for query in _read_jsonl(collection / "queries.jsonl"):
            if query["_id"] in keep_queries:
                f.write(json.dumps(query) + "\n")
    (out / "qrels" / "test.tsv").write_text(
        "\n".join([header, *("\t".join(r) for r in kept_rows)]) + "\n", encoding="utf-8")
    return out
