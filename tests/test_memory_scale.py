"""The memory-scale benchmark's parts at a small size (benchmarks/memory_scale.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import memory_scale  # noqa: E402


def small_args(**changes) -> argparse.Namespace:
    base = {"topics": 12, "window": 4, "shift": 1, "rotation": 0.05, "noise": 0.06, "seed": 0,
            "first": 600, "million": 1500, "sessions": 3, "stream_size": 600}
    return argparse.Namespace(**{**base, **changes})


def test_sessions_are_seeded_unit_vectors_from_a_sliding_window():
    args = small_args()
    directions = memory_scale.topic_directions(args.topics, memory_scale.DIM, args.seed)
    a = memory_scale.session_documents(2, 300, directions, args, block=7)
    b = memory_scale.session_documents(2, 300, directions, args, block=7)
    np.testing.assert_array_equal(a.vectors, b.vectors)  # seeded
    np.testing.assert_allclose(np.linalg.norm(a.vectors, axis=1), 1.0, atol=1e-5)
    assert a.doc_keys[0] == "s2/0" and len(a.token_offsets) == 301
    # session 2's documents lie near the topics of its window (2..5), not the others
    nearest = np.argmax(a.vectors @ directions.T, axis=1)
    assert set(np.unique(nearest)) <= {2, 3, 4, 5}


def test_the_parts_run_small_and_the_targets_are_judged():
    args = small_args()
    million = memory_scale.part_million(args)
    assert million["documents"] == 1500 and million["peak_gb"] > 0
    assert set(million["seconds_by_step"]) >= {"assign", "report"}
    stream = memory_scale.part_stream(args)
    clusters = [s["clusters"] for s in stream["sessions"]]
    assert len(clusters) == 3 and max(clusters) <= stream["max_live_clusters"]
    result = {"million": million, "stream": stream}
    targets = memory_scale._targets(result)
    assert [t["met"] for t in targets][2] is True
    result.update({"command": "x", "written": "now", "targets": targets,
                   "machine": {"platform": "p", "cpus": 2, "loadavg_before": [0, 0, 0],
                               "loadavg_after": [0, 0, 0]}})
    json.dumps(result)
