"""`danlu monitor`: exit codes, the files it writes, the retraining recommendation and
--retrain-with on table (CSV) and text (JSONL) data."""

from __future__ import annotations

import json
import random
import re
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import danlu
from conftest import tiny_config
from danlu.cli import app
from danlu.manifest import verify
from danlu.rundir import RunDir
from danlu.serve.predictor import Predictor
from danlu.serve.requestlog import RequestLog, record, summarize

pytestmark = pytest.mark.usefixtures("one_thread")

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, ANSI.sub("", r.stdout), ANSI.sub("", r.stderr)


def blob_rows(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """conftest's blobs_csv distribution (seed 0, n 120 is that file)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    pts = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, size=(n, 2))
    colour = np.where(y == 1, "red", np.where(rng.random(n) < 0.5, "blue", "green"))
    return pd.DataFrame({"a": pts[:, 0].round(4) + shift, "b": pts[:, 1].round(4),
                         "colour": colour, "kind": np.array(["ant", "bee", "cat"])[y]})  # fmt: skip


WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "big", "small", "red", "blue"]


def texts(n: int, seed: int, new: list[str] | None = None) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9) * (3 if new else 1))]
        words += [rng.choice(new) for _ in range(4)] if new else []
        rows.append({"text": " ".join(words), "label": "yes" if "cat" in words else "no"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("monitor")


@pytest.fixture(scope="module")
def table_run(root: Path) -> Path:
    blob_rows(120, 0).to_csv(root / "blobs.csv", index=False)
    cfg = tiny_config(str(root / "blobs.csv"), data={"label": "kind"})
    return danlu.train(cfg, run_dir=root / "tab", show_progress=False).run.path


@pytest.fixture(scope="module")
def text_run(root: Path) -> Path:
    texts(150, 0).to_json(root / "texts.jsonl", orient="records", lines=True)
    cfg = {
        "seed": 0,
        "data": {"dataset": str(root / "texts.jsonl"),
                 "tokenizer": {"type": "wordpiece", "vocab_size": 60, "min_frequency": 1}},
        "model": {"type": "rnn", "num_layers": 1, "dim": 16, "hidden_size": 16},
        "train": {"epochs": 1, "batch_size": 16, "tensorboard": False, "precision": "fp32"},
    }  # fmt: skip
    return danlu.train(cfg, run_dir=root / "txt", show_progress=False).run.path


def write_log(folder: Path, run: Path, inputs, model: str | None = None, t0: float = 0.0) -> Path:
    """The records a server would append for these inputs (one per input, 1 s apart)."""
    p = Predictor(RunDir.open(run))
    raw = p.collect(inputs)
    preds = p.predict(inputs)
    with RequestLog(folder) as log:
        for i, s in enumerate(summarize(p, raw)):
            r = record(model or run.name, "/v1/predict", s, preds.iloc[i].to_dict(), 2.0)
            log.append({**r, "t": (t0 or r["t"]) + i})
    return folder


def rows(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    return blob_rows(n, seed, shift).drop(columns="kind")


# ---------------------------------------------------------------------------- verdicts


def test_traffic_like_training_exits_0(table_run: Path) -> None:
    log = write_log(Path("logs"), table_run, rows(300, 1))
    code, out, err = cli("monitor", table_run, "--log", log)
    assert code == 0, out + err
    assert "tab: no drift in 9 checks on 300 live samples" in out
    result = json.loads((log / "monitor" / "drift.json").read_text())
    assert (result["status"], result["live"], result["model"]) == ("ok", 300, "tab")
    assert result["gauges"]["drift"] == 0.0
    assert "<h1>Drift: tab</h1>" in (log / "monitor" / "drift.html").read_text()
    assert not (log / "monitor" / "retrain_recommendation.json").exists()


def test_drift_exits_3_with_a_recommendation_removed_once_it_passes(table_run: Path) -> None:
    log = write_log(Path("logs"), table_run, rows(300, 1, shift=6.0))
    code, out, _ = cli("monitor", table_run, "--log", log, "--out", "report")
    assert code == 3
    assert "tab: drift: psi:a" in out
    rec = json.loads(Path("report/retrain_recommendation.json").read_text())
    assert rec["status"] == "drift" and rec["samples"]["live"] == 300
    assert {"psi:a", "ks:a"} <= {d["check"] for d in rec["drifted"]}
    assert rec["since"] == rec["window"][0]  # drifting from the first request
    assert rec["suggested_command"] == (
        f"danlu monitor {table_run} --log logs --retrain-with NEW_LABELLED_DATA.csv"
    )
    md = Path("report/retrain_recommendation.md").read_text()
    assert md.startswith("# Retraining recommended: tab\n") and "| `psi:a` |" in md
    assert "<code>psi:a</code>" in Path("report/drift.html").read_text()
    for f in log.iterdir():
        f.unlink()
    write_log(log, table_run, rows(300, 2))
    assert cli("monitor", table_run, "--log", log, "--out", "report")[0] == 0
    assert not Path("report/retrain_recommendation.json").exists()
    assert not Path("report/retrain_recommendation.md").exists()


def test_a_missing_log_folder_is_one_line(table_run: Path) -> None:
    code, out, err = cli("monitor", table_run, "--log", "nope")
    assert code == 2 and out == ""
    assert err == (
        "error: request log folder 'nope' not found. serve with a request log (danlu serve "
        "--request-log DIR, or serve.request_log)\n"
    )
    Path("logs").mkdir()
    code, _, err = cli("monitor", table_run, "--log", "logs", "--since", "0")
    assert (code, err) == (2, "error: --since is 0.0. it must be positive\n")


def test_few_samples_give_no_verdict_and_other_models_are_named(table_run: Path) -> None:
    log = write_log(Path("logs"), table_run, rows(30, 1, shift=6.0), t0=1000.0)
    code, out, _ = cli("monitor", table_run, "--log", log)
    assert code == 0 and "not enough live samples (30 < 100)" in out
    assert cli("monitor", table_run, "--log", log, "--min-samples", "20")[0] == 3
    code, out, _ = cli("monitor", table_run, "--log", log, "--since", "1")  # t = 1000: old
    assert code == 0 and "not enough live samples (0 < 100)" in out
    write_log(log, table_run, rows(30, 1), model="other")
    code, out, _ = cli("monitor", table_run, "--log", log, "--model", "nobody")
    assert "no requests of model 'nobody' in logs (logged: other, tab; choose with --model)" in out
    code, out, _ = cli(
        "monitor", table_run, "--log", log, "--model", "other", "--min-samples", "20"
    )
    assert code == 0 and "other: no drift" in out


# ----------------------------------------------------------------------------- retrain


def test_retrain_with_new_table_rows(table_run: Path) -> None:
    log = write_log(Path("logs"), table_run, rows(300, 1, shift=6.0))
    blob_rows(30, 7, shift=6.0).to_csv("new.csv", index=False)
    code, out, err = cli("monitor", table_run, "--log", log, "--retrain-with", "new.csv")
    assert code == 3, out + err
    new = table_run.parent / f"tab-retrain-{date.today():%Y%m%d}"
    assert f"retraining on 150 rows (30 new) → {new}" in out
    run = RunDir.open(new)
    assert run.weights.is_file()
    lineage = run.read("lineage.json")
    assert lineage["retrained_from"] == str(table_run.resolve()) and lineage["added_rows"] == 30
    assert "psi:a" in lineage["drift"]["checks"]
    assert sum(run.read("data_card.json")["sizes"].values()) == 150
    data = Path(run.load_config().data.dataset)
    assert data == (log / "monitor" / "retrain_data" / f"{new.name}.csv").resolve()
    merged = pd.read_csv(data)
    pd.testing.assert_frame_equal(merged.tail(30).reset_index(drop=True), pd.read_csv("new.csv"))
    verify(new)  # the lineage written after training is pinned in the manifest


def test_retrain_with_new_jsonl_texts(text_run: Path) -> None:
    drifted = list(texts(150, 1, new=["zebra", "quantum"])["text"])
    log = write_log(Path("logs"), text_run, drifted)
    texts(20, 9, new=["zebra", "quantum"]).to_json("new.jsonl", orient="records", lines=True)
    code, out, err = cli("monitor", text_run, "--log", log, "--retrain-with", "new.jsonl")
    assert code == 3, out + err
    assert "psi:text.chars" in json.loads((log / "monitor" / "drift.json").read_text())["message"]
    new = RunDir.open(text_run.parent / f"txt-retrain-{date.today():%Y%m%d}")
    assert sum(new.read("data_card.json")["sizes"].values()) == 170
    lines = Path(new.load_config().data.dataset).read_text().splitlines()
    assert len(lines) == 170 and json.loads(lines[-1]) == json.loads(
        Path("new.jsonl").read_text().splitlines()[-1]
    )


def test_retrain_needs_the_training_columns(table_run: Path) -> None:
    log = write_log(Path("logs"), table_run, rows(300, 1, shift=6.0))
    blob_rows(10, 7).drop(columns="kind").to_csv("unlabelled.csv", index=False)
    code, _, err = cli("monitor", table_run, "--log", log, "--retrain-with", "unlabelled.csv")
    assert code == 2
    assert err == (
        "error: 'unlabelled.csv' has no column(s) kind. the new rows need the training "
        "columns: a, b, colour, kind\n"
    )


def test_a_registry_reference(table_run: Path) -> None:
    store_module = pytest.importorskip("danlu.serve.store")
    store = store_module.ModelStore("registry")
    store.add(table_run, "blobs")
    log = write_log(Path("logs"), table_run, rows(150, 1), model="blobs")
    code, out, err = cli("monitor", "blobs", "--registry", "registry", "--log", log)
    assert code == 0, out + err
    assert "blobs: no drift" in out
    assert (log / "monitor" / "drift_reference-blobs.json").is_file()  # not in the checkout
    store.checkout("blobs")  # verifies again: the checkout holds only the registered files
