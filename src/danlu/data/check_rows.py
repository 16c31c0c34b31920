"""Where the checks read raw values: each split's texts, table rows or images, and where an
example came from (split, position, source index, file).

Split.index holds each example's position in its source: the row label of the table, the
position among the images or texts, in the official test file for an official test split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from danlu.errors import ConfigError


def split_inputs(bundle: Any) -> tuple[str, dict[str, Any]]:
    """The input kind and each split's raw inputs: texts, table rows (feature columns, values
    before the missing policy) or uint8 images."""
    texts = split_texts(bundle)
    if texts is not None:
        return "text", texts
    kind = bundle.spec.input
    raw = bundle.raw
    if kind == "table" and raw is not None and hasattr(raw, "frame") and bundle.spec.table:
        names = [c["name"] for c in bundle.spec.table["columns"]]
        return kind, {k: f[names] for k, f in split_frames(bundle).items()}
    return kind, {name: s.x.numpy() for name, s in bundle.splits.items()}


def _source(bundle: Any, split: str, main: Any, test: Any) -> Any:
    official = bundle.card.get("test_split") == "official"
    return test if split == "test" and official and test is not None else main


def split_frames(bundle: Any) -> dict[str, pd.DataFrame]:
    raw = bundle.raw
    return {
        name: _source(bundle, name, raw.frame, raw.test_frame).loc[s.index]
        for name, s in bundle.splits.items()
    }


def split_texts(bundle: Any) -> dict[str, list[str]] | None:
    """Texts per split from a RawText source (Split.index = position in texts / test_texts)."""
    raw = bundle.raw
    if raw is None or not isinstance(getattr(raw, "texts", None), list):
        return None
    out = {}
    for name, s in bundle.splits.items():
        src = _source(bundle, name, raw.texts, getattr(raw, "test_texts", None))
        out[name] = [src[int(i)] for i in s.index]
    return out


def describe_row(bundle: Any, split: str, position: int) -> dict[str, Any]:
    """Where an example came from: its split, position there, source index and file."""
    index = int(bundle.splits[split].index[position])
    out: dict[str, Any] = {"split": split, "position": int(position), "index": index}
    raw = bundle.raw
    files = _source(bundle, split, getattr(raw, "files", None), getattr(raw, "test_files", None))
    official_test = split == "test" and bundle.card.get("test_split") == "official"
    if files is not None:
        out["where"] = out["file"] = str(files[index])
    elif bundle.spec.input == "table":  # 1-based data rows, as in DataError messages
        out["where"] = f"{'test file ' if official_test else ''}row {index + 1}"
    else:
        out["where"] = f"{'official test ' if official_test else ''}example {index}"
    return out


def split_column(bundle: Any, split: str, column: str) -> np.ndarray:
    """The raw values of one source column for each example of a split (any column of the
    table, used as a feature or not), e.g. a group for fairness slices."""
    raw = bundle.raw
    if hasattr(raw, "frame") and raw.frame is not None:
        frames = split_frames(bundle)
    elif getattr(raw, "columns", None) is not None:
        test = getattr(raw, "test_columns", None)
        frames = {
            name: _source(bundle, name, raw.columns, test).iloc[s.index]
            for name, s in bundle.splits.items()
            if _source(bundle, name, raw.columns, test) is not None
        }
    else:
        raise ConfigError(
            f"evaluate.slices: column '{column}' cannot be read from a dataset without columns "
            f"({getattr(raw, 'origin', 'this source')})",
            fix="slices need a table (CSV, Parquet, JSONL) holding the group column",
        )
    if split not in frames:
        raise ConfigError(
            f"evaluate.slices: the '{split}' split comes from a source without column '{column}'",
            fix="evaluate another split with --split, or keep the group column in that file",
        )
    frame = frames[split]
    if column not in frame.columns:
        raise ConfigError(
            f"evaluate.slices: no column '{column}' in the data",
            fix=f"choose among: {', '.join(map(str, frame.columns))}",
        )
    return frame[column].fillna("(missing)").astype(str).to_numpy()
