"""Step-time overhead of checkpointing: danlu's fit with a checkpoint every N steps against the
same fit with none, side by side in one process.

The same data (Fashion-MNIST, 60,000 images in memory), model, optimizer (AdamW), batch 128
and number of steps for every variant; each variant is a fresh seeded model trained by
`danlu.train.loop.fit` (no validation split, no TensorBoard, history every 50 steps). The
variants run interleaved, `--repeats` rounds, and each keeps its best time. "none" still
writes the one checkpoint every fit writes at the end, as every variant does. The default
interval (`train.checkpoint_every` unset) is one checkpoint per evaluation, which is once per
epoch unless `train.eval_every` is set: 469 steps here. The last line times the per-step
NaN/Inf check (steps.NonFiniteGuard.inspect) on its own.

On a machine shared with other jobs, wall times of separate runs differ by more than the
effect measured, so each run also times its own checkpoint writes: "in-run" overhead is the
time spent writing checkpoints (beyond the final one every run writes) over the rest of that
run, and "expected" is the median write over (interval × the best step time).

    python benchmarks/checkpoint_overhead.py [--model mlp|cnn] [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH = 128


def load_data() -> tuple[Any, Any]:
    import numpy as np
    import torch

    from danlu.data.builtin import CATALOG

    raw = CATALOG["fashion-mnist"].read(CATALOG["fashion-mnist"].locate())
    x = torch.from_numpy(raw.x.astype(np.float32) / 255.0)
    return (x - 0.2860) / 0.3530, torch.from_numpy(raw.y)  # (N, 1, 28, 28), (N,)


def build_model(kind: str) -> Any:
    from danlu.models.cnn import CNN
    from danlu.models.mlp import MLP

    if kind == "cnn":  # configs/fashion_cnn.yaml
        return CNN([1, 28, 28], 10, channels=[32, 64, 128], head_sizes=[128], dropout=0.2)
    return MLP(784, [256, 128], num_outputs=10, dropout=0.2)


class SaveTimer:
    """Wraps checkpoint.save to time each write and measure its size."""

    def __init__(self) -> None:
        from danlu.train import checkpoint

        self.module, self.real = checkpoint, checkpoint.save
        self.seconds: list[float] = []
        self.bytes = 0

    def __enter__(self) -> SaveTimer:
        def timed(*args: Any, **kwargs: Any) -> Path:
            t = time.perf_counter()
            path = self.real(*args, **kwargs)
            self.seconds.append(time.perf_counter() - t)
            self.bytes = sum(f.stat().st_size for f in path.iterdir())
            return path

        self.module.save = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.save = self.real


def run_once(kind: str, data: tuple, every: int | None, steps: int) -> tuple:
    import numpy as np
    import torch

    from danlu.data.loader import BatchLoader, Split
    from danlu.rundir import RunDir
    from danlu.train import loop
    from danlu.train.objectives import Supervised, make_loss

    x, y = data
    if kind == "mlp":
        x = x.reshape(len(x), -1)
    torch.manual_seed(0)
    model = build_model(kind)
    loader = BatchLoader(Split(x, y, np.arange(len(y))), BATCH, order="shuffle", seed=0)
    objective = Supervised(
        make_loss("auto", "softmax"), "classification", "softmax", list("abcdefghij")
    )
    folder = Path(tempfile.mkdtemp(prefix="danlu-ckpt-bench-"))
    run = RunDir(folder)
    try:
        with SaveTimer() as saves:
            t = time.perf_counter()
            loop.fit(
                model, objective, loader, None, run, max_steps=steps, checkpoint_every=every,
                optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
                precision="fp32", device="cpu", log_every=50, tensorboard=False,
                show_progress=False, keep_checkpoints=2,
            )  # fmt: skip
            seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return seconds, saves.seconds, saves.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--intervals", default="200,50,10")
    args = parser.parse_args()
    import math
    import statistics

    import torch

    data = load_data()
    per_epoch = math.ceil(len(data[1]) / BATCH)
    steps = int(args.epochs * per_epoch)
    variants: dict[str, int | None] = {
        "none": 10**9,
        f"default (each epoch = {per_epoch})": None,
        **{f"every {n}": int(n) for n in args.intervals.split(",")},
    }
    wall: dict[str, float] = {}
    train: dict[str, float] = {}  # wall time minus the checkpoint writes
    saves: dict[str, list[float]] = {}
    in_run: dict[str, list[float]] = {}  # per run: its checkpoint writes / its other time
    size = 0
    for r in range(args.repeats + 1):  # round 0 warms up (imports, allocator, MKL kernels)
        for name, every in variants.items():
            seconds, times, size = run_once(args.model, data, every, steps)
            if r:
                wall[name] = min(wall.get(name, math.inf), seconds)
                train[name] = min(train.get(name, math.inf), seconds - sum(times))
                saves.setdefault(name, []).extend(times)
                share = (sum(times) - times[-1]) / (seconds - sum(times))  # all but the final
                in_run.setdefault(name, []).append(100 * share)
    print(
        f"{args.model} on Fashion-MNIST, batch {BATCH}, {steps} steps, fp32, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}; "
        f"one checkpoint = {size / 2**20:.1f} MB"
    )
    save_ms = 1000 * statistics.median(t for ts in saves.values() for t in ts)
    step_ms = 1000 * train["none"] / steps
    print(f"median checkpoint write {save_ms:.1f} ms; a step {step_ms:.2f} ms (best, no saves)")
    print("overhead: expected = write / (interval × step); in-run = this run's own writes /")
    print("its other time (median of the rounds); wall = best time against the best of 'none'")
    print(f"{'checkpoints':<34}{'saves':>6}{'expected':>10}{'in-run':>9}{'wall':>9}")
    for name, every in variants.items():
        n = len(saves[name]) // args.repeats
        interval = steps / max(n - 1, 1) if every is None else min(every, steps)
        expected = 100 * save_ms / (interval * step_ms) if n > 1 else 0.0
        measured = statistics.median(in_run[name])
        vs_none = 100 * (wall[name] / wall["none"] - 1)
        print(f"{name:<34}{n:6d}{expected:9.1f}%{measured:8.1f}%{vs_none:+8.1f}%")
    check_ms = 1000 * time_guard(args.model, data)
    print(
        f"the per-step NaN/Inf check: {check_ms:.3f} ms ({100 * check_ms / step_ms:.1f} % of a step)"
    )


def time_guard(kind: str, data: tuple, calls: int = 2000) -> float:
    """Seconds per NonFiniteGuard.inspect on the model's real gradients (the fused norm)."""
    import torch

    from danlu.rundir import RunDir
    from danlu.train.steps import NonFiniteGuard

    x, y = data
    model = build_model(kind)
    batch = x[:BATCH].reshape(BATCH, -1) if kind == "mlp" else x[:BATCH]
    torch.nn.functional.cross_entropy(model(batch), y[:BATCH]).backward()
    guard = NonFiniteGuard(RunDir(Path(tempfile.gettempdir())))
    t = time.perf_counter()
    for _ in range(calls):
        guard.inspect(model, [1.0], None, grads=True)
    return (time.perf_counter() - t) / calls


if __name__ == "__main__":
    main()
