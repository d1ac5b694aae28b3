"""Safe formats (parquet, npy without pickle) from any fsspec URL, and atomic local writes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

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


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a local file through `write(temporary path)`, then rename it onto `path`.

    The temporary name is unique and lies beside `path` (same filesystem, so the rename is
    atomic): a reader sees the old file or the whole new one, never a partial one, and a
    failed write leaves no temporary file behind.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """`np.save` without pickle, atomically (see `write_atomically`)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return write_atomically(path, write)
