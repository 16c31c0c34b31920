"""Hugging Face hub datasets by name: `data.dataset: hf:NAME` or `hf:NAME:CONFIG`.

`datasets.load_dataset` is imported lazily (the package is optional: `pip install datasets`).
Whatever the hub client raises (no network, HF_HUB_OFFLINE=1 with nothing cached, an unknown
name) becomes one DataError saying what to do. The train split (and the official test split,
when it is labelled) becomes RawText; `task: language_modeling` gives a RawCorpus over the text
column, `task: seq2seq` RawPairs from `data.text` / `data.target` (default source / target).
ClassLabel ids are replaced by their class names.
"""

from __future__ import annotations

import os

import pandas as pd

from danlu.data.text import (
    RawCorpus,
    RawPairs,
    RawText,
    corpus_from_texts,
    need_columns,
    text_table,
    texts_of,
)
from danlu.errors import DataError


def hf_dataset(
    spec: str,
    *,
    task: str | None = None,
    text: str | None = None,
    label: str | None = None,
    target: str | None = None,
) -> RawText | RawCorpus | RawPairs:
    """`hf:NAME` or `hf:NAME:CONFIG` through datasets.load_dataset (train + test splits)."""
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.dataset '{spec}' needs the Hugging Face `datasets` package",
            fix="pip install datasets",
        ) from None
    try:
        splits = datasets.load_dataset(name, config or None)
    except Exception as e:  # the hub client raises many types; all mean "cannot load it here"
        offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        raise DataError(
            f"could not load Hugging Face dataset '{spec}': {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
            fix="HF_HUB_OFFLINE=1 is set and the dataset is not in the local Hugging Face cache; "
            "unset it on a machine with network access, or use a local file"
            if offline
            else "check the name (and config) on huggingface.co and your network connection",
        ) from None
    if "train" not in splits:
        raise DataError(f"'{spec}' has no train split (splits: {', '.join(splits)})")
    origin = f"Hugging Face dataset {name}" + (f" ({config})" if config else "")
    frame, test = _hf_frame(splits["train"]), splits.get("test")
    if task == "language_modeling":
        need_columns(frame, origin, text=text or "text")
        return corpus_from_texts(texts_of(frame[text or "text"]), origin)
    if task == "seq2seq" or target:
        return text_table(frame, origin, text=text or "source", target=target or "target")
    raw = text_table(frame, origin, text=text or "text", label=label or "label", task=task)
    if test is not None and raw.label_name in test.column_names:
        test_frame = _hf_frame(test)
        if test_frame[raw.label_name].notna().all():  # GLUE-style test sets have no labels
            t = text_table(test_frame, f"{origin} test", text=raw.text_name, label=raw.label_name)
            raw.test_texts, raw.test_labels = t.texts, t.labels
    return raw


def _hf_frame(split) -> pd.DataFrame:
    """A split as a DataFrame, ClassLabel ids replaced by class names (-1 = no label)."""
    frame = split.to_pandas()
    for column, feature in split.features.items():
        if names := getattr(feature, "names", None):
            frame[column] = [names[i] if i >= 0 else None for i in frame[column]]
    return frame
