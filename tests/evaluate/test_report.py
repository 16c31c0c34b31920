"""report.html and compare.html: the right sections for each kind of run, self-contained
(every image a valid embedded PNG, no network reference), user text escaped; end to end on
tiny trained runs; the `danlu report` and `danlu compare` commands."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import danlu
import danlu.cli_report  # (registers report and compare on the app)
from conftest import tiny_config
from danlu.cli import app
from danlu.errors import CheckpointError, ConfigError
from danlu.evaluate.report import write_comparison, write_report

pytestmark = pytest.mark.usefixtures("one_thread")

EVIL = "<script>alert(1)</script>"
RUN_WIDE = ["config", "lineage", "data-card", "learning-curves", "metrics"]
ALL = [
    *RUN_WIDE,
    "confusion-matrix",
    "roc-pr",
    "calibration",
    "per-class",
    "worst-errors",
    "generations",
    "decision-surface",
    "regression",
    "slices",
    "ensemble",
]


# --------------------------------------------------------------------- reading the page


class Page(HTMLParser):
    """The parts of a page the tests look at: section ids, images, references, text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.raw = text
        self.sections: list[str] = []
        self.images: list[str] = []
        self.refs: list[str] = []
        self.tags: list[str] = []
        self.chunks: list[str] = []
        self.feed(text)
        self.text = " ".join(self.chunks)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data: str) -> None:
        if self.lasttag not in ("style", "title"):
            self.chunks.append(data)


def read_page(path: Path) -> Page:
    page = Page(path.read_text(encoding="utf-8"))
    check_self_contained(page)
    return page


def check_self_contained(page: Page) -> None:
    assert "script" not in page.tags  # escaped user text never becomes a tag
    assert not re.search(r"<script", page.raw, re.IGNORECASE)
    assert not any(r.startswith(("http://", "https://", "//")) for r in page.refs), page.refs
    assert all(r.startswith(("#", "data:image/png;base64,")) for r in page.refs), page.refs
    assert "render-error" not in page.raw, re.findall(r"could not be drawn[^<]*", page.raw)
    assert len(page.sections) == len(set(page.sections))
    for src in page.images:
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG"
        image.verify()
        w, h = image.size
        assert 8 <= w <= 1600 and 8 <= h <= 1600, image.size


def expect_sections(page: Page, present: list[str]) -> None:
    assert page.sections == [s for s in ALL if s in present], page.sections


# ------------------------------------------------------------------- hand-written runs


def png_b64(size: int = 8, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_run(
    root: Path,
    name: str,
    split_entry: dict[str, Any] | None,
    task: str = "classification",
    classes: list[str] | None = None,
    split: str = "test",
    **config: Any,
) -> Path:
    """A run directory as `danlu train` + `danlu evaluate` leave it, written from the schema."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "name": name,
        "seed": 0,
        "data": {"dataset": "data.csv", "task": task, "label": "y"},
        "model": {"type": "mlp", "hidden_sizes": [8]},
        "train": {"epochs": 3, "monitor": "val_loss", "optimizer": {"name": "adam", "lr": 0.01}},
        "evaluate": {"split": "test"},
    }
    for key, value in config.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    lineage = {
        "run": name,
        "status": "completed",
        "seed": 0,
        "data_hash": "ab" * 32,
        "config_hash": "cd" * 32,
        "code": {"git_commit": "0123456789abcdef", "git_dirty": True},
        "packages": {"python": "3.11", "torch": "2.0"},
        "host": {"hostname": "box", "platform": "Linux", "cpu_count": 2},
        "command": ["danlu", "train", f"{EVIL}.yaml"],
        "started": "2026-12-01T10:00:00+00:00",
        "ended": "2026-12-01T10:01:00+00:00",
        "parameters": 1234567,
        "trainable_parameters": 1234567,
        "steps": 40,
        "device": "cpu",
        "precision": "fp32",
        "train_seconds": 60.5,
        "best": {"metric": "val_loss", "value": 0.25, "step": 30},
        "stopped_early": False,
    }
    (run / "lineage.json").write_text(json.dumps(lineage))
    classes = classes or []
    card = {
        "dataset": "data.csv",
        "task": task,
        "input": "table",
        "label": "y",
        "sizes": {"train": 800, "val": 100, "test": 100},
        "classes": classes,
        "class_balance": {
            s: {c: n // max(len(classes), 1) for c in classes}
            for s, n in (("train", 800), ("val", 100), ("test", 100))
        },
        "findings": [
            {"level": "warning", "code": "x", "message": f"odd {EVIL}", "action": "look"},
            {"level": "info", "code": "y", "message": "fine", "action": "none"},
        ],
    }
    (run / "data_card.json").write_text(json.dumps(card))
    lines = []
    for step in range(5, 45, 5):
        lr = 0.01 * (1 + math.cos(math.pi * step / 40)) / 2
        lines.append(
            {
                "step": step,
                "epoch": step // 15,
                "split": "train",
                "train_loss": 1.0 / step**0.5,
                "lr": lr,
                "samples_per_s": 100.0,
            }
        )
        if step % 10 == 0:
            lines.append(
                {
                    "step": step,
                    "epoch": step // 15,
                    "split": "val",
                    "val_loss": 1.2 / step**0.5,
                    "val_accuracy": 1 - 1 / step,
                }
            )
    (run / "history.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{cut sho")
    if split_entry is not None:
        (run / "metrics.json").write_text(json.dumps({split: split_entry}))
    return run


def classification_entry(names: list[str]) -> dict[str, Any]:
    """Every key of the schema for a multi-class classifier."""
    k = len(names)
    cm = (np.eye(k, dtype=int) * 30 + 2).tolist()
    grid = np.linspace(-1, 1, 20)
    xx, yy = np.meshgrid(grid, grid)
    predicted = ((xx > 0).astype(int) + (yy > 0).astype(int)) % k
    fpr = np.linspace(0, 1, 11)
    rng = np.random.default_rng(0)
    return {
        "accuracy": 0.91,
        "f1_macro": 0.9,
        "log_loss": 0.3,
        "ece": 0.04,
        "roc_auc": 0.95,
        "count": 100,
        "split": "test",
        "evaluated": "2026-12-01T10:02:00+00:00",
        "headline": "accuracy",
        "ci": {
            "metric": "accuracy",
            "value": 0.91,
            "low": 0.85,
            "high": 0.96,
            "level": 0.95,
            "replicates": 200,
        },
        "class_names": names,
        "confusion_matrix": cm,
        "per_class": {
            n: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 32, "roc_auc": 0.95}
            for n in names
        },
        "curves": {
            "roc": {
                n: {"fpr": fpr.tolist(), "tpr": (fpr ** (1 / (i + 2))).tolist(), "auc": 0.9}
                for i, n in enumerate(names)
            },
            "pr": {
                n: {"recall": fpr.tolist(), "precision": (1 - fpr**3 / 2).tolist(), "ap": 0.8}
                for n in names
            },
            "calibration": {
                "bins": [
                    {
                        "low": i / 10,
                        "high": (i + 1) / 10,
                        "confidence": i / 10 + 0.05,
                        "accuracy": i / 10,
                        "count": 0 if i < 3 else 10 * i,
                    }
                    for i in range(10)
                ],
                "ece": 0.04,
            },
        },
        "worst": [
            {
                "position": 3,
                "where": "row 4",
                "true": names[0],
                "predicted": names[-1],
                "confidence": 0.97,
                "loss": 3.5,
                "input": {"kind": "row", "values": {"colour": EVIL, "size": 1.5}},
            },
            {
                "position": 7,
                "where": "example 8",
                "true": names[1],
                "predicted": names[0],
                "confidence": 0.9,
                "loss": 2.3,
                "input": {"kind": "text", "text": f"hi {EVIL}"},
            },
            {
                "position": 9,
                "where": "file x.png",
                "true": names[-1],
                "predicted": names[1],
                "confidence": None,
                "loss": 1.1,
                "input": {"kind": "image", "png": png_b64()},
            },
        ],
        "decision_surface": {
            "features": ["a", "b"],
            "xs": grid.tolist(),
            "ys": grid.tolist(),
            "proba": np.full(xx.shape, 0.7).tolist(),
            "predicted": predicted.tolist(),
            "points": {
                "x": rng.uniform(-1, 1, 30).tolist(),
                "y": rng.uniform(-1, 1, 30).tolist(),
                "label": (np.arange(30) % k).tolist(),
            },
        },
        "slices": {
            "colour": {
                "groups": {
                    "red": {"count": 60, "accuracy": 0.95, "f1_macro": 0.94},
                    EVIL: {"count": 40, "accuracy": 0.85, "f1_macro": 0.83},
                },
                "gaps": {"accuracy": 0.1, "f1_macro": 0.11},
            }
        },
        "members": [
            {"run": "runs/a", "metric": "accuracy", "value": 0.88},
            {"run": f"runs/{EVIL}", "metric": "accuracy", "value": 0.93},
        ],
    }


def test_classification_report_has_every_section_and_escapes_user_text(tmp_path):
    names = ["ant", "bee", EVIL]
    run = make_run(tmp_path, "cls", classification_entry(names), classes=names)
    path = write_report(run)
    assert path == run / "report.html"
    page = read_page(path)
    expect_sections(page, [s for s in ALL if s not in ("generations", "regression")])
    assert len(page.images) == 6  # 5 figures and the worst error's image thumbnail
    assert EVIL in page.text  # shown as text, escaped in the markup
    assert page.raw.count("&lt;script&gt;") >= 6
    assert "accuracy" in page.text and "0.9100" in page.text
    assert "95% CI 0.8500 – 0.9600" in page.text
    assert "1,234,567" in page.text  # parameters with thousands separators
    assert "test split" in page.text
    assert "+0.0300" in page.text  # the ensemble's gain over the first member
    assert not list(run.glob(".report.html.*"))  # written atomically, no temporary left


def test_regression_report(tmp_path):
    rng = np.random.default_rng(0)
    true = rng.normal(size=300)
    entry = {
        "mse": 0.04,
        "rmse": 0.2,
        "mae": 0.15,
        "r2": 0.96,
        "mape": 0.1,
        "count": 300,
        "headline": "rmse",
        "sample": {"true": true.tolist(), "predicted": (true + rng.normal(0, 0.2, 300)).tolist()},
        "worst": [
            {
                "position": 1,
                "where": "row 2",
                "true": 3.25,
                "predicted": 1.0,
                "confidence": None,
                "loss": 5.06,
                "input": {"kind": "row", "values": {"x": 2}},
            }
        ],
    }
    run = make_run(tmp_path, "reg", entry, task="regression")
    page = read_page(write_report(run))
    expect_sections(page, [*RUN_WIDE, "worst-errors", "regression"])
    assert len(page.images) == 2
    assert "rmse" in page.text and "0.2000" in page.text
    assert "3.2500" in page.text


def test_language_model_report_shows_generations(tmp_path):
    entry = {
        "loss": 2.5,
        "perplexity": 12182.49,
        "accuracy": 0.4,
        "bleu": 21.3,
        "count": 51234,
        "examples": [
            {"source": f"translate {EVIL}", "reference": "ref one", "generated": "gen one"},
            {"source": "x" * 5000, "reference": "ref two", "generated": "gen two"},
        ],
    }
    run = make_run(tmp_path, "lm", entry, task="seq2seq", model={"type": "seq2seq"})
    page = read_page(write_report(run))
    expect_sections(page, [*RUN_WIDE, "generations"])
    assert "gen one" in page.text and "ref two" in page.text
    assert "x" * 401 not in page.text  # long inputs are cut
    assert "12,182.49" in page.text and "51,234" in page.text
    assert "perplexity<span class='value'>12,182.49</span>" in page.raw  # the LM headline


def test_binary_decision_surface_slices_with_fairness_gaps(tmp_path):
    grid = np.linspace(0, 1, 15)
    xx, yy = np.meshgrid(grid, grid[:10])  # rows along y: (10, 15)
    proba = (xx + yy) / 2
    entry = {
        "accuracy": 0.75,
        "count": 4,
        "class_names": ["no", "yes"],
        "decision_surface": {
            "features": ["x1", "x2"],
            "xs": grid.tolist(),
            "ys": grid[:10].tolist(),
            "proba": proba.tolist(),
            "predicted": (proba > 0.5).astype(int).tolist(),
            "points": {"x": [0, 1, 0, 1], "y": [0, 0, 1, 1], "label": [0, 1, 1, 0]},
        },
        "slices": {
            "sex": {
                "groups": {
                    "f": {
                        "count": 2,
                        "accuracy": 1.0,
                        "positive_rate": 0.5,
                        "tpr": 1.0,
                        "fpr": 0.0,
                    },
                    "m": {
                        "count": 2,
                        "accuracy": 0.5,
                        "positive_rate": 0.5,
                        "tpr": 0.5,
                        "fpr": 0.5,
                    },
                },
                "gaps": {"accuracy": 0.5, "positive_rate": 0.0, "tpr": 0.5, "fpr": 0.5},
                "demographic_parity_difference": 0.0,
                "equalized_odds_difference": 0.5,
            }
        },
    }
    run = make_run(tmp_path, "bin", entry, classes=["no", "yes"], split="train")
    page = read_page(write_report(run))
    expect_sections(page, [*RUN_WIDE, "decision-surface", "slices"])
    assert "equalized odds difference 0.5000" in page.text
    assert "demographic parity difference 0.0000" in page.text
    assert "train split" in page.text  # the only split evaluated


def test_a_bare_run_gives_a_short_page_and_bad_data_a_note(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text("name: bare\nmodel: {type: cnn}\n")
    page = read_page(write_report(run))
    assert page.sections == ["config"]
    assert "not evaluated yet" in page.text

    broken = make_run(tmp_path, "broken", {"accuracy": 0.5, "curves": {"roc": {"a": {"fpr": 1}}}})
    text = write_report(broken).read_text()
    assert "could not be drawn" in text  # one section says why; the rest of the page is there
    assert "id='metrics'" in text


def test_without_matplotlib_the_page_has_tables_and_a_note(tmp_path, monkeypatch):
    from danlu.evaluate import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    names = ["a", "b"]
    run = make_run(tmp_path, "noplot", classification_entry(names), classes=names)
    page = read_page(write_report(run))
    assert len(page.images) == 1  # only the worst error's own thumbnail
    assert "pip install 'danlu[report]'" in page.text
    assert "per-class" in page.sections and "slices" in page.sections


def test_the_split_to_report(tmp_path):
    run = make_run(tmp_path, "two", {"accuracy": 0.9, "count": 10}, classes=["a", "b"])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["val"] = {"accuracy": 0.8, "count": 5, "per_class": {"a": {"precision": 1.0}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert "per-class" not in read_page(write_report(run)).sections  # the config's split: test
    page = read_page(write_report(run, "val"))
    assert "per-class" in page.sections
    assert "val split" in page.text
    with pytest.raises(ConfigError, match=r"has no 'train' split \(evaluated splits: test, val"):
        write_report(run, "train")


# --------------------------------------------------------------------- compare (by hand)


def test_compare_hand_written_runs_notes_tasks_and_runs_not_evaluated(tmp_path):
    a = make_run(tmp_path, "a", {"accuracy": 0.9, "log_loss": 0.3, "count": 10})
    b = make_run(
        tmp_path,
        "b",
        {"accuracy": 0.8, "log_loss": 0.2, "count": 10},
        train={"optimizer": {"name": "sgd", "lr": 0.1}},
    )
    c = make_run(tmp_path, "c", None, task="regression")
    out = write_comparison([a, b, c], tmp_path / "cmp.html")
    page = read_page(out)
    assert page.sections == ["runs", "metrics", "learning-curves", "config-diff"]
    assert "different tasks (classification, regression)" in page.text
    assert "not evaluated" in page.text
    best = re.findall(r"<span class='best'>([^<]*)", page.raw)
    assert best == ["0.9000", "0.2000"]  # accuracy: higher is better; log_loss: lower
    assert "train.optimizer.lr" in page.text and "data.task" in page.text
    assert "train.epochs" not in page.text  # equal keys are not listed


# ------------------------------------------------------------------- real tiny runs (e2e)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """XOR (the brief's example) and two tiny blobs runs differing in the learning rate."""
    root = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    pts = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, (90, 2))
    rows = [f"{p[0]:.3f},{p[1]:.3f},{'abc'[c]}" for p, c in zip(pts, y, strict=True)]
    (root / "blobs.csv").write_text("a,b,kind\n" + "\n".join(rows) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("DANLU_CACHE", str(root / "cache"))
        xor = danlu.train(
            "configs/xor_mlp.yaml", ["train.epochs=400"], run_dir="xor", show_progress=False
        )
        danlu.evaluate(xor.run)
        runs = {"xor": root / "xor"}
        for name, lr in (("lr_01", 0.01), ("lr_05", 0.05)):
            cfg = tiny_config(str(root / "blobs.csv"), data={"label": "kind"})
            danlu.train(
                cfg,
                ["train.epochs=2", f"train.optimizer.lr={lr}"],
                run_dir=name,
                show_progress=False,
            )
            danlu.evaluate(root / name)
            runs[name] = root / name
    return runs


def test_report_of_a_trained_xor_run(trained, tmp_path):
    run = tmp_path / "xor"
    shutil.copytree(trained["xor"], run)
    page = read_page(write_report(run))
    for sid in ("config", "lineage", "data-card", "learning-curves", "metrics", "per-class"):
        assert sid in page.sections
    assert "train split" in page.text  # the config's evaluate.split
    metrics = json.loads((run / "metrics.json").read_text())["train"]
    if "decision_surface" not in metrics:
        pytest.skip("metrics.json has no decision_surface yet")
    assert "decision-surface" in page.sections
    assert "confusion-matrix" in page.sections


def test_compare_two_trained_runs_and_its_errors(trained, tmp_path):
    a, b = trained["lr_01"], trained["lr_05"]
    page = read_page(write_comparison([a, b], tmp_path / "c.html"))
    assert page.sections == ["runs", "metrics", "learning-curves", "config-diff"]
    assert "lr_01" in page.text and "lr_05" in page.text
    diff = page.raw[page.raw.index("id='config-diff'") :]
    assert "train.optimizer.lr" in diff
    assert "<td>0.01</td><td>0.05</td>" in diff  # config values exactly as in the YAML
    assert "train.epochs" not in diff
    assert len(page.images) == 1

    with pytest.raises(ConfigError, match=re.escape(f"at least two runs, got 1: '{a}'")):
        write_comparison([a], tmp_path / "x.html")
    with pytest.raises(CheckpointError, match="run directory 'nope' not found"):
        write_comparison([a, "nope"], tmp_path / "x.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"'.*empty' is not a danlu run"):
        write_comparison([a, tmp_path / "empty"], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


# ------------------------------------------------------------------------------- the CLI


def cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_report_evaluates_first_then_writes(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["lr_01"], run)
    (run / "metrics.json").unlink(missing_ok=True)
    r = cli("report", run)
    assert r.exit_code == 0, r.stderr
    assert "evaluating" in r.stdout and "test split" in r.stdout
    assert f"wrote {run / 'report.html'}" in r.stdout.replace("\n", "")
    page = read_page(run / "report.html")
    assert "confusion-matrix" in page.sections or "metrics" in page.sections
    assert "test" in json.loads((run / "metrics.json").read_text())

    r = cli("report", run, "--split", "bogus")
    assert r.exit_code == 2
    assert "--split 'bogus' is not a split" in r.stderr
    r = cli("report", tmp_path / "nope")
    assert r.exit_code == 2
    assert "run directory" in r.stderr and "not found" in r.stderr


def test_cli_compare(trained, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trained["lr_01"], a)
    shutil.copytree(trained["lr_05"], b)
    (b / "metrics.json").unlink()
    r = cli("compare", a, b, "--out", tmp_path / "cmp.html")
    assert r.exit_code == 0, r.stderr
    assert "compared 2 runs" in r.stdout
    assert f"evaluating {b} first" in r.stdout  # a run never evaluated is evaluated first
    assert (b / "metrics.json").is_file()
    page = read_page(tmp_path / "cmp.html")
    assert page.sections == ["runs", "metrics", "learning-curves", "config-diff"]
    assert "not evaluated" not in page.text
    assert "accuracy" in page.text

    r = cli("compare", a)
    assert r.exit_code == 2
    assert "compare needs at least two runs, got 1" in r.stderr
