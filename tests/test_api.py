"""The public Python API: danlu.train / evaluate / predict / load_config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

import danlu
from conftest import make_images, tiny_config
from danlu.config import Config
from danlu.errors import CheckpointError, ConfigError, DataError
from danlu.rundir import RunDir

PROBS = ["prob_ant", "prob_bee", "prob_cat"]


def blobs_cfg(blobs_csv: Path, **sections) -> dict:
    return tiny_config(str(blobs_csv), data={"label": "kind"}, **sections)


def test_import_is_light_and_exports_the_verbs():
    code = "import sys, danlu; print('torch' in sys.modules, sorted(danlu.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "False ['audit', 'card', 'compare', 'compress', 'data_check', 'ensemble', 'evaluate', 'explain', "
        "'export', 'generate', 'load_config', 'predict', 'pretrain', 'report', 'train']"
    )


def test_stage_packages_are_callable_verbs():
    from danlu import api
    from danlu.config import load
    from danlu.train.loop import fit

    assert callable(danlu.train)
    assert danlu.train.loop.fit is fit
    assert callable(danlu.evaluate)
    assert callable(danlu.evaluate.streaming.accumulator)
    assert danlu.predict is api.predict
    assert danlu.load_config is load
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        danlu.nope  # noqa: B018


def test_train_evaluate_predict_round_trip(blobs_csv):
    result = danlu.train(
        blobs_cfg(blobs_csv), ["train.epochs=2"], run_dir="out/run1", show_progress=False
    )
    assert isinstance(result.run, RunDir)
    assert result.run.path == Path("out/run1")
    assert isinstance(result.config, Config)
    assert result.config.train.epochs == 2
    assert result.fit.step == 12
    assert result.fit.monitor == "val_loss"
    assert result.fit.best_step is not None
    assert result.equation is None
    lineage = json.loads(Path("out/run1/lineage.json").read_text())
    assert lineage["status"] == "completed"
    assert lineage["steps"] == 12

    metrics = danlu.evaluate(result.run)
    assert metrics["split"] == "test"
    assert metrics["count"] == 24
    assert 0 <= metrics["accuracy"] <= 1
    on_disk = json.loads(Path("out/run1/metrics.json").read_text())
    assert on_disk["test"]["accuracy"] == metrics["accuracy"]
    val = danlu.evaluate("out/run1", "val")
    assert val["count"] == 12
    assert set(json.loads(Path("out/run1/metrics.json").read_text())) == {"test", "val"}

    rows = pd.read_csv(blobs_csv).drop(columns="kind").head(6)
    from_frame = danlu.predict("out/run1", rows)
    assert list(from_frame.columns) == ["row", "label", "confidence", *PROBS]
    assert len(from_frame) == 6
    from_dicts = danlu.predict(result.run, rows.to_dict("records"))
    pd.testing.assert_frame_equal(from_frame, from_dicts)
    one = danlu.predict(result.run, rows.iloc[2].to_dict())
    assert len(one) == 1
    assert one.loc[0, "label"] == from_frame.loc[2, "label"]
    np.testing.assert_allclose(one[PROBS].to_numpy()[0], from_frame[PROBS].to_numpy()[2], 1e-6)
    rows.to_csv("rows.csv", index=False)
    from_csv = danlu.predict(result.run, "rows.csv")
    pd.testing.assert_frame_equal(from_frame, from_csv)
    from_path = danlu.predict(result.run, Path("rows.csv"))
    pd.testing.assert_frame_equal(from_frame, from_path)


def test_train_from_a_yaml_path_and_from_a_config(blobs_csv):
    path = blobs_csv.parent / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny_config(blobs_csv.name, name="exp", data={"label": "kind"})))
    result = danlu.train(str(path), ["train.epochs=1"], show_progress=False)
    assert result.run.path == Path("runs/exp")
    assert result.config.data.dataset == str(blobs_csv.resolve())
    assert result.fit.step == 6

    cfg = danlu.load_config(path)
    again = danlu.train(cfg, ["train.max_steps=2"], run_dir="from_config", show_progress=False)
    assert again.fit.step == 2
    assert again.config.train.max_steps == 2
    assert cfg.train.max_steps is None  # the Config passed in is untouched


def test_same_seed_gives_the_same_weights(blobs_csv):
    a = danlu.train(blobs_cfg(blobs_csv), run_dir="a", show_progress=False)
    b = danlu.train(blobs_cfg(blobs_csv), run_dir="b", show_progress=False)
    c = danlu.train(blobs_cfg(blobs_csv, seed=1), run_dir="c", show_progress=False)
    wa, wb, wc = (load_file(str(r.run.weights)) for r in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert not all(np.array_equal(wa[k].numpy(), wc[k].numpy()) for k in wa)


def test_train_api_errors(blobs_csv):
    with pytest.raises(ConfigError, match="no config given"):
        danlu.train(None)
    with pytest.raises(ConfigError, match=r"did you mean 'train\.optimizer'"):
        danlu.train(blobs_cfg(blobs_csv), ["train.optimzer.lr=1"])
    with pytest.raises(CheckpointError, match="run directory 'nope' not found"):
        danlu.evaluate("nope")
    with pytest.raises(CheckpointError, match="run directory 'nope' not found"):
        danlu.predict("nope", {"a": 1})


def test_resume_through_the_api(blobs_csv):
    first = danlu.train(blobs_cfg(blobs_csv, train={"epochs": 1}), show_progress=False)
    assert first.fit.step == 6
    with pytest.raises(ConfigError, match=r"train\.batch_size: 16 → 8"):
        danlu.train(None, ["train.batch_size=8"], resume=first.run)
    more = danlu.train(None, ["train.epochs=2"], resume="runs/tiny", show_progress=False)
    assert more.fit.resumed_from == 6
    assert more.fit.step == 12
    assert more.run.path == first.run.path


def test_resume_on_changed_data_is_refused_without_touching_the_run(blobs_csv):
    first = danlu.train(blobs_cfg(blobs_csv, train={"epochs": 1}), show_progress=False)
    saved = first.run.config.read_text()
    frame = pd.read_csv(blobs_csv)
    frame.loc[0, "a"] = 9.5
    frame.to_csv(blobs_csv, index=False)
    with pytest.raises(DataError, match=r"the data changed since run 'runs/tiny' started"):
        danlu.train(None, ["train.epochs=2"], resume=first.run)
    assert first.run.config.read_text() == saved
    forced = danlu.train(None, ["train.epochs=2"], resume=first.run, force=True)
    assert forced.fit.step == 12
    assert danlu.load_config(first.run.config).train.epochs == 2


def test_linear_equation_for_a_one_column_regression(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, 80)
    frame = pd.DataFrame({"x": x, "y": 3 * x + 1 + rng.normal(0, 0.01, 80)})
    frame.to_csv("line.csv", index=False)
    cfg = tiny_config(
        "line.csv",
        data={"label": "y", "task": "regression"},
        model={"hidden_sizes": [], "output": "linear"},
        train={"epochs": 60, "batch_size": 80, "optimizer": {"name": "adam", "lr": 0.1}},
    )
    result = danlu.train(cfg, show_progress=False)
    assert result.equation is not None
    label, rest = result.equation.split(" = ")
    slope, intercept = rest.split(" * x + ")
    assert label == "y"
    assert float(slope) == pytest.approx(3, abs=0.1)
    assert float(intercept) == pytest.approx(1, abs=0.1)
    preds = danlu.predict(result.run, {"x": 2.0})
    assert list(preds.columns) == ["row", "prediction"]
    assert preds.loc[0, "prediction"] == pytest.approx(7, abs=0.2)


def test_predict_images_every_input_form(tmp_path):
    x, y = make_images(24)
    folder = tmp_path / "images"
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(folder / f"c{label}" / f"{i:02d}.png")
    result = danlu.train(tiny_config(str(folder)), run_dir="img", show_progress=False)
    probs = ["prob_c0", "prob_c1", "prob_c2"]

    whole = danlu.predict(result.run, folder)
    assert len(whole) == 24
    assert list(whole.columns) == ["input", "label", "confidence", *probs]
    by_name = whole.set_index("input")
    first = folder / "c0" / "00.png"
    one = danlu.predict(result.run, str(first))
    assert one.loc[0, "input"] == str(first)
    np.testing.assert_allclose(one[probs].to_numpy()[0], by_name.loc[str(first), probs], 1e-6)

    # arrays hold the same pixels as the PNG files, so they predict the same
    for array in (x[0, 0], x[0], x[0].transpose(1, 2, 0)):
        out = danlu.predict(result.run, array)
        assert list(out["input"]) == ["array[0]"]
        np.testing.assert_allclose(out[probs].to_numpy()[0], one[probs].to_numpy()[0], 1e-5)
    files = [folder / f"c{y[i]}" / f"{i:02d}.png" for i in range(5)]
    expected = by_name.loc[[str(f) for f in files], probs].to_numpy()
    for batch in (x[:5], x[:5, 0], list(x[:5, 0])):
        out = danlu.predict(result.run, batch)
        assert list(out["input"]) == [f"array[{i}]" for i in range(5)]
        np.testing.assert_allclose(out[probs].to_numpy(), expected, 1e-5)
    listed = danlu.predict(result.run, files)
    np.testing.assert_allclose(listed[probs].to_numpy(), expected, 1e-6)
