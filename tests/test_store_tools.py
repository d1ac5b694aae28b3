"""Looking after a store: `driftlane gc` removes only what no published session needs and never
races a writer; `driftlane verify` and the pre-run check find damaged files by sha256, reading
each file once per machine; numba's compiled code is cached across processes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from malformed_sessions import write_valid_session
from typer.testing import CliRunner

from driftlane.flows.cli import app
from driftlane.flows.cli_errors import EXIT_BUSY, EXIT_ENVIRONMENT
from driftlane.flows.session import session_flow
from driftlane.infra import integrity
from driftlane.infra.config import SessionConfig
from driftlane.infra.lock import StoreLock
from driftlane.infra.store import GC_RECORD, DamagedStore, SessionManifest, Store
from driftlane.tasks.housekeeping import models_in_use, removable_models

CONFIG = SessionConfig.model_validate({
    "finetune": {"enabled": True, "max_steps": 2, "batch_size": 4, "max_seq_length": 32},
    "lock": {"global_limit": False},
})
WEIGHTS = "model/model.safetensors"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: what gc may change."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def three_sessions(tmp_path_factory, prefect_harness):
    """A store after three fine-tuning sessions, and a fourth session's folder."""
    root = tmp_path_factory.mktemp("store-tools")
    folders = [write_valid_session(root / "in" / f"s{i}", n_docs=6, name_prefix=p)
               for i, p in enumerate("abcd")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRIFTLANE_SCRATCH", str(root / "scratch"))
        for folder in folders[:3]:
            assert session_flow(str(folder), str(root / "store"), CONFIG)["status"] == "published"
    return {"store": root / "store", "next": folders[3]}


def copy_store(three_sessions, tmp_path: Path) -> Path:
    return Path(shutil.copytree(three_sessions["store"], tmp_path / "store"))


def test_gc_frees_the_stale_cache_and_the_store_keeps_working(tmp_path, three_sessions,
                                                               scratch):
    store_dir = copy_store(three_sessions, tmp_path)
    store = Store(str(store_dir))
    manifests = store.sessions()
    published = {m.model_version for m in manifests}
    versions = {p.name for p in (store_dir / "cache").iterdir()}
    results = len(list((store_dir / "results").iterdir()))
    assert versions - published, "the base model's cache blocks should be stale"
    orphan = store_dir / ".staging" / "00003_x.0123456789ab"
    orphan.mkdir(parents=True)
    (orphan / "docs.parquet").write_bytes(b"x" * 10)
    old = time.time() - 3600
    for path in (orphan / "docs.parquet", orphan):
        os.utime(path, (old, old))

    before = listing(store_dir)
    dry = cli("gc", "--store", str(store_dir), "--dry-run", "--keep-models", "1")
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.stdout and "bytes" in dry.stdout
    assert listing(store_dir) == before

    done = cli("gc", "--store", str(store_dir), "--keep-models", "1")
    assert done.exit_code == 0, done.output
    assert {p.name for p in (store_dir / "cache").iterdir()} == versions & published
    assert not orphan.exists()
    # every run here has published: what is left was written in the second it published
    assert len(list((store_dir / "results").iterdir())) < results
    # the models of sessions 0 and 1 went, recorded beside their manifests; the last stays
    for m in manifests[:2]:
        assert not (store_dir / "sessions" / m.folder / "model").exists()
        assert WEIGHTS in store.removed_files(m)
        assert (store_dir / "sessions" / m.folder / GC_RECORD).exists()
    assert (store_dir / "sessions" / manifests[2].folder / WEIGHTS).exists()
    assert dry.stdout.replace("would free (dry run, nothing removed)", "freed") == done.stdout

    assert cli("verify", "--store", str(store_dir)).exit_code == 0
    shown = cli("show", "--store", str(store_dir))
    assert shown.exit_code == 0 and "3 session(s)" in shown.stdout
    found = cli("search", "--store", str(store_dir), "sourdough starter", "-k", "3")
    assert found.exit_code == 0 and found.stdout.strip(), found.stdout
    gone = cli("search", "--store", str(store_dir), "--session", "0", "sourdough starter")
    assert gone.exit_code == 2 and "removed by `driftlane gc" in gone.stderr, gone.stderr
    summary = session_flow(str(three_sessions["next"]), str(store_dir), CONFIG)
    assert summary["status"] == "published" and summary["index"] == 3


def test_gc_waits_for_a_running_writer_then_exits_3_removing_nothing(tmp_path, three_sessions,
                                                                      scratch):
    store_dir = copy_store(three_sessions, tmp_path)
    before = listing(store_dir)
    with StoreLock(str(store_dir), owner_label="a running session", lease_seconds=60,
                   keep_alive=True):
        started = time.monotonic()
        result = cli("gc", "--store", str(store_dir), "--wait", "1", "--keep-models", "0")
        waited = time.monotonic() - started
        held = listing(store_dir)
    assert result.exit_code == EXIT_BUSY, result.output
    assert "a running session" in result.stderr and "locked" in result.stderr
    assert 1 <= waited < 30
    lock_files = {k for k in held if k.startswith(".lock")}
    assert {k: v for k, v in held.items() if k not in lock_files} == before


def test_verify_names_a_truncated_and_a_same_size_changed_file(tmp_path, three_sessions,
                                                               scratch):
    store_dir = copy_store(three_sessions, tmp_path)
    assert cli("verify", "--store", str(store_dir)).exit_code == 0
    first, second = Store(str(store_dir)).sessions()[:2]
    truncated = store_dir / "sessions" / first.folder / "docs.parquet"
    truncated.write_bytes(truncated.read_bytes()[:100])
    changed = store_dir / "sessions" / second.folder / "metrics.json"
    data = bytearray(changed.read_bytes())
    digit = max(i for i, c in enumerate(data) if chr(c).isdigit())
    data[digit] = ord("1") if data[digit] != ord("1") else ord("2")  # still valid JSON
    changed.write_bytes(bytes(data))

    result = cli("verify", "--store", str(store_dir))
    assert result.exit_code == EXIT_ENVIRONMENT, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    assert str(truncated) in lines[0] and "truncated or changed" in lines[0]
    assert str(changed) in lines[1] and "sha256 differs" in lines[1]
    assert "2 published file(s) differ" in result.stderr.strip().splitlines()[-1]
    # a run's pre-check sees the same-size change too, through the digest cache
    shutil.copy2(three_sessions["store"] / truncated.relative_to(store_dir), truncated)
    with pytest.raises(DamagedStore, match="sha256 differs"):
        Store(str(store_dir)).check_published()


def test_the_digest_cache_reads_each_file_once(tmp_path, three_sessions, scratch, monkeypatch):
    store_dir = copy_store(three_sessions, tmp_path)
    reads: list[str] = []
    real = integrity.file_sha256

    def counted(fs, path):
        reads.append(path)
        return real(fs, path)

    monkeypatch.setattr(integrity, "file_sha256", counted)
    store = Store(str(store_dir))
    n_files = sum(len(m.files) for m in store.check_published())
    assert len(reads) == n_files
    assert integrity.digest_cache_path().is_relative_to(scratch)
    store.check_published()
    assert len(reads) == n_files  # second time: sizes and stamps only
    touched = store_dir / "sessions" / store.sessions()[0].folder / "metrics.json"
    os.utime(touched, (time.time() + 5, time.time() + 5))
    store.check_published()
    assert reads[n_files:] == [str(touched)]


def _manifest(index: int, version: str, trained: bool) -> SessionManifest:
    files = {WEIGHTS: {"bytes": 1, "sha256": "0"}} if trained else {}
    return SessionManifest(name=f"s{index}", index=index, digest=str(index), model_version=version,
                           n_docs=1, n_queries=0, config_digest="c", files=files)


def test_a_model_a_later_session_still_uses_is_never_removed(tmp_path):
    store = Store(str(tmp_path / "store"))
    # s1 trained v1; s2 did not train and still uses s1's model; s3 trained v3
    manifests = [_manifest(0, "v0", True), _manifest(1, "v1", True),
                 _manifest(2, "v1", False), _manifest(3, "v3", True)]
    assert models_in_use(store, manifests) == {"s1", "s3"}
    assert [m.name for m in removable_models(store, manifests, 0)] == ["s0"]
    assert removable_models(store, manifests, 3) == []
    assert models_in_use(store, manifests[:3]) == {"s1"}  # the next run starts from it


def test_numba_compiled_code_is_cached_on_disk():
    from numba.core import config
    from numba.core.caching import FunctionCache
    from numba.typed import typeddict

    from driftlane.infra.numba_cache import kernel_cache_dir
    from driftlane.tasks.evaluation import retrieval_metrics

    metrics = retrieval_metrics({"q": {"s/a": 1}}, {"q": {"s/a": 1.0, "s/b": 0.5}})
    assert metrics["ndcg@10"] == pytest.approx(1.0)
    assert config.CACHE_DIR == str(kernel_cache_dir()) and kernel_cache_dir().is_dir()
    assert isinstance(typeddict._make_dict._cache, FunctionCache)  # numba leaves it uncached
