"""Which encoder a session starts from, and getting it out of the store (DESIGN step 8).

Each session publishes its fine-tuned model (safetensors) under `model/` in its store folder, and
its manifest's `model_version` is the digest of that folder. The next session embeds and
clusters with it, and trains it further (continual) or trains the configured base encoder
again (`finetune.start_from = "base"`, the joint retraining baseline). A model in a remote
store is copied into scratch once per version;
a local store's folder is used in place.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.embedding import model_version, resolve_model_path


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


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="start model")
def start_model(previous_model: dict | None, base_model: str, scratch_dir: str) -> dict:
    """The model of the last session that trained one, else the base model: {path, version}."""
    if previous_model is None:
        path = resolve_model_path(base_model)
        result = {"path": path, "version": model_version(path), "origin": "base model"}
    else:
        path = local_model_folder(previous_model["url"], previous_model["version"], scratch_dir)
        result = {"path": path, "version": previous_model["version"],
                  "origin": f"model of session {previous_model['session']}"}
    get_run_logger().info("%s: version %s", result["origin"], result["version"])
    return result
