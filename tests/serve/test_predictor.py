"""Predictor: loads a run once; the same raw input gives the same prediction in every form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import danlu
from conftest import tiny_config
from danlu.errors import CheckpointError, DataError
from danlu.serve.predictor import Predictor

PROBS = ["prob_ant", "prob_bee", "prob_cat"]


@pytest.fixture
def table_run(blobs_csv: Path) -> Path:
    danlu.train(
        tiny_config(str(blobs_csv), data={"label": "kind"}), run_dir="tab", show_progress=False
    )
    return Path("tab")


@pytest.fixture
def rows(blobs_csv: Path) -> pd.DataFrame:
    return pd.read_csv(blobs_csv).drop(columns="kind").head(8)


def test_load_keeps_the_run_spec_and_model(table_run):
    p = Predictor.load(table_run)
    assert p.run.path == table_run
    assert p.spec.class_names == ["ant", "bee", "cat"]
    assert p.spec.input == "table"
    assert p.kind == "softmax"
    assert not p.model.training


def test_csv_path_and_dataframe_give_equal_predictions(table_run, rows):
    p = Predictor.load(table_run)
    rows.to_csv("rows.csv", index=False)
    from_frame = p.predict(rows)
    from_csv = p.predict("rows.csv")
    pd.testing.assert_frame_equal(from_frame, from_csv)
    assert list(from_frame["row"]) == [str(i) for i in range(1, 9)]
    np.testing.assert_allclose(from_frame[PROBS].sum(axis=1), 1.0, atol=1e-5)
    rows.to_parquet("rows.parquet")
    pd.testing.assert_frame_equal(from_frame, p.predict(Path("rows.parquet")))


def test_column_order_and_extra_columns_do_not_matter(table_run, rows, blobs_csv):
    p = Predictor.load(table_run)
    expected = p.predict(rows)
    shuffled = rows[["colour", "b", "a"]].assign(note="ignored")
    pd.testing.assert_frame_equal(expected, p.predict(shuffled))
    with_label = pd.read_csv(blobs_csv).head(8)  # the label column is simply not used
    pd.testing.assert_frame_equal(expected, p.predict(with_label))


def test_predictions_match_the_model_on_preprocessed_features(table_run, rows):
    p = Predictor.load(table_run)
    x = p.spec.table_features(rows)
    assert x.shape == (8, 2 + 3)  # a, b, and one-hot colour (blue, green, red)
    with torch.no_grad():
        expected = torch.softmax(p.model(x), dim=1).numpy()
    np.testing.assert_allclose(p.predict(rows)[PROBS].to_numpy(), expected, rtol=1e-5)


def test_missing_feature_column_is_named(table_run, rows):
    p = Predictor.load(table_run)
    with pytest.raises(DataError) as info:
        p.predict(rows.drop(columns=["colour"]))
    assert str(info.value) == (
        "input: missing feature column(s) colour. the model expects columns: a, b, colour"
    )
    rows.drop(columns=["a"]).to_csv("partial.csv", index=False)
    with pytest.raises(DataError, match=r"^partial\.csv: missing feature column\(s\) a\. "):
        p.predict("partial.csv")


def test_one_column_csv(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, 40)
    pd.DataFrame({"x": x, "y": 2 * x}).to_csv("line.csv", index=False)
    cfg = tiny_config(
        "line.csv",
        data={"label": "y", "task": "regression"},
        model={"hidden_sizes": [], "output": "linear"},
        train={"epochs": 1},
    )
    danlu.train(cfg, run_dir="line", show_progress=False)
    pd.DataFrame({"x": [1.5, -2.25]}).to_csv("xs.csv", index=False)
    expected = Predictor.load("line").predict(pd.DataFrame({"x": [1.5, -2.25]}))
    pd.testing.assert_frame_equal(Predictor.load("line").predict("xs.csv"), expected)


def test_unseen_category_is_an_all_zero_one_hot(table_run):
    p = Predictor.load(table_run)
    row = {"a": 0.1, "b": 3.9, "colour": "purple"}
    x = p.spec.table_features(pd.DataFrame([row]))
    assert x[0, 2:].tolist() == [0.0, 0.0, 0.0]
    out = p.predict(row)
    assert len(out) == 1
    assert out.loc[0, "label"] in {"ant", "bee", "cat"}
    assert out[PROBS].to_numpy().sum() == pytest.approx(1.0, abs=1e-5)
    known = p.spec.table_features(pd.DataFrame([{**row, "colour": "red"}]))
    assert known[0, 2:].tolist() == [0.0, 0.0, 1.0]


def test_bad_values_name_row_and_column(table_run, rows):
    p = Predictor.load(table_run)
    bad = rows.astype({"a": object})
    bad.loc[3, "a"] = "oops"
    with pytest.raises(DataError, match=r"row 4, column 'a': value 'oops' is not a number"):
        p.predict(bad)
    gap = rows.copy()
    gap.loc[1, "colour"] = None
    with pytest.raises(DataError, match=r"row 2, column 'colour' is missing a value"):
        p.predict(gap)


def test_inputs_of_the_wrong_kind(table_run, tmp_path):
    p = Predictor.load(table_run)
    with pytest.raises(DataError, match="cannot predict on int input"):
        p.predict(3)
    with pytest.raises(DataError, match="this model takes table rows, not images"):
        p.predict([np.zeros((8, 8), np.uint8)])
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(DataError, match=r"input '.*notes\.json' is neither a table"):
        p.predict(tmp_path / "notes.json")
    with pytest.raises(DataError, match=r"input 'absent\.csv' not found"):
        p.predict("absent.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"folder '.*empty' holds no image files"):
        p.predict(tmp_path / "empty")


def test_no_rows_give_an_empty_result(table_run, rows):
    p = Predictor.load(table_run)
    for empty in ([], rows.head(0)):
        out = p.predict(empty)
        assert len(out) == 0
        assert list(out.columns) == ["row", "label", "confidence", *PROBS]


def test_image_run_refuses_rows_and_accepts_empty_batches(image_folder):
    danlu.train(tiny_config(str(image_folder)), run_dir="img", show_progress=False)
    p = Predictor.load("img")
    with pytest.raises(DataError, match="this model takes images, not table rows"):
        p.predict({"a": 1})
    with pytest.raises(DataError, match=r"an image array must be \(H, W\) or \(H, W, C\)"):
        p.predict(np.zeros((2, 2, 8, 8, 1), np.uint8))
    out = p.predict([])
    assert len(out) == 0
    assert list(out.columns)[:3] == ["input", "label", "confidence"]


def test_run_without_weights(table_run):
    (table_run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        Predictor.load(table_run)
