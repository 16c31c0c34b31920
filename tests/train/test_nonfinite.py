"""train.nonfinite: a NaN/Inf loss or gradient is never applied; "stop" leaves a diagnostic and
one clear error, "skip" counts the step, stops after K in a row, and still resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from danlu.cli import app
from danlu.data.loader import Batch, BatchLoader, Split
from danlu.evaluate.metrics import metric_names
from danlu.models.mlp import MLP
from danlu.rundir import RunDir
from danlu.train.loop import fit
from danlu.train.objectives import Supervised, make_loss
from danlu.train.steps import NonFiniteGuard, TrainingDiverged, last_finite_checkpoint, train_step

BAD_ROW = 7  # the training row with a NaN feature


def _data(n: int = 60, bad: int | None = BAD_ROW) -> Split:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.eye(3)[y].repeat(1, 2) * 2 + torch.randn(n, 6, generator=g)
    if bad is not None:
        x[bad, 2] = math.nan  # what a table cell "nan" (or inf after scaling) becomes
    return Split(x, y, np.arange(n))


def _fit(path: Path, max_steps: int, *, bad: int | None = BAD_ROW, **kwargs):
    torch.manual_seed(0)
    model = MLP(6, [16], num_outputs=3, dropout=0.1)
    train = BatchLoader(_data(bad=bad), 8, order="shuffle", seed=0)
    objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", list("abc"))
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    options = {
        "optimizer": {"name": "adam", "lr": 0.01},
        "checkpoint_every": 4,
        "log_every": 2,
        "tensorboard": False,
        "show_progress": False,
        "precision": "fp32",
        "device": "cpu",
        "metric_names": metric_names("classification", 3),
        **kwargs,
    }
    return model, fit(model, objective, train, None, run, max_steps=max_steps, **options), run


def _history(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.history.read_text().splitlines()]


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _bad_steps(n_steps: int) -> list[int]:
    """The steps whose batch holds BAD_ROW (7 full batches of 8 + one of 4 per epoch)."""
    loader = BatchLoader(_data(), 8, order="shuffle", seed=0)
    out, step, epoch = [], 0, 0
    while step < n_steps:
        for b in loader.epoch(epoch):
            step += 1
            if BAD_ROW in b.rows.tolist() and step <= n_steps:
                out.append(step)
        epoch += 1
    return out


def test_stop_writes_the_diagnostic_and_raises_one_clear_error(tmp_path):
    first_bad = _bad_steps(40)[0]
    assert first_bad > 4  # a checkpoint exists before it
    with pytest.raises(TrainingDiverged) as info:
        _fit(tmp_path / "r", 40)
    message = str(info.value)
    last = (first_bad - 1) // 4 * 4
    assert message.startswith(
        f"training diverged at step {first_bad}: loss is nan and the gradients"
    )
    assert f"last good checkpoint {tmp_path / 'r' / 'checkpoints' / f'step-{last}'}" in message
    assert "lower train.optimizer.lr or set train.grad_clip" in message

    diag = json.loads((tmp_path / "r" / "nonfinite.json").read_text())
    assert diag["step"] == first_bad and diag["epoch"] == 0 and diag["policy"] == "stop"
    assert diag["loss"] == "nan" and diag["grad_norm"] == "nan"
    assert diag["parameters_with_nonfinite_grads"] == [
        "body.0.weight", "body.0.bias", "head.weight", "head.bias"
    ]  # fmt: skip
    (micro,) = diag["micro_batches"]
    assert micro["batch"] == first_bad - 1 and BAD_ROW in micro["rows"] and len(micro["rows"]) == 8
    assert diag["last_checkpoint"].endswith(f"step-{last}")


def test_the_bad_update_is_never_applied(tmp_path):
    """With "stop", the weights at the error are those after the last good step: finite."""
    torch.manual_seed(0)
    model = MLP(6, [16], num_outputs=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", list("abc"))
    data = _data()
    batch = Batch(data.x[:8], data.y[:8], torch.arange(8))
    guard = NonFiniteGuard(RunDir(tmp_path))
    loss = train_step(
        model, objective, [batch], opt, torch.device("cpu"), "fp32", None, 0.0, guard=guard
    )
    assert math.isnan(loss) and guard.pending is not None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # dropped, not left for the next step
    assert not opt.state  # the optimizer never stepped


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_finite_loss_with_nonfinite_gradients_is_caught(tmp_path, grad_clip):
    torch.manual_seed(0)
    model = MLP(6, [16], num_outputs=3)
    model.head.weight.register_hook(lambda g: g * math.inf)  # a gradient overflow
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", list("abc"))
    data = _data(bad=None)
    batch = Batch(data.x[:8], data.y[:8], torch.arange(8))
    guard = NonFiniteGuard(RunDir(tmp_path))
    loss = train_step(
        model, objective, [batch], opt, torch.device("cpu"), "fp32", grad_clip, 0.0, guard=guard
    )
    assert math.isfinite(loss)
    assert guard.pending["parameters"] == ["head.weight"]
    with pytest.raises(TrainingDiverged, match=r"loss is [\d.]+ but the gradients of 1 param"):
        guard.settle(loss, [batch], 1, 0, 0, log=None)


def test_skip_counts_the_steps_and_training_goes_on(tmp_path, capsys):
    bad = _bad_steps(40)
    assert len(bad) == 5  # one per epoch
    model, result, run = _fit(tmp_path / "r", 40, nonfinite={"policy": "skip"})
    assert result.step == 40 and result.skipped_steps == 5 and _finite(model)
    skipped = [h for h in _history(run) if h["split"] == "skipped"]
    assert [h["step"] for h in skipped] == bad
    assert [h["skipped_steps"] for h in skipped] == [1, 2, 3, 4, 5]
    assert skipped[0]["reason"].startswith("loss is nan")
    train = [h for h in _history(run) if h["split"] == "train"]
    assert all(math.isfinite(h["train_loss"]) for h in train)  # skipped losses kept out
    assert train[-1]["train_loss"] < train[0]["train_loss"]
    err = capsys.readouterr().err
    assert f"step {bad[0]} skipped: loss is nan" in err
    assert "5 steps skipped (non-finite loss or gradients)" in err
    state = json.loads((run.checkpoints / "step-40" / "state.json").read_text())
    assert state["nonfinite"] == {"skipped": 5, "consecutive": 0}


def test_skip_resumes_exactly(tmp_path):
    """A skipped step still counts (data consumed, schedule moved on, no update): a run
    stopped after a skip and resumed ends like an uninterrupted one."""
    reference, ref_result, _ = _fit(tmp_path / "a", 40, nonfinite={"policy": "skip"})
    stop = _bad_steps(40)[1] + 1  # just after the second skip
    _fit(tmp_path / "b", stop, nonfinite={"policy": "skip"}, checkpoint_every=stop)
    model, result, _ = _fit(tmp_path / "b", 40, nonfinite={"policy": "skip"}, resume=True)
    assert result.resumed_from == stop and result.skipped_steps == ref_result.skipped_steps == 5
    expected = reference.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


def test_skip_stops_after_max_consecutive(tmp_path):
    # plain SGD at lr 1e6 blows the weights up: every step after that is NaN
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row were not finite") as info:
        _fit(
            tmp_path / "r", 40, bad=None, optimizer={"name": "sgd", "lr": 1e6},
            nonfinite={"policy": "skip", "max_consecutive": 3},
        )  # fmt: skip
    diag = json.loads((tmp_path / "r" / "nonfinite.json").read_text())
    assert diag["policy"] == "skip" and diag["skipped_steps"] == 3
    assert f"training diverged at step {diag['step']}" in str(info.value)
    skipped = [h["step"] for h in _history(RunDir(tmp_path / "r")) if h["split"] == "skipped"]
    assert skipped == [diag["step"] - 2, diag["step"] - 1]  # the third one stopped the run


def test_cli_divergence_and_an_inf_cell_each_stop_with_one_line(tmp_path):
    """What a user hits: a learning rate far too high; a numeric column holding `inf`."""
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    pts = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, (90, 2))
    lines = ["a,b,kind"] + [f"{p[0]:.3f},{p[1]:.3f},k{c}" for p, c in zip(pts, y, strict=True)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    cfg = tiny_config(
        str(tmp_path / "t.csv"),
        data={"label": "kind", "split": {"val": 0.0, "test": 0.0}},
        train={"optimizer": {"name": "sgd", "lr": 1.0e20}},
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--run-dir", "R"])
    assert r.exit_code == 2, r.output
    line = next(x for x in r.stderr.splitlines() if "diverged" in x)
    assert line.startswith("error: training diverged at step ")
    assert ": loss is nan" in line and "details in R/nonfinite.json" in line
    lineage = json.loads((tmp_path / "R" / "lineage.json").read_text())
    assert lineage["status"] == "failed"

    # policy skip: every step is bad here, so max_consecutive of them in a row stop the run
    cfg["train"]["nonfinite"] = {"policy": "skip", "max_consecutive": 3}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--run-dir", "S"])
    assert r.exit_code == 2, r.output
    assert "3 steps in a row were not finite" in r.stderr
    skipped = [h for h in _history(RunDir(tmp_path / "S")) if h["split"] == "skipped"]
    assert len(skipped) == 2  # the third one stops the run instead

    # an inf cell never reaches training: loading names the file, row and column
    lines[10] = "inf,1.0,k0"
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "--run-dir", "T"])
    assert r.exit_code == 2, r.output
    assert "t.csv: row 10, column 'a': value inf is infinite" in r.stderr
    assert not (tmp_path / "T").exists()


def test_the_reported_checkpoint_has_finite_weights(tmp_path):
    """Finite gradients can still overflow the weights (an update of 1e6 × 1e35): the
    diagnostic names the newest checkpoint whose weights are all finite."""
    from safetensors.torch import load_file, save_file

    _, _, run = _fit(tmp_path / "r", 12, bad=None)  # checkpoints 4, 8, 12
    newest = run.checkpoints / "step-12" / "model.safetensors"
    weights = load_file(str(newest))
    weights["head.weight"][0, 0] = math.inf
    save_file(weights, str(newest))
    assert last_finite_checkpoint(run) == run.checkpoints / "step-8"
