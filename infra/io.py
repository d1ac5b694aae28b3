"""Reading safe formats (parquet, npy without pickle, JSON) from any fsspec URL."""

from __future__ import annotations

import io
import json
from typing import Any

import fsspec
import numpy as np
import pandas as pd


def read_parquet(url: str) -> pd.DataFrame:
    with fsspec.open(url, "rb") as f:
        return pd.read_parquet(f)


def read_npy(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def read_json(url: str) -> Any:
    with fsspec.open(url, "rb") as f:
        return json.loads(f.read())


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()
