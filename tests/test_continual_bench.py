"""The continual benchmark's pure parts: configurations, figures, costs, the report and
--resume."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from continual_helpers import NDCG, SESSIONS, rows_from, timings  # noqa: E402

from benchmarks import (  # noqa: E402
    continual,
    continual_costs,
    continual_report,
    continual_results,
    continual_resume,
)


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
    # each self-supervised variant that ran is reported; one at +1.5 points meets it
    variants = continual_results.evaluate_targets(
        {**methods, "driftlane_selfsup_fusion": method(0.415)}, significance(0.01))
    assert variants["selfsup_above_zero_shot"]["measured"] == {
        "driftlane_selfsup_minus_zero_shot_points": pytest.approx(0.5),
        "driftlane_selfsup_fusion_minus_zero_shot_points": pytest.approx(1.5)}
    assert variants["selfsup_above_zero_shot"]["met"] is True

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
    assert missing["selfsup_above_zero_shot"]["met"] is None
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
    continual_resume.save_finished_run(tmp_path, "driftlane", 0, config, run)
    assert continual_resume.load_finished_run(tmp_path, "driftlane", 0, config, 0) == run
    assert continual_resume.load_finished_run(tmp_path, "driftlane", 0, config, 1) is None
    path = tmp_path / "runs" / "driftlane_seed0.json"
    saved = json.loads(path.read_text())
    # a run saved before `replay_selection` existed: another digest, the field missing
    del saved["settings"]["sampling"]["replay_selection"]
    saved["config_digest"] = "older"
    path.write_text(json.dumps(saved))
    assert continual_resume.load_finished_run(tmp_path, "driftlane", 0, config, 0) == run
    other = continual.method_config(small, "random_replay", 0)
    assert continual_resume.load_finished_run(tmp_path, "driftlane", 0, other, 0) is None
    saved["settings"]["sampling"]["removed_option"] = 1  # a field this code no longer knows
    path.write_text(json.dumps(saved))
    assert continual_resume.load_finished_run(tmp_path, "driftlane", 0, config, 0) is None
    del saved["settings"]  # runs saved with the digest alone still need the same digest
    path.write_text(json.dumps(saved))
    assert continual_resume.load_finished_run(tmp_path, "driftlane", 0, config, 0) is None
