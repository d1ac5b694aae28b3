"""Reading safe formats (parquet, npy without pickle) from any fsspec URL."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pandas as pd


def read_parquet(url: str) -> pd.DataFrame:
    with fsspec.open(url, "rb") as f:
        return pd.read_parquet(f)


def read_npy(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)
