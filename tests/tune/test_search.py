"""`danlu tune`: an Optuna study whose trials are danlu runs (tiny MLPs on a 3-class table).

One study is run once for the module, in two invocations (3 trials, then continued to 5), and
inspected by several tests; the error tests never train.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import yaml
from typer.testing import CliRunner

import danlu
from danlu import api
from danlu.cli import app
from danlu.config_tune import ParamSpec
from danlu.errors import CheckpointError, ConfigError
from danlu.tune.search import run_study
from danlu.tune.space import Param, yaml_text

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def write_blobs(folder: Path) -> Path:
    """120 rows of 3 overlapping classes: accuracy depends on the settings, never 100 %."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    pts = np.array([[0, 0], [3, 3], [0, 3]])[y] + rng.normal(0, 0.9, size=(120, 2))
    rows = [f"{p[0]:.4f},{p[1]:.4f},k{c}" for p, c in zip(pts, y, strict=True)]
    path = folder / "blobs.csv"
    path.write_text("a,b,kind\n" + "\n".join(rows) + "\n")
    return path


def study_config(data: Path, **tune: Any) -> dict[str, Any]:
    return {
        "name": "blobs",
        "seed": 0,
        "data": {"dataset": str(data), "label": "kind", "split": {"val": 0.25, "test": 0.1}},
        "model": {"type": "mlp", "hidden_sizes": [8]},
        "train": {
            "epochs": 4, "batch_size": 16, "log_every": 50, "tensorboard": False,
            "precision": "fp32", "monitor": "val_accuracy",
            "optimizer": {"name": "sgd", "lr": 0.1},
        },
        "tune": {
            "trials": 5, "startup_trials": 1, "warmup_evaluations": 1, "pruner": "median",
            "space": {
                # 1e-4 barely moves in 4 epochs, 1e3 blows up: a bad region on both sides
                "train.optimizer.lr": {"type": "log_uniform", "low": 1.0e-4, "high": 1.0e3},
                "model.hidden_sizes": {"type": "choice", "values": [[8], [16, 8]]},
                "model.dropout": {"type": "uniform", "low": 0.0, "high": 0.3},
                "train.epochs": {"type": "int", "low": 3, "high": 4},
            },
            **tune,
        },
    }  # fmt: skip


def never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the study trained although its input was invalid")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 5-trial study run as 3 trials, then continued by the same call with trials=5."""
    root = tmp_path_factory.mktemp("tune")
    cfg = study_config(write_blobs(root))
    folder = root / "study"
    first = run_study(cfg, train=api.train, trials=3, study_dir=folder)
    weights = folder / "trial-0000" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = run_study(cfg, train=api.train, study_dir=folder)
    again = run_study(cfg, train=api.train, study_dir=folder)
    return {"cfg": cfg, "folder": folder, "first": first, "second": second, "again": again,
            "stamp": (stamp, weights.stat().st_mtime_ns)}  # fmt: skip


def load(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="blobs", storage=f"sqlite:///{folder / 'study.db'}")


def get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_each_trial_is_a_run_and_the_best_config_trains(study):
    folder, s = study["folder"], load(study["folder"])
    assert [t.number for t in s.trials] == [0, 1, 2, 3, 4]
    for t in s.trials:
        run = folder / f"trial-{t.number:04d}"
        cfg = danlu.load_config(run / "config.yaml")  # a normal run with the trial's values
        assert cfg.train.optimizer.lr == t.params["train.optimizer.lr"]
        assert cfg.model.hidden_sizes == yaml.safe_load(t.params["model.hidden_sizes"])
        assert cfg.train.epochs == t.params["train.epochs"] and cfg.tune is None
        lineage = json.loads((run / "lineage.json").read_text())
        assert lineage["tune"]["trial"] == t.number
        assert lineage["tune"]["state"] == t.state.name.lower().replace("fail", "failed")
    best = s.best_trial
    cfg = danlu.load_config(folder / "best_config.yaml")
    for key, label in best.params.items():
        expected = yaml.safe_load(label) if key == "model.hidden_sizes" else label
        assert get(cfg, key) == expected
    assert cfg.tune is None and cfg.data.dataset == study["cfg"]["data"]["dataset"]
    summary = json.loads((folder / "tune_summary.json").read_text())
    assert summary["best"]["number"] == best.number and summary["best"]["value"] == best.value
    assert summary["best"]["run"] == f"trial-{best.number:04d}"
    assert [r["number"] for r in summary["trials"]] == [0, 1, 2, 3, 4]
    assert all(r["seconds"] > 0 for r in summary["trials"])
    importance = summary["importance"]
    assert set(importance) == set(study["cfg"]["tune"]["space"])
    assert abs(sum(importance.values()) - 1) < 1e-3
    page = (folder / "tune_report.html").read_text()
    assert page.count("<img class='figure'") == 3  # history, per-evaluation curves, importance
    assert "Optimization history" in page and "Parameter importance" in page
    assert "<script" not in page and "src='http" not in page  # self-contained


def test_training_the_best_config_repeats_the_best_trial(study):
    best = load(study["folder"]).best_trial
    again = api.train(study["folder"] / "best_config.yaml", run_dir="again", show_progress=False)
    assert again.fit.best_value == best.value  # fp32 on CPU: the same run, bit for bit


def test_the_value_is_the_metric_of_the_weights_the_run_keeps(study):
    folder, s = study["folder"], load(study["folder"])
    for t in s.trials:
        if t.state.name != "COMPLETE":
            continue
        history = (folder / f"trial-{t.number:04d}" / "history.jsonl").read_text().splitlines()
        val = [json.loads(line)["val_accuracy"] for line in history if '"val"' in line]
        assert t.value == max(val)  # train.monitor is val_accuracy: its best evaluation
        assert list(t.intermediate_values.values()) == val  # one report per evaluation


def test_a_continued_study_runs_to_the_budget_without_redoing_trials(study):
    first, second, again = study["first"], study["second"], study["again"]
    assert (first.ran, first.counted, first.budget) == (3, 3, 3)
    assert (second.ran, second.counted, second.budget) == (2, 5, 5)
    assert (again.ran, again.counted, again.stopped) == (0, 5, None)
    before, after = study["stamp"]
    assert before == after  # trial 0 was not trained again
    assert json.loads((study["folder"] / "study.json").read_text())["continued"]


def test_the_pruner_stops_trials_in_the_bad_region(study):
    folder, s = study["folder"], load(study["folder"])
    pruned = [t for t in s.trials if t.state.name == "PRUNED"]
    assert pruned, [(t.state.name, t.params) for t in s.trials]
    for t in pruned:
        run = folder / f"trial-{t.number:04d}"
        lineage = json.loads((run / "lineage.json").read_text())
        assert lineage["status"] == "pruned" and lineage["tune"]["state"] == "pruned"
        evaluations = sum('"val"' in line for line in (run / "history.jsonl").open())
        assert evaluations == len(t.intermediate_values) < t.params["train.epochs"]
        assert t.user_attrs["pruned_at"]["evaluation"] == evaluations
    rows = json.loads((folder / "tune_summary.json").read_text())["trials"]
    assert sum(r["state"] == "pruned" for r in rows) == len(pruned)


def test_another_config_is_refused_unless_forced(study, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(study["folder"], folder)
    cfg = study["cfg"]
    with pytest.raises(ConfigError, match=r"another config \(train\.batch_size: 16 → 32\)"):
        run_study(cfg, ["train.batch_size=32"], train=never, study_dir=folder)
    forced = run_study(cfg, ["train.batch_size=32"], train=never, study_dir=folder, force=True)
    assert forced.ran == 0 and forced.counted == 5  # the budget was reached already
    load(folder).ask()  # trial 5 left "running", as by a process killed outright
    # the budgets may change without --force; the study's own config is used with --resume
    more = run_study(None, train=api.train, study_dir=folder, resume=True, trials=6)
    assert (more.ran, more.counted) == (1, 6)
    states = [r["state"] for r in more.summary["trials"]]
    assert states[5] == "interrupted" and states[6] != "interrupted"  # 6 replaces 5
    assert danlu.load_config(folder / "trial-0006" / "config.yaml").train.batch_size == 32


def test_ctrl_c_stops_after_the_current_trial(tmp_path):
    cfg = study_config(write_blobs(tmp_path), trials=3)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # the main thread gets it while this trial runs
        return api.train(*args, **kwargs)

    result = run_study(cfg, train=interrupted, study_dir="s")
    assert (result.stopped, result.ran, result.counted) == ("interrupted", 1, 1)
    assert load(Path("s")).trials[0].state.name in ("COMPLETE", "PRUNED")
    assert Path("s/tune_summary.json").is_file()


def test_the_time_budget_stops_early_with_a_note(tmp_path):
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(study_config(write_blobs(tmp_path), trials=4)))
    r = CliRunner().invoke(app, ["tune", str(path), "--timeout", "0.0001", "--study-dir", "s"])
    out = ANSI.sub("", r.stdout)
    assert r.exit_code == 0, out + r.stderr
    assert "stopped by the time budget after 1 trial(s) in this run; 1 of 4 trials done" in out
    assert "run the same command again to continue" in out
    summary = json.loads(Path("s/tune_summary.json").read_text())
    assert len(summary["trials"]) == 1 and summary["stopped"] == "timeout"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"model.dropuot": {"type": "uniform", "low": 0, "high": 0.5}},
         r"tune.space \(model.dropuot=0\): unknown key 'model.dropuot'; did you mean 'model.dropout'\?"),
        ({"train.optimzer.lr": [0.1]}, r"did you mean 'train.optimizer'\?"),
        ({}, r"tune.space: the search space is empty; add a key such as train.optimizer.lr"),
        ({"model.dropout": {"type": "uniform", "low": 0.5, "high": 0.5}},
         r"tune.space.model.dropout: low must be below high \(got low=0.5, high=0.5\)"),
        ({"train.optimizer.lr": {"type": "log_uniform", "low": 0, "high": 1}},
         r"log_uniform needs low > 0 \(got low=0\)"),
        ({"model.hidden_sizes": {"type": "choice", "values": []}},
         r"model.hidden_sizes: a choice needs at least one value"),
        ({"model.dropout": {"type": "normal", "low": 0, "high": 1}},
         r"type 'normal' is not a search type; did you mean 'uniform'\? use one of uniform, "
         r"log_uniform, int, choice"),
        ({"model.dropout": {"type": "uniform", "lo": 0, "high": 1}},
         r"'lo' is not a key of a uniform range; did you mean 'low'\?"),
        ({"train.epochs": {"type": "int", "low": 1.5, "high": 4}}, r"whole bounds"),
        ({"model.dropout": 0.3}, r"a search range is a mapping .* \(got 0.3\)"),
        ({"model.dropout": {"type": "uniform", "low": 0.0, "high": 1.5}},
         r"tune.space \(model.dropout=1.5\): model.dropout: Input should be less than 1"),
        ({"tune.trials": [1, 2]}, r"the search cannot change the tune section"),
        ({"train.optimizer": [{"name": "sgd"}], "train.optimizer.lr": [0.1]},
         r"'train.optimizer.lr' lies inside 'train.optimizer'"),
    ],
)  # fmt: skip
def test_bad_search_spaces_are_one_clear_error(tmp_path, space, message):
    cfg = study_config(tmp_path / "none.csv")
    cfg["tune"]["space"] = space
    with pytest.raises(ConfigError, match=message) as e:
        run_study(cfg, train=never, study_dir="s")
    assert "\n" not in str(e.value)
    assert not Path("s").exists()


def test_bad_options_and_folders(tmp_path):
    cfg = study_config(tmp_path / "none.csv")
    with pytest.raises(ConfigError, match="no tune: section"):
        run_study({k: v for k, v in cfg.items() if k != "tune"}, train=never)
    with pytest.raises(ConfigError, match=r"--trials must be at least 1 \(got 0\)"):
        run_study(cfg, train=never, trials=0)
    with pytest.raises(CheckpointError, match="no study to resume in 's'"):
        run_study(cfg, train=never, study_dir="s", resume=True)
    Path("busy").mkdir()
    (Path("busy") / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="'busy' holds other files and no study"):
        run_study(cfg, train=never, study_dir="busy")
    typo = study_config(tmp_path / "none.csv", metric="val_accuarcy")
    with pytest.raises(ConfigError, match=r"'val_accuarcy' .* did you mean 'val_accuracy'\?"):
        run_study(typo, train=never)
    no_val = study_config(tmp_path / "none.csv")
    no_val["data"]["split"]["val"] = 0
    with pytest.raises(ConfigError, match=r"data\.split\.val is 0"):
        run_study(no_val, train=never)


def test_values_round_trip_through_override_text():
    for value in [1e-05, 0.1, 3, True, None, "yes", [128, 64], [1e-07], {"name": "sgd"}]:
        assert yaml.safe_load(yaml_text(value)) == value
    assert yaml_text(1e-05) == "1.0e-05"
    param = Param("model.hidden_sizes", ParamSpec(type="choice", values=[[64], [128, 64]]))
    assert param.labels == ["[64]", "[128, 64]"]
    assert param.decode("[128, 64]") == [128, 64]
