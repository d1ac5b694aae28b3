"""Shared fixtures: the packaged encoder, real datasets, an isolated Prefect harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# unit tests call tasks outside any flow; Prefect warns that their logs have no run to go to
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("DRIFTLANE_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The shared BEIR collections; the suite fails loudly when they are missing."""
    if not (DATASETS / "cisi" / "corpus.jsonl").exists():
        pytest.fail(f"shared datasets not found at {DATASETS} (set DRIFTLANE_DATASETS)")
    return DATASETS


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 weights."""
    from driftlane.tasks.models import resolve_model_path

    return resolve_model_path("default")


@pytest.fixture(scope="session")
def encoder(minilm_path):
    """The packaged MiniLM on the CPU, loaded once per test session. Do not modify it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect database for the whole session, flow heartbeats off."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        # a loaded 2-core machine can take longer than the 30 s default to start the server
        with prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A private scratch folder per test, so cached stage outputs never leak between tests."""
    folder = tmp_path / "scratch"
    monkeypatch.setenv("DRIFTLANE_SCRATCH", str(folder))
    return folder


@pytest.fixture()
def world() -> dict:
    """The hand-made sampling world of `tests.sampling_world`."""
    from sampling_world import make_world

    return make_world()
