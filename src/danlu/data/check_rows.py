"""Where the checks read raw values: each split's texts, table rows or images, and where an
example came from (split, position, source index, file).

Split.index holds each example's position in its source: the row label of the table, the
position among the images or texts, in the official test file for an official test split.
"""

from __future__ import annotations

from typing import Any

import pandas as pd


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
