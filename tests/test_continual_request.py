"""The continual benchmark's command line: configurations, ad-hoc streams, names, and the one
line it stops with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import (  # noqa: E402
    continual,
    continual_request,
)


def test_missing_folders_are_named_in_one_line(tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "cisi").mkdir(parents=True)
    out = tmp_path / "results"
    check = continual.missing_folder_error
    assert check(out, str(datasets), ("cisi",)) is None  # a given --out-dir is created later
    assert "has no scifact, cosqa" in check(out, str(datasets), ("cisi", "scifact", "cosqa"))
    assert "no datasets folder" in check(out, str(tmp_path / "absent"), ("cisi",))
    assert check(out, "s3://bucket/datasets", ("cisi",)) is None  # checked when read


@pytest.mark.parametrize("absent", ["results", "datasets"])
def test_main_stops_with_one_line_when_a_folder_is_missing(absent, tmp_path, monkeypatch,
                                                            capsys):
    (tmp_path / "datasets" / "cisi").mkdir(parents=True)
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(continual_request, "DEFAULT_OUT_DIR", tmp_path / "results")
    monkeypatch.setattr(continual_request, "CONFIGS", {"small": continual.BenchConfig(
        name="small", datasets=("cisi",), docs_per_session=10, queries_per_session=None,
        seeds=(0,))})
    monkeypatch.setenv("DRIFTLANE_DATASETS", str(tmp_path / "datasets"))
    (tmp_path / absent).rename(tmp_path / "gone")
    with pytest.raises(SystemExit) as stopped:
        continual.main(["--work", str(tmp_path / "work")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no {absent} folder {tmp_path / absent}" in err
    assert "Traceback" not in err and not (tmp_path / "work").exists()  # nothing started



# --- what to run: configurations, ad-hoc streams, names --------------------------------------


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A datasets folder with scifact, cosqa, cisi, a results folder and a stream folder."""
    for name in ("scifact", "cosqa", "cisi", "npl_vaswani"):
        (tmp_path / "datasets" / name).mkdir(parents=True)
    (tmp_path / "results").mkdir()
    stream = tmp_path / "my stream!"
    for name in ("00_a", "01_b"):
        (stream / name).mkdir(parents=True)
    (stream / "stream.json").write_text(json.dumps({"sessions": [{"name": "00_a"},
                                                                 {"name": "01_b"}]}))
    monkeypatch.setattr(continual_request, "DEFAULT_OUT_DIR", tmp_path / "results")
    monkeypatch.setenv("DRIFTLANE_DATASETS", str(tmp_path / "datasets"))
    return tmp_path


def test_a_configuration_run_and_its_subsets(folders):
    request = continual.request_from_argv(["--config", "medium"])
    assert not request.ad_hoc and request.bench is continual.CONFIGS["medium"]
    assert request.stem == "continual_medium" and request.seeds == (0, 1, 2)
    assert request.methods == tuple(continual.METHODS)
    assert request.out_dir == folders / "results"
    assert request.work == (Path.home() / ".cache/driftlane/bench/medium").resolve()
    subset = continual.request_from_argv(["--methods", "driftlane,zero_shot", "--seeds", "3"])
    assert subset.methods == ("zero_shot", "driftlane")  # report order
    assert subset.seeds == (3,) and subset.stem == "continual_small_subset"
    modes = continual.request_from_argv(["--methods", "zero_shot", "driftlane", "driftlane_full",
                                         "driftlane_compatible", "joint"])
    assert modes.methods == ("zero_shot", "joint", "driftlane_full", "driftlane_compatible",
                             "driftlane")
    assert modes.stem == "continual_small_subset"
    assert {"driftlane", "driftlane_full", "driftlane_compatible", "joint"} <= set(
        request.methods)  # medium runs the update modes too
    assert continual.request_from_argv([]).stem == "continual_small"  # `make bench`


def test_an_ad_hoc_run_from_collections(folders):
    mine = folders / "beir" / "my-corpus"
    mine.mkdir(parents=True)
    request = continual.request_from_argv(["--config", "medium", "--datasets", "scifact",
                                           f"{mine}/", "--work", str(folders / "w")])
    assert request.ad_hoc and request.settings_from == "medium"
    assert request.bench.name == "scifact-my-corpus" and request.stem == \
        "continual_scifact-my-corpus"
    assert request.bench.datasets == ("scifact", f"{mine}/")
    assert request.bench.session == continual.CONFIGS["medium"].session
    assert request.bench.docs_per_session == 2000  # cut as the configuration cuts
    assert request.out_dir == folders / "w"  # the results stay with the run, not in the repo
    named = continual.request_from_argv(["--datasets", "cosqa,cisi", "--name", "mine",
                                         "--out-dir", str(folders / "out")])
    assert named.bench.datasets == ("cosqa", "cisi") and named.stem == "continual_mine"
    assert named.out_dir == folders / "out" and named.bench.seeds == (0,)


def test_an_ad_hoc_run_from_a_stream(folders):
    request = continual.request_from_argv(["--stream", str(folders / "my stream!")])
    assert request.bench.stream == str((folders / "my stream!").resolve())
    assert request.bench.name == "my_stream" and request.bench.datasets == ()
    assert request.work.name == "my_stream"


def test_ad_hoc_names_are_safe_and_bounded():
    assert continual.ad_hoc_name(["a", "s3://bucket/b/", "~/x y"], None) == "a-b-x_y"
    long = continual.ad_hoc_name([f"collection_{i}" for i in range(10)], None)
    assert len(long) == 60 and long.startswith("collection_0-collection_1")
    assert long != continual.ad_hoc_name([f"collection_{i}" for i in range(11)], None)


@pytest.mark.parametrize(("argv", "message"), [
    (["--config", "huge"], "--config must be one of small, medium, gpu"),
    (["--datasets", "cisi", "--stream", "s"], "--datasets and --stream both give the stream"),
    (["--name", "x"], "--name names an ad-hoc run"),
    (["--datasets", "cisi", "--name", "small"], "belongs to a configuration's results"),
    (["--datasets", "cisi", "--name", "a/b"], "use letters, digits"),
    (["--methods", "driftlane,lwf"], "unknown method 'lwf'"),
    (["--datasets", "cisi", "absent"], "has no absent"),
    (["--datasets", "/no/such/beir"], "no collection folder /no/such/beir"),
    (["--stream", "STREAM", "--datasets-dir", "d"], "--datasets-dir does not apply"),
    (["--stream", "DATASETS"], "no stream.json"),
    (["--stream", "SMALL"], "pass --name"),
])
def test_what_cannot_run_is_one_line(folders, argv, message):
    small = folders / "small"  # a stream folder whose name is a configuration's
    (small / "00_a").mkdir(parents=True)
    (small / "stream.json").write_text(json.dumps({"sessions": [{"name": "00_a"}]}))
    places = {"STREAM": str(folders / "my stream!"), "DATASETS": str(folders / "datasets"),
              "SMALL": str(small)}
    with pytest.raises(continual.BenchUsageError) as raised:
        continual.request_from_argv([places.get(a, a) for a in argv])
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_bench_command_passes_its_options_on(folders, monkeypatch):
    from typer.testing import CliRunner

    from driftlane.flows.cli import app

    ran = []
    monkeypatch.setattr(continual, "run_request", lambda request, argv: ran.append(request))
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--config", "medium", "--datasets", "scifact,cosqa",
                                 "--datasets", "cisi", "--methods", "driftlane",
                                 "--methods", "zero_shot", "--seeds", "1", "--seeds", "2",
                                 "--work", str(folders / "w"), "--resume"])
    assert result.exit_code == 0, result.output
    (request,) = ran
    assert request.bench.datasets == ("scifact", "cosqa", "cisi")
    assert request.stem == "continual_scifact-cosqa-cisi" and request.settings_from == "medium"
    assert request.methods == ("zero_shot", "driftlane") and request.seeds == (1, 2)
    assert request.resume and request.work == folders / "w"

    result = runner.invoke(app, ["bench", "--datasets", "cisi", "--stream", "s"])
    assert result.exit_code == 2 and not ran[1:]
    assert result.output.strip().splitlines() == [
        "error: --datasets and --stream both give the stream; pass one"]


