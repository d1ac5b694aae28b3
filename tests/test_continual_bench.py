"""The continual benchmark's pure parts (configurations, figures, report) and its
start-up checks."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import (  # noqa: E402
    continual,
    continual_costs,
    continual_report,
    continual_results,
    continual_runs,
)

# R[i][j] of nDCG@10 for a three-session stream, by hand; other metrics are 0.1 lower.
NDCG = [[0.50, None, None],
        [0.40, 0.60, None],
        [0.45, 0.55, 0.70]]
SESSIONS = ["00_a", "01_b", "02_c"]


def rows_from(matrix):
    rows = []
    for i, name in enumerate(SESSIONS):
        metrics = {}
        for j, value in enumerate(matrix[i]):
            if value is not None:
                metrics[SESSIONS[j]] = {"ndcg@10": value, "success@5": value - 0.1,
                                        "recall@10": value - 0.1, "recall@100": value - 0.1,
                                        "n_queries": 10}
        rows.append((name, metrics))
    return rows


def timings(embedding, training, indexing=1.0):
    """A session's timings.json (or the summed stage times of a run)."""
    return {"embedding": embedding, "clustering": 2.0, "training": training,
            "indexing": indexing, "evaluation": 3.0,
            "total": embedding + 2.0 + training + indexing + 3.0}


def test_every_method_builds_a_valid_session_config():
    for bench in continual.CONFIGS.values():
        for method in continual.METHODS:
            config = continual.method_config(bench, method, seed=7)
            assert config.finetune.seed == config.sampling.seed == config.memory.seed == 7
    small = continual.CONFIGS["small"]
    assert continual.method_config(small, "zero_shot", 0).finetune.enabled is False
    joint = continual.method_config(small, "joint", 0)
    assert joint.finetune.start_from == "base" and joint.sampling.replay_all
    replay = continual.method_config(small, "random_replay", 0)
    ours = continual.method_config(small, "driftlane", 0)
    assert replay.memory.budget == ours.memory.budget  # the same memory budget
    assert replay.memory.eviction == "reservoir" and ours.memory.eviction == "cluster_aware"
    assert continual.method_config(small, "driftlane_selfsup", 0).sampling.mode == \
        "self_supervised"
    assert ours.embedding.chunking.window_tokens <= min(128, ours.finetune.max_seq_length)
    assert 64 <= ours.finetune.max_seq_length <= 96


def test_update_modes_of_the_methods():
    small = continual.CONFIGS["small"]
    modes = {m: continual.method_config(small, m, 0).update.mode.value for m in continual.METHODS}
    assert modes["driftlane"] == "aligned"  # the default
    assert modes["driftlane_full"] == modes["joint"] == "full"  # joint: a retrained model
    assert modes["driftlane_compatible"] == "compatible"
    assert {modes[m] for m in ("zero_shot", "sequential", "random_replay",
                               "driftlane_selfsup")} == {"aligned"}
    # the modes differ from driftlane in their update mode only
    ours = continual.method_settings(small, "driftlane", 0)
    for method in ("driftlane_full", "driftlane_compatible"):
        theirs = continual.method_settings(small, method, 0)
        assert {k: v for k, v in theirs.items() if k != "update"} == ours
    # baselines first: the pooled tests read "driftlane vs driftlane_full"
    names = list(continual.METHODS)
    assert names.index("driftlane_full") < names.index("driftlane")
    assert names.index("driftlane_compatible") < names.index("driftlane")


def test_small_stays_as_committed_and_medium_is_larger():
    committed = json.loads((REPO_ROOT / "benchmarks" / "results" /
                            "continual_small.json").read_text())["config"]
    small, medium = continual.CONFIGS["small"], continual.CONFIGS["medium"]
    assert small.session == committed["shared_settings"]  # `make bench` runs the same thing
    assert (list(small.datasets), small.docs_per_session, list(small.seeds)) == \
        (committed["datasets"], committed["docs_per_session"], committed["seeds"])
    assert medium.seeds == (0, 1, 2) and len(medium.datasets) == 3
    assert medium.docs_per_session >= 2000 and medium.queries_per_session is None
    # the same encoder settings, so small's per-token costs carry over to the estimate
    assert medium.session["embedding"] == small.session["embedding"]
    # ... and the same training but for medium's cap on the steps of a session
    assert medium.session["finetune"] == {**small.session["finetune"], "max_steps": 50}


def test_an_unknown_field_fails_loudly():
    bench = continual.BenchConfig(name="x", datasets=("cisi",), docs_per_session=10,
                                  queries_per_session=None, seeds=(0,),
                                  session={"finetune": {"no_such_field": 1}})
    with pytest.raises(ValueError, match="no_such_field"):
        continual.method_config(bench, "driftlane", 0)


def test_deep_merge_leaves_its_inputs_alone():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    merged = continual.deep_merge(base, {"a": {"c": 9}, "e": 4})
    assert merged == {"a": {"b": 1, "c": 9}, "d": 3, "e": 4}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_stage_times_group_task_runs_by_stage():
    task_runs = [("embed_documents", 4.0), ("reembed_sources", 6.0), ("fine_tune_session", 20.0),
                 ("sample_training", 1.0), ("evaluate_sessions", 3.0), ("embed_documents", 2.0),
                 ("ingest_session", 0.5), ("update_session_memory", 2.5)]
    times = continual_results.stage_times_from_task_runs(task_runs, [25.0, 20.0])
    assert times["embedding"] == 12.0 and times["training"] == 21.0
    assert times["clustering"] == 2.5 and times["evaluation"] == 3.0 and times["indexing"] == 0
    assert times["total"] == 45.0 and times["other"] == pytest.approx(45.0 - 38.5)
    assert times["by_task"]["embed_documents"] == 6.0
    assert continual_results.task_function_name("reembed_sources-5f3a9c") == "reembed_sources"


def test_summary_of_one_run_from_a_hand_made_matrix():
    run = continual_results.summarize_run(rows_from(NDCG), [timings(10, 20), timings(5, 30), None])
    assert run["avg_ndcg@10"] == pytest.approx((0.45 + 0.55 + 0.70) / 3)
    assert run["avg_success@5"] == pytest.approx((0.35 + 0.45 + 0.60) / 3)
    # bwt = mean(R[2][0] - R[0][0], R[2][1] - R[1][1]) = mean(-0.05, -0.05)
    assert run["bwt_ndcg@10"] == pytest.approx(-0.05)
    assert run["curve_ndcg@10"] == pytest.approx([0.50, 0.50, (0.45 + 0.55 + 0.70) / 3])
    assert run["time_s"] is None  # one session without timings: no partial sums
    assert run["time_s_per_session"]["embedding"] == [10.0, 5.0, None]  # but per session
    assert run["time_s_per_session"]["training"] == [20.0, 30.0, None]
    assert continual_results.summarize_run(rows_from(NDCG), [None] * 3)["time_s_per_session"] \
        is None
    complete = continual_results.summarize_run(
        rows_from(NDCG), [timings(10, 20), timings(5, 30), timings(1, 1)])
    assert complete["time_s"]["training"] == pytest.approx(51.0)
    assert complete["time_s"]["total"] == pytest.approx(sum(t["total"] for t in (
        timings(10, 20), timings(5, 30), timings(1, 1))))


def test_aggregate_over_seeds_gives_mean_std_and_every_seed():
    per_seed = {0: {"avg_ndcg@10": 0.40, "bwt_ndcg@10": -0.02, "curve_ndcg@10": [0.5, 0.4],
                    "time_s": timings(10, 20), "wall_s": 100.0, "sessions": SESSIONS[:2]},
                1: {"avg_ndcg@10": 0.50, "bwt_ndcg@10": 0.00, "curve_ndcg@10": [0.7, 0.5],
                    "time_s": timings(20, 40), "wall_s": 120.0, "sessions": SESSIONS[:2]}}
    out = continual_results.aggregate_seeds(per_seed)
    assert out["avg_ndcg@10"] == pytest.approx(0.45)
    assert out["std"]["avg_ndcg@10"] == pytest.approx(0.0707107, abs=1e-6)
    assert out["bwt_ndcg@10"] == pytest.approx(-0.01)
    assert out["time_s"]["training"] == pytest.approx(30.0)
    assert out["curve_ndcg@10"] == pytest.approx([0.6, 0.45])
    assert out["avg_success@5"] is None  # no seed has it
    assert set(out["seeds"]) == {"0", "1"} and out["n_seeds"] == 2
    single = continual_results.aggregate_seeds({3: per_seed[0]})
    assert single["avg_ndcg@10"] == 0.40 and single["std"]["avg_ndcg@10"] is None


def method(avg, bwt=0.0, encoded=1e6, trained=1e5, cpu=100.0):
    """A method's means: avg / bwt nDCG@10 and its work (cost = encoded + 3 x trained)."""
    return {"avg_ndcg@10": avg, "bwt_ndcg@10": bwt, "cpu_s": cpu,
            "time_s": timings(10.0, 10.0),
            "work": {"encoded": {"tokens": encoded}, "trained": {"tokens": trained},
                     "cost_token_equivalents": encoded + 3 * trained}}


def significance(p_value):
    return {"pairs": {"driftlane vs zero_shot": {"ndcg@10": {"p_value": p_value}}}}


def test_targets_from_hand_made_figures():
    methods = {
        "zero_shot": method(0.40),
        "sequential": method(0.41, bwt=-0.03),
        "random_replay": method(0.425),
        "joint": method(0.44, encoded=5e6, trained=5e6, cpu=1000.0),  # cost 20M
        "driftlane": method(0.435, bwt=-0.004, encoded=2e6, trained=2e6, cpu=900.0),  # 8M
        "driftlane_selfsup": method(0.405),
    }
    targets = continual_results.evaluate_targets(methods, significance(0.01))
    above = targets["driftlane_above_zero_shot"]
    assert above["measured"] == {"driftlane_minus_zero_shot_points": pytest.approx(3.5),
                                 "p_value": 0.01}
    assert above["met"] is True
    replay = targets["driftlane_above_replay"]
    assert replay["measured"] == {"driftlane_minus_random_replay_points": pytest.approx(1.0)}
    assert replay["met"] is True
    assert targets["driftlane_backward_transfer"]["met"] is True
    assert targets["driftlane_backward_transfer"]["measured"]["sequential_bwt_points"] == \
        pytest.approx(-3.0)
    close = targets["driftlane_close_to_joint"]
    assert close["measured"]["cost_ratio"] == pytest.approx(8 / 20)  # units, not seconds
    assert close["measured"]["cpu_s_ratio"] == pytest.approx(0.9)  # reported beside it
    assert close["measured"]["driftlane_minus_joint_points"] == pytest.approx(-0.5)
    assert close["met"] is True
    assert targets["selfsup_above_zero_shot"]["met"] is False  # 0.5 points < 1

    # not significant, a MIR baseline ahead, forgetting, a costlier driftlane
    worse = {**methods, "mir": method(0.44),
             "driftlane": method(0.435, bwt=-0.006, encoded=5e6, trained=2e6)}
    targets = continual_results.evaluate_targets(worse, significance(0.2))
    assert targets["driftlane_above_zero_shot"]["met"] is False
    assert targets["driftlane_above_replay"]["measured"][
        "driftlane_minus_mir_points"] == pytest.approx(-0.5)
    assert targets["driftlane_above_replay"]["met"] is False
    assert targets["driftlane_backward_transfer"]["met"] is False
    assert targets["driftlane_close_to_joint"]["met"] is False  # 11M / 20M > 0.4

    missing = continual_results.evaluate_targets({"driftlane": methods["driftlane"]})
    assert missing["driftlane_above_zero_shot"]["met"] is None
    assert missing["driftlane_above_replay"]["met"] is None
    assert missing["driftlane_backward_transfer"]["met"] is True
    no_test = continual_results.evaluate_targets(methods)  # no pooled test: not verifiable
    assert no_test["driftlane_above_zero_shot"]["met"] is None
    # issue 14: no driftlane_full run, no comparison with it; the cost against joint from the
    # work counts; no per-session costs, nothing to say about flatness
    assert "default_mode_close_to_full" not in no_test
    assert no_test["update_cost_vs_joint"]["measured"]["cost_ratio"] == pytest.approx(0.4)
    assert no_test["update_cost_vs_joint"]["met"] is True
    assert no_test["embedding_indexing_time_flat"]["met"] is None
    assert no_test["bytes_added_flat"]["met"] is None
    assert "update_cost_vs_joint" not in missing  # joint not run


def mode_method(avg, cost, seconds, megabytes):
    """A method's means with per-session costs: its work all encoding (`cost` tokens, spread
    over 3 sessions), embedding seconds and megabytes added per session."""
    out = method(avg, encoded=cost, trained=0)
    n = len(seconds)
    per_session = {"encoded_tokens": [cost / n] * n, "trained_tokens": [0] * n,
                   "session_bytes": [m * 1e6 for m in megabytes], "cache_bytes": [0] * n}
    times = {"embedding": seconds, "indexing": [0.0] * n, "training": [1.0] * n}
    out["session_costs"] = continual_costs.session_costs(SESSIONS, times,
                                                         {"per_session": per_session})
    return out


def test_update_mode_targets_met_and_not_met():
    met = {
        "joint": mode_method(0.45, 20e6, [10, 20, 30], [1, 2, 3]),
        "driftlane_full": mode_method(0.44, 15e6, [10, 20, 30], [1, 2, 3]),
        "driftlane_compatible": mode_method(0.43, 9e6, [10, 10, 11], [1, 1, 1]),
        "driftlane": mode_method(0.435, 8e6, [10, 10, 12], [1, 1, 1.2]),
    }
    targets = continual_results.evaluate_targets(met)
    close = targets["default_mode_close_to_full"]
    assert close["measured"] == {"driftlane_minus_driftlane_full_points": pytest.approx(-0.5)}
    assert close["met"] is True
    cost = targets["update_cost_vs_joint"]
    assert cost["measured"]["driftlane_cumulative_cost"] == 8e6
    assert cost["measured"]["joint_cumulative_cost"] == 20e6
    assert cost["measured"]["cost_ratio"] == pytest.approx(0.4)  # at the limit: met
    assert cost["measured"]["driftlane_full_cost_ratio"] == pytest.approx(0.75)
    assert cost["measured"]["driftlane_compatible_cost_ratio"] == pytest.approx(0.45)
    assert cost["met"] is True
    time_flat = targets["embedding_indexing_time_flat"]
    assert time_flat["measured"]["driftlane_last_over_second"] == pytest.approx(1.2)
    assert time_flat["measured"]["driftlane_full_last_over_second"] == pytest.approx(1.5)
    assert time_flat["measured"]["joint_last_over_second"] == pytest.approx(1.5)
    assert time_flat["met"] is True
    bytes_flat = targets["bytes_added_flat"]
    assert bytes_flat["measured"]["driftlane_last_over_second"] == pytest.approx(1.2)
    assert bytes_flat["met"] is True

    worse = {**met, "driftlane": mode_method(0.425, 9e6, [10, 10, 13], [1, 1, 2])}
    targets = continual_results.evaluate_targets(worse)
    assert targets["default_mode_close_to_full"]["measured"][
        "driftlane_minus_driftlane_full_points"] == pytest.approx(-1.5)
    assert targets["default_mode_close_to_full"]["met"] is False
    assert targets["update_cost_vs_joint"]["measured"]["cost_ratio"] == pytest.approx(0.45)
    assert targets["update_cost_vs_joint"]["met"] is False
    assert targets["embedding_indexing_time_flat"]["measured"][
        "driftlane_last_over_second"] == pytest.approx(1.3)
    assert targets["embedding_indexing_time_flat"]["met"] is False
    assert targets["bytes_added_flat"]["measured"][
        "driftlane_last_over_second"] == pytest.approx(2.0)
    assert targets["bytes_added_flat"]["met"] is False

    # better than full by more than a point is fine: "within" bounds the loss, not the gain
    better = {**met, "driftlane": mode_method(0.46, 8e6, [10, 10, 12], [1, 1, 1.2])}
    assert continual_results.evaluate_targets(better)["default_mode_close_to_full"]["met"]
    # only the targets whose methods ran
    alone = continual_costs.update_mode_targets({"driftlane_full": met["driftlane_full"],
                                                 "joint": met["joint"]})
    assert alone == {}
    no_joint = continual_costs.update_mode_targets({"driftlane": met["driftlane"],
                                                    "driftlane_full": met["driftlane_full"]})
    assert set(no_joint) == {"default_mode_close_to_full", "embedding_indexing_time_flat",
                             "bytes_added_flat"}
    failed_full = {**met, "driftlane_full": {"avg_ndcg@10": None}}  # ran, no figure
    assert continual_results.evaluate_targets(failed_full)[
        "default_mode_close_to_full"]["met"] is None


def test_qrels_and_run_use_session_scoped_keys():
    qrels = continual_results.stream_qrels({
        "00_a": pd.DataFrame({"query_id": ["1", "1", "2"], "doc_id": ["x", "y", "x"],
                              "score": [1, 0, 2], "split": ["test", "test", "train"]}),
        "01_b": pd.DataFrame({"query_id": ["1"], "doc_id": ["x"], "score": [1],
                              "split": ["test"]}),
    })
    assert qrels == {"00_a/1": {"00_a/x": 1}, "01_b/1": {"01_b/x": 1}}
    runs = pd.DataFrame({"evaluated_session": ["00_a", "00_a"], "query_id": ["1", "1"],
                         "doc_key": ["00_a/x", "01_b/x"], "score": [0.9, 0.8],
                         "rank": [1, 2]})
    run = continual_results.run_from_frame(runs, qrels)
    assert run == {"00_a/1": {"00_a/x": 0.9, "01_b/x": pytest.approx(0.8)},
                   "01_b/1": {"__none__": 0.0}}


def test_markdown_report_shows_methods_cost_targets_tests_and_seeds(tmp_path):
    stage_times = continual_results.stage_times_from_task_runs(
        [("embed_documents", 30.0), ("fine_tune_session", 60.0)], [100.0])
    per_seed = continual_results.summarize_run(rows_from(NDCG), [timings(10, 20)] * 3,
                                               stage_times, wall_s=99.0)
    per_seed["cpu_s"] = 150.0
    work = {"encoded": {"texts": 1200, "windows": 1500, "tokens": 2_000_000},
            "trained": {"steps": 10, "examples": 160, "tokens": 500_000},
            "per_session": {"encoded_tokens": [1_000_000, 500_000, 500_000],
                            "trained_tokens": [200_000, 150_000, 150_000],
                            "session_bytes": [1_000_000, 2_000_000, 2_500_000],
                            "cache_bytes": [500_000, 500_000, 500_000]}}
    work["cost_token_equivalents"] = continual_costs.cost_token_equivalents(work)
    methods = {"zero_shot": continual_results.aggregate_seeds({0: per_seed}),
               "driftlane": continual_results.aggregate_seeds({0: {**per_seed, "work": work}})}
    test = continual_results.pooled_paired_test({"0": {"q1": 0.9, "q2": 0.5}},
                                                {"0": {"q1": 0.4, "q2": 0.5}})
    results = {
        "command": "python -m benchmarks.continual --config small",
        "config": {"name": "small", "description": "a hand-made stream", "seeds": [0]},
        "environment": {"device_name": "x86_64", "cpu_count": 2, "torch": "2",
                        "torch_threads": 2,
                        "load_average_during_run": {"mean": 3.0, "max": 5.0, "samples": 3}},
        "methods": methods,
        "targets": continual_results.evaluate_targets(methods),
        "significance": {"max_p": 0.05, "bootstrap": {"resamples": 10_000},
                         "pairs": {"driftlane vs zero_shot": {
                             m: test for m in continual_results.TEST_METRICS}}},
        "errors": {"joint/seed0": "RuntimeError: boom"},
    }
    text = continual_report.render_markdown(results)
    assert "| driftlane | 0.5667 | 0.4667 | 0.4667 | -0.0500 |" in text
    # cost: 2M encoded + 3 x 0.5M trained = 3.5M forward-token equivalents
    assert "| driftlane | 3.50 | n/a | 2.00 | 1,200 | 10 | 160 | 0.50 | 150 | 99 |" in text
    assert "| driftlane | 30 | 6 | 60 | 3 | 9 | 108 |" in text  # wall seconds per stage
    # per session: embedding + indexing 10 + 1 s, embedding + training 10 + 20 s, cost
    # 1M + 3 x 0.2M, bytes added 1 MB folder + 0.5 MB cache
    assert "| driftlane | 0 00_a | 11.0 | 30.0 | 1.60 | 1.50 | 1.00 | 0.50 |" in text
    assert "| driftlane | 2 02_c | 11.0 | 30.0 | 0.95 | 3.00 | 2.50 | 0.50 |" in text
    assert "| zero_shot | 1 01_b | 11.0 | 30.0 | n/a | n/a | n/a | n/a |" in text  # no counts
    # sums and last / second: 3.0 MB / 2.5 MB = 1.2
    assert "| driftlane | 3.50 | n/a | 33.0 | 7.00 | 1.00 | 1.20 | 1.00 |" in text
    assert "## Targets (issues 4, 13 and 14)" in text
    assert "embedding + indexing wall seconds: last session / second session <= 1.25 | " \
        "driftlane_last_over_second = 1.0 | met |" in text
    written = continual_report.plot_results(results, tmp_path, "continual_x")
    assert [p.name for p in written] == ["continual_x_curve.png",
                                         "continual_x_driftlane_matrix.png",
                                         "continual_x_session_cost.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert per_seed["time_s_prefect"]["other"] == pytest.approx(10.0)
    assert "| zero_shot | 0 | 0.5667 |" in text
    # one query +0.5, one tie: mean +25 points, bootstrap interval [0, 50]
    assert "| driftlane vs zero_shot | 2 | 1 | +25.00 [+0.00, +50.00] |" in text
    assert "| 1/1/0 |" in text
    assert "not met" in text and "n/a" in text
    assert "joint/seed0: RuntimeError: boom" in text
    assert "| 02_c | 0.4500 | 0.5500 | 0.7000 |" in text  # driftlane's matrix row
    assert "load average during the run: mean 3.0" in text


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
    monkeypatch.setattr(continual, "DEFAULT_OUT_DIR", tmp_path / "results")
    monkeypatch.setattr(continual, "CONFIGS", {"small": continual.BenchConfig(
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


@pytest.mark.slow
def test_per_query_scores_on_a_toy_run():
    qrels = {"s/1": {"s/a": 1}, "s/2": {"s/b": 1}, "s/3": {"s/a": 1}}
    run = {"s/1": {"s/b": 1.0, "s/a": 0.5}, "s/2": {"s/b": 1.0}, "s/3": {"s/c": 1.0}}
    scores = continual_results.per_query_scores(qrels, run)
    assert set(scores) == set(continual_results.TEST_METRICS)
    assert scores["ndcg@10"] == pytest.approx({"s/1": 1 / math.log2(3), "s/2": 1.0,
                                               "s/3": 0.0})
    assert scores["success@5"] == {"s/1": 1.0, "s/2": 1.0, "s/3": 0.0}


# --- pooled paired tests --------------------------------------------------------------------


def test_pooled_paired_test_against_a_hand_computed_example():
    # a - b per query and seed: q1 -0.1 / +0.1, q2 +0.1 / +0.3, q3 +0.4 / +0.4, so the
    # per-query differences (means over the seeds) are d = 0.0, 0.2, 0.4
    b = {"0": {"q1": 0.5, "q2": 0.5, "q3": 0.5}, "1": {"q1": 0.5, "q2": 0.5, "q3": 0.5}}
    a = {"0": {"q1": 0.4, "q2": 0.6, "q3": 0.9}, "1": {"q1": 0.6, "q2": 0.8, "q3": 0.9}}
    out = continual_results.pooled_paired_test(a, b)
    # mean(d) = 0.2, sd(d) = 0.2, t = 0.2 / (0.2 / sqrt(3)) = sqrt(3); with 2 degrees of
    # freedom the two-sided p-value is 1 - |t| / sqrt(t^2 + 2) = 1 - sqrt(3 / 5)
    assert out["n_queries"] == 3 and out["seeds"] == ["0", "1"]
    assert out["mean_difference"] == pytest.approx(0.2)
    assert (out["mean_a"], out["mean_b"]) == (pytest.approx(0.7), pytest.approx(0.5))
    assert out["t"] == pytest.approx(math.sqrt(3))
    assert out["p_value"] == pytest.approx(1 - math.sqrt(3 / 5))  # 0.2254
    assert out["significant"] is False
    assert (out["wins"], out["ties"], out["losses"]) == (2, 1, 0)
    # 3 queries: a resample of one query thrice has probability 1/27 > 2.5%, so the 95%
    # interval runs from the smallest to the largest difference
    assert out["ci95"] == pytest.approx([0.0, 0.4])
    assert continual_results.pooled_paired_test(a, b) == out  # seeded


def test_pooled_paired_test_uses_the_seeds_both_ran_and_handles_no_spread():
    a = {"0": {"q1": 0.9, "q2": 0.7}, "1": {"q1": 0.0, "q2": 0.0}}
    b = {"0": {"q1": 0.5, "q2": 0.3}}
    out = continual_results.pooled_paired_test(a, b)
    assert out["seeds"] == ["0"] and out["mean_difference"] == pytest.approx(0.4)
    assert out["p_value"] == 0.0 and out["ci95"] == pytest.approx([0.4, 0.4])
    same = continual_results.pooled_paired_test(b, b)
    assert same["p_value"] == 1.0 and same["ties"] == 2 and same["ci95"] == [0.0, 0.0]


def test_pooled_tests_pair_every_method_baselines_second():
    one = {"0": {m: {"q": 0.5} for m in continual_results.TEST_METRICS}}
    scores = {"zero_shot": one, "joint": one, "driftlane": one}
    pairs = continual_results.pooled_paired_tests(scores)["pairs"]
    assert list(pairs) == ["joint vs zero_shot", "driftlane vs zero_shot", "driftlane vs joint"]
    assert set(pairs["driftlane vs joint"]) == set(continual_results.TEST_METRICS)


# --- work in load-independent units --------------------------------------------------------


def test_tokens_through_windows_by_hand():
    # 96-token windows with 2 special tokens hold 94 content tokens; stride 94 - 16 = 78.
    # 200 tokens: [0, 94), [78, 172), [106, 200) -> 3 x 94 + 3 x 2 = 288
    counts = continual_costs.window_token_counts([200, 50, 0, 94, 95], 96, 16, 2)
    assert counts.tolist() == [288, 52, 2, 96, 192]


def test_encoding_and_training_units_and_their_cost():
    encoded = continual_costs.encoding_units(
        ["d1", "d2", "d3"], [3, 1, 2], {"d1": ("document", 288), "d2": ("query", 12)},
        window_tokens=96)
    # d3 is no text of the stream: its 2 windows count 96 tokens each
    assert encoded == {"texts": 3, "windows": 6, "tokens": 288 + 12 + 2 * 96,
                       "texts_by_kind": {"document": 1, "query": 1, "other": 1}}
    trained = continual_costs.training_units([
        {"steps": 3, "batch_size": 16, "tokens_per_example": 200.5},
        {"steps": 2, "batch_size": 16, "tokens_per_example": 100.0}])
    assert trained == {"steps": 5, "examples": 80, "tokens": 48 * 200.5 + 32 * 100}
    work = {"encoded": encoded, "trained": trained}
    assert continual_costs.cost_token_equivalents(work) == 492 + 3 * 12824
    assert continual_costs.cost_token_equivalents({"encoded": encoded, "trained": None}) \
        is None


def test_training_tokens_cut_each_text_and_count_negatives_the_loss_used():
    from benchmarks.continual_runs import WorkCounter

    class WordTokenizer:  # one token per word
        def __call__(self, texts, **_):
            return {"input_ids": [[7] * len(text.split()) for text in texts]}

    counter = object.__new__(WorkCounter)  # no encoder to load
    counter.tokenizer, counter.n_special = WordTokenizer(), 2
    examples = pd.DataFrame({"anchor": ["a b c", "a " * 20],
                             "positive_key": ["s/1", "s/2"], "negative_key": ["s/2", None]})
    doc_content = {"s/1": 5, "s/2": 30}
    # cut at 10: anchors 5 and 10, positives 7 and 10, the one negative 10
    assert counter._tokens_per_example(examples, doc_content, 10, True) == \
        pytest.approx((5 + 7 + 10 + 10 + 10) / 2)
    assert counter._tokens_per_example(examples, doc_content, 10, False) == \
        pytest.approx((5 + 7 + 10 + 10) / 2)


def test_aggregate_averages_cpu_seconds_and_work():
    def run(cpu, tokens):
        return {"avg_ndcg@10": 0.5, "cpu_s": cpu,
                "work": {"encoded": {"tokens": tokens, "texts_by_kind": {"document": tokens}},
                         "trained": {"steps": 2}, "cost_token_equivalents": tokens}}

    out = continual_results.aggregate_seeds({0: run(100.0, 10), 1: run(300.0, 30)})
    assert out["cpu_s"] == 200.0 and out["std"]["cpu_s"] == pytest.approx(141.42, abs=0.01)
    assert out["work"] == {"encoded": {"tokens": 20.0, "texts_by_kind": {"document": 20.0}},
                           "trained": {"steps": 2.0}, "cost_token_equivalents": 20.0}
    assert continual_results.aggregate_seeds({0: run(1.0, 1), 1: {"cpu_s": 2.0}})["work"] \
        is None  # a seed without counts: no partial mean


# --- cost per session (issue 14) ---------------------------------------------------------------


def test_files_belong_to_the_session_whose_manifest_follows_them():
    published = [100.0, 200.0, 300.0]
    owners = continual_costs.owners_by_time([50.0, 100.0, 100.4, 150.0, 300.2, 999.0],
                                            published)
    assert owners == [0, 0, 0, 1, 2, 2]  # 0.5 s of slack; after the last: the last session
    assert continual_costs.owners_by_time([100.4], published, slack_s=0.0) == [1]
    # a cache shard's name holds its time in nanoseconds; other files use their mtime
    name = "cache/m/c-vec-e1/01700000000123456789-abcdef012345.vectors.npy"
    assert continual_costs.file_time(name, 5.0) == pytest.approx(1_700_000_000.123456789)
    assert continual_costs.file_time("x/manifest.json", 5.0) == 5.0
    assert continual_costs.file_time("x/manifest.json", "yesterday", default=7.0) == 7.0
    with pytest.raises(ValueError, match="no published session"):
        continual_costs.owners_by_time([1.0], [])


def per_session_work():
    """Three sessions' work by hand: cache shards of sessions 0, 2, 2; sessions 0 and 2
    trained; session folders of 1000-1200 bytes; cache files of sessions 0, 0, 1, 2."""
    return continual_costs.per_session_work(
        3, shard_owners=[0, 2, 2],
        shard_units=[{"texts": 2, "tokens": 100}, {"texts": 1, "tokens": 40},
                     {"texts": 3, "tokens": 60}],
        trained={0: {"steps": 2, "batch_size": 16, "tokens_per_example": 10.0},
                 2: {"steps": 1, "batch_size": 16, "tokens_per_example": 20.0}},
        session_bytes=[1000, 1100, 1200], cache_owners=[0, 0, 1, 2],
        cache_file_bytes=[10, 20, 30, 40])


def test_work_and_bytes_per_session_by_hand():
    assert per_session_work() == {
        "encoded_texts": [2, 0, 4], "encoded_tokens": [100, 0, 100],
        "trained_steps": [2, 0, 1], "trained_examples": [32, 0, 16],
        "trained_tokens": [320, 0, 320], "session_bytes": [1000, 1100, 1200],
        "cache_bytes": [30, 30, 40]}


def test_session_costs_sums_and_last_over_second():
    times = continual_costs.per_session_times(
        [timings(10, 20, 2), timings(4, 30, 1), timings(5, 0, 1)], continual_results.STAGES)
    costs = continual_costs.session_costs(SESSIONS, times, {"per_session": per_session_work()})
    assert costs["sessions"] == SESSIONS
    assert costs["embedding_indexing_s"] == [12.0, 5.0, 6.0]
    assert costs["embedding_training_s"] == [30.0, 34.0, 5.0]
    # tokens encoded + 3 x tokens trained
    assert costs["embedding_training_cost"] == [100 + 960, 0, 100 + 960]
    assert costs["bytes_added"] == [1030, 1130, 1240]
    assert costs["cumulative"]["embedding_training_cost"] == 2120
    assert costs["cumulative"]["embedding_indexing_s"] == 23.0
    assert costs["cumulative"]["bytes_added"] == 3400
    flat = costs["last_over_second"]
    assert flat["embedding_indexing_s"] == pytest.approx(1.2)
    assert flat["bytes_added"] == pytest.approx(1240 / 1130, abs=1e-4)
    assert flat["embedding_training_cost"] is None  # the second session cost nothing
    # a session without timings: its seconds, their sum and a ratio through it are unknown
    partial = continual_costs.session_costs(
        SESSIONS, continual_costs.per_session_times([timings(10, 20), timings(4, 30), None],
                                                    continual_results.STAGES), None)
    assert partial["embedding_indexing_s"] == [11.0, 5.0, None]
    assert partial["cumulative"]["embedding_indexing_s"] is None
    assert partial["last_over_second"]["embedding_indexing_s"] is None
    assert partial["bytes_added"] is None and partial["cumulative"]["bytes_added"] is None
    assert continual_costs.session_costs(SESSIONS, None, {"encoded": {}}) is None
    assert continual_costs.last_over_second([5.0]) is None  # one session: no second


def test_aggregate_averages_the_per_session_costs_over_seeds():
    def run(scale):
        work = per_session_work()
        work = {"per_session": {k: [v * scale for v in values] for k, values in work.items()}}
        return {"avg_ndcg@10": 0.5, "sessions": SESSIONS, "work": work,
                "time_s_per_session": continual_costs.per_session_times(
                    [timings(10 * scale, 20), timings(4 * scale, 30), timings(5 * scale, 0)],
                    continual_results.STAGES)}

    out = continual_results.aggregate_seeds({0: run(1), 1: run(3)})
    assert out["work"]["per_session"]["cache_bytes"] == [60.0, 60.0, 80.0]  # mean of x1, x3
    assert out["time_s_per_session"]["embedding"] == [20.0, 8.0, 10.0]
    costs = out["session_costs"]
    assert costs["sessions"] == SESSIONS
    assert costs["embedding_indexing_s"] == [21.0, 9.0, 11.0]
    assert costs["bytes_added"] == [2060.0, 2260.0, 2480.0]
    assert costs["last_over_second"]["embedding_indexing_s"] == pytest.approx(11 / 9, abs=1e-4)
    older = {k: v for k, v in run(1).items() if k != "time_s_per_session"}  # older code
    mixed = continual_results.aggregate_seeds({0: run(1), 1: older})
    assert mixed["time_s_per_session"] is None
    assert mixed["session_costs"]["embedding_indexing_s"] is None
    assert mixed["session_costs"]["bytes_added"] == [1030.0, 1130.0, 1240.0]


class WordTokenizer:  # one token per word
    def __call__(self, texts, **_):
        return {"input_ids": [[7] * len(text.split()) for text in texts]}


def test_work_of_a_hand_made_store_splits_over_its_sessions(tmp_path):
    from benchmarks.continual_runs import WorkCounter
    from driftlane.infra.config import ChunkingConfig
    from driftlane.infra.embedding_cache import EmbeddedTexts, EmbeddingCache
    from driftlane.infra.store import SessionManifest, Store
    from driftlane.tasks.texts import text_digest

    counter = object.__new__(WorkCounter)  # no encoder to load
    counter.tokenizer, counter.n_special, counter._sessions = WordTokenizer(), 2, {}
    counter.window_tokens, counter.overlap_tokens = 96, 16
    store = Store(str(tmp_path / "store"))
    store.ensure()
    cache = EmbeddingCache(store.cache_url, "m1", ChunkingConfig(window_tokens=96,
                                                                  overlap_tokens=16))
    for index, (name, docs) in enumerate({"a": ["one two three", "four"],
                                          "b": ["five six"]}.items()):
        texts = [*docs, f"query of {name}"]
        cache.add([text_digest(t) for t in texts],
                  EmbeddedTexts(np.zeros((len(texts), 4), np.float32),
                                np.ones(len(texts), np.int32)))
        folder = tmp_path / name
        folder.mkdir()
        pd.DataFrame({"doc_id": [str(i) for i in range(len(docs))], "title": [""] * len(docs),
                      "text": docs}).to_parquet(folder / "docs.parquet")
        pd.DataFrame({"query_id": ["q"], "text": [f"query of {name}"]}).to_parquet(
            folder / "queries.parquet")
        store.publish_session(folder, SessionManifest(
            name=name, index=index, digest=f"d{index}", model_version="m1",
            n_docs=len(docs), n_queries=1, config_digest="c"))
        if index == 0:  # the next session writes its cache files after this one's manifest
            time.sleep(continual_costs.CLOCK_SLACK_S + 0.1)
    work = counter.work_of_store(store.url)

    def sizes(folder):
        return {path.name: path.stat().st_size for path in sorted(folder.rglob("*"))
                if path.is_file()}

    # tokens: each content word + 2 special tokens; a: 5 + 3 + 5 (query), b: 4 + 5
    assert work["encoded"]["tokens"] == 22 and work["encoded"]["texts"] == 5
    per = work["per_session"]
    assert per["encoded_tokens"] == [13, 9] and per["encoded_texts"] == [3, 2]
    assert per["trained_tokens"] == [0, 0] and per["trained_steps"] == [0, 0]
    sessions = store.path("sessions")
    assert per["session_bytes"] == [sum(sizes(Path(sessions) / f).values())
                                    for f in sorted(os.listdir(sessions))]
    cache_files = sizes(Path(store.path("cache")))
    shards = sorted({name.split(".")[0] for name in cache_files})
    assert len(shards) == 2
    assert per["cache_bytes"] == [sum(b for n, b in cache_files.items() if n.startswith(s))
                                  for s in shards]


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
    monkeypatch.setattr(continual, "DEFAULT_OUT_DIR", tmp_path / "results")
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
    (["--methods", "driftlane,mir"], "unknown method 'mir'"),
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


def test_sampling_diagnostics_are_pooled_by_judged_cases():
    from benchmarks.continual_sampling import sampling_lines

    seeds = {"0": {"sampling": {"hard_negative_false_negative_rate": 0.5,
                                "hard_negatives_judged": 2, "pseudo_positive_precision": None,
                                "pseudo_positives_judged": 0}},
             "1": {"sampling": {"hard_negative_false_negative_rate": 0.0,
                                "hard_negatives_judged": 6, "pseudo_positive_precision": 0.25,
                                "pseudo_positives_judged": 4}}}
    lines = sampling_lines({"driftlane": {"seeds": seeds}, "zero_shot": {"seeds": {"0": {}}}})
    assert "| driftlane | 0.2500 (4) | 0.1250 (8) |" in lines  # (0.5 * 2 + 0) / 8
    assert not any(line.startswith("| zero_shot") for line in lines)
    assert sampling_lines({"zero_shot": {"seeds": {"0": {}}}}) == []


def test_resume_keeps_a_run_whose_settings_only_lack_new_fields(tmp_path):
    small = continual.CONFIGS["small"]
    config = continual.method_config(small, "driftlane", 0)
    run = {"store": str(tmp_path / "store"), "avg_ndcg@10": 0.5}
    continual_runs.save_finished_run(tmp_path, "driftlane", 0, config, run)
    assert continual_runs.load_finished_run(tmp_path, "driftlane", 0, config, 0) == run
    assert continual_runs.load_finished_run(tmp_path, "driftlane", 0, config, 1) is None
    path = tmp_path / "runs" / "driftlane_seed0.json"
    saved = json.loads(path.read_text())
    # a run saved before `replay_selection` existed: another digest, the field missing
    del saved["settings"]["sampling"]["replay_selection"]
    saved["config_digest"] = "older"
    path.write_text(json.dumps(saved))
    assert continual_runs.load_finished_run(tmp_path, "driftlane", 0, config, 0) == run
    other = continual.method_config(small, "random_replay", 0)
    assert continual_runs.load_finished_run(tmp_path, "driftlane", 0, other, 0) is None
    saved["settings"]["sampling"]["removed_option"] = 1  # a field this code no longer knows
    path.write_text(json.dumps(saved))
    assert continual_runs.load_finished_run(tmp_path, "driftlane", 0, config, 0) is None
    del saved["settings"]  # runs saved with the digest alone still need the same digest
    path.write_text(json.dumps(saved))
    assert continual_runs.load_finished_run(tmp_path, "driftlane", 0, config, 0) is None
