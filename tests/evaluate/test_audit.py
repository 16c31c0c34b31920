"""`danlu audit`: membership inference against real tiny runs. An MLP that memorized random
labels leaks (AUC near 1); a model that never trained on either side does not (AUC near 0.5);
a DP run leaks less than the same run without DP; language models, ensembles, the shadow
attack, the files and the errors."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import danlu
import danlu.cli_audit  # registers `danlu audit`
from conftest import tiny_config, tiny_gpt_config
from danlu.api_audit import fit_shadow
from danlu.cli import app
from danlu.errors import ConfigError, DataError
from danlu.evaluate.audit import Scorer, attack_metrics, audit
from danlu.evaluate.run import build_data, evaluate_run, load_model
from danlu.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def random_labels_csv(path: Path, n: int, seed: int = 0) -> Path:
    """8 noise features and a label drawn at random from 3 classes: nothing to learn, so a
    model can only fit the training rows by memorizing them."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 8)), rng.integers(0, 3, n)
    head = ",".join(f"f{i}" for i in range(8)) + ",label"
    rows = [",".join(f"{v:.4f}" for v in r) + f",c{t}" for r, t in zip(x, y, strict=True)]
    path.write_text("\n".join([head, *rows]) + "\n")
    return path


def overfit_config(path: Path, **train) -> dict:
    """100 training and 100 test rows, no val split (the last weights are kept), 100 steps (25
    epochs) of a 64×64 MLP: the training loss ends near 0."""
    return tiny_config(
        str(path),
        data={"label": "label", "split": {"val": 0.0, "test": 0.5}},
        model={"hidden_sizes": [64, 64]},
        train={
            "max_steps": 100,
            "epochs": None,
            "batch_size": 25,
            "log_every": 100,
            "checkpoint_every": 100,
            **train,
        },
    )


def _train(cfg: dict, run_dir: Path) -> RunDir:
    return danlu.train(cfg, run_dir=run_dir, show_progress=False).run


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, one_thread) -> RunDir:
    folder = tmp_path_factory.mktemp("overfit")
    return _train(overfit_config(random_labels_csv(folder / "random.csv", 200)), folder / "run")


# ------------------------------------------------------------------------- the loss attack


def test_an_overfit_model_gives_its_training_examples_away(overfit):
    r = audit(overfit, samples=500)
    loss, h = r["loss"], r["losses"]
    assert r["split"] == "test" and r["task"] == "classification"
    assert r["loss_kind"] == "cross-entropy"
    assert r["sizes"] == {"members": 100, "non_members": 100, "train": 100, "test": 100}
    assert loss["members"] == loss["non_members"] == 100
    assert loss["auc"] > 0.8 and loss["advantage"] > 0.5
    assert loss["auc_ci95"][0] > 0.75 and loss["auc_ci95"][1] <= 1.0
    assert h["members"]["mean"] < 0.05 < 1.0 < h["non_members"]["mean"]  # memorized vs not
    # members are called when their loss is at most the threshold: a small loss
    assert 0 < loss["threshold"] < 0.5
    # 100 non-members: a 1 % FPR is one example. A third of them carry, by chance, the label
    # the model predicts confidently, so some non-members have lower losses than any member:
    # at 1 % FPR the attack finds far fewer members than its best threshold does
    assert set(loss["tpr_at_fpr"]) == {"0.01"}
    assert 0 <= loss["tpr_at_fpr"]["0.01"] < loss["advantage"]
    assert sum(h["members"]["counts"]) == sum(h["non_members"]["counts"]) == 100
    assert len(h["edges"]) == len(h["members"]["counts"]) + 1 == 31
    assert h["scale"] == "log"  # memorized losses sit decades below the others
    assert 100 * h["members"]["median"] < h["non_members"]["median"]
    assert r["interpretation"].startswith(f"AUC 0.50 = no leakage; {loss['auc']:.2f} here")
    assert "strongly separate" in r["interpretation"]
    assert "privacy" not in r and "shadow" not in r


def test_examples_the_model_never_saw_are_indistinguishable(overfit, tmp_path):
    # the overfit model on two halves of its test split (neither trained on): the attack
    # sees no difference although the model is heavily overfit. Under no leakage the AUC's
    # standard error is sqrt((n1 + n0 + 1) / (12 n1 n0)): 0.058 for 50 vs 50, so |AUC - 0.5|
    # stays below 3 SE = 0.17
    model, cfg, spec, kind = load_model(overfit)
    test = build_data(cfg, overfit).splits["test"]
    losses = Scorer(cfg, spec, kind, "supervised")(model, test)
    assert losses.shape == (100,) and losses.mean() > 1.0
    halves = attack_metrics(-losses[:50], -losses[50:])
    assert abs(halves["auc"] - 0.5) < 0.17
    assert halves["auc_ci95"][0] < 0.5 < halves["auc_ci95"][1]
    # a model that never trained at all (one step at lr 1e-6) on exchangeable train and test
    # rows: 100 vs 100, SE 0.041, so |AUC - 0.5| < 3 SE = 0.12
    csv = random_labels_csv(tmp_path / "fresh.csv", 400, seed=1)
    cfg = tiny_config(
        str(csv),
        data={"label": "label", "split": {"val": 0.25, "test": 0.25}},
        train={"max_steps": 1, "epochs": None, "optimizer": {"name": "adam", "lr": 1e-6}},
    )
    r = audit(_train(cfg, tmp_path / "fresh"), samples=100)
    assert r["sizes"]["members"] == 100 and r["sizes"]["train"] == 200
    assert abs(r["loss"]["auc"] - 0.5) < 0.12 and r["loss"]["advantage"] < 0.3
    assert audit(tmp_path / "fresh", split="val", samples=100)["split"] == "val"


def test_a_dp_run_leaks_less_than_the_same_run_without_dp(overfit, tmp_path):
    csv = Path(overfit.load_config().data.dataset)
    private = {"privacy": {"noise_multiplier": 1.0, "delta": 1e-3, "max_grad_norm": 1.0}}
    dp = audit(_train(overfit_config(csv, **private), tmp_path / "dp"))
    plain = audit(overfit)
    assert dp["loss"]["auc"] < plain["loss"]["auc"] - 0.1
    assert dp["loss"]["advantage"] < plain["loss"]["advantage"]
    p = dp["privacy"]
    assert p["delta"] == 1e-3 and p["epsilon"] > 1
    bound = (np.expm1(p["epsilon"]) + 2e-3) / (np.exp(p["epsilon"]) + 1)
    assert p["advantage_bound"] == pytest.approx(min(1.0, bound), abs=1e-4)
    assert f"ε {p['epsilon']:.3g}" in dp["interpretation"]


@pytest.mark.parametrize(
    ("auc", "ci", "privacy", "says"),
    [
        (0.53, [0.45, 0.61], None, "0.53 here is within chance for 100 examples per side"),
        (0.62, [0.55, 0.69], None, "clearly separate training from held-out examples"),
        (0.62, [0.55, 0.69], None, "; more data, regularization or DP training"),
        (0.9, [0.85, 0.95], None, "strongly separate"),
        (0.3, [0.22, 0.38], None, "held-out examples have lower losses than training ones"),
        (0.55, [0.51, 0.59], {"epsilon": 1.0, "delta": 1e-5}, "bounds the advantage by 0.46"),
        (0.55, [0.51, 0.59], {"epsilon": 20.0, "delta": 1e-5}, "is too weak to bound"),
    ],
)
def test_the_interpretation_reads_the_auc_against_chance(auc, ci, privacy, says):
    from danlu.evaluate.audit_html import dp_summary, interpretation

    result = {"loss": {"auc": auc, "auc_ci95": ci, "members": 100, "advantage": 0.1}}
    if privacy:
        result["privacy"] = dp_summary(privacy)
    text = interpretation(result)
    assert text.startswith(f"AUC 0.50 = no leakage; {auc:.2f} here") and text.endswith(".")
    assert says in text


# -------------------------------------------------------------------- files and the CLI


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_audit_json_and_html_are_written(overfit):
    r = audit(overfit, samples=60, seed=3)
    saved = json.loads((overfit.path / "audit.json").read_text())
    assert saved == json.loads(json.dumps(r))
    assert saved["seed"] == 3 and saved["sizes"]["members"] == 60
    assert set(saved["loss"]) >= {"auc", "auc_ci95", "advantage", "roc", "tpr_at_fpr"}
    assert saved["loss"]["roc"]["fpr"][0] == 0 and saved["loss"]["roc"]["tpr"][-1] == 1
    assert saved["loss"]["tpr_at_fpr"] == {}  # 60 non-members cannot measure a 1 % FPR
    page = (overfit.path / "audit.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "<script" not in page.lower()
    assert {"html", "table", "img", "section"} <= set(parser.tags)
    assert "Privacy audit" in page and "loss threshold" in page
    assert f"<b>{saved['loss']['auc']:.4f}</b>" in page


def test_the_cli_audits_with_shadow_models(overfit):
    result = CliRunner().invoke(app, ["audit", str(overfit.path), "--samples", "100",
                                      "--shadow", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((overfit.path / "audit.json").read_text())
    assert "AUC" in result.output and "shadow models" in result.output
    assert f"{saved['loss']['auc']:.4f}" in result.output
    assert "AUC 0.50 = no leakage" in result.output
    s = saved["shadow"]
    assert s["models"] == 2 and s["train_size"] == 100
    assert s["steps"] == 100  # as many passes over 100 examples as the run made over its 100
    assert s["attack"] == "logistic regression on log-loss, one per class"
    assert s["auc"] > 0.8 and s["advantage"] > 0.5


def test_cli_errors_are_one_line_with_exit_2(overfit):
    result = CliRunner().invoke(app, ["audit", str(overfit.path), "--split", "train"])
    assert result.exit_code == 2
    assert "--split 'train' is not a held-out split" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------- other kinds of run


def test_a_language_model_is_audited_per_block(tmp_path):
    cfg = tiny_gpt_config(tmp_path, 20)
    cfg["data"]["block_size"] = 8
    run = _train(cfg, tmp_path / "lm")
    r = audit(run, shadow=1, trainer=fit_shadow)
    assert r["loss_kind"] == "mean token cross-entropy" and r["task"] == "language_modeling"
    assert r["sizes"]["members"] == r["sizes"]["non_members"] == r["sizes"]["test"] == 36
    assert r["sizes"]["train"] == 288
    assert 0 <= r["loss"]["auc"] <= 1 and np.isfinite(r["losses"]["members"]["mean"])
    assert r["shadow"]["models"] == 1 and r["shadow"]["steps"] == 2  # 20 × 36 / 288
    # per-block losses weighted by their targets give evaluation's loss per token
    model, config, spec, kind = load_model(run)
    test = build_data(config, run).splits["test"]
    from danlu.evaluate.audit import _blocks, _documents

    starts, lengths = _blocks(test, spec)
    per_block = Scorer(config, spec, kind, "causal_lm")(model, _documents(test, starts, lengths))
    weighted = float((per_block * (lengths - 1)).sum() / (lengths - 1).sum())
    assert weighted == pytest.approx(evaluate_run(run, "test")["loss"], rel=1e-5)


def test_a_regressor_is_audited_on_squared_errors(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 4)), rng.normal(size=120)  # noise targets: memorized only
    rows = [",".join(f"{v:.4f}" for v in (*r, t)) for r, t in zip(x, y, strict=True)]
    (tmp_path / "noise.csv").write_text("\n".join(["a,b,c,d,target", *rows]) + "\n")
    cfg = overfit_config(tmp_path / "noise.csv", max_steps=150, checkpoint_every=150)
    cfg["data"].update(label="target", task="regression")
    r = audit(_train(cfg, tmp_path / "reg"))
    assert r["loss_kind"] == "squared error" and r["sizes"]["members"] == 60
    assert r["loss"]["auc"] > 0.8
    assert r["losses"]["members"]["mean"] < 0.2 < 1.0 < r["losses"]["non_members"]["mean"]


def test_an_ensemble_is_audited_on_its_averaged_probabilities(overfit, tmp_path):
    second = tmp_path / "second"
    cfg = overfit.load_config().to_dict()
    data = {**cfg["data"], "split": {**cfg["data"]["split"], "seed": 0}}  # the same rows
    _train({**cfg, "seed": 1, "data": data, "train": {**cfg["train"], "max_steps": 20}}, second)
    ens = danlu.ensemble([overfit.path, second], tmp_path / "ens", evaluate=False).run
    r = audit(ens, samples=100)
    assert r["loss_kind"] == "cross-entropy" and r["loss"]["auc"] > 0.8
    with pytest.raises(ConfigError, match="is an ensemble, and shadow models retrain"):
        audit(ens, shadow=2, trainer=fit_shadow)


def test_bad_input_is_refused(overfit, tmp_path):
    with pytest.raises(
        ConfigError, match="--samples 10: the audit needs at least 20 examples per side"
    ):
        audit(overfit, samples=10)
    with pytest.raises(ConfigError, match="needs a trainer"):
        audit(overfit, shadow=1)
    few = random_labels_csv(tmp_path / "few.csv", 40)
    cfg = overfit_config(few, max_steps=2)
    cfg["data"]["split"] = {"val": 0.0, "test": 0.25}
    with pytest.raises(DataError, match="has 10 examples on the smaller side"):
        audit(_train(cfg, tmp_path / "few"))
    cfg["data"]["split"] = {"val": 0.0, "test": 0.0}
    with pytest.raises(DataError, match=r"no held-out \(test or val\) examples"):
        audit(_train(cfg, tmp_path / "none"))
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "few", moved)
    few.write_text(few.read_text().replace("c0", "c1", 3))
    with pytest.raises(DataError, match=r"changed since run .* was trained"):
        audit(moved)


def test_the_public_audit_pins_its_files_and_the_report_shows_it(overfit, tmp_path):
    run = RunDir(shutil.copytree(overfit.path, tmp_path / "copy"))
    result = danlu.audit(run, samples=100)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert {"audit.json", "audit.html"} <= set(manifest["files"])
    from danlu.evaluate.report import write_report

    html = write_report(run).read_text()
    assert "membership" in html.lower() and f"{result['loss']['auc']:.3f}"[:4] in html
