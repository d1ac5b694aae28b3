"""Sampling diagnostics of the continual benchmark's stores (issues 13 and 15): how often a
pseudo-positive is a judged positive, and how often a mined hard negative is one (a false
negative), read back from each session's training/sampling.json and pooled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# (rate, count) pairs of `training/sampling.json`'s diagnostics, pooled by `sampling_diagnostics`
SAMPLING_RATES = (("pseudo_positive_precision", "pseudo_positives_judged"),
                  ("hard_negative_false_negative_rate", "hard_negatives_judged"))


def sampling_diagnostics(store_url: str) -> dict[str, Any]:
    """Each trained session's sampling diagnostics (training/sampling.json) and each rate
    pooled over the stream, weighted by the number of judged cases (None when none)."""
    from driftlane.infra.store import Store

    store = Store(store_url)
    sessions = []
    for manifest in store.sessions():
        if "training/sampling.json" in manifest.files:
            summary = store.read_json(manifest, "training/sampling.json")
            sessions.append({"session": manifest.name, **summary.get("diagnostics", {})})
    pooled: dict[str, Any] = {"per_session": sessions}
    for rate, count in SAMPLING_RATES:
        judged = sum(s.get(count) or 0 for s in sessions)
        hits = sum((s.get(rate) or 0.0) * (s.get(count) or 0) for s in sessions)
        pooled[rate], pooled[count] = (hits / judged if judged else None), judged
    return pooled



def sampling_lines(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Pseudo-positive precision and the false-negative rate of hard negatives, pooled over
    seeds and sessions (qrels read for these figures only)."""
    rows = []
    for name, m in methods.items():
        runs = [run.get("sampling") for run in m.get("seeds", {}).values()]
        runs = [r for r in runs if r]
        if not runs:
            continue
        cells = []
        for rate, count in SAMPLING_RATES:
            judged = sum(r.get(count) or 0 for r in runs)
            hits = sum((r.get(rate) or 0.0) * (r.get(count) or 0) for r in runs)
            cells.append(f"{hits / judged:.4f} ({judged:,})" if judged else "n/a")
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    if not rows:
        return []
    return ["", "## Sampling diagnostics", "",
            "Pooled over seeds and sessions, with the number of judged cases: how often a "
            "pseudo-positive is a judged positive of its query (self-supervised mode), and how "
            "often a mined hard negative of a query example is (a false negative; in labeled "
            "mode the query's own training positives are never negatives, so only judgments of "
            "other splits count). Qrels are read for these figures only.", "",
            "| method | pseudo-positive precision | hard negatives that are judged positives |",
            "|---|---|---|", *rows]
