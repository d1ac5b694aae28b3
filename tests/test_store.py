"""The store: scratch-then-publish, manifest last, failures at every step, isolation."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import fsspec
import pytest

from driftlane.infra.faults import InjectedFailure
from driftlane.infra.store import SessionManifest, Store, StoreError, normalize_url

PUBLISH_STEPS = ["publish.stage", "publish.stage.file", "publish.rename", "publish.manifest"]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: 'byte for byte unchanged' means equal snapshots."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_outputs(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.parquet").write_bytes(b"PAR1" + tag.encode() * 100)
    (folder / "metrics.json").write_text(json.dumps({tag: {"ndcg@10": 0.5}}))
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "vectors.npy").write_bytes(os.urandom(4096))
    return folder


def manifest(name: str, index: int) -> SessionManifest:
    return SessionManifest(name=name, index=index, digest=f"digest-{name}", model_version="m1",
                           n_docs=3, n_queries=1, config_digest="c1")


def test_publish_round_trip(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.ensure()
    out = make_outputs(tmp_path / "scratch" / "a", "a")
    published = store.publish_session(out, manifest("a", 0))
    assert [m.name for m in store.sessions()] == ["a"]
    assert store.sessions()[0] == published
    assert set(published.files) == {"docs.parquet", "metrics.json", "sub/vectors.npy"}
    folder = tmp_path / "store" / "sessions" / "00000_a"
    assert snapshot(folder) == {**snapshot(out), "manifest.json": published.to_json().encode()}
    assert store.read_json(published, "metrics.json") == {"a": {"ndcg@10": 0.5}}


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_failure_at_each_publish_step_leaves_no_session_and_rerun_completes(
        tmp_path, monkeypatch, step):
    store = Store(str(tmp_path / "store"))
    store.ensure()
    store.publish_session(make_outputs(tmp_path / "s" / "a", "a"), manifest("a", 0))
    before = [m.name for m in store.sessions()]

    out = make_outputs(tmp_path / "s" / "b", "b")
    monkeypatch.setenv("DRIFTLANE_FAIL_AT", step)
    with pytest.raises(InjectedFailure):
        store.publish_session(out, manifest("b", 1))
    assert [m.name for m in store.sessions()] == before  # nothing partial is visible

    monkeypatch.delenv("DRIFTLANE_FAIL_AT")
    published = store.publish_session(out, manifest("b", 1))
    assert [m.name for m in store.sessions()] == ["a", "b"]
    assert snapshot(tmp_path / "store" / "sessions" / "00001_b") == {
        **snapshot(out), "manifest.json": published.to_json().encode()}
    # the interrupted attempt left nothing behind in staging
    assert list((tmp_path / "store" / ".staging").iterdir()) == []


def test_scratch_on_dev_shm_store_on_disk(tmp_path):
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    store = Store(str(tmp_path / "store"))
    store.ensure()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        out = make_outputs(Path(shm) / "a", "a")
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev  # really a cross-device move
        published = store.publish_session(out, manifest("a", 0))
        assert snapshot(tmp_path / "store" / "sessions" / "00000_a") == {
            **snapshot(out), "manifest.json": published.to_json().encode()}


def test_two_stores_never_share_state(tmp_path):
    one, two = Store(str(tmp_path / "one")), Store(str(tmp_path / "two"))
    assert one.ensure() != two.ensure()
    one.publish_session(make_outputs(tmp_path / "s" / "a", "a"), manifest("a", 0))
    assert [m.name for m in one.sessions()] == ["a"]
    assert two.sessions() == []
    assert one.results_url != two.results_url and one.cache_url != two.cache_url


def test_memory_store(tmp_path):
    url = "memory://driftlane-test-store"
    try:
        store = Store(url)
        store.ensure()
        store.publish_session(make_outputs(tmp_path / "a", "a"), manifest("a", 0))
        assert [m.name for m in Store(url).sessions()] == ["a"]
    finally:
        fsspec.filesystem("memory").rm("/driftlane-test-store", recursive=True)


def test_folder_without_manifest_is_ignored(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.ensure()
    (tmp_path / "store" / "sessions" / "00000_ghost").mkdir(parents=True)
    (tmp_path / "store" / "sessions" / "00000_ghost" / "docs.parquet").write_bytes(b"x")
    assert store.sessions() == []
    # and the next publish of that slot replaces the leftover
    store.publish_session(make_outputs(tmp_path / "s" / "ghost", "g"), manifest("ghost", 0))
    assert [m.name for m in store.sessions()] == ["ghost"]


def test_same_content_is_found_and_same_name_different_content_is_refused(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.ensure()
    store.publish_session(make_outputs(tmp_path / "s" / "a", "a"), manifest("a", 0))
    assert store.find_published("a", "digest-a").index == 0
    assert store.find_published("b", "digest-b") is None
    with pytest.raises(StoreError, match=r"already holds a session named 'a'"):
        store.find_published("a", "another-digest")


def test_publish_refuses_wrong_index_and_double_publish(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.ensure()
    out = make_outputs(tmp_path / "s" / "a", "a")
    with pytest.raises(StoreError, match="as session #3: the store now holds 0 sessions"):
        store.publish_session(out, manifest("a", 3))
    store.publish_session(out, manifest("a", 0))
    before = snapshot(tmp_path / "store")
    with pytest.raises(StoreError):
        store.publish_session(out, manifest("a", 0))
    assert snapshot(tmp_path / "store") == before


def test_normalize_url_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert normalize_url("~/s") == str(tmp_path / "s")
    assert normalize_url("file://~/s") == f"file://{tmp_path / 's'}"
    assert normalize_url("memory://x/y") == "memory://x/y"
