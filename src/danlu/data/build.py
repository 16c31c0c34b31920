"""`build(**cfg.data)`: a dataset name or path → splits in memory, a DataSpec and a data card.

bundle = build(dataset="fashion-mnist", seed=0)
loader = bundle.loader("train", 64, order="shuffle", seed=0)
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from danlu.data import builtin, prepare
from danlu.data.images import (
    RawImages,
    find_idx,
    read_cifar_folder,
    read_idx_folder,
    read_image_folder,
)
from danlu.data.prepare import DataBundle
from danlu.data.tables import RawTable, is_table, read_table
from danlu.errors import DataError

__all__ = ["DataBundle", "build", "resolve"]

log = logging.getLogger("danlu")


def resolve(
    dataset: str,
    *,
    image: dict[str, Any],
    cache_dir: str | None,
    mirror: str | None,
    download: bool,
) -> RawImages | RawTable:
    """Read a built-in name, a table file or an image folder."""
    if dataset in builtin.CATALOG:
        raw = builtin.load(dataset, cache=cache_dir, mirror=mirror, download=download)
    else:
        path = Path(dataset).expanduser()
        if path.is_file() and is_table(path):
            raw = RawTable(read_table(path), str(path))
        elif path.is_file():
            raise DataError(
                f"data file '{path}' has an unsupported type '{path.suffix}'",
                fix="use .csv, .tsv, .parquet, or a folder of IDX files, CIFAR batches or images",
            )
        elif path.is_dir():
            size = tuple(image["resize"]) if image.get("resize") else None
            if find_idx(path):
                raw = read_idx_folder(path)
            elif any(path.glob("data_batch_*.bin")):
                raw = read_cifar_folder(path)
            else:
                raw = read_image_folder(path, image.get("channels"), size)
        else:
            close = difflib.get_close_matches(dataset, builtin.names(), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise DataError(
                f"dataset '{dataset}' is neither a built-in name nor an existing file or folder",
                fix=f"{hint}built-in datasets: {', '.join(builtin.names())} (see `danlu datasets list`)",
            )
    return raw


def build(
    *,
    dataset: str,
    task: str | None = None,
    label: str | None = None,
    features: list[str] | None = None,
    columns: dict[str, str] | None = None,
    missing: str = "error",
    fill_value: Any = 0,
    split: dict[str, Any] | None = None,
    normalize: bool = True,
    image: dict[str, Any] | None = None,
    augment: dict[str, Any] | None = None,
    max_samples: int | None = None,
    max_eval_samples: int | None = None,
    mirror: str | None = None,
    cache_dir: str | None = None,
    download: bool = True,
    text: str | None = None,
    target: str | None = None,
    tokenizer: dict[str, Any] | None = None,
    block_size: int = 256,
    pack: bool = True,
    encoding_errors: str = "strict",
    memory_cap_mb: int | None = None,
    check: dict[str, Any] | None = None,  # read by `danlu data check`, not here
    sufficiency: dict[str, Any] | None = None,  # read by `danlu data check`, not here
    seed: int = 0,
) -> DataBundle:
    split = {"val": 0.1, "test": "auto", "stratify": True, "seed": None, **(split or {})}
    image = image or {}
    raw = resolve(dataset, image=image, cache_dir=cache_dir, mirror=mirror, download=download)
    opts = dict(
        split=split,
        seed=split["seed"] if split["seed"] is not None else seed,
        max_samples=max_samples,
        max_eval_samples=max_eval_samples,
    )
    if isinstance(raw, RawImages):
        bundle = prepare.images(raw, dataset, task or "classification", image, normalize, **opts)
    else:
        bundle = prepare.table(
            raw,
            dataset,
            task,
            label,
            features,
            columns or {},
            missing,
            fill_value,
            normalize,
            **opts,
        )
    bundle.augment = augment
    return bundle
