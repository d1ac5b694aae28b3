"""The continual benchmark's report, pure: Markdown tables and PNG plots of a results dict
(as `benchmarks.continual` writes to continual_<config>.json): `<stem>_curve.png`,
`<stem>_driftlane_matrix.png` and `<stem>_session_cost.png` (issue 14: each session's cost
against the session index, one line per method).

Covered by tests/test_continual_bench.py (Markdown, and that the plots are written); the plots'
looks by the committed PNGs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.continual_costs import MAX_LAST_OVER_SECOND
from benchmarks.continual_results import STAGES, TEST_METRICS
from benchmarks.continual_sampling import sampling_lines

# The four figures of the report's main table, per method and per seed.
HEADLINE = ("avg_ndcg@10", "avg_success@5", "avg_recall@10", "bwt_ndcg@10")


# --- Markdown ------------------------------------------------------------------------------


def format_score(value: float | None, std: float | None = None, digits: int = 4) -> str:
    """`value` to `digits` decimals (with ` ± std` when given); "n/a" for None."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def _fmt_met(met: bool | None) -> str:
    return {True: "met", False: "not met", None: "n/a"}[met]


def _fmt_measured(measured: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {'n/a' if v is None else v}" for k, v in measured.items())


def _millions(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}"


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def render_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results dict (as written to continual_<config>.json)."""
    methods: Mapping[str, Mapping[str, Any]] = results["methods"]
    config = results["config"]
    env = results.get("environment", {})
    kind = "ad-hoc run" if config.get("kind") == "ad hoc" else "configuration"
    lines = [f"# Continual benchmark, `{config['name']}` {kind}", "",
             f"Command: `{results['command']}`. Stream: {config['description']}. "
             f"Seeds: {', '.join(str(s) for s in config['seeds'])}.", ""]
    if env:
        load = env.get("load_average_during_run")
        lines += [f"Machine: {env.get('device_name', '?')}, {env.get('cpu_count', '?')} CPUs, "
                  f"torch {env.get('torch', '?')} ({env.get('torch_threads', '?')} threads)"
                  + (f"; load average during the run: mean {load['mean']:.1f}, max "
                     f"{load['max']:.1f} (other work shared the machine)" if load else "")
                  + ".", ""]
    lines += ["Final average over the sessions' test queries after the last session (mean over "
              "seeds ± sample std); BWT = backward transfer of nDCG@10 (negative: forgetting).",
              "", "| method | nDCG@10 | Success@5 | Recall@10 | BWT nDCG@10 |",
              "|---|---|---|---|---|"]
    for name, m in methods.items():
        std = m.get("std", {})
        lines.append(f"| {name} | "
                     + " | ".join(format_score(m.get(k), std.get(k)) for k in HEADLINE) + " |")
    lines += _cost_lines(methods)
    lines += _session_cost_lines(methods)
    lines += ["", "## Targets (issues 4, 13 and 14)", "", "| target | measured | met |",
              "|---|---|---|"]
    for target in results["targets"].values():
        lines.append(f"| {target['target']} | {_fmt_measured(target['measured'])} | "
                     f"{_fmt_met(target['met'])} |")
    lines += _significance_lines(results.get("significance"))
    lines += sampling_lines(methods)
    lines += _curve_lines(methods)
    ours = methods.get("driftlane")
    if ours and ours.get("matrix_ndcg@10"):
        sessions = ours["sessions"]
        lines += ["", "## driftlane: nDCG@10 matrix R (row: after session i; column: session j)",
                  "", "| after \\ on | " + " | ".join(sessions) + " |",
                  "|---" * (len(sessions) + 1) + "|"]
        for name, row in zip(sessions, ours["matrix_ndcg@10"], strict=True):
            lines.append(f"| {name} | " + " | ".join(format_score(v) for v in row) + " |")
    lines += ["", "## Per seed", "", "| method | seed | nDCG@10 | Success@5 | Recall@10 | "
              "BWT nDCG@10 | cost (M) | CPU s | wall s | mean load during the run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        for seed, run in m.get("seeds", {}).items():
            load = (run.get("load_average") or {}).get("mean")
            cells = [format_score(run.get(k)) for k in HEADLINE]
            cells += [_millions((run.get("work") or {}).get("cost_token_equivalents")),
                      format_score(run.get("cpu_s"), digits=0),
                      format_score(run.get("wall_s"), digits=0), format_score(load, digits=1)]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    errors = results.get("errors") or {}
    if errors:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {key}: {message}" for key, message in errors.items()]
    return "\n".join(lines) + "\n"


def _cost_lines(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Cost in load-independent units, then CPU and wall seconds (means over seeds)."""
    joint = ((methods.get("joint") or {}).get("work") or {}).get("cost_token_equivalents")
    lines = ["", "## Cost", "",
             "Load-independent units, read back from each store: texts and tokens encoded "
             "(every text of its embedding cache, through its windows: new documents, memory "
             "re-embedded after each new model, the whole corpus too in update mode full, "
             "queries), training steps, examples "
             "(steps x batch size) and their tokens (each text cut at the training length). "
             "Cost = tokens encoded + 3 x tokens trained (a backward pass costs about two "
             "forward passes), in millions of forward-token equivalents. CPU s: process time "
             "of the run; wall s per stage: the sessions' timings.json. Both depend on the "
             "machine and its load; the targets use the cost.", "",
             "| method | cost (M) | / joint | tokens encoded (M) | texts encoded | steps | "
             "examples trained | tokens trained (M) | CPU s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        work = m.get("work") or {}
        encoded, trained = work.get("encoded") or {}, work.get("trained") or {}
        cost = work.get("cost_token_equivalents")
        ratio = "n/a" if cost is None or not joint else f"{cost / joint:.2f}"
        cells = [_millions(cost), ratio, _millions(encoded.get("tokens")),
                 _count(encoded.get("texts")), _count(trained.get("steps")),
                 _count(trained.get("examples")), _millions(trained.get("tokens")),
                 format_score(m.get("cpu_s"), digits=0), format_score(m.get("wall_s"),
                                                                      digits=0)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Wall seconds per stage, summed over the stream (embedding = the new "
              "documents + re-embedding memory with each new model, and the corpus in update "
              "mode full, the new documents in mode compatible; indexing = the index shards "
              "and, in mode aligned, the map between models; training = sampling + "
              "fine-tuning). Prefect's task-run records of the same runs are in the JSON "
              "(`time_s_prefect`).", "",
              "| method | " + " | ".join(f"{s} s" for s in STAGES) + " |",
              "|---" * (len(STAGES) + 1) + "|"]
    for name, m in methods.items():
        times = m.get("time_s")
        lines.append(f"| {name} | " + " | ".join(
            format_score(None if times is None else times[s], digits=0) for s in STAGES) + " |")
    return lines


def _megabytes(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}"


def _ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _session_cost_lines(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per method and session: embedding + indexing seconds, embedding + training cost and
    bytes added (`session_costs`, means over seeds); then the sums and last / second ratios."""
    costs = {name: m["session_costs"] for name, m in methods.items() if m.get("session_costs")}
    if not costs:
        return []
    lines = ["", "## Cost per session (issue 14)", "",
             "Per session index (means over seeds): wall seconds of embedding + indexing and of "
             "embedding + training (timings.json), the embedding + training cost in millions of "
             "forward-token equivalents (tokens encoded during the session + 3 x tokens "
             "trained; a cache shard belongs to the session whose manifest was written first "
             "after it) and the megabytes the session added to the store: its folder "
             "`sessions/<NNNNN>_<name>/` + the embedding-cache files (`cache/`) written during "
             "it (Prefect's task results not counted). Flat is a last / second session ratio "
             f"<= {MAX_LAST_OVER_SECOND:g}.", "",
             "| method | session | embedding + indexing s | embedding + training s | "
             "embedding + training cost (M) | bytes added (MB) | session folder (MB) | "
             "cache (MB) |", "|---|---|---|---|---|---|---|---|"]
    for name, c in costs.items():
        sessions = c.get("sessions") or []
        n = max((len(c[k]) for k in ("embedding_indexing_s", "embedding_training_cost",
                                     "bytes_added") if c.get(k)), default=len(sessions))

        for i in range(n):
            label = f"{i} {sessions[i]}" if i < len(sessions) else str(i)
            value = {k: None if c.get(k) is None else c[k][i] for k in (
                "embedding_indexing_s", "embedding_training_s", "embedding_training_cost",
                "bytes_added", "session_bytes", "cache_bytes")}
            cells = [format_score(value["embedding_indexing_s"], digits=1),
                     format_score(value["embedding_training_s"], digits=1),
                     _millions(value["embedding_training_cost"]),
                     _megabytes(value["bytes_added"]), _megabytes(value["session_bytes"]),
                     _megabytes(value["cache_bytes"])]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    joint = ((costs.get("joint") or {}).get("cumulative") or {}).get("embedding_training_cost")
    lines += ["", "Over the stream: sums, and the last session over the second.", "",
              "| method | cost (M) | / joint | embedding + indexing s | bytes added (MB) | "
              "last / second: embedding + indexing s | last / second: bytes added | "
              "last / second: cost |", "|---|---|---|---|---|---|---|---|"]
    for name, c in costs.items():
        total, flat = c.get("cumulative") or {}, c.get("last_over_second") or {}
        cost = total.get("embedding_training_cost")
        share = "n/a" if cost is None or not joint else f"{cost / joint:.2f}"
        cells = [_millions(cost), share,
                 format_score(total.get("embedding_indexing_s"), digits=1),
                 _megabytes(total.get("bytes_added")),
                 _ratio_text(flat.get("embedding_indexing_s")),
                 _ratio_text(flat.get("bytes_added")),
                 _ratio_text(flat.get("embedding_training_cost"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _significance_lines(significance: Mapping[str, Any] | None) -> list[str]:
    pairs = (significance or {}).get("pairs")
    if not pairs:
        return ["", "## Paired tests, pooled over seeds", "",
                (significance or {}).get("note", "Not computed.")]
    lines = ["", "## Paired tests, pooled over seeds", "",
             "Per query on the last session's row (every session's test queries, each query "
             "once, against the whole corpus): a query's difference a - b is its mean over the "
             "seeds both methods ran; two-sided paired t-test over the queries (* p < "
             f"{significance['max_p']}) and a bootstrap 95% interval of the mean difference "
             f"({significance['bootstrap']['resamples']:,} resamples of the queries). The mean "
             "is over queries (sessions weighted by their number of test queries), unlike the "
             "averages above. W/T/L: queries where a wins / ties / loses.", "",
             "| a vs b | queries | seeds | nDCG@10 a - b (points) [95% interval] | nDCG@10 p | "
             "Success@5 p | Recall@10 p | nDCG@10 W/T/L |",
             "|---|---|---|---|---|---|---|---|"]
    for pair, metrics in pairs.items():
        ndcg = metrics["ndcg@10"]
        low, high = (v * 100 for v in ndcg["ci95"])
        cells = [str(ndcg["n_queries"]), str(len(ndcg["seeds"])),
                 f"{ndcg['mean_difference'] * 100:+.2f} [{low:+.2f}, {high:+.2f}]"]
        for m in TEST_METRICS:
            p = metrics[m]["p_value"]
            cells.append(f"{p:.3g}" + (" *" if metrics[m]["significant"] else ""))
        cells.append(f"{ndcg['wins']}/{ndcg['ties']}/{ndcg['losses']}")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return lines


def _curve_lines(methods: Mapping[str, Mapping[str, Any]]) -> list[str]:
    sessions = next((m["sessions"] for m in methods.values() if m.get("sessions")), None)
    if not sessions:
        return []
    lines = ["", "## Average nDCG@10 over the sessions seen, after each session", "",
             "| method | " + " | ".join(sessions) + " |", "|---" * (len(sessions) + 1) + "|"]
    for name, m in methods.items():
        curve = m.get("curve_ndcg@10") or [None] * len(sessions)
        lines.append(f"| {name} | " + " | ".join(format_score(v) for v in curve) + " |")
    return lines


# --- plots ---------------------------------------------------------------------------------


def plot_results(results: Mapping[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """PNG plots: average nDCG@10 after each session per method; driftlane's R heatmap; the
    cost of each session per method (`plot_session_costs`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    written: list[Path] = []
    sessions = next((m["sessions"] for m in methods.values() if m.get("sessions")), None)
    if sessions:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, m in methods.items():
            curve = m.get("curve_ndcg@10")
            if curve:
                ax.plot(range(len(curve)), [np.nan if v is None else v for v in curve],
                        marker="o", label=name)
        ax.set_xticks(range(len(sessions)), sessions, rotation=20, ha="right")
        ax.set_ylabel("average nDCG@10 over sessions seen")
        ax.set_title(f"Continual benchmark ({results['config']['name']}): after each session")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}_curve.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    ours = methods.get("driftlane", {})
    if ours.get("matrix_ndcg@10"):
        matrix = np.array([[np.nan if v is None else v for v in row]
                           for row in ours["matrix_ndcg@10"]])
        names = ours["sessions"]
        fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 1.1 * len(names) + 1.8))
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(np.nanmax(matrix), 1e-9))
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center",
                            color="white" if matrix[i, j] < 0.6 * np.nanmax(matrix) else "black",
                            fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("evaluated session j")
        ax.set_ylabel("after training on session i")
        ax.set_title("driftlane: nDCG@10 R[i][j]")
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"{stem}_driftlane_matrix.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    session_plot = plot_session_costs(results, out_dir, stem)
    return written + ([session_plot] if session_plot else [])


# (key in session_costs, y label, scale) of the panels of the per-session cost plot
SESSION_PANELS = (
    ("embedding_training_cost", "embedding + training cost\n(M forward-token equivalents)", 1e6),
    ("embedding_indexing_s", "embedding + indexing\n(wall seconds)", 1.0),
    ("bytes_added", "bytes added to the store\n(MB: session folder + cache)", 1e6),
)


def plot_session_costs(results: Mapping[str, Any], out_dir: Path, stem: str) -> Path | None:
    """`<stem>_session_cost.png`: per panel (SESSION_PANELS) each session's cost against the
    session index, one line per method; None when no method has per-session costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = {name: m["session_costs"] for name, m in results["methods"].items()
             if m.get("session_costs")}
    if not costs:
        return None
    sessions = next((c["sessions"] for c in costs.values() if c.get("sessions")), None)
    fig, axes = plt.subplots(1, len(SESSION_PANELS), figsize=(15, 4.4))
    for ax, (key, label, scale) in zip(axes, SESSION_PANELS, strict=True):
        for name, c in costs.items():
            column = c.get(key)
            if column:
                ax.plot(range(len(column)),
                        [np.nan if v is None else v / scale for v in column], marker="o",
                        label=name)
        if sessions:
            ax.set_xticks(range(len(sessions)),
                          [f"{i}: {s}" for i, s in enumerate(sessions)], rotation=20,
                          ha="right", fontsize=8)
        ax.set_xlabel("session index")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Continual benchmark ({results['config']['name']}): cost of each session")
    fig.tight_layout()
    path = out_dir / f"{stem}_session_cost.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
