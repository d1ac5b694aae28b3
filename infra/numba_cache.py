"""Numba-compiled code (ranx's metrics) cached on disk, so a fresh process does not compile it.

ranx declares its kernels `cache=True`, but every `Qrels` and `Run` it builds goes through
numba's typed containers (`numba.typed.Dict` / `List`), whose helpers numba compiles again in
every process, uncached: about 5 s before a fresh process's first evaluation on 2 loaded
cores, on top of ranx's own kernels the first time (`benchmarks/first_evaluation.py`).
`cache_compiled_kernels()` points numba's on-disk cache at a writable folder of ours and
turns on caching for those typed-container helpers, so only the first process on a machine
compiles them.

Call it before ranx is imported: ranx's kernels pick their cache folder when they are defined.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from driftlane.infra.logs import module_logger

logger = module_logger(__name__)

_lock = threading.Lock()
_done = False


def kernel_cache_dir() -> Path:
    """`$NUMBA_CACHE_DIR` when set, else ~/.cache/driftlane/numba."""
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    return Path(chosen) if chosen else Path.home() / ".cache" / "driftlane" / "numba"


def cache_compiled_kernels() -> None:
    """Cache numba's compiled code across processes (idempotent; see the module doc).

    Where no cache folder can be written, numba keeps compiling in memory, as before.
    """
    global _done
    with _lock:
        if _done:
            return
        _done = True
        folder = kernel_cache_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.warning("numba cache folder %s unusable (%s): compiled kernels are not "
                           "kept across processes", folder, exc)
            return
        os.environ.setdefault("NUMBA_CACHE_DIR", str(folder))
        from numba.core import config

        # numba read the environment when it was imported; it may have been imported already
        config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
        _cache_typed_containers()


def _cache_typed_containers() -> None:
    """Give the jitted helpers of numba.typed.Dict / List an on-disk cache (numba leaves them
    uncached; ranx builds every Qrels and Run with them)."""
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher
    from numba.typed import typeddict, typedlist

    for module in (typeddict, typedlist):
        for dispatcher in vars(module).values():
            if isinstance(dispatcher, CPUDispatcher) and isinstance(dispatcher._cache, NullCache):
                try:
                    dispatcher.enable_caching()
                except RuntimeError as exc:  # numba found no writable cache location
                    logger.warning("numba helpers compile per process: %s", exc)
                    return
