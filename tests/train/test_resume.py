"""Exact resume: a run killed at any moment and resumed ends bit-identical to an uninterrupted one.

Every run goes through the real CLI (`python -m danlu train`) in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import assert_equal_tree, resumable_mlp_config, write_idx_folder

MAX_STEPS = 600
EVERY = 20  # eval_every and checkpoint_every
LOG_EVERY = 10


class Runs:
    """The runs of one config: A trains uninterrupted in the background; B and C start at the
    same time and are interrupted right after their first checkpoint (B by SIGKILL, C by
    SIGTERM). Starting them together keeps the python start-up costs from adding up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        folder = write_idx_folder(root / "idx", train=150)
        config = resumable_mlp_config(
            folder, "resume", 3, max_steps=MAX_STEPS, eval_every=EVERY, checkpoint_every=EVERY,
            log_every=LOG_EVERY, keep_checkpoints=2,
            schedule={"name": "cosine", "warmup_steps": 30},
        )  # fmt: skip
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.a = root / "A"
        self.reference = start(root, [str(self.config), "--run-dir", str(self.a)], "A")
        self.returncodes: dict[str, int] = {}
        self._reference_done = False

    def interrupt_first_runs(self) -> None:
        procs = {
            name: start(self.root, [str(self.config), "--run-dir", str(self.root / name)], name)
            for name in ("B", "C")
        }
        signals = {"B": signal.SIGKILL, "C": signal.SIGTERM}
        try:
            pending = dict(procs)
            deadline = time.monotonic() + 180
            while pending and time.monotonic() < deadline:
                for name, proc in list(pending.items()):
                    if checkpoint_steps(self.root / name):
                        # signal now, wait later: waiting for one exit would let the other
                        # process run on to the end
                        assert proc.poll() is None, f"{name} finished before it was interrupted"
                        proc.send_signal(signals[name])
                        del pending[name]
                    elif proc.poll() is not None:
                        pytest.fail(
                            f"{name} ended (rc {proc.returncode}) before its first checkpoint: "
                            f"{log_text(self.root, name)[-3000:]}"
                        )
                time.sleep(0.01)
            assert not pending, f"no first checkpoint in {sorted(pending)} after 180 s"
            self.returncodes = {name: proc.wait(timeout=120) for name, proc in procs.items()}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def wait_reference(self) -> Path:
        if not self._reference_done:
            rc = self.reference.wait(timeout=240)
            assert rc == 0, f"reference run failed ({rc}): {log_text(self.root, 'A')[-3000:]}"
            self._reference_done = True
        return self.a


def start(root: Path, args: list[str], name: str) -> subprocess.Popen:
    env = {**os.environ, "DANLU_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("DANLU_DEBUG", None)
    with open(root / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "danlu", "train", *args],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def log_text(root: Path, name: str) -> str:
    path = root / f"{name}.log"
    return path.read_text(errors="replace") if path.is_file() else ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    runs = Runs(tmp_path_factory.mktemp("resume"))
    try:
        runs.interrupt_first_runs()
        yield runs
    finally:
        if runs.reference.poll() is None:
            runs.reference.kill()
            runs.reference.wait()


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, at_least: int, name: str) -> int:
    """Poll until a checkpoint step-N with N >= at_least exists; returns N."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        steps = checkpoint_steps(run)
        if steps and steps[-1] >= at_least:
            return steps[-1]
        if proc.poll() is not None:
            pytest.fail(
                f"{name} ended (rc {proc.returncode}) before a checkpoint at step >= {at_least}: "
                f"{log_text(run.parent, name)[-3000:]}"
            )
        time.sleep(0.01)
    pytest.fail(f"no checkpoint at step >= {at_least} in {run} after 180 s")


def kill(proc: subprocess.Popen, sig: int) -> int:
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def resume(root: Path, run: Path, name: str) -> None:
    proc = start(root, ["--resume", str(run)], name)
    assert proc.wait(timeout=240) == 0, log_text(root, name)[-3000:]


def history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def assert_same_as_reference(a: Path, b: Path) -> None:
    final = f"checkpoints/step-{MAX_STEPS}"
    for rel in ("model.safetensors", f"{final}/model.safetensors"):
        assert_equal_tree(load_file(str(a / rel)), load_file(str(b / rel)), rel)
    with (
        safe_open(str(a / "model.safetensors"), "pt") as fa,
        safe_open(str(b / "model.safetensors"), "pt") as fb,
    ):
        assert fa.metadata() == fb.metadata()  # same best step and value
    assert_equal_tree(
        torch.load(a / final / "optimizer.pt", weights_only=True),
        torch.load(b / final / "optimizer.pt", weights_only=True),
        "optimizer",
    )
    state_a = json.loads((a / final / "state.json").read_text())
    state_b = json.loads((b / final / "state.json").read_text())
    for key in ("step", "epoch", "batch", "best_value", "best_step", "schedule"):
        assert state_a[key] == state_b[key], key

    ha, hb = history(a), history(b)
    train_b = [h["step"] for h in hb if h["split"] == "train"]
    assert len(train_b) == len(set(train_b)), "duplicated train steps in history.jsonl"
    assert train_b == [h["step"] for h in ha if h["split"] == "train"]
    assert [h["lr"] for h in hb if h["split"] == "train"] == [
        h["lr"] for h in ha if h["split"] == "train"
    ]
    assert [h["train_loss"] for h in hb if h["split"] == "train"] == [
        h["train_loss"] for h in ha if h["split"] == "train"
    ]
    assert [h for h in hb if h["split"] == "val"] == [h for h in ha if h["split"] == "val"]
    assert json.loads((b / "lineage.json").read_text())["status"] == "completed"


def test_sigkill_at_two_moments_then_resume_is_bit_identical(runs):
    root, run = runs.root, runs.root / "B"
    assert runs.returncodes["B"] == -signal.SIGKILL
    assert json.loads((run / "lineage.json").read_text())["status"] == "running"
    after_first = checkpoint_steps(run)[-1]
    assert after_first < MAX_STEPS // 2

    # a later moment: the resumed process is killed again after a checkpoint past half-way
    second = start(root, ["--resume", str(run)], "B")
    later = wait_for_checkpoint(second, run, max(MAX_STEPS // 2, after_first + 2 * EVERY), "B")
    assert kill(second, signal.SIGKILL) == -signal.SIGKILL
    later = checkpoint_steps(run)[-1]  # the process may have gone on a little before the kill
    assert later < MAX_STEPS

    resume(root, run, "B")
    log = log_text(root, "B")
    assert f"resumed from step {after_first} " in log
    assert f"resumed from step {later} " in log
    lineage = json.loads((run / "lineage.json").read_text())
    assert len(lineage["resumes"]) == 2
    assert_same_as_reference(runs.wait_reference(), run)


def test_sigterm_checkpoints_exits_130_and_resumes_identically(runs):
    root, run = runs.root, runs.root / "C"
    assert runs.returncodes["C"] == 130
    log = log_text(root, "C")
    assert "Resume with: danlu train --resume" in log

    step = checkpoint_steps(run)[-1]
    assert 0 < step < MAX_STEPS
    ckpt = run / "checkpoints" / f"step-{step}"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
    ]
    assert json.loads((ckpt / "state.json").read_text())["step"] == step
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert f"training stopped at step {step};" in log
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["status"] == "interrupted" and lineage["ended"]
    assert lineage["precision"] == "fp32"  # recorded at the start, not only on completion

    resume(root, run, "C")
    assert f"resumed from step {step} " in log_text(root, "C")
    # the interrupted step is usually not a multiple of log_every: the checkpoint carries the
    # logging window, so the train losses in history.jsonl still equal the reference's
    assert_same_as_reference(runs.wait_reference(), run)
