"""The text the encoder sees for a document, looked up by session, and its digest.

Every stage that embeds documents builds their text with `document_text`, so the same document
always has the same text digest, the key of the embedding cache (`infra.embedding_cache`).
"""

from __future__ import annotations

import hashlib

import pandas as pd

from driftlane.infra.io import read_parquet

__all__ = ["doc_texts_of", "document_text", "text_digest"]


def document_text(title: str, text: str) -> str:
    """The text the encoder sees for a document: title and text joined by one space."""
    return f"{title} {text}".strip() if title else text


def doc_texts_of(sessions: list[str], docs_urls: dict[str, str]) -> pd.Series:
    """Series doc_key -> document text for every document of the named sessions."""
    parts = []
    for session in dict.fromkeys(sessions):
        docs = read_parquet(docs_urls[session])
        texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"], strict=True)]
        parts.append(pd.Series(texts, index=session + "/" + docs["doc_id"].astype(str)))
    return pd.concat(parts) if parts else pd.Series(dtype=object)


def text_digest(text: str) -> str:
    """sha256 hex digest of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
