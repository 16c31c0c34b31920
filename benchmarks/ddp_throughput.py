"""DDP and FSDP throughput: 2 processes (`danlu train --nproc 2`) against 1 process, one machine.

    .venv/bin/python benchmarks/ddp_throughput.py [--steps 300] [--batch 256] [--hidden 512]

Both runs train the same MLP on the same synthetic table with the same GLOBAL batch, through
the real CLI; samples/s = steps × batch / the training seconds the run records in lineage.json
(start-up, data preparation and process launch are left out). The single process uses all
cores (torch threads = cores); each DDP rank gets cores / 2 threads. On a machine with few
cores DDP is not expected to win: the two ranks split the same cores the single process already
used for its matmuls, and add an all-reduce of every gradient per step (gloo over loopback) and
the Python overhead of a second process. DDP pays off across GPUs or nodes, not across the
cores of one small CPU. FSDP (`train.strategy=fsdp`) adds more communication per step (gather
the parameters for forward and again for backward, reduce-scatter the gradients) in exchange
for 1/W of the memory per process: it is there for models that do not fit, not for speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def write_data(folder: Path, rows: int = 20_000, features: int = 32) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features))
    y = (x[:, :4].sum(1) > 0).astype(int) + (x[:, 4] > 1)
    header = ",".join(f"f{i}" for i in range(features)) + ",label\n"
    body = "".join(",".join(f"{v:.3f}" for v in r) + f",c{c}\n" for r, c in zip(x, y, strict=True))
    path = folder / "table.csv"
    path.write_text(header + body)
    return path


def run(
    folder: Path,
    name: str,
    nproc: int,
    args: argparse.Namespace,
    threads: int | None = None,
    strategy: str = "auto",
) -> dict:
    config = {
        "name": name,
        "seed": 0,
        "data": {"dataset": "table.csv", "label": "label"},
        "model": {"type": "mlp", "hidden_sizes": [args.hidden, args.hidden], "dropout": 0.0},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "log_every": 50,
            "eval_every": args.steps,
            "checkpoint_every": args.steps,
            "tensorboard": False,
            "precision": "fp32",
            "estimate": False,
            "threads": threads,
            "strategy": strategy,
        },
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "danlu", "train", f"{name}.yaml", "--run-dir", name]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=folder, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lineage = json.loads((folder / name / "lineage.json").read_text())
    seconds = lineage["train_seconds"]
    return {
        "processes": f"{nproc}"
        + (f" ({threads} thread)" if threads else "")
        + (f" {strategy}" if strategy != "auto" else ""),
        "train_s": seconds,
        "wall_s": wall,
        "samples_per_s": args.steps * args.batch / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_data(folder)
        one = run(folder, "one", 1, args)
        single = run(folder, "single", 1, args, threads=1)  # what each DDP rank gets here
        two = run(folder, "two", 2, args)
        fsdp = run(folder, "fsdp", 2, args, strategy="fsdp")
    print(f"machine: {os.cpu_count()} cores · MLP 32→{args.hidden}→{args.hidden}→3 · "
          f"global batch {args.batch} · {args.steps} steps · fp32")  # fmt: skip
    print(f"{'processes':>14} {'samples/s':>10} {'train s':>8} {'wall s':>7}")
    for r in (one, single, two, fsdp):
        print(
            f"{r['processes']:>14} {r['samples_per_s']:>10,.0f} {r['train_s']:>8.1f} "
            f"{r['wall_s']:>7.1f}"
        )
    print(f"DDP 2 processes / 1 process: {two['samples_per_s'] / one['samples_per_s']:.2f}×")
    print(f"DDP 2 processes / 1 process with 1 thread: "
          f"{two['samples_per_s'] / single['samples_per_s']:.2f}×")  # fmt: skip
    print(f"FSDP 2 processes / 1 process: {fsdp['samples_per_s'] / one['samples_per_s']:.2f}×")
    print(f"FSDP 2 processes / DDP 2 processes: "
          f"{fsdp['samples_per_s'] / two['samples_per_s']:.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()
