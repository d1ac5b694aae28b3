"""What the continual benchmark runs: its command line, checked before anything starts.

Any stream (issue 13): `--datasets NAME_OR_PATH ...` (BEIR folders: names under
--datasets-dir, or paths; cut into sessions as the configuration cuts its own) or `--stream
DIR` (a stream written by `driftlane make-stream`) run the methods with the settings of
`--config` (default small) and write continual_<name>.* (name from --name, else from the
collections or the stream folder) into --out-dir (default: the run's --work folder).

Run:  python -m benchmarks.continual --config small
      python -m benchmarks.continual --config medium
      python -m benchmarks.continual --datasets ~/beir/a ~/beir/b --methods zero_shot driftlane
      (or `driftlane bench ...`)
Writes benchmarks/results/continual_<config>.json, .md and three PNG plots (`_curve`: average
nDCG@10 after each session per method; `_driftlane_matrix`: driftlane's matrix R as a heatmap;
`_session_cost`: each session's embedding + training cost, embedding + indexing seconds and
bytes added against the session index, one line per method); `--methods` or `--seeds` other
than the configuration's write continual_<config>_subset.* instead (the update modes alone:
`--methods zero_shot driftlane driftlane_full driftlane_compatible joint`). Stores, stream and
per-run logs go under --work (default ~/.cache/driftlane/bench/<name>); every store starts
fresh unless --resume keeps the method/seed runs that an interrupted run with the same
configuration finished. The configurations need a checkout of the repository: they read the
collections from ../shared/datasets next to the checkout (else --datasets-dir or
$DRIFTLANE_DATASETS) and write benchmarks/results/ (else --out-dir); a missing folder stops
the run with one line.

"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.continual_configs import CONFIGS, METHODS, BenchConfig
from benchmarks.continual_runs import REPO_ROOT

DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_WORK_ROOT = Path("~/.cache/driftlane/bench")


class BenchUsageError(ValueError):
    """A command line the benchmark cannot run; the message is one line."""


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark run: the configuration (or an ad-hoc one built on a configuration's
    settings), methods, seeds and folders, and the stem of its result files."""

    bench: BenchConfig
    settings_from: str  # the configuration whose settings the run uses
    ad_hoc: bool
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    work: Path
    out_dir: Path
    stem: str
    datasets_dir: str | None
    resume: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.continual",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small",
                        help=f"settings and stream: {', '.join(CONFIGS)} (default small); "
                             "with --datasets or --stream, the settings only")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="NAME_OR_PATH",
                        help="an ad-hoc stream of these BEIR collections (names under "
                             "--datasets-dir, or paths), one session each, in this order")
    parser.add_argument("--stream", default=None, metavar="DIR",
                        help="an ad-hoc run on a stream written by `driftlane make-stream`")
    parser.add_argument("--name", default=None,
                        help="an ad-hoc run's name (default: from the collections or the "
                             "stream folder); it writes continual_<name>.*")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the results go (default: benchmarks/results for a "
                             "configuration, the --work folder for an ad-hoc run)")
    parser.add_argument("--work", type=Path, default=None,
                        help="stream, stores, scratch and logs (default "
                             "~/.cache/driftlane/bench/<name>)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"a subset of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="default: the configuration's seeds")
    parser.add_argument("--datasets-dir", default=None,
                        help="where the collections are (default: $DRIFTLANE_DATASETS, else "
                             "../shared/datasets)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the method/seed runs an interrupted run of the same "
                             "configuration finished (their figures and times are from then)")
    return parser


def split_values(values: Sequence[str] | None) -> list[str]:
    """Values given one by one, repeated or comma-separated ("a,b" "c" -> a, b, c)."""
    return [v for value in values or [] for v in value.split(",") if v.strip()]


def ad_hoc_name(datasets: Sequence[str], stream: str | None) -> str:
    """An ad-hoc run's name: the stream folder's name, else the collections' folder names
    joined by '-'; characters other than letters, digits, '_', '-', '.' become '_', and a name
    longer than 60 characters keeps 51 of them and a digest of the whole."""
    parts = [Path(stream).expanduser().resolve().name] if stream is not None else [
        d.rstrip("/").rsplit("/", 1)[-1] for d in datasets]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)).strip("._-") or "adhoc"
    if len(name) > 60:
        name = f"{name[:51]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def _checked_name(name: str, given: bool) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise BenchUsageError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it "
                              "names the result files)")
    taken = {c for c in CONFIGS} | {f"{c}_subset" for c in CONFIGS}
    if name in taken:
        how = "choose another --name" if given else "pass --name"
        raise BenchUsageError(f"the name {name!r} belongs to a configuration's results "
                              f"(continual_{name}.*); {how}")
    return name


def _stream_problem(stream: str) -> str | None:
    folder = Path(stream).expanduser()
    if not folder.is_dir():
        return f"--stream {folder}: no such folder"
    manifest = folder / "stream.json"
    if not manifest.is_file():
        return (f"--stream {folder}: no stream.json (it takes a folder written by "
                "`driftlane make-stream`)")
    try:
        names = [s["name"] for s in json.loads(manifest.read_text())["sessions"]]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest}: not a stream manifest ({type(exc).__name__}: {exc})"
    absent = [n for n in names if not (folder / n).is_dir()]
    if not names or absent:
        return f"{manifest}: session folders missing: {', '.join(absent) or '(none listed)'}"
    return None


def missing_folder_error(out_dir: Path | None, datasets_dir: str | None,
                         datasets: Sequence[str]) -> str | None:
    """What keeps a run from starting, in one line, or None. Checked: the results folder (when
    --out-dir is not given: benchmarks/results of this checkout), the datasets folder with the
    collections named by a bare name (when it is local), and collections given as local
    paths."""
    from driftlane.tasks.stream_builder import default_datasets_dir

    if out_dir is None and not DEFAULT_OUT_DIR.is_dir():
        return (f"no results folder {DEFAULT_OUT_DIR}: the benchmarks run from a checkout of "
                "the repository (see benchmarks/README.md), or pass --out-dir")
    paths = [Path(d.removeprefix("file://")).expanduser() for d in datasets
             if "/" in d and ("://" not in d or d.startswith("file://"))]
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        return f"no collection folder {', '.join(missing)}"
    bare = [name for name in datasets if "/" not in name]
    if not bare:
        return None
    folder = datasets_dir or default_datasets_dir()
    if "://" in folder and not folder.startswith("file://"):
        return None  # a remote folder is read (and checked) when the stream is built
    local = Path(folder.removeprefix("file://")).expanduser().resolve()
    if not local.is_dir():
        return (f"no datasets folder {local}: the benchmarks read ../shared/datasets next to "
                "a checkout of the repository; pass --datasets-dir or set $DRIFTLANE_DATASETS")
    absent = [name for name in bare if not (local / name).is_dir()]
    if absent:
        return f"the datasets folder {local} has no {', '.join(absent)}"
    return None


def request_from_argv(argv: Sequence[str] | None = None) -> BenchRequest:
    """What a command line asks to run; BenchUsageError (one line) for what cannot run.

    Nothing is written: the folders are checked, not created.
    """
    args = build_parser().parse_args(argv)
    if args.config not in CONFIGS:
        raise BenchUsageError(f"--config must be one of {', '.join(CONFIGS)}, got "
                              f"{args.config!r}")
    base = CONFIGS[args.config]
    datasets = split_values(args.datasets)
    if args.datasets is not None and not datasets:
        raise BenchUsageError("--datasets needs at least one collection")
    if datasets and args.stream is not None:
        raise BenchUsageError("--datasets and --stream both give the stream; pass one")
    ad_hoc = bool(datasets) or args.stream is not None
    if args.name is not None and not ad_hoc:
        raise BenchUsageError("--name names an ad-hoc run (--datasets or --stream); a "
                              "configuration's results are continual_<config>.*")
    if args.stream is not None and args.datasets_dir is not None:
        raise BenchUsageError("--datasets-dir does not apply to --stream (its sessions are "
                              "built already)")
    unknown = [m for m in split_values(args.methods) if m not in METHODS]
    if unknown:
        raise BenchUsageError(f"unknown method {unknown[0]!r}; the methods are "
                              f"{', '.join(METHODS)}")
    chosen = set(split_values(args.methods)) or set(METHODS)
    methods = tuple(m for m in METHODS if m in chosen)  # report order
    seeds = tuple(dict.fromkeys(args.seeds)) if args.seeds else base.seeds
    if any(seed < 0 for seed in seeds):
        raise BenchUsageError("--seeds must be non-negative")

    if not ad_hoc:
        bench = base
        complete = methods == tuple(METHODS) and seeds == base.seeds
        stem = f"continual_{bench.name}" + ("" if complete else "_subset")
    else:
        name = _checked_name(args.name or ad_hoc_name(datasets, args.stream),
                             given=args.name is not None)
        source = (f"the stream {Path(args.stream).expanduser().resolve()}"
                  if args.stream is not None else
                  f"{', '.join(datasets)}, one session each, cut as the {base.name} "
                  "configuration cuts its collections")
        bench = dataclasses.replace(
            base, name=name, datasets=tuple(datasets),
            stream=None if args.stream is None else
            str(Path(args.stream).expanduser().resolve()),
            description=f"ad-hoc: {source}; settings of the {base.name} configuration "
                        f"({base.description})")
        stem = f"continual_{name}"
    work = (args.work or DEFAULT_WORK_ROOT / bench.name).expanduser().resolve()
    out_dir = args.out_dir or (work if ad_hoc else None)  # None: DEFAULT_OUT_DIR
    problem = (_stream_problem(args.stream) if args.stream is not None else
               missing_folder_error(out_dir, args.datasets_dir, bench.datasets))
    if problem:
        raise BenchUsageError(problem)
    return BenchRequest(bench=bench, settings_from=base.name, ad_hoc=ad_hoc, methods=methods,
                        seeds=seeds, work=work,
                        out_dir=(out_dir or DEFAULT_OUT_DIR).expanduser().resolve(),
                        stem=stem, datasets_dir=args.datasets_dir, resume=args.resume)
