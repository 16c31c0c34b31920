"""Deterministic, stratified train/val/test splits and subsets.

The same data, fractions and seed always give the same rows in each split, which is what lets
`evaluate` rebuild the exact test split a run was trained against.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from danlu.errors import DataError


def carve(
    pool: np.ndarray,
    y: np.ndarray | None,
    fraction: float,
    *,
    seed: int,
    stratify: bool,
    what: str,
    origin: str,
    whole: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions `pool` into (rest, part) with `part` ≈ fraction of the pool.

    `whole` is the share of all the data the pool holds: errors quote the configured fraction
    (`fraction * whole`), not the share of the pool.
    """
    if fraction <= 0:
        return pool, pool[:0]
    n_part = round(fraction * len(pool))
    if n_part == 0 or n_part >= len(pool):
        left = "" if whole == 1 else " left after the test split"
        raise DataError(
            f"{origin}: data.split.{what}={fraction * whole:g} of the {len(pool)} examples{left} "
            f"gives {'an empty' if n_part == 0 else 'no training data besides the'} {what} split",
            fix=f"use a fraction between {whole / len(pool):.3g} and "
            f"{whole * (1 - 1 / len(pool)):.3g}, or data.split.{what}: 0",
        )
    labels = y[pool] if (stratify and y is not None) else None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() < 2 or n_part < len(counts) or len(pool) - n_part < len(counts):
            labels = None  # too few examples per class to keep proportions
    rest, part = train_test_split(pool, test_size=n_part, stratify=labels, random_state=seed)
    return np.sort(rest), np.sort(part)


def split_positions(
    n: int,
    y: np.ndarray | None,
    *,
    val: float,
    test: float | str,
    has_official: bool,
    seed: int,
    stratify: bool,
    origin: str,
) -> tuple[dict[str, np.ndarray], str]:
    """Positions of train/val(/test) in the main data; says how the test split was chosen."""
    if test == "official" and not has_official:
        raise DataError(
            f"{origin}: data.split.test is 'official' but this dataset has no official test split",
            fix="set data.split.test to a fraction such as 0.2",
        )
    if test == "auto":
        test = "official" if has_official else 0.2
    pool = np.arange(n)
    out: dict[str, np.ndarray] = {}
    if test == "official":
        how = "official"
    else:
        pool, out["test"] = carve(
            pool, y, float(test), seed=seed, stratify=stratify, what="test", origin=origin
        )
        how = f"fraction {test}"
    # val is a fraction of the whole, carved out of what remains after the test split
    whole = 1.0 if how == "official" else 1 - float(test)
    out["train"], out["val"] = carve(
        pool,
        y,
        val / whole,
        seed=seed + 1,
        stratify=stratify,
        what="val",
        origin=origin,
        whole=whole,
    )
    return out, how


def subset(positions: np.ndarray, y: np.ndarray | None, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` positions, keeping class proportions where possible."""
    if limit is None or limit >= len(positions):
        return positions
    labels = y[positions] if y is not None else None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() < 2 or limit < len(counts):
            labels = None
    keep, _ = train_test_split(positions, train_size=limit, stratify=labels, random_state=seed)
    return np.sort(keep)
