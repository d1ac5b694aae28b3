"""How the `driftlane` command ends when something goes wrong: one line and an exit code.

Every failure of a command ends with exactly one line `error: <what>: <why>` on stderr and one
of these exit codes:

    1  a bug (anything not foreseen below); the line says to rerun with --debug
    2  bad input or usage: a malformed session, a missing or wrong path, a bad config value
    3  the store is busy: another run holds it, or this run lost its lock
    4  the environment: permission denied, read-only or full disk, a damaged store

The traceback goes to stderr only with `--debug` (inside a flow it is in the Prefect run log
too, where it belongs): Prefect's console handler prints log records without their traceback
unless `--debug` is given.
"""

from __future__ import annotations

import errno
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer

EXIT_BUG, EXIT_INPUT, EXIT_BUSY, EXIT_ENVIRONMENT = 1, 2, 3, 4

_debug = False

_ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                       errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                       errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


class CommandError(Exception):
    """A failure the command itself diagnosed: its message and exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


def _os_error_line(exc: OSError) -> str:
    cause = _ENVIRONMENT_ERRNOS.get(exc.errno) or exc.strerror or type(exc).__name__
    path = exc.filename if exc.filename is not None else None
    return f"{path}: {cause}" if path else cause


def classify(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message for an exception that ended a command."""
    from driftlane.infra.config import ConfigError
    from driftlane.infra.lock import LockLost, StoreLocked
    from driftlane.infra.store import DamagedStore, StoreError
    from driftlane.tasks.session_files import SessionFormatError
    from driftlane.tasks.stream_plan import StreamBuildError

    if isinstance(exc, CommandError):
        return exc.code, str(exc)
    if isinstance(exc, SessionFormatError | ConfigError | StreamBuildError):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, StoreLocked | LockLost):
        return EXIT_BUSY, str(exc)
    if isinstance(exc, DamagedStore):
        return EXIT_ENVIRONMENT, str(exc)
    if isinstance(exc, StoreError):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return EXIT_INPUT, _os_error_line(exc)
    if isinstance(exc, OSError):
        return EXIT_ENVIRONMENT, _os_error_line(exc)
    if isinstance(exc, MemoryError):
        return EXIT_ENVIRONMENT, "out of memory"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return EXIT_BUG, (f"internal error: {type(exc).__name__}: {text} "
                      "(run again with --debug for the traceback)")


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextmanager
def reported(debug: bool) -> Iterator[None]:
    """Turn any exception raised inside into one line on stderr and the exit code it gets."""
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=130) from None
    except BaseException as exc:  # noqa: BLE001 - the one place every failure ends
        code, message = classify(exc)
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        typer.secho(f"error: {_one_line(message)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=code) from None


def fail(message: str, code: int = EXIT_INPUT) -> None:
    """End the command with `message` and `code` (through `reported`)."""
    raise CommandError(message, code)


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, leaving out its traceback and stack."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            # other handlers (the run log) still get the traceback
            record.exc_info, record.exc_text, record.stack_info = saved


def console_without_tracebacks() -> None:
    """Prefect's console output keeps its log lines but not their tracebacks (unless
    `--debug`). Call it before a flow runs; it imports Prefect."""
    if _debug:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    seen: set[int] = set()
    for logger in [logging.getLogger(), *[logging.getLogger(n) for n in
                                          list(logging.root.manager.loggerDict)]]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and id(handler) not in seen:
                seen.add(id(handler))
                if not isinstance(handler.formatter, _WithoutTraceback):
                    handler.setFormatter(_WithoutTraceback(handler.formatter))


def command(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a typer command so that it ends through `reported` (see the module doc)."""
    import functools

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with reported(_debug):
            return function(*args, **kwargs)

    return wrapper


def set_debug(on: bool) -> None:
    """`--debug`: print tracebacks (and keep them in Prefect's console output)."""
    global _debug
    _debug = on
