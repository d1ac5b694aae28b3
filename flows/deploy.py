"""Serve driftlane's deployments from one process: the one-command local set-up.

    python -m driftlane.flows.deploy --store ~/stores/lab --landing ~/landing [--interval 300]

serves three deployments against the Prefect server in PREFECT_API_URL:

- `driftlane-session/session`: one session folder into the store (parameter `session_url`);
- `driftlane-stream/stream`: several session folders in order (parameter `session_urls`);
- `driftlane-ingestion/ingestion`: every `--interval` seconds, every new complete session
  folder of the landing folder, in name order, exactly once (see flows/ingestion.py).

Each writes the store, so each has a concurrency limit of 1 with the ENQUEUE strategy: a run
that arrives while another run of the same deployment is going waits for it instead of being
cancelled. Flow runs execute in subprocesses of this one; stop it with Ctrl-C (the ingestion
schedule is paused on shutdown and active again when this is started again).

`prefect.yaml` declares the same deployments for a work pool (`prefect deploy --all`).
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from driftlane.infra.store import normalize_url

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_INTERVAL_S = 300


def store_tags(store_url: str, landing_url: str | None = None) -> list[str]:
    """Tags that say which store (and landing folder) a deployment's runs touch."""
    tags = ["driftlane", f"store:{normalize_url(store_url)}"]
    return tags + [f"landing:{normalize_url(landing_url)}"] if landing_url else tags


def build_deployments(store_url: str, landing_url: str,
                      interval: timedelta = timedelta(seconds=DEFAULT_INTERVAL_S),
                      config_path: str | None = None,
                      marker: str | None = None) -> list[RunnerDeployment]:
    """The session, stream and ingestion deployments of one store and landing folder."""
    # Imported here, not at the top, so that `--help` answers without loading torch.
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from driftlane.flows.ingestion import DEFAULT_MARKER, landing_flow
    from driftlane.flows.session import session_flow
    from driftlane.flows.stream import stream_flow
    from driftlane.infra.config import load_config

    store_url, landing_url = normalize_url(store_url), normalize_url(landing_url)
    # One run per deployment at a time; later ones queue (the store lock still guards
    # runs of different deployments on the same store).
    one_at_a_time = ConcurrencyLimitConfig(limit=1,
                                           collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    # Flow runs start as `python -m prefect.engine` subprocesses that import the flow; a
    # module entrypoint (driftlane.flows.session.session_flow) works from any working directory.
    options = {"concurrency_limit": one_at_a_time, "paused": False,
               "entrypoint_type": EntrypointType.MODULE_PATH}
    common = {"store_url": store_url}
    if config_path:
        common["config"] = load_config(config_path).model_dump(mode="json")
    return [
        session_flow.to_deployment(
            "session", parameters=common, tags=store_tags(store_url), **options,
            description=f"Run one session folder (session_url) as the next session of "
                        f"{store_url}."),
        stream_flow.to_deployment(
            "stream", parameters=common, tags=store_tags(store_url), **options,
            description=f"Run session folders (session_urls) in order into {store_url}."),
        landing_flow.to_deployment(
            "ingestion", interval=interval,
            parameters={**common, "landing_url": landing_url,
                        "marker": marker or DEFAULT_MARKER},
            tags=store_tags(store_url, landing_url), **options,
            description=f"Every {interval.total_seconds():g} s, run each new complete "
                        f"session folder of {landing_url} into {store_url}, in name order."),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m driftlane.flows.deploy",
        description="Serve driftlane's session, stream and scheduled ingestion deployments.")
    parser.add_argument("--store", required=True, help="store URL (local folder or fsspec URL)")
    parser.add_argument("--landing", required=True,
                        help="landing folder (any fsspec URL) watched by the ingestion schedule")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S,
                        help=f"seconds between ingestion runs (default {DEFAULT_INTERVAL_S})")
    parser.add_argument("--marker", default=None,
                        help="file that marks a session folder complete (default _READY)")
    parser.add_argument("--config", type=Path, default=None,
                        help="session config file (TOML/YAML/JSON) used by all deployments")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be positive")

    from prefect import serve

    from driftlane.infra.config import ConfigError

    try:
        deployments = build_deployments(args.store, args.landing,
                                        timedelta(seconds=args.interval),
                                        str(args.config) if args.config else None, args.marker)
    except ConfigError as exc:
        parser.error(str(exc))
    serve(*deployments)


if __name__ == "__main__":
    main()
