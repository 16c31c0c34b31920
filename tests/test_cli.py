"""`danlu VERB ...` end to end: run directories, outputs, and one-line user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import danlu
from conftest import tiny_config
from danlu.cli import app
from danlu.config import load

ANSI = re.compile(r"\x1b\[[0-9;]*m")
runner = CliRunner()


class Result:
    def __init__(self, code: int, stdout: str, stderr: str, exception: BaseException | None):
        self.code = code
        self.stdout = ANSI.sub("", stdout)
        self.stderr = ANSI.sub("", stderr)
        self.exception = exception


def cli(*args: object) -> Result:
    r = runner.invoke(app, [str(a) for a in args])
    return Result(r.exit_code, r.stdout, r.stderr, r.exception)


def run_module(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "danlu", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


def assert_user_error(code: int, stdout: str, stderr: str, *expected: str) -> str:
    """Exit status 2, one line starting with 'error:', no traceback; returns that line."""
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DANLU_DEBUG", raising=False)


@pytest.fixture
def tiny_yaml(blobs_csv: Path) -> Path:
    """tiny.yaml next to blobs.csv (the data path is relative to the config file)."""
    path = blobs_csv.parent / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(blobs_csv.name, data={"label": "kind"})))
    return path


@pytest.fixture
def rows_csv(blobs_csv: Path) -> Path:
    """The first 10 blobs rows without the label column."""
    frame = pd.read_csv(blobs_csv).head(10).drop(columns="kind")
    path = blobs_csv.parent / "rows.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_run(tiny_yaml: Path) -> Path:
    r = cli("train", tiny_yaml)
    assert r.code == 0, r.stderr
    return Path("runs/tiny")


# --------------------------------------------------------------------------------- train


def test_train_in_a_subprocess_writes_the_whole_run_directory(tiny_yaml):
    proc = run_module("train", tiny_yaml.name)
    assert proc.returncode == 0, proc.stderr
    assert "run: runs/tiny  (18 steps" in proc.stdout
    assert "Traceback" not in proc.stderr
    run = Path("runs/tiny")

    assert load(run / "config.yaml") == load(tiny_yaml)

    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["status"] == "completed"
    assert lineage["seed"] == 0
    assert re.fullmatch(r"[0-9a-f]{64}", lineage["data_hash"])
    assert lineage["packages"]["torch"] == torch.__version__
    started = datetime.fromisoformat(lineage["started"])
    ended = datetime.fromisoformat(lineage["ended"])
    assert started <= ended
    assert lineage["steps"] == 18
    assert lineage["data_sizes"] == {"train": 84, "val": 12, "test": 24}

    card = json.loads((run / "data_card.json").read_text())
    assert sum(card["sizes"].values()) == 120
    spec = json.loads((run / "preprocess.json").read_text())
    assert spec["class_names"] == ["ant", "bee", "cat"]
    assert spec["label"] == "kind"
    assert [c["name"] for c in spec["table"]["columns"]] == ["a", "b", "colour"]

    weights = load_file(str(run / "model.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values())

    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert steps[-1] == 18
    for step in steps:
        folder = run / "checkpoints" / f"step-{step}"
        names = {p.name for p in folder.iterdir()}
        assert names == {"model.safetensors", "optimizer.pt", "rng.pt", "state.json"}
        assert json.loads((folder / "state.json").read_text())["step"] == step

    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert records
    assert all(isinstance(r["step"], int) for r in records)
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    train_steps = [r["step"] for r in records if "train_loss" in r]
    assert train_steps == sorted(set(train_steps))
    assert train_steps[-1] == 18
    assert any("val_accuracy" in r for r in records)


def test_train_prints_the_run_and_best_metric(tiny_yaml):
    r = cli("train", tiny_yaml)
    assert r.code == 0, r.stderr
    assert r.stdout.startswith("run: runs/tiny  (18 steps, ")
    assert re.search(r"best val_loss: \d\.\d{4} at step \d+", r.stdout)
    assert "training 18 steps" in r.stderr


def test_run_directory_clash_gets_a_suffix(tiny_yaml):
    for expected in ("runs/tiny", "runs/tiny-2", "runs/tiny-3"):
        r = cli("train", tiny_yaml, "train.epochs=1")
        assert r.code == 0, r.stderr
        assert f"run: {expected}  (" in r.stdout
        assert (Path(expected) / "model.safetensors").is_file()


def test_run_dir_option(tiny_yaml, tmp_path):
    r = cli("train", tiny_yaml, "train.epochs=1", "--run-dir", "elsewhere/mine")
    assert r.code == 0, r.stderr
    assert (tmp_path / "elsewhere/mine/model.safetensors").is_file()
    assert not Path("runs").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = cli("train", tiny_yaml, "--run-dir", "full")
    assert_user_error(
        r.code,
        r.stdout,
        r.stderr,
        "error: run directory 'full' already exists and is not empty",
        "--resume full",
    )
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]


def test_a_failed_train_leaves_no_run_folder(tiny_yaml):
    r = cli("train", tiny_yaml, "data.label=nolabel")
    assert_user_error(r.code, r.stdout, r.stderr, "label column 'nolabel' not found", "kind")
    assert not Path("runs").exists()
    r = cli("train", tiny_yaml, "train.epochs=1")
    assert "run: runs/tiny  (" in r.stdout


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_prints_accuracy_and_writes_metrics(tiny_run):
    r = cli("evaluate", tiny_run)
    assert r.code == 0, r.stderr
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    test = metrics["test"]
    assert test["split"] == "test"
    assert test["count"] == 24
    assert 0.0 <= test["accuracy"] <= 1.0
    assert sum(map(sum, test["confusion_matrix"])) == 24
    assert set(test["per_class"]) == {"ant", "bee", "cat"}
    assert re.search(rf"accuracy\s+│\s+{test['accuracy']:.4f}", r.stdout)
    assert "runs/tiny · test split · 24 examples" in " ".join(r.stdout.split())
    ci = test["ci"]
    assert f"accuracy {test['accuracy']:.4f}, 95% bootstrap interval [{ci['low']:.4f}" in r.stdout
    assert "report: runs/tiny/report.html" in r.stdout
    assert "id='confusion-matrix'" in (tiny_run / "report.html").read_text()
    (tiny_run / "report.html").unlink()

    r = cli("evaluate", tiny_run, "--split", "val", "--no-report")
    assert r.code == 0, r.stderr
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(metrics) == {"test", "val"}
    assert metrics["val"]["count"] == 12
    assert metrics["test"] == test
    assert "runs/tiny · val split · 12 examples" in " ".join(r.stdout.split())
    assert not (tiny_run / "report.html").exists()


# ------------------------------------------------------------------------------- predict


def test_predict_rows_to_csv(tiny_run, rows_csv, blobs_csv):
    r = cli("predict", tiny_run, rows_csv, "--out", "preds.csv")
    assert r.code == 0, r.stderr
    assert "wrote 10 predictions to preds.csv" in r.stdout
    preds = pd.read_csv("preds.csv")
    assert list(preds.columns) == [
        "row",
        "label",
        "confidence",
        "prob_ant",
        "prob_bee",
        "prob_cat",
    ]
    assert list(preds["row"]) == list(range(1, 11))
    probs = preds[["prob_ant", "prob_bee", "prob_cat"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(preds["confidence"], probs.max(axis=1), rtol=1e-6)
    assert list(preds["label"]) == [["ant", "bee", "cat"][i] for i in probs.argmax(axis=1)]
    truth = pd.read_csv(blobs_csv)["kind"].head(10)
    assert (preds["label"] == truth).mean() >= 0.8
    # the table on the screen shows the same labels
    for label in preds["label"]:
        assert label in r.stdout


def test_predict_an_image_folder(image_folder):
    cfg = tiny_config(str(image_folder))
    danlu.train(cfg, run_dir="runs/images", show_progress=False)
    r = cli("predict", "runs/images", image_folder, "--out", "img.csv")
    assert r.code == 0, r.stderr
    assert "wrote 24 predictions to img.csv" in r.stdout
    preds = pd.read_csv("img.csv")
    assert len(preds) == 24
    assert {Path(p).parent.name for p in preds["input"]} == {"class_0", "class_1", "class_2"}
    assert set(preds["label"]) <= {"class_0", "class_1", "class_2"}
    probs = preds[[f"prob_class_{i}" for i in range(3)]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    one = cli("predict", "runs/images", next(image_folder.glob("class_1/*.png")))
    assert one.code == 0, one.stderr
    assert "class_" in one.stdout
    files = sorted(image_folder.glob("class_2/*.png"))[:3]
    several = cli("predict", "runs/images", *files, "--out", "three.csv")
    assert several.code == 0, several.stderr
    assert list(pd.read_csv("three.csv")["input"]) == [str(f) for f in files]


def test_predict_user_errors(tiny_run, blobs_csv, rows_csv):
    r = cli("predict", tiny_run, "missing.csv")
    assert_user_error(r.code, r.stdout, r.stderr, "error: input 'missing.csv' not found")
    Path("blocker").write_text("a file where a folder should be")
    r = cli("predict", tiny_run, rows_csv, "--out", "blocker/preds.csv")
    assert_user_error(r.code, r.stdout, r.stderr, "cannot write predictions to 'blocker/preds.csv'")
    pd.read_csv(blobs_csv).drop(columns="colour").to_csv("nocolour.csv", index=False)
    r = cli("predict", tiny_run, "nocolour.csv")
    assert_user_error(r.code, r.stdout, r.stderr, "missing feature column(s) colour")


# ----------------------------------------------------------------------- other commands


def test_datasets_list():
    r = cli("datasets", "list")
    assert r.code == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in ("fashion-mnist", "mnist-5k", "digits", "iris", "wine", "breast-cancer"):
        assert any(line.startswith(f"{name} ") and "classification" in line for line in lines)
    assert any(line.startswith("diabetes ") and "regression" in line for line in lines)
    # every dataset says whether it is on this machine and where from
    from danlu.data.builtin import CATALOG

    assert sum("local: " in line for line in lines) == len(CATALOG)


def test_config_show_prints_resolved_yaml_with_overrides(tiny_yaml):
    r = cli("config", "show", tiny_yaml, "train.epochs=7", "model.hidden_sizes=[8,4]")
    assert r.code == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["train"]["epochs"] == 7
    assert shown["model"]["hidden_sizes"] == [8, 4]
    assert shown["train"]["schedule"]["name"] == "constant"  # defaults are filled in
    assert shown["data"]["dataset"] == str(tiny_yaml.parent.resolve() / "blobs.csv")
    assert load(shown) == load(tiny_yaml, ["train.epochs=7", "model.hidden_sizes=[8,4]"])


def test_config_show_bundled_example():
    r = cli("config", "show", "fashion_cnn")
    assert r.code == 0, r.stderr
    assert yaml.safe_load(r.stdout)["model"]["type"] == "cnn"


def test_config_schema_is_json():
    r = cli("config", "schema")
    assert r.code == 0, r.stderr
    schema = json.loads(r.stdout)
    assert {"data", "model", "train", "evaluate"} <= set(schema["properties"])
    assert schema["required"] == ["data", "model"]
    assert "OptimizerConfig" in schema["$defs"]


def test_help_lists_the_verbs():
    r = cli("--help")
    assert r.code == 0
    for verb in ("train", "evaluate", "predict", "datasets", "config", "quickstart"):
        assert verb in r.stdout


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["train", "tiny.yaml", "train.optimzer.lr=1"],
            "error: tiny.yaml: unknown key 'train.optimzer'; did you mean 'train.optimizer'?",
        ),
        (["train", "missing.yaml"], "error: config file 'missing.yaml' not found"),
        (["train"], "error: no config given"),
        (["train", "tiny.yaml", "train.epochs"], "error: override 'train.epochs' is not key=value"),
        (["train", "tiny.yaml", "train.batch_size=abc"], "train.batch_size: Input should be"),
        (["evaluate", "runs/nope"], "error: run directory 'runs/nope' not found"),
        (["evaluate", ".", "--split", "bogus"], "error: --split 'bogus' is not a split"),
        (["evaluate", "."], "is not a danlu run: it has no config.yaml"),
        (["predict", "runs/nope", "rows.csv"], "error: run directory 'runs/nope' not found"),
        (["config", "show", "tiny.yaml", "model.type=mpl"], "did you mean 'mlp'?"),
        (
            ["train", "tiny.yaml", "--run-dir", "tiny.yaml"],
            "error: --run-dir 'tiny.yaml' is a file",
        ),
        (["predict", ".", "rows.csv", "--out", "."], "error: --out '.' is a folder"),
        (["config", "show", "tiny.yaml", "[b]x"], "error: override '[b]x' is not key=value"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tiny_yaml, args, expected):
    r = cli(*args)
    assert_user_error(r.code, r.stdout, r.stderr, expected)
    assert r.stdout == ""


def test_user_error_in_a_subprocess_and_debug_traceback(tiny_yaml):
    proc = run_module("config", "show", "tiny.yaml", "train.optimzer=1")
    line = assert_user_error(proc.returncode, proc.stdout, proc.stderr)
    assert line == "error: tiny.yaml: unknown key 'train.optimzer'; did you mean 'train.optimizer'?"
    proc = run_module("config", "show", "tiny.yaml", "train.optimzer=1", "--debug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "danlu.errors.ConfigError: tiny.yaml: unknown key 'train.optimzer'" in proc.stderr
    proc = run_module("config", "show", "tiny.yaml", "train.optimzer=1", env={"DANLU_DEBUG": "1"})
    assert "Traceback" in proc.stderr


def test_debug_reraises_in_process(tiny_yaml):
    r = cli("train", "tiny.yaml", "train.optimzer.lr=1", "--debug")
    assert r.code == 1
    assert type(r.exception).__name__ == "ConfigError"
    assert "did you mean 'train.optimizer'?" in str(r.exception)


# -------------------------------------------------------------------------------- resume


def history_steps(run: Path) -> list[int]:
    lines = (run / "history.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "train_loss" in line]


def test_resume_refuses_a_changed_config_and_continues_to_a_new_length(tiny_yaml):
    r = cli("train", tiny_yaml, "train.epochs=2")
    assert r.code == 0, r.stderr
    run = Path("runs/tiny")
    assert history_steps(run)[-1] == 12
    saved = (run / "config.yaml").read_text()

    r = cli("train", "--resume", run, "train.optimizer.lr=0.5")
    assert_user_error(
        r.code,
        r.stdout,
        r.stderr,
        "the config differs from the one run 'runs/tiny' was trained with",
        "train.optimizer.lr: 0.01 → 0.5",
        "--force",
    )
    assert (run / "config.yaml").read_text() == saved

    r = cli("train", "--resume", run, "train.epochs=4")
    assert r.code == 0, r.stderr
    assert "resumed from step 12" in r.stderr
    assert "run: runs/tiny  (24 steps" in r.stdout
    assert history_steps(run) == sorted(set(history_steps(run)))
    assert history_steps(run)[-1] == 24
    assert (run / "checkpoints" / "step-24" / "state.json").is_file()
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["status"] == "completed"
    assert len(lineage["resumes"]) == 1
    assert load(run / "config.yaml").train.epochs == 4

    r = cli("train", "--resume", run, "train.max_steps=30")
    assert r.code == 0, r.stderr
    assert "run: runs/tiny  (30 steps" in r.stdout

    r = cli("train", "--resume", run, "train.optimizer.lr=0.5", "train.max_steps=36", "--force")
    assert r.code == 0, r.stderr
    assert "run: runs/tiny  (36 steps" in r.stdout
    assert load(run / "config.yaml").train.optimizer.lr == 0.5
    assert not Path("runs/tiny-2").exists()


def test_resume_of_a_missing_run(tiny_yaml):
    r = cli("train", "--resume", "runs/nope")
    assert_user_error(r.code, r.stdout, r.stderr, "run directory 'runs/nope' not found")


# ------------------------------------------------------------------- the example configs


def test_xor_example_reaches_full_accuracy():
    r = cli("train", "configs/xor_mlp.yaml")
    assert r.code == 0, r.stderr
    assert "run: runs/xor_mlp  (2000 steps" in r.stdout
    r = cli("evaluate", "runs/xor_mlp", "--split", "train")
    assert r.code == 0, r.stderr
    metrics = json.loads(Path("runs/xor_mlp/metrics.json").read_text())["train"]
    assert metrics["count"] == 4
    assert metrics["accuracy"] == 1.0
    assert re.search(r"accuracy\s+│\s+1\.0000", r.stdout)


def test_linear_regression_example_fits_the_line():
    r = cli("train", "configs/linear_regression.yaml")
    assert r.code == 0, r.stderr
    m = re.search(r"fitted: y = (-?[\d.]+) \* x \+ (-?[\d.]+)", r.stdout)
    assert m, r.stdout
    slope, intercept = float(m.group(1)), float(m.group(2))
    assert abs(slope - 2) < 0.1
    assert abs(intercept) < 0.2


@pytest.mark.parametrize(
    ("example", "classes"), [("tabular_wine", 3), ("mnist_mlp", 10)], ids=["wine", "mnist"]
)
def test_example_trains_shortened_and_evaluates(example, classes):
    r = cli("train", f"configs/{example}.yaml", "train.epochs=2")
    assert r.code == 0, r.stderr
    assert f"run: runs/{example}  (" in r.stdout
    r = cli("evaluate", f"runs/{example}")
    assert r.code == 0, r.stderr
    test = json.loads(Path(f"runs/{example}/metrics.json").read_text())["test"]
    assert len(test["per_class"]) == classes
    assert test["accuracy"] > 1.5 / classes  # well above chance after two epochs
    assert sum(map(sum, test["confusion_matrix"])) == test["count"]


@pytest.mark.slow
def test_quickstart_at_reduced_size():
    """The whole tour (R8 → MiniLM → evaluate → int8 → report → registry) at a tiny size; the
    stages themselves are tested fast in tests/test_pipeline.py."""
    r = cli("quickstart", "--no-serve", "data.max_samples=300", "data.max_eval_samples=100",
            "train.max_steps=4", "train.eval_every=2")  # fmt: skip
    assert r.code == 0, r.stderr
    m = re.search(r"test accuracy: (\d\.\d{4}) on 100 examples", r.stdout)
    assert m, r.stdout
    metrics = json.loads(Path("runs/quickstart_r8/metrics.json").read_text())
    assert f"{metrics['test']['accuracy']:.4f}" == m.group(1)
    assert "registry: quickstart-r8:1" in r.stdout
    assert Path("runs/quickstart_r8/compressed/dynamic-int8/model.safetensors").is_file()
