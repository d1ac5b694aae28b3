"""The continual benchmark's pure parts (configurations, figures, report) and its
start-up checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import continual, continual_report, continual_results  # noqa: E402

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


def method(avg, bwt=0.0, embedding=10.0, training=10.0, indexing=0.0):
    return {"avg_ndcg@10": avg, "bwt_ndcg@10": bwt,
            "time_s": timings(embedding, training, indexing)}


def test_targets_from_hand_made_figures():
    methods = {
        "zero_shot": method(0.40),
        "sequential": method(0.41, bwt=-0.03),
        "random_replay": method(0.425),
        "joint": method(0.44, embedding=50.0, training=150.0, indexing=100.0),
        "driftlane": method(0.435, bwt=-0.004, embedding=40.0, training=40.0, indexing=30.0),
        "driftlane_selfsup": method(0.405),
    }
    targets = continual_results.evaluate_targets(methods)
    above = targets["driftlane_above_baselines"]
    assert above["measured"]["driftlane_minus_zero_shot_points"] == pytest.approx(3.5)
    assert above["measured"]["driftlane_minus_random_replay_points"] == pytest.approx(1.0)
    assert above["met"] is True
    assert targets["driftlane_backward_transfer"]["met"] is True
    assert targets["driftlane_backward_transfer"]["measured"]["sequential_bwt_points"] == \
        pytest.approx(-3.0)
    close = targets["driftlane_close_to_joint"]
    assert close["measured"]["cost_ratio"] == pytest.approx(80 / 200)  # indexing not counted
    assert close["measured"]["driftlane_minus_joint_points"] == pytest.approx(-0.5)
    assert close["met"] is True
    assert targets["selfsup_above_zero_shot"]["met"] is False  # 0.5 points < 1

    slower = {**methods, "driftlane": method(0.435, bwt=-0.006, training=200.0)}
    targets = continual_results.evaluate_targets(slower)
    assert targets["driftlane_backward_transfer"]["met"] is False
    assert targets["driftlane_close_to_joint"]["met"] is False

    missing = continual_results.evaluate_targets({"driftlane": methods["driftlane"]})
    assert missing["driftlane_above_baselines"]["met"] is None
    assert missing["driftlane_backward_transfer"]["met"] is True


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


def test_markdown_report_shows_methods_targets_and_seeds():
    stage_times = continual_results.stage_times_from_task_runs(
        [("embed_documents", 30.0), ("fine_tune_session", 60.0)], [100.0])
    per_seed = continual_results.summarize_run(rows_from(NDCG), [timings(10, 20)] * 3,
                                               stage_times, wall_s=99.0)
    methods = {"zero_shot": continual_results.aggregate_seeds({0: per_seed}),
               "driftlane": continual_results.aggregate_seeds({0: per_seed})}
    results = {
        "command": "python -m benchmarks.continual --config small",
        "config": {"name": "small", "description": "a hand-made stream", "seeds": [0]},
        "environment": {"device_name": "x86_64", "cpu_count": 2, "torch": "2",
                        "torch_threads": 2,
                        "load_average_during_run": {"mean": 3.0, "max": 5.0, "samples": 3}},
        "methods": methods,
        "targets": continual_results.evaluate_targets(methods),
        "significance": {"note": "Not computed."},
        "errors": {"joint/seed0": "RuntimeError: boom"},
    }
    text = continual_report.render_markdown(results)
    assert "| driftlane | 0.5667 | 0.4667 | 0.4667 | -0.0500 | 30 | 6 | 60 | 3 | 9 | 108 |" \
        in text
    assert per_seed["time_s_prefect"]["other"] == pytest.approx(10.0)
    assert "| zero_shot | 0 | 0.5667 |" in text
    assert "not met" in text and "Not computed." in text
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
def test_paired_tests_on_a_toy_run():
    qrels = {"s/1": {"s/a": 1}, "s/2": {"s/b": 1}, "s/3": {"s/a": 1}}
    good = {"s/1": {"s/a": 1.0, "s/b": 0.5}, "s/2": {"s/b": 1.0}, "s/3": {"s/a": 1.0}}
    bad = {"s/1": {"s/b": 1.0, "s/a": 0.5}, "s/2": {"s/c": 1.0}, "s/3": {"s/c": 1.0}}
    out = continual_results.paired_tests(qrels, {"good": good, "bad": bad})
    assert out["n_queries"] == 3
    assert out["means"]["good"]["ndcg@10"] == pytest.approx(1.0)
    pair = out["pairs"]["good vs bad"]["ndcg@10"]
    assert (pair["w"], pair["t"], pair["l"]) == (3, 0, 0)
    assert 0.0 <= pair["p_value"] <= 1.0
