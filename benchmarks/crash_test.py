"""The crash test at full size: SIGKILL a real training run at 10 random moments, resume it
each time, and compare the end with an uninterrupted run of the same config.

The config is an MLP (784 → 256 → 128 → 10, dropout 0.2, AdamW, cosine schedule) on
Fashion-MNIST (60,000 images from the Debian package dataset-fashion-mnist), checkpointing
every 50 steps. Every run is the real CLI (`python -m danlu train`) in its own process. The
kill moments are training steps drawn from a seeded RNG; two of the kills (also drawn) wait
instead for a checkpoint write in progress — the run is started with
DANLU_TEST_SLOW_CHECKPOINT so that the write lasts long enough to be hit on purpose — and the
others may hit one by chance. After every kill every step-N folder on disk is loaded with
checkpoint.load into a fresh model and optimizer. The final weights, the final optimizer state
and the best weights must equal the uninterrupted run's bit for bit (torch.equal).

    python benchmarks/crash_test.py [--kills 10] [--steps 1500] [--seed 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATASET = "/usr/share/datasets/fashion-mnist"
EVERY = 50  # checkpoint_every
LOG_EVERY = 10
SLOW = "0.4"  # seconds between the files of a deliberately slow checkpoint write


def write_config(root: Path, steps: int) -> Path:
    import yaml

    dataset = DATASET if Path(DATASET).is_dir() else "fashion-mnist"
    config = {
        "name": "crash_test",
        "seed": 0,
        "data": {"dataset": dataset, "split": {"val": 0.1, "test": "official"}},
        "model": {"type": "mlp", "hidden_sizes": [256, 128], "dropout": 0.2},
        "train": {
            "max_steps": steps,
            "batch_size": 64,
            "optimizer": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup_steps": 100},
            "eval_every": 250,
            "checkpoint_every": EVERY,
            "log_every": LOG_EVERY,
            "keep_checkpoints": 3,
            "monitor": "val_accuracy",
            "precision": "fp32",
            "threads": 1,
            "tensorboard": False,
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(root: Path, args: list[str], log: Path, slow: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DANLU_TEST_SLOW_CHECKPOINT"}
    if slow:
        env["DANLU_TEST_SLOW_CHECKPOINT"] = SLOW
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "danlu", "train", *args],
            cwd=root,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def logged_step(log: Path) -> int:
    found = re.findall(r"^step (\d+)/", log.read_text(errors="replace"), flags=re.M)
    return int(found[-1]) if found else 0


def writes(run: Path, pid: int) -> list[Path]:
    return list((run / "checkpoints").glob(f".tmp-step-*-{pid}"))


def wait_for(proc: subprocess.Popen, log: Path, ready: Any, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            sys.exit(f"the run ended (rc {proc.returncode}) too early:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"timed out:\n{log.read_text()[-2000:]}")
        time.sleep(0.005)


def load_all(run: Path) -> list[int]:
    """checkpoint.load every step-N folder into a fresh model and optimizer."""
    from danlu import models
    from danlu.data import DataSpec
    from danlu.rundir import RunDir
    from danlu.train import checkpoint
    from danlu.train.optim import build_optimizer

    cfg = RunDir.open(run).load_config()
    spec = DataSpec.from_dict(json.loads((run / "preprocess.json").read_text()))
    loaded = []
    for s in checkpoint.steps(RunDir(run)):
        model = models.build_for(cfg.model.model_dump(), spec)
        opt = build_optimizer(model, **cfg.train.optimizer.model_dump())
        loaded.append(
            checkpoint.load(run / "checkpoints" / f"step-{s}", model=model, optimizer=opt)["step"]
        )
    return loaded


def kill_once(root: Path, config: Path, run: Path, i: int, target: int, in_write: bool) -> str:
    log = root / f"B-{i}.log"
    args = [str(config), "--run-dir", str(run)] if i == 0 else ["--resume", str(run)]
    proc = start(root, args, log, slow=in_write)
    if in_write:
        wait_for(proc, log, lambda: bool(writes(run, proc.pid)))
    else:
        wait_for(proc, log, lambda: logged_step(log) >= target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = writes(run, proc.pid)
    loaded = load_all(run)
    moment = "a checkpoint write" if in_write else f"step ≥ {target}"
    hit = f"yes (.tmp of step {partial[0].name.split('-')[2]})" if partial else "no"
    return (
        f"kill {i + 1:2d}: aimed at {moment:<20} last logged step {logged_step(log):5d} · "
        f"hit a checkpoint write: {hit:<24} · checkpoints on disk {loaded} all load"
    )


def compare(a: Path, b: Path, steps: int) -> list[str]:
    import torch
    from safetensors.torch import load_file

    final = f"checkpoints/step-{steps}"
    lines = []
    for rel in ("model.safetensors", f"{final}/model.safetensors"):
        wa, wb = load_file(str(a / rel)), load_file(str(b / rel))
        same = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        lines.append(f"{rel:<42} bit-identical: {'yes' if same else 'NO'} (max |Δ| {diff:.1e})")
    oa = torch.load(a / final / "optimizer.pt", weights_only=True)
    ob = torch.load(b / final / "optimizer.pt", weights_only=True)
    same = (
        all(
            torch.equal(oa["state"][k][n], ob["state"][k][n])
            for k in oa["state"]
            for n in oa["state"][k]
        )
        and oa["param_groups"] == ob["param_groups"]
    )
    lines.append(f"{final + '/optimizer.pt':<42} bit-identical: {'yes' if same else 'NO'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="danlu-crash-"))
    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root, args.steps)
    rng = random.Random(args.seed)
    moments = sorted(rng.sample(range(EVERY // 2, args.steps - 2 * EVERY), args.kills))
    in_write = set(rng.sample(range(1, args.kills), min(2, args.kills - 1)))
    t0 = time.perf_counter()
    reference = start(root, [str(config), "--run-dir", str(root / "A")], root / "A.log")
    print(f"{args.kills} SIGKILLs over {args.steps} steps (checkpoint every {EVERY}), in {root}")
    for i, target in enumerate(moments):
        print(kill_once(root, config, root / "B", i, target, i in in_write), flush=True)
    last = start(root, ["--resume", str(root / "B")], root / "B-end.log")
    if last.wait() != 0 or reference.wait() != 0:
        sys.exit("a run failed: see the logs in " + str(root))
    resumes = json.loads((root / "B" / "lineage.json").read_text())["resumes"]
    print(f"resumed {len(resumes)} times; finished in {time.perf_counter() - t0:.0f} s")
    for line in compare(root / "A", root / "B", args.steps):
        print(line)


if __name__ == "__main__":
    main()
