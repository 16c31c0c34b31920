"""The fit loop: determinism, accumulation, penalties, early stopping, run-directory files."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_config
from danlu import api
from danlu.data.loader import BatchLoader, Split
from danlu.device import autocast
from danlu.errors import ConfigError
from danlu.evaluate.metrics import metric_names
from danlu.models.mlp import MLP
from danlu.rundir import RunDir
from danlu.train.loop import TrainingInterrupted, _StopSignals, fit
from danlu.train.objectives import Supervised, make_loss

CLASSES = ["a", "b", "c"]
METRICS = metric_names("classification", 3)


# ----------------------------------------------------------------- fit called directly


def _split(n: int, seed: int, shift_labels: bool = False) -> Split:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.tensor([[0.0, 0, 0, 0], [2, 2, 0, 0], [0, 2, 2, 0]])
    x = centers[y] + torch.randn(n, 4, generator=g) * 0.7
    return Split(x, (y + 1) % 3 if shift_labels else y, np.arange(n))


def _fit(
    path: Path,
    *,
    model_seed: int = 0,
    batch_size: int = 16,
    dropout: float = 0.0,
    val: bool = True,
    shift_val_labels: bool = False,
    objective=None,
    **kwargs,
):
    torch.manual_seed(model_seed)
    model = MLP(4, [16], num_outputs=3, dropout=dropout)
    train = BatchLoader(_split(84, 0), batch_size, order="shuffle", seed=0)
    val_loader = BatchLoader(_split(30, 1, shift_val_labels), 32) if val else None
    if objective is None:
        objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", CLASSES)
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    options = {
        "optimizer": {"name": "sgd", "lr": 0.1},
        "tensorboard": False,
        "show_progress": False,
        "precision": "fp32",
        "device": "cpu",
        "metric_names": METRICS,
        **kwargs,
    }
    result = fit(model, objective, train, val_loader, run, **options)
    return model, result, run


def _initial(model_seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(model_seed)
    return {k: v.clone() for k, v in MLP(4, [16], num_outputs=3).state_dict().items()}


def _history(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.history.read_text().splitlines()]


def _steps(run: RunDir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.checkpoints.glob("step-*"))


def test_grad_accum_matches_the_larger_batch(tmp_path):
    accum, r1, _ = _fit(tmp_path / "accum", batch_size=8, grad_accum=2, epochs=2)
    big, r2, _ = _fit(tmp_path / "big", batch_size=16, epochs=2)
    assert r1.step == r2.step == 12  # 84 rows: 6 steps per epoch (the last one 4 rows)
    for key, value in big.state_dict().items():
        assert torch.allclose(accum.state_dict()[key], value, atol=1e-5), key
    small, _, _ = _fit(tmp_path / "small", batch_size=8, epochs=1)
    assert not torch.allclose(small.head.weight, big.head.weight, atol=1e-3)


def test_l1_penalty_shrinks_the_weights(tmp_path):
    def l1_norm(model: MLP) -> float:
        return sum(p.detach().abs().sum().item() for p in model.parameters() if p.ndim >= 2)

    plain, _, _ = _fit(tmp_path / "plain", epochs=3)
    sparse, _, _ = _fit(tmp_path / "l1", epochs=3, l1=0.05)
    assert l1_norm(sparse) < 0.75 * l1_norm(plain)


@pytest.mark.parametrize("clip", [0.01, 0.05])
def test_grad_clip_bounds_the_update(tmp_path, clip):
    before = _initial()
    optimizer = {"name": "sgd", "lr": 1.0}
    free, _, _ = _fit(tmp_path / "free", max_steps=1, optimizer=optimizer, val=False)
    clipped, _, _ = _fit(
        tmp_path / "clip", max_steps=1, optimizer=optimizer, val=False, grad_clip=clip
    )

    def update_norm(model: MLP) -> float:
        return float(
            torch.sqrt(sum(((v - before[k]) ** 2).sum() for k, v in model.state_dict().items()))
        )

    assert update_norm(free) > 2 * clip  # the clip is active
    assert update_norm(clipped) == pytest.approx(clip, rel=1e-4)


@pytest.mark.parametrize(
    ("stopping", "monitor"),
    [
        ({"patience": 2, "min_delta": 100.0}, "val_loss"),  # no evaluation improves by 100
        ({"patience": 3, "metric": "val_loss", "min_delta": 100.0}, "val_accuracy"),
    ],
)
def test_early_stopping_stops_after_patience_and_records_it(tmp_path, stopping, monitor):
    _, result, run = _fit(
        tmp_path / "r", eval_every=1, max_steps=50, early_stopping=stopping, monitor=monitor
    )
    patience = stopping["patience"]
    assert result.stopped_early and result.step == patience + 1 < 50
    state = json.loads((run.checkpoints / f"step-{result.step}" / "state.json").read_text())
    assert state["stopped_early"] is True and state["bad_evals"] == patience
    assert [h["step"] for h in _history(run) if h["split"] == "val"] == list(range(1, patience + 2))

    # resuming a run that stopped early does not train further
    _, again, _ = _fit(
        tmp_path / "r",
        eval_every=1,
        max_steps=50,
        early_stopping=stopping,
        monitor=monitor,
        resume=True,
    )
    assert again.step == result.step and again.resumed_from == result.step


def test_invalid_monitor_lists_the_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="'val_acc' is not a metric of this task") as e:
        _fit(tmp_path / "a", max_steps=1, monitor="val_acc")
    for name in ("val_loss", "val_accuracy", "val_f1_macro", "val_log_loss"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match=r"train\.early_stopping\.metric: 'val_f1'"):
        _fit(tmp_path / "b", max_steps=1, early_stopping={"metric": "val_f1"})
    with pytest.raises(ConfigError, match="must be a validation metric"):
        _fit(tmp_path / "c", max_steps=1, monitor="train_loss")


def test_best_weights_by_monitor_and_kept_checkpoints(tmp_path):
    # the validation labels are shifted by one class: the better the model learns the training
    # labels, the worse its validation loss, so the best evaluation comes early
    model, result, run = _fit(
        tmp_path / "r",
        shift_val_labels=True,
        eval_every=2,
        max_steps=16,
        keep_checkpoints=2,
        optimizer={"name": "sgd", "lr": 0.5},
    )
    val = [h for h in _history(run) if h["split"] == "val"]
    assert [h["step"] for h in val] == [2, 4, 6, 8, 10, 12, 14, 16]
    best = min(val, key=lambda h: h["val_loss"])
    assert result.best_step == best["step"] < 14
    assert result.best_value == best["val_loss"]
    assert _steps(run) == [best["step"], 14, 16]

    weights = load_file(str(run.weights))
    at_best = load_file(str(run.checkpoints / f"step-{best['step']}" / "model.safetensors"))
    assert weights.keys() == at_best.keys()
    assert all(torch.equal(weights[k], at_best[k]) for k in weights)
    assert not torch.equal(weights["head.weight"], model.head.weight.detach())
    with safe_open(str(run.weights), "pt") as f:
        assert f.metadata()["step"] == str(best["step"])
        assert float(f.metadata()["val_loss"]) == pytest.approx(best["val_loss"])


def test_the_final_checkpoint_holds_the_final_evaluation(tmp_path):
    options = {"max_steps": 20, "eval_every": 7, "checkpoint_every": 10}
    _, result, run = _fit(tmp_path / "r", **options)
    state = json.loads((run.checkpoints / "step-20" / "state.json").read_text())
    assert state["last_eval"] == 20
    assert (state["best_step"], state["best_value"]) == (result.best_step, result.best_value)
    before = run.history.read_text()
    # resuming a finished run neither trains nor scores again
    _, again, _ = _fit(tmp_path / "r", resume=True, **options)
    assert again.step == 20 and again.resumed_from == 20
    assert run.history.read_text() == before
    assert [h["step"] for h in _history(run) if h["split"] == "val"] == [7, 14, 20]


def test_monitor_where_higher_is_better(tmp_path):
    _, result, run = _fit(tmp_path / "r", eval_every=1, max_steps=8, monitor="val_accuracy")
    val = [h for h in _history(run) if h["split"] == "val"]
    top = max(h["val_accuracy"] for h in val)
    first_top = next(h for h in val if h["val_accuracy"] == top)  # ties keep the earlier one
    assert result.monitor == "val_accuracy"
    assert (result.best_step, result.best_value) == (first_top["step"], top)


def test_without_validation_the_final_weights_are_saved(tmp_path):
    model, result, run = _fit(tmp_path / "r", val=False, epochs=2)
    assert result.best_value is None and result.step == 12
    weights = load_file(str(run.weights))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert _steps(run) == [6, 12]  # a checkpoint at each epoch end
    assert not [h for h in _history(run) if h["split"] == "val"]


def test_checkpoint_holds_everything_to_continue(tmp_path):
    _, _, run = _fit(
        tmp_path / "r", max_steps=5, dropout=0.2, optimizer={"name": "adam", "lr": 0.01}
    )
    ckpt = run.checkpoints / "step-5"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    ]
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (5, 0, 5)
    assert state["schedule"] == {"scale": 1.0, "best": None, "bad": 0}
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert all(int(s["step"]) == 5 for s in opt["state"].values())
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    assert set(rng) == {"torch", "cuda", "numpy", "python"}


class InterruptAt:
    """An objective that sends this process SIGTERM during training step `step`."""

    def __init__(self, step: int) -> None:
        self.inner = Supervised(make_loss("auto", "softmax"), "classification", "softmax", CLASSES)
        self.step, self.calls = step, 0

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.step:
                handler = signal.getsignal(signal.SIGTERM)
                assert isinstance(getattr(handler, "__self__", None), _StopSignals)
                signal.raise_signal(signal.SIGTERM)
        return self.inner(model, batch)

    def metrics(self):
        return self.inner.metrics()


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are only installed in the main thread")
    previous = signal.getsignal(signal.SIGTERM)
    options = {
        "max_steps": 20,
        "log_every": 4,
        "eval_every": 5,
        "dropout": 0.3,
        "optimizer": {"name": "adam", "lr": 0.01},
    }
    full, _, full_run = _fit(tmp_path / "full", **options)

    with pytest.raises(TrainingInterrupted) as e:
        _fit(tmp_path / "cut", objective=InterruptAt(7), **options)
    assert e.value.step == 7
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is removed again
    cut = RunDir(tmp_path / "cut")
    assert _steps(cut) == [5, 7]
    state = json.loads((cut.checkpoints / "step-7" / "state.json").read_text())
    assert state["window_samples"] == 16 + 4 + 16  # steps 5-7 (6 ends the epoch: 4 rows)

    resumed, result, _ = _fit(tmp_path / "cut", resume=True, **options)
    assert result.resumed_from == 7 and result.step == 20
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in full.state_dict().items())

    def lines(run: RunDir) -> list[tuple]:
        return [
            (h["step"], h["split"], h.get("train_loss"), h.get("val_loss"), h.get("lr"))
            for h in _history(run)
        ]

    assert lines(cut) == lines(full_run)


# ------------------------------------------------------------------ through api.train


@pytest.fixture
def blobs_config(blobs_csv):
    def make(**train):
        return tiny_config(
            str(blobs_csv),
            data={"label": "kind"},
            model={"dropout": 0.3},
            train={"max_steps": 12, **train},
        )

    return make


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_bit_identical_weights(blobs_config):
    first = api.train(blobs_config(), run_dir="a", show_progress=False)
    second = api.train(blobs_config(), run_dir="b", show_progress=False)
    other = api.train({**blobs_config(), "seed": 1}, run_dir="c", show_progress=False)
    assert first.fit.step == second.fit.step == 12
    assert _same(_weights(Path("a/model.safetensors")), _weights(Path("b/model.safetensors")))
    final = "checkpoints/step-12/model.safetensors"
    assert _same(_weights(Path("a") / final), _weights(Path("b") / final))
    assert not _same(_weights(Path("a") / final), _weights(Path("c") / final))

    def losses(run: str) -> list[float]:
        return [h["train_loss"] for h in _history(RunDir(run)) if h["split"] == "train"]

    assert losses("a") == losses("b") and losses("a") != losses("c")
    assert other.run.path == Path("c")


def test_history_lineage_and_files(blobs_config):
    result = api.train(blobs_config(log_every=4, eval_every=5), run_dir="r", show_progress=False)
    run = result.run
    history = _history(run)
    train = [h for h in history if h["split"] == "train"]
    val = [h for h in history if h["split"] == "val"]
    assert [h["step"] for h in train] == [4, 8, 12]
    assert [h["step"] for h in val] == [5, 10, 12]  # every eval_every, and at the end
    for h in train:
        assert {"train_loss", "lr", "samples_per_s", "epoch"} <= set(h)
        assert h["lr"] == 0.01
    for h in val:
        assert set(h) == {"step", "epoch", "split", "val_loss", *(f"val_{m}" for m in METRICS)}

    lineage = run.read("lineage.json")
    assert lineage["status"] == "completed" and lineage["steps"] == 12
    assert (lineage["device"], lineage["precision"]) == ("cpu", "fp32")
    best = min(val, key=lambda h: h["val_loss"])
    assert lineage["best"] == {
        "metric": "val_loss",
        "value": best["val_loss"],
        "step": best["step"],
    }
    assert lineage["ended"] and lineage["seed"] == 0
    for name in ("config.yaml", "data_card.json", "preprocess.json", "model.safetensors"):
        assert (run.path / name).is_file(), name
    assert not run.tb.exists()  # tensorboard: false in tiny_config


def test_invalid_monitor_through_the_api(blobs_config):
    with pytest.raises(ConfigError, match="val_acc") as e:
        api.train(blobs_config(monitor="val_acc"), run_dir="r", show_progress=False)
    assert "val_accuracy" in str(e.value)
    assert RunDir("r").read("lineage.json")["status"] == "failed"


def test_resume_ignores_and_removes_a_partial_checkpoint(blobs_config):
    api.train(blobs_config(max_steps=10), run_dir="full", show_progress=False)
    api.train(blobs_config(max_steps=6), run_dir="part", show_progress=False)
    tmp = Path("part/checkpoints/.tmp-step-8-12345")
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"torn")
    resumed = api.train(None, ["train.max_steps=10"], resume="part", show_progress=False)
    assert resumed.fit.resumed_from == 6 and resumed.fit.step == 10
    assert not tmp.exists()
    assert not list(Path("part/checkpoints").glob(".tmp-*"))
    final = "checkpoints/step-10/model.safetensors"
    assert _same(_weights(Path("full") / final), _weights(Path("part") / final))
    lineage = RunDir("part").read("lineage.json")
    assert lineage["status"] == "completed" and len(lineage["resumes"]) == 1
    steps = [h["step"] for h in _history(RunDir("part")) if h["split"] == "train"]
    assert steps == sorted(set(steps))


def test_tensorboard_event_files(blobs_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    api.train(
        blobs_config(max_steps=4, log_every=2, eval_every=2, tensorboard=True),
        run_dir="r",
        show_progress=False,
    )
    events = list(Path("r/tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator("r/tb")
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/accuracy", "lr"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]


def test_bf16_precision_runs_on_cpu(blobs_config):
    linear = torch.nn.Linear(4, 2)
    with autocast(torch.device("cpu"), "bf16"):
        assert linear(torch.randn(3, 4)).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert linear(torch.randn(3, 4)).dtype == torch.float32

    result = api.train(
        blobs_config(max_steps=2, precision="bf16"), run_dir="r", show_progress=False
    )
    assert result.fit.precision == "bf16" and result.fit.step == 2
    weights = _weights(Path("r/model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert RunDir("r").read("lineage.json")["precision"] == "bf16"
    val = [h for h in _history(RunDir("r")) if h["split"] == "val"]
    assert val and np.isfinite(val[-1]["val_loss"])


def test_auto_precision_on_cpu_needs_the_flag_and_a_measured_speed_up(monkeypatch):
    from danlu import device as dev

    cpu = torch.device("cpu")
    for native, faster, expected in [
        (False, True, "fp32"),
        (True, False, "fp32"),
        (True, True, "bf16"),
    ]:
        monkeypatch.setattr(dev, "cpu_bf16_native", lambda n=native: n)
        monkeypatch.setattr(dev, "cpu_bf16_faster", lambda f=faster: f)
        assert dev.resolve_precision("auto", cpu) == expected
    assert dev.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice is kept
