"""The crash test (fast version): SIGKILL a run at random moments — once in the middle of a
checkpoint write — resume it each time, and end bit-identical to an uninterrupted run, with
every checkpoint left on disk loadable after every kill.

Every run goes through the real CLI (`python -m danlu train`) in its own process; the kill
moments are training steps drawn from a seeded RNG (the benchmarks/crash_test.py version
kills 10 times on a bigger model).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_equal_tree, resumable_mlp_config, write_idx_folder
from danlu import models
from danlu.data import DataSpec
from danlu.rundir import RunDir
from danlu.train import checkpoint
from danlu.train.optim import build_optimizer

MAX_STEPS = 300
EVERY = 10  # checkpoint_every
LOG_EVERY = 5
SLOW = "0.5"  # DANLU_TEST_SLOW_CHECKPOINT: seconds between files of a checkpoint write
TIMEOUT = 180


def write_config(root: Path, max_steps: int = MAX_STEPS) -> Path:
    folder = write_idx_folder(root / "idx", train=150)
    config = resumable_mlp_config(
        folder, "crash", 5, max_steps=max_steps, eval_every=2 * EVERY, checkpoint_every=EVERY,
        log_every=LOG_EVERY, keep_checkpoints=3,
        schedule={"name": "cosine", "warmup_steps": 20},
    )  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(root: Path, args: list[str], log: Path, slow: bool = False) -> subprocess.Popen:
    env = {**os.environ, "DANLU_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("DANLU_DEBUG", None)
    env.pop(checkpoint.SLOW_ENV, None)
    if slow:
        env[checkpoint.SLOW_ENV] = SLOW
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "danlu", "train", *args],
            cwd=root,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def logged_step(log: Path) -> int:
    """The last "step N/M" line this process printed (0 before its first one)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = re.findall(r"^step (\d+)/", text, flags=re.M)
    return int(found[-1]) if found else 0


def wait_until(proc: subprocess.Popen, log: Path, ready, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {tail(log)}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {what} after {TIMEOUT} s: {tail(log)}")


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.is_file() else ""


def writing(run: Path, pid: int | str = "*") -> list[Path]:
    """Checkpoint writes in progress (or cut short) — of process `pid` if given."""
    return list((run / "checkpoints").glob(f".tmp-step-*-{pid}"))


def step_folders(run: Path) -> list[Path]:
    return [p for p in (run / "checkpoints").glob("step-*") if checkpoint.STEP_DIR.match(p.name)]


def load_every_checkpoint(run: Path) -> list[int]:
    """checkpoint.load each step-N into a fresh model and optimizer (raises if one cannot)."""
    cfg = RunDir.open(run).load_config()
    spec = DataSpec.from_dict(json.loads((run / "preprocess.json").read_text()))
    loaded = []
    for folder in sorted(step_folders(run)):
        model = models.build_for(cfg.model.model_dump(), spec)
        opt = build_optimizer(model, **cfg.train.optimizer.model_dump())
        state = checkpoint.load(folder, model=model, optimizer=opt)
        assert state["step"] == int(folder.name.split("-")[1])
        loaded.append(state["step"])
    return loaded


def crash_and_resume(root: Path, config: Path, run: Path, moments: list[int], slow_kill: int):
    """Kill the run once at each moment (a step), the `slow_kill`-th time during a checkpoint
    write instead; returns what happened at each kill."""
    kills: list[dict[str, Any]] = []
    for i, target in enumerate(moments):
        log = root / f"B-{i}.log"
        args = [str(config), "--run-dir", str(run)] if i == 0 else ["--resume", str(run)]
        during_write = i == slow_kill
        proc = start(root, args, log, slow=during_write)
        if during_write:  # deterministic: the temporary folder lives ≥ 3 × SLOW seconds
            ready, what = (lambda pid=proc.pid: bool(writing(run, pid))), "a checkpoint write"
        else:
            ready, what = (lambda t=target, f=log: logged_step(f) >= t), f"step {target}"
        wait_until(proc, log, ready, what)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        partial = writing(run, proc.pid)
        kills.append(
            {
                "target": None if during_write else target,
                "logged_step": logged_step(log),
                "during_write": bool(partial),
                "checkpoints": load_every_checkpoint(run),  # zero unreadable checkpoints
            }
        )
        if during_write:
            assert partial, "the kill missed the checkpoint write"
            step = int(partial[0].name.split("-")[2])
            assert not (run / "checkpoints" / f"step-{step}").exists()
    return kills


def assert_identical_runs(a: Path, b: Path, steps: int) -> None:
    final = f"checkpoints/step-{steps}"
    for rel in ("model.safetensors", f"{final}/model.safetensors"):
        assert_equal_tree(load_file(str(a / rel)), load_file(str(b / rel)), rel)
    assert_equal_tree(
        torch.load(a / final / "optimizer.pt", weights_only=True),
        torch.load(b / final / "optimizer.pt", weights_only=True),
        "optimizer",
    )
    state_a = json.loads((a / final / "state.json").read_text())
    state_b = json.loads((b / final / "state.json").read_text())
    for key in ("step", "epoch", "batch", "best_value", "best_step", "schedule", "nonfinite"):
        assert state_a[key] == state_b[key], key

    def train_lines(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"], r["lr"]) for r in rows if r["split"] == "train"]

    assert train_lines(a) == train_lines(b)


def test_sigkill_at_random_moments_resumes_bit_identical(tmp_path: Path):
    config = write_config(tmp_path)
    reference = tmp_path / "A"
    ref = start(tmp_path, [str(config), "--run-dir", str(reference)], tmp_path / "A.log")
    try:
        rng = random.Random(6)
        moments = sorted(rng.sample(range(15, MAX_STEPS - 40), 3))
        run = tmp_path / "B"
        kills = crash_and_resume(tmp_path, config, run, moments, slow_kill=1)
        assert kills[1]["during_write"]  # the others may hit a write too, by chance
        assert all(k["checkpoints"] for k in kills[1:])

        last = start(tmp_path, ["--resume", str(run)], tmp_path / "B-end.log")
        assert last.wait(timeout=TIMEOUT) == 0, tail(tmp_path / "B-end.log")
        assert f"resumed from step {kills[-1]['checkpoints'][-1]} " in tail(tmp_path / "B-end.log")
        assert not writing(run) and load_every_checkpoint(run)[-1] == MAX_STEPS
        lineage = json.loads((run / "lineage.json").read_text())
        assert lineage["status"] == "completed" and len(lineage["resumes"]) == len(kills)

        assert ref.wait(timeout=TIMEOUT) == 0, tail(tmp_path / "A.log")
        assert_identical_runs(reference, run, MAX_STEPS)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()


# ------------------------------------------------ a damaged checkpoint: fall back, say so


def _fit(path: Path, max_steps: int, **kwargs: Any):
    import numpy as np

    from danlu.data.loader import BatchLoader, Split
    from danlu.evaluate.metrics import metric_names
    from danlu.models.mlp import MLP
    from danlu.train.loop import fit
    from danlu.train.objectives import Supervised, make_loss

    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.eye(3)[y].repeat(1, 2) * 2 + torch.randn(90, 6, generator=g)
    torch.manual_seed(0)
    model = MLP(6, [16], num_outputs=3, dropout=0.2)
    train = BatchLoader(Split(x[:60], y[:60], np.arange(60)), 8, order="shuffle", seed=0)
    val = BatchLoader(Split(x[60:], y[60:], np.arange(30)), 30)
    objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", list("abc"))
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    result = fit(
        model, objective, train, val, run, max_steps=max_steps, checkpoint_every=10,
        keep_checkpoints=3, optimizer={"name": "adam", "lr": 0.01}, tensorboard=False,
        show_progress=False, precision="fp32", device="cpu",
        metric_names=metric_names("classification", 3), **kwargs,
    )  # fmt: skip
    return model, result, run


DAMAGE = {
    "truncated safetensors": lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:300]
    ),
    "garbage optimizer.pt": lambda f: (f / "optimizer.pt").write_bytes(os.urandom(2000)),
    "bad state.json": lambda f: (f / "state.json").write_text('{"step": 30, "epo'),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capsys):
    reference, _, _ = _fit(tmp_path / "ref", 40)
    _fit(tmp_path / "r", 30)  # stopped at step 30 (checkpoints 10, 20, 30) ...
    DAMAGE[damage](tmp_path / "r" / "checkpoints" / "step-30")  # ... and step-30 damaged
    capsys.readouterr()

    model, result, run = _fit(tmp_path / "r", 40, resume=True)
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "unreadable" in x)
    assert line.startswith("checkpoint step-30 is unreadable (")
    assert line.endswith("), renamed step-30.corrupt; resuming from step-20")
    assert "resumed from step 20 " in err
    assert result.resumed_from == 20 and result.step == 40
    kept = run.checkpoints / "step-30.corrupt"
    assert kept.is_dir() and sorted(p.name for p in kept.iterdir()) == [
        "model.safetensors", "optimizer.pt", "rng.pt", "state.json"
    ]  # fmt: skip
    # resuming from step 20 is as exact as any resume: the weights of an uninterrupted run
    assert_equal_tree(model.state_dict(), reference.state_dict())
    assert checkpoint.steps(run) == [20, 30, 40]  # step-30 written again by the resumed run


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path):
    from danlu.errors import CheckpointError

    _fit(tmp_path / "r", 20)
    for step in (10, 20):
        DAMAGE["garbage optimizer.pt"](tmp_path / "r" / "checkpoints" / f"step-{step}")
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* can be restored: step-20 \("):
        _fit(tmp_path / "r", 30, resume=True)
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == [
        "step-10.corrupt", "step-20.corrupt"
    ]  # fmt: skip


def test_checkpoints_of_another_model_are_refused_not_set_aside(tmp_path, monkeypatch):
    from danlu.errors import CheckpointError
    from danlu.models import mlp

    _fit(tmp_path / "r", 20)
    wider = mlp.MLP
    monkeypatch.setattr(mlp, "MLP", lambda i, h, **k: wider(i, [32], **k))
    with pytest.raises(CheckpointError, match=r"checkpoint step-20 of .* does not fit the model"):
        _fit(tmp_path / "r", 30, resume=True)
    assert checkpoint.steps(RunDir(tmp_path / "r")) == [10, 20]  # nothing renamed


def test_a_crash_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Old checkpoints are renamed out of the step-N namespace before they are deleted."""
    import shutil

    _fit(tmp_path / "r", 20)
    real = shutil.rmtree

    def crash(path, *args, **kwargs):  # the process dies in the middle of the deletion
        if ".del-step-10" in str(path):
            os.remove(Path(path) / "optimizer.pt")
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(RunDir(tmp_path / "r"), keep=1, protect=None)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert checkpoint.steps(RunDir(tmp_path / "r")) == [20]
    assert load_every_checkpoint_of(tmp_path / "r") == [20]
    checkpoint.clean_partial(RunDir(tmp_path / "r"))
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step-20"]


def load_every_checkpoint_of(path: Path) -> list[int]:
    from danlu.models.mlp import MLP

    out = []
    for folder in sorted(step_folders(path)):
        model = MLP(6, [16], num_outputs=3, dropout=0.2)
        opt = build_optimizer(model, name="adam", lr=0.01)
        out.append(checkpoint.load(folder, model=model, optimizer=opt)["step"])
    return out
