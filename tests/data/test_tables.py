"""Tables through danlu.data.build: column typing, encoding, normalization, missing values,
labels, regression, bad data, and the data card."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from danlu.data import build
from danlu.errors import DataError


def _frame(n: int = 30, seed: int = 0) -> pd.DataFrame:
    """Numeric `a`, integer `code`, string `s`, integer label `y` with values 10, 2, 1."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "a": np.round(rng.normal(size=n), 4),
            "code": rng.integers(0, 3, n),
            "s": ["u", "v", "w"] * (n // 3),
            "y": [10, 2, 1] * (n // 3),
        }
    )


def _csv(frame: pd.DataFrame, name: str = "t.csv") -> str:
    frame.to_csv(name, index=False)
    return name


def _all_rows(bundle) -> np.ndarray:
    return np.sort(np.concatenate([s.index for s in bundle.splits.values()]))


# ------------------------------------------------------------------------------ sources


def test_csv_inferred_types_one_hot_and_labels(blobs_csv: Path) -> None:
    bundle = build(dataset=str(blobs_csv), label="kind", seed=0)
    raw = pd.read_csv(blobs_csv)
    cols = {c["name"]: c for c in bundle.spec.table["columns"]}
    assert [c["kind"] for c in cols.values()] == ["numeric", "numeric", "categorical"]
    assert cols["colour"]["categories"] == ["blue", "green", "red"]
    assert bundle.spec.input_shape == [5]  # a, b, colour=blue, colour=green, colour=red
    assert bundle.spec.class_names == ["ant", "bee", "cat"]
    assert bundle.spec.label == "kind"
    assert bundle.card["sizes"] == {"test": 24, "train": 84, "val": 12}
    assert np.array_equal(_all_rows(bundle), np.arange(120))
    for split in bundle.splits.values():
        x, y = split.x.numpy(), split.y.numpy()
        assert x.dtype == np.float32
        rows = raw.iloc[split.index]
        onehot = x[:, 2:5]
        assert np.array_equal(onehot.sum(1), np.ones(len(x)))
        expected = rows["colour"].map({"blue": 0, "green": 1, "red": 2}).to_numpy()
        assert np.array_equal(onehot.argmax(1), expected)
        assert np.array_equal(y, rows["kind"].map({"ant": 0, "bee": 1, "cat": 2}).to_numpy())


@pytest.mark.parametrize("kind", ["tsv", "parquet"])
def test_tsv_and_parquet_give_the_same_bundle_as_csv(blobs_csv: Path, kind: str) -> None:
    frame = pd.read_csv(blobs_csv)
    if kind == "tsv":
        path = "blobs.tsv"
        frame.to_csv(path, sep="\t", index=False)
    else:
        path = "blobs.parquet"
        frame.to_parquet(path)
    other = build(dataset=path, label="kind", seed=0)
    ref = build(dataset=str(blobs_csv), label="kind", seed=0)
    assert other.spec.table == ref.spec.table
    for name, split in ref.splits.items():
        assert np.array_equal(other.splits[name].index, split.index)
        assert np.allclose(other.splits[name].x.numpy(), split.x.numpy(), atol=1e-6)
        assert np.array_equal(other.splits[name].y.numpy(), split.y.numpy())


def test_declared_column_types_and_features() -> None:
    path = _csv(_frame())
    inferred = build(dataset=path, label="y", seed=0)
    kinds = {c["name"]: c["kind"] for c in inferred.spec.table["columns"]}
    assert kinds == {"a": "numeric", "code": "numeric", "s": "categorical"}
    assert inferred.spec.input_shape == [5]

    declared = build(dataset=path, label="y", columns={"code": "categorical", "s": "ignore"})
    cols = declared.spec.table["columns"]
    assert [(c["name"], c["kind"], c["categories"]) for c in cols] == [
        ("a", "numeric", []),
        ("code", "categorical", ["0", "1", "2"]),
    ]
    raw = pd.read_csv(path)
    train = declared.splits["train"]
    assert np.array_equal(train.x.numpy()[:, 1:].argmax(1), raw["code"].to_numpy()[train.index])

    only_a = build(dataset=path, label="s", features=["a"])
    assert only_a.spec.input_shape == [1]
    assert [c["name"] for c in only_a.spec.table["columns"]] == ["a"]
    assert only_a.spec.class_names == ["u", "v", "w"]


def test_numeric_labels_sorted_numerically() -> None:
    path = _csv(_frame())
    bundle = build(dataset=path, label="y", seed=0)
    assert bundle.spec.class_names == ["1", "2", "10"]
    raw = pd.read_csv(path)
    for split in bundle.splits.values():
        expected = raw["y"].map({1: 0, 2: 1, 10: 2}).to_numpy()[split.index]
        assert np.array_equal(split.y.numpy(), expected)


def test_string_labels_sorted() -> None:
    frame = _frame()
    frame["y"] = ["pear", "apple", "fig"] * 10
    bundle = build(dataset=_csv(frame), label="y")
    assert bundle.spec.class_names == ["apple", "fig", "pear"]
    train = bundle.splits["train"]
    expected = frame["y"].map({"apple": 0, "fig": 1, "pear": 2}).to_numpy()[train.index]
    assert np.array_equal(train.y.numpy(), expected)


def test_normalization_uses_training_rows_only(blobs_csv: Path) -> None:
    bundle = build(dataset=str(blobs_csv), label="kind", seed=3)
    raw = pd.read_csv(blobs_csv)
    train = bundle.splits["train"]
    cols = {c["name"]: c for c in bundle.spec.table["columns"]}
    for j, name in enumerate(["a", "b"]):
        values = raw[name].to_numpy()
        mean, std = values[train.index].mean(), values[train.index].std()
        assert cols[name]["mean"] == pytest.approx(mean, rel=1e-12)
        assert cols[name]["std"] == pytest.approx(std, rel=1e-12)
        assert cols[name]["mean"] != pytest.approx(values.mean(), rel=1e-6)
        for split in bundle.splits.values():
            expected = (values[split.index] - mean) / std
            assert np.allclose(split.x.numpy()[:, j], expected, atol=1e-5)
    assert np.allclose(train.x.numpy()[:, :2].mean(0), 0, atol=1e-5)
    assert np.allclose(train.x.numpy()[:, :2].std(0), 1, atol=1e-5)

    plain = build(dataset=str(blobs_csv), label="kind", seed=3, normalize=False)
    split = plain.splits["test"]
    assert np.allclose(split.x.numpy()[:, 0], raw["a"].to_numpy()[split.index], atol=1e-6)


def test_spec_transforms_new_rows_like_training(blobs_csv: Path) -> None:
    bundle = build(dataset=str(blobs_csv), label="kind", seed=0)
    raw = pd.read_csv(blobs_csv)
    test = bundle.splits["test"]
    rows = raw.iloc[test.index].drop(columns=["kind"])
    assert np.array_equal(bundle.spec.table_features(rows).numpy(), test.x.numpy())


# ------------------------------------------------------------------------ missing values

# row 2 misses `b` (numeric), row 3 misses `c` (categorical); labels alternate cat/dog
MISSING_CSV = (
    "a,b,c,y\n1,2,x,cat\n2,,y,dog\n3,4,,cat\n4,5,x,dog\n5,6,y,cat\n"
    "6,7,x,dog\n7,8,y,cat\n8,9,x,dog\n9,10,y,cat\n10,11,x,dog\n"
)


def _missing_bundle(missing: str, **kw):
    Path("m.csv").write_text(MISSING_CSV)
    return build(
        dataset="m.csv",
        label="y",
        missing=missing,
        normalize=False,
        split={"val": 0.2, "test": 0.2},
        seed=0,
        **kw,
    )


def _row(bundle, index: int) -> np.ndarray:
    for split in bundle.splits.values():
        hit = np.nonzero(split.index == index)[0]
        if len(hit):
            return split.x.numpy()[hit[0]]
    raise AssertionError(f"row {index} in no split")


def test_missing_error_names_row_and_column() -> None:
    with pytest.raises(DataError) as e:
        _missing_bundle("error")
    msg = str(e.value)
    assert "m.csv: row 2, column 'b' is missing a value (1 missing in that column)" in msg
    assert "set data.missing to drop, mean or constant" in msg


def test_missing_drop_removes_incomplete_rows() -> None:
    bundle = _missing_bundle("drop")
    assert np.array_equal(_all_rows(bundle), [0, 3, 4, 5, 6, 7, 8, 9])
    assert sum(bundle.card["sizes"].values()) == 8
    assert bundle.card["rows_dropped"] == 2
    assert any(
        "2 rows with missing values dropped" in f["message"] for f in bundle.card["findings"]
    )
    # nothing was filled: every row keeps its own values
    assert np.array_equal(_row(bundle, 3), [4, 5, 1, 0])


def test_missing_mean_fills_training_mean_and_mode() -> None:
    bundle = _missing_bundle("mean")
    raw = pd.read_csv(io.StringIO(MISSING_CSV))
    train = bundle.splits["train"].index
    b_mean = raw["b"].to_numpy()[train]
    b_mean = b_mean[~np.isnan(b_mean)].mean()
    c_mode = sorted(raw["c"].iloc[train].dropna().mode())[0]
    cols = {c["name"]: c for c in bundle.spec.table["columns"]}
    assert cols["b"]["fill"] == pytest.approx(b_mean)
    assert cols["c"]["fill"] == c_mode
    assert cols["c"]["categories"] == ["x", "y"]
    assert _row(bundle, 1)[1] == pytest.approx(b_mean, abs=1e-5)
    assert np.array_equal(_row(bundle, 2)[2:], [1, 0] if c_mode == "x" else [0, 1])
    assert _row(bundle, 0)[1] == 2.0  # present values are untouched


def test_missing_constant_fills_the_given_value() -> None:
    bundle = _missing_bundle("constant", fill_value=-1)
    cols = {c["name"]: c for c in bundle.spec.table["columns"]}
    assert cols["b"]["fill"] == -1.0
    assert cols["c"]["categories"] == ["x", "y", "-1"]
    assert np.array_equal(_row(bundle, 1), [2, -1, 0, 1, 0])
    assert np.array_equal(_row(bundle, 2), [3, 4, 0, 0, 1])


# ---------------------------------------------------------------------- tasks and labels


def test_regression_targets_are_floats() -> None:
    frame = _frame()
    frame["y"] = frame["a"] * 1.5 + 0.25
    path = _csv(frame)
    bundle = build(dataset=path, label="y", task="regression", seed=0)
    assert bundle.spec.task == "regression"
    assert bundle.spec.class_names is None
    assert "class_balance" not in bundle.card
    raw = pd.read_csv(path)
    for name, split in bundle.splits.items():
        assert split.y.dtype.is_floating_point
        assert np.allclose(split.y.numpy(), raw["y"].to_numpy()[split.index], atol=1e-6)
        assert bundle.card["target"][name]["mean"] == pytest.approx(
            float(split.y.float().mean()), rel=1e-6
        )


def test_float_label_with_classification_suggests_regression() -> None:
    frame = _frame()
    frame["y"] = [0.5, 1.0, 2.0] * 10
    with pytest.raises(DataError) as e:
        build(dataset=_csv(frame), label="y")
    msg = str(e.value)
    assert "t.csv" in msg and "'y'" in msg and "0.5" in msg
    assert "data.task: regression" in msg


def test_integer_valued_float_labels_are_classes() -> None:
    frame = _frame()
    frame["y"] = [0.0, 1.0, 2.0] * 10
    bundle = build(dataset=_csv(frame), label="y")
    assert bundle.spec.class_names == ["0", "1", "2"]


# ----------------------------------------------------------------------------- bad data


def test_missing_file() -> None:
    with pytest.raises(DataError) as e:
        build(dataset="nowhere/absent.csv", label="y")
    assert "nowhere/absent.csv" in str(e.value)
    assert "neither a built-in name nor an existing file" in str(e.value)


def test_unsupported_file_type() -> None:
    Path("data.xlsx").write_text("a")
    with pytest.raises(DataError, match=r"data\.xlsx.*unsupported type '\.xlsx'.*\.csv"):
        build(dataset="data.xlsx", label="y")


def test_label_column_absent_lists_columns() -> None:
    with pytest.raises(DataError) as e:
        build(dataset=_csv(_frame()), label="target")
    msg = str(e.value)
    assert "t.csv" in msg and "'target' not found" in msg
    assert "a, code, s, y" in msg


def test_label_not_set_lists_columns() -> None:
    with pytest.raises(DataError, match=r"data\.label is not set.*a, code, s, y"):
        build(dataset=_csv(_frame()))


def test_unknown_declared_column() -> None:
    with pytest.raises(DataError, match=r"column 'colour' named in the config not found"):
        build(dataset=_csv(_frame()), label="y", columns={"colour": "categorical"})


def test_non_numeric_value_in_numeric_column() -> None:
    frame = _frame()
    frame["a"] = frame["a"].astype(object)
    frame.loc[17, "a"] = "oops"
    with pytest.raises(DataError) as e:
        build(dataset=_csv(frame), label="y")
    msg = str(e.value)
    assert "t.csv" in msg and "row 18" in msg and "column 'a'" in msg
    assert "'oops'" in msg and "not a number" in msg
    assert "data.columns.a: categorical" in msg


@pytest.mark.parametrize("cell", ["inf", "-Infinity", "1e999"])
def test_infinite_value_in_numeric_column_names_row_and_column(cell: str) -> None:
    frame = _frame()
    frame["a"] = frame["a"].astype(object)
    frame.loc[5, "a"] = cell
    with pytest.raises(DataError) as e:
        build(dataset=_csv(frame), label="y")
    msg = str(e.value)
    assert "t.csv: row 6, column 'a': value " in msg and "column 'a'" in msg
    assert "infinite (1 infinite in that column)" in msg and "leave the cell empty" in msg


def test_declared_numeric_on_text_column() -> None:
    with pytest.raises(DataError, match=r"row \d+, column 's': value '[uvw]' is not a number"):
        build(dataset=_csv(_frame()), label="y", columns={"s": "numeric"})


def test_missing_label_value_names_row() -> None:
    frame = _frame()
    frame["y"] = frame["y"].astype(object)
    frame.loc[4, "y"] = None
    with pytest.raises(DataError, match=r"t\.csv: row 5 has no value in label column 'y'"):
        build(dataset=_csv(frame), label="y")


def test_only_one_class() -> None:
    frame = _frame()
    frame["y"] = "same"
    with pytest.raises(DataError, match=r"t\.csv: the training split holds only one class"):
        build(dataset=_csv(frame), label="y")


def test_empty_table() -> None:
    Path("empty.csv").write_text("a,y\n")
    with pytest.raises(DataError, match=r"empty\.csv' has no rows"):
        build(dataset="empty.csv", label="y")


# ------------------------------------------------------------------------------ data card


def test_card_sizes_balance_and_imbalance_finding() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=100), "y": ["big"] * 88 + ["small"] * 12})
    bundle = build(dataset=_csv(frame), label="y", seed=0)
    card = bundle.card
    assert card["sizes"] == {name: len(s) for name, s in bundle.splits.items()}
    assert card["sizes"] == {"test": 20, "train": 70, "val": 10}
    for name, split in bundle.splits.items():
        counts = np.bincount(split.y.numpy(), minlength=2)
        assert card["class_balance"][name] == {"big": int(counts[0]), "small": int(counts[1])}
    big, small = card["class_balance"]["train"].values()
    imbalance = [f for f in card["findings"] if f["message"].startswith("class imbalance")]
    assert len(imbalance) == 1
    assert f"= {big / small:.1f} (smallest: 'small')" in imbalance[0]["message"]
    assert "class_weights" in imbalance[0]["action"]
    assert card["test_split"] == "fraction 0.2"
    assert card["label"] == "y"
    assert card["content_hash"] == bundle.content_hash


def test_card_reports_duplicates_across_train_and_test() -> None:
    base = _frame(n=30, seed=1)
    frame = pd.concat([base, base], ignore_index=True)  # row i and i + 30 are twins
    bundle = build(dataset=_csv(frame), label="y", seed=0)
    train = set(bundle.splits["train"].index.tolist())
    test = bundle.splits["test"].index
    leaked = sum(((i + 30) % 60) in train for i in test)
    assert leaked > 0
    messages = [f["message"] for f in bundle.card["findings"]]
    assert f"{leaked} test examples also appear in the training data" in messages
    in_train = sum(((i + 30) % 60) in train for i in train) // 2
    assert f"{in_train} duplicate examples in the training split" in messages


def test_card_describes_the_splits_after_max_samples() -> None:
    base = pd.DataFrame({"a": np.arange(60.0), "y": ["p", "q", "r"] * 20})
    frame = pd.concat([base, base], ignore_index=True)  # row i and i + 60 are twins
    bundle = build(dataset=_csv(frame), label="y", max_samples=12, max_eval_samples=6, seed=0)
    assert bundle.card["sizes"] == {"test": 6, "train": 12, "val": 6}
    train = bundle.splits["train"].index % 60
    leaked = int(np.isin(bundle.splits["test"].index % 60, train).sum())
    dups = len(train) - len(np.unique(train))
    messages = [f["message"] for f in bundle.card["findings"]]
    leak_msgs = [m for m in messages if "also appear in the training data" in m]
    assert leak_msgs == (
        [f"{leaked} test examples also appear in the training data"] if leaked else []
    )
    dup_msgs = [m for m in messages if "duplicate examples" in m]
    assert dup_msgs == ([f"{dups} duplicate examples in the training split"] if dups else [])


def test_card_flags_constant_column() -> None:
    frame = _frame()
    frame["k"] = 7
    bundle = build(dataset=_csv(frame), label="y")
    constant = [f for f in bundle.card["findings"] if f["message"] == "column 'k' is constant"]
    assert constant and constant[0]["action"] == "drop it: data.columns.k: ignore"
    assert not [f for f in bundle.card["findings"] if "imbalance" in f["message"]]
