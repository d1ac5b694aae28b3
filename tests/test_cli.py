"""The CLI as a new user drives it, on sessions cut from the real collections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from malformed_sessions import MALFORMED
from real_sessions import cut_session
from typer.testing import CliRunner

from driftlane.flows.cli import app

pytestmark = pytest.mark.usefixtures("prefect_harness", "scratch")
DRIFTLANE = Path(sys.executable).parent / "driftlane"


@pytest.fixture(scope="module")
def real_sessions(tmp_path_factory, datasets_dir):
    root = tmp_path_factory.mktemp("real")
    return [cut_session(datasets_dir / "cisi", root / "cisi", n_queries=3, n_extra_docs=30),
            cut_session(datasets_dir / "npl_vaswani", root / "npl_vaswani", n_queries=3,
                        n_extra_docs=30)]


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_run_stream_then_show_json(tmp_path, real_sessions):
    store = tmp_path / "store"
    config = tmp_path / "driftlane.toml"
    config.write_text("[embedding]\nbatch_size = 16\n[embedding.chunking]\nwindow_tokens = 128\n"
                      "overlap_tokens = 32\n[finetune]\nmax_seq_length = 32\nbatch_size = 8\n"
                      "max_steps = 2\n")
    result = run_cli("run-stream", *map(str, real_sessions), "--store", str(store),
                     "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "cisi: published as session #0" in result.output
    assert "npl_vaswani: published as session #1" in result.output

    # `show --json` through the installed entry point, as a user would call it
    shown = subprocess.run([str(DRIFTLANE), "show", "--store", str(store), "--json"],
                           capture_output=True, text=True, check=True, env=os.environ)
    summary = json.loads(shown.stdout)
    sessions = summary["sessions"]
    assert [s["name"] for s in sessions] == ["cisi", "npl_vaswani"]
    assert all(s["model_version"] and s["n_docs"] > 30 for s in sessions)
    assert set(sessions[0]["metrics"]) == {"cisi"}
    assert set(sessions[1]["metrics"]) == {"cisi", "npl_vaswani"}
    for values in sessions[1]["metrics"].values():
        assert 0.0 < values["ndcg@10"] <= 1.0
        assert {"success@5", "recall@10", "recall@100"} <= set(values)

    text = run_cli("show", "--store", str(store))
    assert text.exit_code == 0 and "#1 npl_vaswani" in text.output

    again = run_cli("run-session", str(real_sessions[0]), "--store", str(store))
    assert again.exit_code == 0 and "already in the store" in again.output


def test_bad_session_exits_2_naming_file_and_line(tmp_path):
    case = next(c for c in MALFORMED if c.id == "duplicate_doc_id")
    (tmp_path / "bad").mkdir()
    bad = case.build(tmp_path / "bad")
    result = CliRunner().invoke(app, ["run-session", str(bad), "--store", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "corpus.jsonl:" in result.output and "duplicate doc id" in result.output
    assert not (tmp_path / "s").exists()


def test_bad_config_exits_2_naming_the_field(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[embedding.chunking]\nwindow_tokens = 100\noverlap_tokens = 99\n")
    result = CliRunner().invoke(app, ["run-session", str(tmp_path), "--store",
                                      str(tmp_path / "s"), "--config", str(config)])
    assert result.exit_code == 2
    assert "bad.toml" in result.output and "overlap_tokens=99" in result.output


def test_show_on_a_missing_store_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["show", "--store", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no driftlane store" in result.output
