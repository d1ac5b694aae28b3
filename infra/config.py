"""Typed configuration: one pydantic model per stage, nested in `SessionConfig`.

A config file (TOML, YAML or JSON) holds any subset of the fields; the rest keep their
defaults. Prefect renders `SessionConfig` as a form in the UI because it is a typed flow
parameter.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_MODEL = "default"


class WindowPooling(StrEnum):
    """How a document vector is pooled from its window vectors."""

    mean = "mean"
    max = "max"
    first = "first"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def digest(self) -> str:
        """Stable digest of the settings, used in cache keys."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ChunkingConfig(_Section):
    """Overlapping token windows for documents longer than the encoder's window."""

    window_tokens: int = Field(
        default=256, ge=8, le=8192, description="Tokens per window, special tokens included."
    )
    overlap_tokens: int = Field(
        default=64, ge=0, le=8000, description="Tokens shared by consecutive windows."
    )
    pooling: WindowPooling = Field(
        default=WindowPooling.mean, description="How window vectors become one document vector."
    )

    @model_validator(mode="after")
    def _overlap_leaves_room(self) -> ChunkingConfig:
        # Two slots per window go to special tokens ([CLS] ... [SEP] for BERT-style models);
        # each window must still advance by at least one content token.
        if self.overlap_tokens >= self.window_tokens - 2:
            raise ValueError(
                f"overlap_tokens={self.overlap_tokens} must be smaller than "
                f"window_tokens - 2 = {self.window_tokens - 2}"
            )
        return self


class EmbeddingConfig(_Section):
    """Which encoder embeds documents, and how."""

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Path of a sentence-transformers model, or 'default' for the packaged "
        "all-MiniLM-L6-v2.",
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda'.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Windows per forward pass.")
    keep_token_embeddings: bool = Field(
        default=False, description="Also keep float16 token embeddings (for term-based scoring)."
    )
    chunking: ChunkingConfig = ChunkingConfig()


class IndexConfig(_Section):
    """Faiss index over the corpus seen so far."""

    kind: str = Field(default="exact", pattern="^exact$", description="Only 'exact' for now.")


class EvaluationConfig(_Section):
    """Zero-shot evaluation of every session seen so far."""

    top_k: int = Field(default=100, ge=10, le=10000, description="Documents retrieved per query.")
    split: str = Field(default="test", pattern="^(test|train)$", description="Which qrels to use.")


class SessionConfig(_Section):
    """Everything one session run needs to know besides its input and its store."""

    embedding: EmbeddingConfig = EmbeddingConfig()
    index: IndexConfig = IndexConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    scratch_dir: str | None = Field(
        default=None,
        description="Local folder for work in progress (default: ~/.cache/driftlane/scratch).",
    )


class ConfigError(ValueError):
    """A configuration file could not be read or holds invalid values."""


def load_config(path: str | Path | None) -> SessionConfig:
    """Read a session config from TOML, YAML or JSON; `None` gives the defaults."""
    if path is None:
        return SessionConfig()
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    data: Any
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(raw) or {}
        elif path.suffix == ".json":
            data = json.loads(raw)
        else:
            raise ConfigError(
                f"{path}: unknown config format {path.suffix!r} (use .toml, .yaml, .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError,
            UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return SessionConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc
