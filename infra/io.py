"""Safe formats (parquet, npy without pickle) from any fsspec URL, and atomic local writes."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import fsspec
import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def read_parquet(url: str) -> pd.DataFrame:
    import pandas as pd

    with fsspec.open(url, "rb") as f:
        return pd.read_parquet(f)


def read_npy(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:  # seekable: np.load reads it without a copy
        return np.load(f, allow_pickle=False)


@contextlib.contextmanager
def naming_path(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an OSError that names no file (a full disk while writing through a file
    object, say) as the same error naming `path`, so its message says where it happened."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a local file through `write(temporary path)`, then rename it onto `path`.

    The temporary name is unique and lies beside `path` (same filesystem, so the rename is
    atomic): a reader sees the old file or the whole new one, never a partial one, and a
    failed write leaves no temporary file behind.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with naming_path(path):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_fs_atomically(fs: fsspec.AbstractFileSystem, path: str,
                        write: Callable[[IO[bytes]], None]) -> None:
    """`write_atomically` for any fsspec filesystem: write through `write(handle)` to a unique
    temporary name beside `path`, then move it onto `path` (atomic on POSIX and NFS; on an
    object store the move is a copy, so readers trust manifests, not file presence). A
    failure removes the temporary file and names `path` in an OSError that named no file."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with naming_path(fs.unstrip_protocol(path)):
            with fs.open(tmp, "wb") as handle:
                write(handle)
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """`np.save` without pickle, atomically (see `write_atomically`)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return write_atomically(path, write)
