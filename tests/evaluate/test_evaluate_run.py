"""`danlu evaluate` on real tiny runs: what metrics.json holds for the report (CI, curves,
worst errors with inputs, decision surface, LM samples), fairness slices, the memory cap,
metric choice, and ensembles."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import danlu
from conftest import tiny_config
from danlu.cli import app
from danlu.errors import ConfigError
from danlu.evaluate.run import evaluate_run
from danlu.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(cfg: dict, run_dir: str, *overrides: str) -> RunDir:
    return danlu.train(cfg, list(overrides), run_dir=run_dir, show_progress=False).run


def people_csv(path: Path, n: int = 240) -> Path:
    """A binary table with a group column the model never sees (kept for slices)."""
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    group = np.where(rng.random(n) < 0.4, "north", "south")
    y = ((x1 + 0.5 * x2 + rng.normal(0, 0.6, n)) > 0).astype(int)
    lines = ["x1,x2,region,outcome"] + [
        f"{a:.4f},{b:.4f},{g},{int(t)}" for a, b, g, t in zip(x1, x2, group, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def people_cfg(path: Path, data: dict | None = None, **sections) -> dict:
    base = {"label": "outcome", "features": ["x1", "x2"], "split": {"val": 0.2, "test": 0.3}}
    return tiny_config(str(path), data={**base, **(data or {})}, **sections)


def test_a_table_run_records_ci_curves_worst_rows_and_the_decision_surface(tmp_path):
    run = _train(people_cfg(people_csv(tmp_path / "people.csv")), "runs/p")
    m = evaluate_run(run)
    assert m["headline"] == "accuracy" and m["count"] == 72
    ci = m["ci"]
    assert ci["low"] <= m["accuracy"] <= ci["high"] and ci["replicates"] == 200
    assert set(m["curves"]) == {"roc", "pr", "calibration"}
    assert list(m["curves"]["roc"]) == ["1"]
    assert 0.5 < m["roc_auc"] <= 1 and 0 <= m["ece"] < 0.5
    wrong = m["confusion_matrix"][0][1] + m["confusion_matrix"][1][0]
    assert len(m["worst"]) == min(10, wrong)
    w = m["worst"][0]
    assert w["true"] != w["predicted"] and w["where"].startswith("row ")
    assert set(w["input"]["values"]) == {"x1", "x2"}
    surface = m["decision_surface"]
    assert surface["features"] == ["x1", "x2"]
    assert np.array(surface["proba"]).shape == (100, 100)
    assert len(surface["points"]["x"]) == 72
    on_disk = json.loads(run.metrics.read_text())["test"]
    assert on_disk["ci"] == ci and on_disk["worst"] == m["worst"]


def test_slices_by_a_column_the_model_does_not_use(tmp_path):
    path = people_csv(tmp_path / "people.csv")
    run = _train(people_cfg(path, evaluate={"slices": ["region"]}), "runs/s")
    m = evaluate_run(run)
    s = m["slices"]["region"]
    assert set(s["groups"]) == {"north", "south"}
    assert sum(g["count"] for g in s["groups"].values()) == m["count"]
    rates = [g["positive_rate"] for g in s["groups"].values()]
    assert s["demographic_parity_difference"] == pytest.approx(max(rates) - min(rates))
    assert "equalized_odds_difference" in s and "accuracy" in s["gaps"]

    bad = _train(people_cfg(path, evaluate={"slices": ["county"]}), "runs/s2")
    with pytest.raises(ConfigError, match=r"evaluate.slices: no column 'county'.*region"):
        evaluate_run(bad)


def test_a_metric_that_does_not_fit_the_task_is_refused_before_any_work(tmp_path):
    path = people_csv(tmp_path / "people.csv")
    run = _train(people_cfg(path, evaluate={"metrics": ["accuracy", "roc_auc"]}), "runs/m")
    m = evaluate_run(run)
    assert "accuracy" in m and "roc_auc" in m and "f1_macro" not in m
    assert "curves" in m  # the report's tables stay
    text = run.config.read_text().replace("- roc_auc", "- bleu")
    run.config.write_text(text)
    with pytest.raises(ConfigError, match="'bleu' scores generated text"):
        evaluate_run(run)


def test_memory_cap_gives_the_same_numbers(tmp_path):
    path = people_csv(tmp_path / "people.csv", n=600)
    run = _train(people_cfg(path), "runs/c")
    full = evaluate_run(run)
    capped = evaluate_run(run, memory_mb=0.0005)  # ~500 bytes: folds after the first batch
    assert capped["confusion_matrix"] == full["confusion_matrix"]
    for key in ("accuracy", "f1_macro", "log_loss", "ece"):
        assert capped[key] == pytest.approx(full[key])
    assert capped["roc_auc"] == pytest.approx(full["roc_auc"], abs=2e-3)


def test_image_worst_errors_carry_a_png_thumbnail(idx_folder):
    slow = {"epochs": 1, "optimizer": {"name": "sgd", "lr": 1e-6}}  # about the initial model
    cfg = tiny_config(str(idx_folder), train=slow, evaluate={"bootstrap": 0})
    run = _train(cfg, "runs/img")
    m = evaluate_run(run)
    assert "ci" not in m and "decision_surface" not in m
    assert m["worst"], "an under-trained model makes errors"
    from base64 import b64decode
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(b64decode(m["worst"][0]["input"]["png"])))
    assert img.format == "PNG" and img.size == (64, 64)  # 8×8 upscaled


def test_text_worst_errors_carry_the_text(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    rows = ["text,label"] + [
        f"{' '.join(rng.choice(words) for _ in range(6))},{rng.choice(['x', 'y'])}"
        for _ in range(80)
    ]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(
        str(tmp_path / "t.csv"),
        data={
            "text": "text",
            "label": "label",
            "tokenizer": {"type": "wordpiece", "vocab_size": 60},
        },
        model={"type": "rnn", "hidden_size": 8, "num_layers": 1, "dim": 8},
        train={"epochs": 1},
    )
    cfg["model"].pop("hidden_sizes")
    m = evaluate_run(_train(cfg, "runs/txt"))
    assert m["worst"] and m["worst"][0]["input"]["kind"] == "text"
    assert set(m["worst"][0]["input"]["text"].split()) <= set(words)


def test_a_language_model_evaluation_keeps_sample_generations(tmp_path):
    rng = random.Random(0)
    (tmp_path / "c").mkdir()
    for d in range(6):
        words = " ".join(rng.choice(["in", "the", "beginning", "was"]) for _ in range(150))
        (tmp_path / "c" / f"d{d}.txt").write_text(words + "\n")
    cfg = {
        "name": "lm",
        "data": {
            "dataset": str(tmp_path / "c"),
            "task": "language_modeling",
            "tokenizer": {"type": "char", "vocab_size": 64},
            "block_size": 48,
            "split": {"val": 0.2, "test": 0.0},
        },
        "model": {"type": "gpt", "num_layers": 1, "dim": 16, "num_heads": 2},
        "train": {"max_steps": 5, "batch_size": 8, "tensorboard": False, "precision": "fp32"},
    }
    m = evaluate_run(_train(cfg, "runs/lm"), "val")
    assert m["headline"] == "perplexity" and m["ci"]["metric"] == "perplexity"
    assert len(m["examples"]) == 3
    assert {"prompt", "reference", "generated"} <= set(m["examples"][0])
    assert len(m["examples"][0]["prompt"]) == 24  # char tokens


# ----------------------------------------------------------------------------- ensembles


def test_an_ensemble_averages_probabilities_and_reports_each_member(tmp_path):
    path = people_csv(tmp_path / "people.csv")
    split = {"val": 0.2, "test": 0.3, "seed": 7}
    a = _train(people_cfg(path, data={"split": split}, seed=1), "runs/a")
    b = _train(
        people_cfg(path, data={"split": split}, seed=2, model={"hidden_sizes": [8, 8]}), "runs/b"
    )
    result = danlu.ensemble([a.path, b.path], "runs/ens")
    m = result.metrics
    assert [x["run"] for x in m["members"]] == ["runs/a", "runs/b"]
    assert all(x["metric"] == "accuracy" for x in m["members"])
    assert (Path("runs/ens/members/0/model.safetensors")).is_file()
    # the ensemble's probabilities are the members' average
    rows = [{"x1": 0.3, "x2": -0.2}, {"x1": -1.0, "x2": 0.5}]
    pa, pb, pe = (danlu.predict(r, rows) for r in ("runs/a", "runs/b", "runs/ens"))
    cols = [c for c in pe.columns if c.startswith("p_")]
    np.testing.assert_allclose(
        pe[cols].to_numpy(), (pa[cols].to_numpy() + pb[cols].to_numpy()) / 2, atol=1e-6
    )
    lineage = json.loads(Path("runs/ens/lineage.json").read_text())
    assert lineage["kind"] == "ensemble" and len(lineage["members"]) == 2
    # weights
    w = danlu.ensemble([a.path, b.path], "runs/ens_w", weights=[1.0, 0.0], evaluate=False)
    pw = danlu.predict(w.run, rows)
    np.testing.assert_allclose(pw[cols].to_numpy(), pa[cols].to_numpy(), atol=1e-6)


def test_ensemble_refuses_members_that_do_not_fit(tmp_path):
    path = people_csv(tmp_path / "people.csv")
    a = _train(people_cfg(path, seed=1), "runs/a")
    b = _train(people_cfg(path, seed=2), "runs/b")  # split seed follows the run seed
    with pytest.raises(ConfigError, match=r"splits its data differently \(split seed 2 vs 1\)"):
        danlu.ensemble([a.path, b.path], "runs/e")
    with pytest.raises(ConfigError, match="at least 2 runs"):
        danlu.ensemble([a.path], "runs/e")
    reg = _train(
        tiny_config(str(path), data={"label": "x2", "features": ["x1"], "task": "regression"},
                    seed=1),
        "runs/r",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="is a regression model"):
        danlu.ensemble([a.path, reg.path], "runs/e")
    with pytest.raises(ConfigError, match=r"model\.type: ensemble is not trained"):
        danlu.train({**people_cfg(path), "model": {"type": "ensemble", "members": ["a", "b"]}})
    assert not Path("runs/e").exists()


def test_ensemble_cli(tmp_path):
    path = people_csv(tmp_path / "people.csv")
    split = {"val": 0.2, "test": 0.3, "seed": 3}
    _train(people_cfg(path, data={"split": split}, seed=1), "runs/a")
    _train(people_cfg(path, data={"split": split}, seed=2), "runs/b")
    r = CliRunner().invoke(app, ["ensemble", "runs/a", "runs/b", "--out", "runs/e"])
    assert r.exit_code == 0, r.output
    assert "ensemble of 2 runs" in r.output and "runs/a: accuracy" in r.output
    r = CliRunner().invoke(app, ["ensemble", "runs/a", "runs/b", "--out", "runs/e"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(app, ["ensemble", "runs/a", "runs/b", "--out", "x", "--weights", "a"])
    assert r.exit_code == 2 and "--weights 'a' is not" in r.output
    r = CliRunner().invoke(app, ["evaluate", "runs/e"])
    assert r.exit_code == 0 and "bootstrap interval" in r.output
    assert torch.get_num_threads() == 1
