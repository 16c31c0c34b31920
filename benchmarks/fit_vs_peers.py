"""Training throughput: danlu's fit against a plain PyTorch loop, PyTorch Lightning and Keras 3.

The same CNN (danlu's `cnn` family: 32-64-128 conv blocks with batch norm, a 128-unit head),
the same Fashion-MNIST images already in memory, the same optimizer (AdamW, lr 3e-3), batch
size and number of steps, fp32 on CPU. Each contestant runs in its own process, one after the
other; the time measured is the wall time of the training call, after each contestant's modules
are imported (one-time import costs, ~1-3 s here, are not training speed). Ratios > 1 mean
danlu is faster.

    python benchmarks/fit_vs_peers.py [--images 12800] [--epochs 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BATCH = 128


def warm_imports(*modules: str) -> None:
    """Import what a contestant uses (and torch's optimizer machinery) before the timer."""
    import importlib

    import torch

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    for name in modules:
        importlib.import_module(name)


def load(n: int):
    import numpy as np
    import torch

    from danlu.data.builtin import CATALOG

    raw = CATALOG["fashion-mnist"].read(CATALOG["fashion-mnist"].locate())
    x = torch.from_numpy(raw.x[:n].astype(np.float32) / 255.0)
    x = (x - 0.2860) / 0.3530  # (N, 1, 28, 28)
    return x, torch.from_numpy(raw.y[:n])


def model():
    from danlu.models.cnn import CNN

    return CNN([1, 28, 28], 10, channels=[32, 64, 128], head_sizes=[128])


def run_plain(n: int, epochs: int) -> float:
    import torch
    import torch.nn.functional as F

    warm_imports()
    torch.manual_seed(0)
    x, y = load(n)
    m = model()
    t = time.perf_counter()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t


def run_danlu(n: int, epochs: int) -> float:
    import torch

    from danlu.data.loader import BatchLoader, Split
    from danlu.rundir import RunDir
    from danlu.train.loop import fit
    from danlu.train.objectives import Supervised, make_loss

    warm_imports(
        "danlu.train.progress",
        "danlu.train.checkpoint",
        "safetensors.torch",
        "rich.progress",
        "psutil",
    )
    torch.manual_seed(0)
    x, y = load(n)
    loader = BatchLoader(Split(x, y, None), BATCH, order="shuffle", seed=0)
    objective = Supervised(
        make_loss("cross_entropy", "softmax"),
        "classification",
        "softmax",
        [str(i) for i in range(10)],
    )
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        fit(
            model(),
            objective,
            loader,
            None,
            RunDir(d),
            epochs=epochs,
            optimizer={"name": "adamw", "lr": 3e-3},
            precision="fp32",
            log_every=50,
            tensorboard=False,
            show_progress=False,
        )
        return time.perf_counter() - t


def run_lightning(n: int, epochs: int) -> float:
    import lightning as L
    import torch
    import torch.nn.functional as F

    warm_imports("lightning.pytorch.trainer.trainer")
    torch.manual_seed(0)
    x, y = load(n)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model()

        def training_step(self, batch, _):
            bx, by = batch
            loss = F.cross_entropy(self.net(bx), by)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True
    )
    with tempfile.TemporaryDirectory() as d:
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            default_root_dir=d,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=True,
        )
        t = time.perf_counter()
        trainer.fit(Module(), data)
        return time.perf_counter() - t


def run_keras(n: int, epochs: int) -> float:
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    warm_imports("keras.src.backend.torch.trainer")
    x, y = load(n)
    xs = x.permute(0, 2, 3, 1).numpy()  # Keras is channels-last: (N, 28, 28, 1)
    keras.utils.set_random_seed(0)
    layers = [keras.Input((28, 28, 1))]
    for c in (32, 64, 128):
        layers += [
            keras.layers.Conv2D(c, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
        ]
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ]
    m = keras.Sequential(layers)
    m.compile(
        optimizer=keras.optimizers.AdamW(3e-3, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    t = time.perf_counter()
    m.fit(xs, y.numpy(), batch_size=BATCH, epochs=epochs, verbose=0)
    return time.perf_counter() - t


CONTESTANTS = {
    "plain": run_plain,
    "danlu": run_danlu,
    "lightning": run_lightning,
    "keras": run_keras,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=12800)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        print(json.dumps({"seconds": CONTESTANTS[a.only](a.images, a.epochs)}))
        return
    samples = a.images * a.epochs
    best: dict[str, float] = {}
    for _ in range(a.repeats):  # interleaved, best of N, to damp machine noise
        for name in CONTESTANTS:
            cmd = [
                sys.executable,
                __file__,
                "--only",
                name,
                "--images",
                str(a.images),
                "--epochs",
                str(a.epochs),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            best[name] = min(best.get(name, float("inf")), seconds)
    print(
        f"{samples} samples (Fashion-MNIST CNN, batch {BATCH}, fp32, "
        f"{os.cpu_count()} CPU threads), best of {a.repeats}:"
    )
    for name, s in best.items():
        ratio = s / best["danlu"] if "danlu" in best else float("nan")
        print(f"  {name:10s} {s:7.2f} s  {samples / s:8.0f} samples/s  danlu speed ×{ratio:.2f}")


if __name__ == "__main__":
    main()
