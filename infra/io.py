"""Reading safe formats (parquet, npy without pickle) from any fsspec URL."""

from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd


def read_parquet(url: str) -> pd.DataFrame:
    with fsspec.open(url, "rb") as f:
        return pd.read_parquet(f)


def read_npy(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:  # seekable: np.load reads it without a copy
        return np.load(f, allow_pickle=False)
