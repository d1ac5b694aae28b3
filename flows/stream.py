"""A stream: several session folders run in order against one store, each as a subflow."""

from __future__ import annotations

from prefect import flow, tags

from driftlane.flows.session import session_flow, session_tags
from driftlane.infra.config import SessionConfig


@flow(name="driftlane-stream", flow_run_name="stream of {store_url}")
def stream_flow(session_urls: list[str], store_url: str,
                config: SessionConfig = SessionConfig()) -> list[dict]:  # noqa: B008
    """Run each session folder in the order given; already published ones are no-ops."""
    results = []
    for url in session_urls:
        with tags(*session_tags(url, store_url)):
            results.append(session_flow(url, store_url, config))
    return results
