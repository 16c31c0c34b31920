"""Splits: deterministic for a seed, stratified, sized as configured; subsets and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from danlu.data import build
from danlu.data.splits import split_positions, subset
from danlu.errors import DataError

# 97 examples of 3 classes in proportions 50 : 33 : 14, shuffled
Y = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [50, 33, 14]))


def _split(y=Y, n=None, **kw):
    args = {"val": 0.1, "test": 0.2, "has_official": False, "seed": 0, "stratify": True}
    return split_positions(len(y) if n is None else n, y, origin="data.csv", **{**args, **kw})


def _assert_partition(pos: dict[str, np.ndarray], n: int) -> None:
    every = np.concatenate(list(pos.values()))
    assert len(every) == n
    assert np.array_equal(np.sort(every), np.arange(n))
    for p in pos.values():
        assert np.array_equal(p, np.sort(p))


# ------------------------------------------------------------------------ split_positions


def test_fractions_give_the_expected_sizes() -> None:
    pos, how = _split()
    assert how == "fraction 0.2"
    assert {k: len(v) for k, v in pos.items()} == {"test": 19, "train": 68, "val": 10}
    _assert_partition(pos, 97)
    pos, _ = _split(y=np.arange(100) % 2, val=0.25, test=0.15)
    assert {k: len(v) for k, v in pos.items()} == {"test": 15, "train": 60, "val": 25}
    pos, _ = _split(val=0.0, test=0.0)
    assert len(pos["train"]) == 97 and len(pos["val"]) == 0 and len(pos["test"]) == 0


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a, _ = _split(seed=0)
    b, _ = _split(seed=0)
    c, _ = _split(seed=1)
    for name in ("train", "val", "test"):
        assert np.array_equal(a[name], b[name])
    assert not np.array_equal(a["test"], c["test"])
    assert not np.array_equal(a["val"], c["val"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stratified_splits_keep_class_proportions(seed: int) -> None:
    pos, _ = _split(seed=seed)
    share = np.bincount(Y) / len(Y)
    for p in pos.values():
        counts = np.bincount(Y[p], minlength=3)
        assert np.all(np.abs(counts - share * len(p)) <= 1), (counts, share * len(p))


def test_unstratified_split_is_still_deterministic() -> None:
    a, _ = _split(stratify=False, seed=4)
    b, _ = _split(stratify=False, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    _assert_partition(a, 97)
    assert len(a["test"]) == 19


def test_regression_targets_split_without_labels() -> None:
    pos, _ = split_positions(
        50, None, val=0.2, test=0.2, has_official=False, seed=0, stratify=True, origin="r.csv"
    )
    assert {k: len(v) for k, v in pos.items()} == {"test": 10, "train": 30, "val": 10}


def test_auto_uses_the_official_test_split_when_there_is_one() -> None:
    pos, how = _split(test="auto", has_official=True)
    assert how == "official"
    assert set(pos) == {"train", "val"}
    assert len(pos["val"]) == round(0.1 * 97)  # val is then a fraction of the whole data
    _assert_partition(pos, 97)
    pos, how = _split(test="auto", has_official=False)
    assert how == "fraction 0.2"
    assert len(pos["test"]) == 19


def test_official_without_one_is_an_error() -> None:
    with pytest.raises(DataError) as e:
        _split(test="official", has_official=False)
    msg = str(e.value)
    assert msg.startswith("data.csv: data.split.test is 'official'")
    assert "no official test split" in msg and "data.split.test to a fraction" in msg


def test_val_fraction_too_small_gives_an_empty_split() -> None:
    with pytest.raises(DataError) as e:
        _split(y=np.arange(10) % 2, val=0.01, test=0.2)
    msg = str(e.value)
    assert "data.csv: data.split.val=0.01 of the 8 examples left after the test split" in msg
    assert "an empty val split" in msg
    assert "data.split.val: 0" in msg


def test_test_fraction_too_large_leaves_no_training_data() -> None:
    with pytest.raises(DataError, match=r"data\.split\.test=0\.9 of the 2 examples gives no train"):
        _split(y=np.array([0, 1]), val=0.0, test=0.9)


# --------------------------------------------------------------------------------- subset


def test_subset_keeps_stratification_and_is_deterministic() -> None:
    positions = np.arange(3, 97)
    keep = subset(positions, Y, 40, seed=0)
    assert len(keep) == 40
    assert np.array_equal(keep, np.sort(keep))
    assert set(keep) <= set(positions)
    assert np.array_equal(keep, subset(positions, Y, 40, seed=0))
    assert not np.array_equal(keep, subset(positions, Y, 40, seed=1))
    share = np.bincount(Y[positions], minlength=3) / len(positions)
    assert np.all(np.abs(np.bincount(Y[keep], minlength=3) - share * 40) <= 1)


def test_subset_without_limit_or_with_a_large_one_keeps_everything() -> None:
    positions = np.arange(10)
    assert subset(positions, None, None, 0) is positions
    assert subset(positions, None, 10, 0) is positions
    assert len(subset(positions, None, 4, 0)) == 4


# ----------------------------------------------------------------------- through build()


def _table() -> str:
    frame = pd.DataFrame({"f": np.arange(97, dtype=float), "y": np.array(["a", "b", "c"])[Y]})
    frame.to_csv("s.csv", index=False)
    return "s.csv"


def _indices(bundle) -> dict[str, list[int]]:
    return {k: s.index.tolist() for k, s in bundle.splits.items()}


def test_build_is_deterministic_for_a_seed() -> None:
    path = _table()
    a, b = build(dataset=path, label="y", seed=0), build(dataset=path, label="y", seed=0)
    assert _indices(a) == _indices(b)
    assert a.content_hash == b.content_hash
    c = build(dataset=path, label="y", seed=1)
    assert _indices(c) != _indices(a)
    assert c.content_hash == a.content_hash  # same data, other split
    pinned = build(dataset=path, label="y", seed=1, split={"seed": 0})
    assert _indices(pinned) == _indices(a)


def test_build_split_sizes_and_balance() -> None:
    bundle = build(dataset=_table(), label="y", split={"val": 0.2, "test": 0.3}, seed=0)
    assert bundle.card["sizes"] == {"test": 29, "train": 49, "val": 19}
    share = np.bincount(Y) / len(Y)
    for name, split in bundle.splits.items():
        counts = np.array(list(bundle.card["class_balance"][name].values()))
        assert np.all(np.abs(counts - share * len(split)) <= 1)


def test_build_empty_val_split_is_an_error() -> None:
    frame = pd.DataFrame({"f": np.arange(10.0), "y": ["a", "b"] * 5})
    frame.to_csv("tiny.csv", index=False)
    with pytest.raises(DataError, match=r"tiny\.csv: data\.split\.val=0\.05 of the 8 examples"):
        build(dataset="tiny.csv", label="y", split={"val": 0.05})


def test_max_samples_keeps_stratification(blobs_csv: Path) -> None:
    bundle = build(dataset=str(blobs_csv), label="kind", max_samples=30, max_eval_samples=9)
    assert bundle.card["sizes"] == {"test": 9, "train": 30, "val": 9}
    assert bundle.card["class_balance"]["train"] == {"ant": 10, "bee": 10, "cat": 10}
    assert bundle.card["class_balance"]["test"] == {"ant": 3, "bee": 3, "cat": 3}
    full = build(dataset=str(blobs_csv), label="kind")
    assert set(bundle.splits["train"].index) <= set(full.splits["train"].index)
    assert set(bundle.splits["test"].index) <= set(full.splits["test"].index)


def test_max_samples_on_images(idx_folder: Path) -> None:
    bundle = build(dataset=str(idx_folder), max_samples=12, max_eval_samples=6)
    assert bundle.card["sizes"] == {"train": 12, "val": 6, "test": 6}
    for name in ("train", "test"):
        counts = bundle.card["class_balance"][name]
        assert set(counts.values()) == {len(bundle.splits[name]) // 3}
