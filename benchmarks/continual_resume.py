"""--resume of the continual benchmark: a finished method/seed run is recorded with its
settings, and kept by a later run whose configuration it still matches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["load_finished_run", "save_finished_run"]


def save_finished_run(work: Path, method: str, seed: int, config: Any,
                      run: dict[str, Any]) -> None:
    """Record a finished method/seed run, with its settings and their digest, for --resume."""
    path = work / "runs" / f"{method}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config_digest": config.digest(),
                                "settings": config.model_dump(mode="json"), "run": run},
                               indent=2))


def load_finished_run(work: Path, method: str, seed: int, config: Any,
                      n_sessions: int) -> dict[str, Any] | None:
    """The summary an earlier run saved for this method and seed, if its store is complete
    and its settings are this configuration's (--resume).

    The saved settings are read with today's configuration schema, so a field added since
    takes its default: a run stays valid when new options leave its behaviour unchanged, and
    not when a field it set was removed or a value differs.
    """
    from pydantic import ValidationError

    from driftlane.infra.store import Store

    path = work / "runs" / f"{method}_seed{seed}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    same = saved["config_digest"] == config.digest()
    if not same and "settings" in saved:
        try:
            same = type(config).model_validate(saved["settings"]).digest() == config.digest()
        except ValidationError:
            same = False
    if not same or len(Store(saved["run"]["store"]).sessions()) != n_sessions:
        return None
    return saved["run"]
