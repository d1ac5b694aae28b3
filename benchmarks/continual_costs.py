"""The continual benchmark's cost figures, pure: work in load-independent units, its split over
the sessions, each session's wall seconds and the bytes it added to the store, and the targets
of issue 14 on them (the update modes: `[update] mode = full | aligned | compatible`).

Cost in units that do not depend on the machine's load (`encoding_units`, `training_units`,
`cost_token_equivalents`): texts, windows and tokens the encoder ran at inference (every text a
store's embedding cache holds was encoded once by that run: new documents, memory re-embedded
after each new model, in full mode the whole corpus too, training and test queries), and
training steps, examples (steps x batch size) and the tokens of those examples (each text cut at
the training length). The cost targets compare forward-token equivalents: encoded tokens plus
TRAINING_FLOP_FACTOR times the trained tokens.

Per session (`session_costs`): the work of each session (a cache shard belongs to the session
whose manifest was the first written after it: `owners_by_time`), the wall seconds of embedding
+ indexing and of embedding + training (the sessions' timings.json), and the bytes the session
added to the store: its folder `sessions/<NNNNN>_<name>/` plus the embedding-cache files
(`cache/`) written during it. Prefect's persisted task results (`results/`) are not counted.

Functions over plain dicts, lists and arrays, no file access: `benchmarks.continual_runs` reads
the stores. Covered by tests/test_continual_bench.py.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# A training token costs a forward and a backward pass: about 3 forward passes (Kaplan et al.
# 2020, "Scaling laws for neural language models": 6N against 2N FLOPs per token).
TRAINING_FLOP_FACTOR = 3.0
COST_UNIT = ("forward-token equivalents: tokens encoded + "
             f"{TRAINING_FLOP_FACTOR:g} x tokens trained (steps x batch size x tokens per "
             "example)")
BYTES_COUNTED = ("bytes added by a session: every file under its folder sessions/<NNNNN>_<name>/ "
                 "(manifest included) + the embedding-cache files (cache/) written during it "
                 "(by the time in a shard's name, else the file's mtime, up to the session's "
                 "manifest); Prefect's task results (results/) not counted")
POINTS = 100.0  # a "point" of nDCG is 0.01
# A file's modification time comes from the kernel's coarse clock (a few ms behind the time
# in a cache shard's name); the next session writes to the cache seconds after the manifest
# of the last one (plan, ingest, load the model), so files up to this long after a manifest
# still belong to its session.
CLOCK_SLACK_S = 0.5
# Issue 14: the default update mode against full re-embedding, and how flat its cost stays.
DEFAULT_MODE = "driftlane"
FULL_MODE = "driftlane_full"
MAX_POINTS_BELOW_FULL = 1.0
MAX_COST_VS_JOINT = 0.40
MAX_LAST_OVER_SECOND = 1.25
# Per-session columns of `session_costs` whose last / second session ratio is reported.
FLATNESS_KEYS = ("embedding_indexing_s", "bytes_added", "embedding_training_cost",
                 "embedding_training_s")


def all_known(*values: Any) -> bool:
    return all(v is not None for v in values)


def points(a: float | None, b: float | None) -> float | None:
    """a - b in nDCG points (0.01), None when either is unknown."""
    return None if a is None or b is None else round((a - b) * POINTS, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if all_known(a, b) and b else None


# --- work in load-independent units ----------------------------------------------------------


def window_token_counts(n_content_tokens: Sequence[int] | np.ndarray, window_tokens: int,
                        overlap_tokens: int, n_special: int) -> np.ndarray:
    """(n,) int64: tokens the encoder runs for each text, as `tasks.embedding.embed_texts`
    cuts it: the content tokens of each of its windows plus `n_special` special tokens per
    window (`window_tokens` includes them; consecutive windows share `overlap_tokens`)."""
    from driftlane.tasks.chunking import window_table

    lengths = np.asarray(n_content_tokens, dtype=np.int64).reshape(-1)  # (n,)
    table = window_table(lengths, window_tokens - n_special, overlap_tokens)
    per_window = table.end - table.start + n_special  # (n_windows,)
    return np.bincount(table.doc, weights=per_window, minlength=len(lengths)).astype(np.int64)


def encoding_units(digests: Sequence[str], n_windows: Sequence[int] | np.ndarray,
                   known: Mapping[str, tuple[str, int]], window_tokens: int) -> dict[str, Any]:
    """Texts, windows and tokens encoded at inference, from the rows of a store's embedding
    cache (one row per text encoded: its digest and window count).

    known: text digest -> (kind, tokens through its windows) for the texts the stream holds
    (kind "document" or "query"); a text not among them (kind "other") counts
    `window_tokens` per window, an upper bound.
    """
    windows = np.asarray(n_windows, dtype=np.int64).reshape(-1)
    by_kind: dict[str, int] = {"document": 0, "query": 0, "other": 0}
    tokens = 0
    for digest, n in zip(digests, windows.tolist(), strict=True):
        kind, count = known.get(digest, ("other", n * window_tokens))
        by_kind[kind] = by_kind.get(kind, 0) + 1
        tokens += int(count)
    return {"texts": len(windows), "windows": int(windows.sum()), "tokens": tokens,
            "texts_by_kind": by_kind}


def training_units(sessions: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Steps, examples (steps x batch size) and tokens trained over the trained sessions.

    sessions: per session that trained, {"steps", "batch_size", "tokens_per_example"} (the
    mean tokens of an example's texts, each cut at the training length).
    """
    steps = sum(int(s["steps"]) for s in sessions)
    examples = sum(int(s["steps"]) * int(s["batch_size"]) for s in sessions)
    tokens = sum(int(s["steps"]) * int(s["batch_size"]) * float(s["tokens_per_example"])
                 for s in sessions)
    return {"steps": steps, "examples": examples, "tokens": int(round(tokens))}


def cost_token_equivalents(work: Mapping[str, Any] | None) -> float | None:
    """Forward-token equivalents of a run's work (COST_UNIT); None when unknown."""
    if not work or work.get("encoded") is None or work.get("trained") is None:
        return None
    return float(work["encoded"]["tokens"] + TRAINING_FLOP_FACTOR * work["trained"]["tokens"])


# --- split over the sessions -----------------------------------------------------------------


def file_time(path: str, mtime: Any = None, default: float = 0.0) -> float:
    """When a store file was written, in seconds since the epoch: the time in a cache shard's
    name (`<time_ns:020d>-<uuid>.<suffix>`, `infra.embedding_cache`), else `mtime` when it is
    a number, else `default`."""
    found = re.match(r"(\d{20})-", posixpath.basename(path))
    if found:
        return int(found.group(1)) / 1e9
    return float(mtime) if isinstance(mtime, int | float) else default


def owners_by_time(times_s: Sequence[float], published_s: Sequence[float],
                   slack_s: float | None = None) -> list[int]:
    """The session each file written at `times_s` belongs to: the first session whose
    manifest was written at or after it, less `slack_s` (default CLOCK_SLACK_S);
    `published_s` increasing; later files belong to the last session."""
    if not len(published_s):
        raise ValueError("no published session to attribute files to")
    slack = CLOCK_SLACK_S if slack_s is None else slack_s
    owners = np.searchsorted(np.asarray(published_s, float) + slack,
                             np.asarray(times_s, float), side="left")
    return np.minimum(owners, len(published_s) - 1).astype(int).tolist()


def sum_by_owner(owners: Sequence[int], values: Sequence[float], n: int) -> list[float]:
    """(n,) sums of `values` per owner index."""
    out = [0.0] * n
    for owner, value in zip(owners, values, strict=True):
        out[owner] += float(value)
    return out


def per_session_work(n_sessions: int, shard_owners: Sequence[int],
                     shard_units: Sequence[Mapping[str, Any]],
                     trained: Mapping[int, Mapping[str, float]],
                     session_bytes: Sequence[float], cache_owners: Sequence[int],
                     cache_file_bytes: Sequence[float]) -> dict[str, Any]:
    """A store's work and bytes per session, as columns (lists indexed by session).

    shard_owners, shard_units: each cache shard's session (`owners_by_time`) and its
    `encoding_units`; trained: session index -> {"steps", "batch_size", "tokens_per_example"}
    of the sessions that trained; session_bytes: each session folder's bytes; cache_owners,
    cache_file_bytes: each cache file's session and size.
    """
    def encoded(key: str) -> list[int]:
        return [int(v) for v in sum_by_owner(shard_owners, [u[key] for u in shard_units],
                                             n_sessions)]

    units = [training_units([trained[i]] if i in trained else []) for i in range(n_sessions)]
    return {"encoded_texts": encoded("texts"), "encoded_tokens": encoded("tokens"),
            "trained_steps": [u["steps"] for u in units],
            "trained_examples": [u["examples"] for u in units],
            "trained_tokens": [u["tokens"] for u in units],
            "session_bytes": [int(b) for b in session_bytes],
            "cache_bytes": [int(b) for b in sum_by_owner(cache_owners, cache_file_bytes,
                                                           n_sessions)]}


def per_session_times(timings: Sequence[Mapping[str, float] | None],
                      stages: Sequence[str]) -> dict[str, list[float | None]] | None:
    """{stage: seconds per session} of the sessions' timings.json (None where one is
    missing); None without any."""
    if not timings or all(t is None for t in timings):
        return None
    return {stage: [None if t is None else float(t.get(stage, 0.0)) for t in timings]
            for stage in stages}


def _add(*columns: Sequence[float | None] | None, factors: Sequence[float] | None = None
         ) -> list[float | None] | None:
    """Element-wise weighted sum of equally long columns (None where an element is)."""
    if any(c is None for c in columns):
        return None
    factors = factors or [1.0] * len(columns)
    return [None if any(v is None for v in values) else
            float(sum(f * v for f, v in zip(factors, values, strict=True)))
            for values in zip(*columns, strict=True)]


def last_over_second(column: Sequence[float | None] | None) -> float | None:
    """The last session's value over the second session's (None with fewer than 2
    sessions, an unknown value or a second session of 0)."""
    if column is None or len(column) < 2:
        return None
    return ratio(column[-1], column[1])


def session_costs(sessions: Sequence[str] | None,
                  time_s_per_session: Mapping[str, Sequence[float | None]] | None,
                  work: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Each session's cost (lists indexed by session), their sums (`cumulative`) and the
    last / second session ratios (`last_over_second`): embedding + indexing and embedding +
    training wall seconds, embedding + training cost in COST_UNIT (all encoding + 3 x
    training tokens), the work units behind it and the bytes added (BYTES_COUNTED)."""
    times = time_s_per_session or {}
    per = (work or {}).get("per_session") or {}
    if not times and not per:
        return None
    columns: dict[str, list[float | None] | None] = {
        "embedding_indexing_s": _add(times.get("embedding"), times.get("indexing")),
        "embedding_training_s": _add(times.get("embedding"), times.get("training")),
        "embedding_training_cost": _add(per.get("encoded_tokens"), per.get("trained_tokens"),
                                        factors=[1.0, TRAINING_FLOP_FACTOR]),
        "encoded_tokens": per.get("encoded_tokens"),
        "trained_tokens": per.get("trained_tokens"),
        "trained_examples": per.get("trained_examples"),
        "session_bytes": per.get("session_bytes"),
        "cache_bytes": per.get("cache_bytes"),
        "bytes_added": _add(per.get("session_bytes"), per.get("cache_bytes")),
    }
    cumulative = {key: None if c is None or any(v is None for v in c) else float(sum(c))
                  for key, c in columns.items()}
    return {"sessions": list(sessions) if sessions else None,
            **{key: None if c is None else list(c) for key, c in columns.items()},
            "cumulative": cumulative,
            "last_over_second": {key: last_over_second(columns[key]) for key in FLATNESS_KEYS}}


# --- the targets of issue 14 -----------------------------------------------------------------


def update_mode_targets(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 14's targets on the means over seeds, each only when the methods it needs ran:
    the default update mode (driftlane, aligned) against full re-embedding (driftlane_full)
    and joint retraining, and how flat its per-session cost stays. `met` is None when a
    figure is missing."""

    def costs(method: str, group: str, key: str) -> Any:
        return (((methods.get(method) or {}).get("session_costs") or {}).get(group) or {}
                ).get(key)

    def cumulative_cost(method: str) -> float | None:
        work = (methods.get(method) or {}).get("work") or {}
        total = work.get("cost_token_equivalents")
        return total if total is not None else costs(method, "cumulative",
                                                     "embedding_training_cost")

    def met(ok: Any, *figures: Any) -> bool | None:
        return bool(ok) if all_known(*figures) else None

    def flat(key: str, what: str) -> dict[str, Any]:
        ours = costs(DEFAULT_MODE, "last_over_second", key)
        measured = {f"{m}_last_over_second": costs(m, "last_over_second", key)
                    for m in (DEFAULT_MODE, FULL_MODE, "driftlane_compatible", "joint")
                    if m in methods}
        return {"target": f"{DEFAULT_MODE} (default update mode) {what}: last session / "
                          f"second session <= {MAX_LAST_OVER_SECOND:g}",
                "measured": measured,
                "met": met(ours is not None and ours <= MAX_LAST_OVER_SECOND, ours)}

    out: dict[str, dict[str, Any]] = {}
    if DEFAULT_MODE in methods and FULL_MODE in methods:
        gap = points(methods[DEFAULT_MODE].get("avg_ndcg@10"),
                     methods[FULL_MODE].get("avg_ndcg@10"))
        out["default_mode_close_to_full"] = {
            "target": f"{DEFAULT_MODE} (default update mode) avg nDCG@10 within "
                      f"{MAX_POINTS_BELOW_FULL:g} point of {FULL_MODE} (full re-embedding): "
                      f">= {FULL_MODE} - {MAX_POINTS_BELOW_FULL:g} point",
            "measured": {f"{DEFAULT_MODE}_minus_{FULL_MODE}_points": gap},
            "met": met(gap is not None and gap >= -MAX_POINTS_BELOW_FULL, gap)}
    if DEFAULT_MODE in methods and "joint" in methods:
        ours, joint = cumulative_cost(DEFAULT_MODE), cumulative_cost("joint")
        share = ratio(ours, joint)
        measured = {f"{DEFAULT_MODE}_cumulative_cost": ours, "joint_cumulative_cost": joint,
                    "cost_ratio": share}
        measured.update({f"{m}_cost_ratio": ratio(cumulative_cost(m), joint)
                         for m in (FULL_MODE, "driftlane_compatible") if m in methods})
        out["update_cost_vs_joint"] = {
            "target": f"{DEFAULT_MODE} (default update mode) cumulative embedding + training "
                      f"cost <= {MAX_COST_VS_JOINT:.2f} x joint's (forward-token equivalents)",
            "measured": measured,
            "met": met(share is not None and share <= MAX_COST_VS_JOINT, share)}
    if DEFAULT_MODE in methods:
        out["embedding_indexing_time_flat"] = flat("embedding_indexing_s",
                                                   "embedding + indexing wall seconds")
        out["bytes_added_flat"] = flat("bytes_added", "bytes added to the store")
    return out
