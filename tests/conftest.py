"""Shared fixtures: tiny seeded data written by the tests themselves, isolated caches."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder with its own download cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DANLU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    """Write an IDX file (magic 0 0 0x08 ndim, big-endian dims, uint8 data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_images(n: int, classes: int = 3, size: int = 8, channels: int = 1, seed: int = 0):
    """Images whose class is visible (a bright band at a class-dependent row) plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, channels, size, size)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, :, (c * size) // classes, :] = 250
    return x, y.astype(np.int64)


def write_idx_folder(folder: Path, train: int = 60) -> Path:
    """MNIST-style IDX files in a new `folder`: `train` and 30 test 8×8 images of 3 classes."""
    folder.mkdir()
    x, y = make_images(train)
    tx, ty = make_images(30, seed=1)
    write_idx(folder / "train-images-idx3-ubyte.gz", x[:, 0])
    write_idx(folder / "train-labels-idx1-ubyte.gz", y)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", tx[:, 0])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", ty)
    return folder


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    """A folder with MNIST-style IDX files: 60 train and 30 test 8×8 images of 3 classes."""
    return write_idx_folder(tmp_path / "idx")


def write_cifar(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """CIFAR-10 binary records: 1 label byte + 3×32×32 pixel bytes."""
    records = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1)
    path.write_bytes(records.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def cifar_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar"
    folder.mkdir()
    x, y = make_images(40, classes=4, size=32, channels=3)
    write_cifar(folder / "data_batch_1.bin", x[:20], y[:20])
    write_cifar(folder / "data_batch_2.bin", x[20:], y[20:])
    tx, ty = make_images(12, classes=4, size=32, channels=3, seed=1)
    write_cifar(folder / "test_batch.bin", tx, ty)
    (folder / "batches.meta.txt").write_text("a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n")
    return folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """<folder>/<class>/*.png: 3 classes × 8 grayscale 8×8 PNG images."""
    from PIL import Image

    folder = tmp_path / "images"
    x, y = make_images(24)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = folder / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(d / f"{i}.png")
    return folder


@pytest.fixture
def blobs_csv(tmp_path: Path) -> Path:
    """A separable 3-class table: two numeric features, one categorical, a string label."""
    rng = np.random.default_rng(0)
    n = 120
    y = np.arange(n) % 3
    centers = np.array([[0, 0], [4, 4], [0, 4]])
    pts = centers[y] + rng.normal(0, 0.5, size=(n, 2))
    colour = np.where(y == 1, "red", np.where(rng.random(n) < 0.5, "blue", "green"))
    names = np.array(["ant", "bee", "cat"])[y]
    path = tmp_path / "blobs.csv"
    lines = ["a,b,colour,kind"] + [
        f"{p[0]:.4f},{p[1]:.4f},{c},{k}" for p, c, k in zip(pts, colour, names, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(dataset: str, **sections) -> dict:
    """A fast config dict: small MLP, few steps, no TensorBoard."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": dataset},
        "model": {"type": "mlp", "hidden_sizes": [16]},
        "train": {
            "epochs": 3,
            "batch_size": 16,
            "log_every": 5,
            "tensorboard": False,
            "precision": "fp32",
            "optimizer": {"name": "adam", "lr": 0.01},
        },
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def tiny_gpt_config(folder: Path, steps: int, **model) -> dict:
    """A character GPT language model on a small repetitive corpus written into `folder`."""
    corpus = folder / "corpus.txt"
    corpus.write_text(("the cat sat on the mat. the dog ran to the cat. " * 60) + "\n")
    cfg = tiny_config(
        str(corpus),
        data={"task": "language_modeling", "block_size": 16, "split": {"val": 0.1, "test": 0.1},
              "tokenizer": {"type": "char"}},
        model={"type": "gpt", "num_layers": 1, "num_heads": 2, **model},
        train={"max_steps": steps, "epochs": None},
    )  # fmt: skip
    del cfg["model"]["hidden_sizes"]
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread, above all when other processes share
    the CPU (60 seq2seq steps: 2.0 s on one thread, 20.7 s on two on a busy 2-core machine).
    Model test modules use it for all their tests: pytestmark = usefixtures("one_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_equal_tree(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts / lists / tensors (optimizer and RNG states) equal bit for bit."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def resumable_mlp_config(folder: Path, name: str, seed: int, **train: Any) -> dict:
    """The MLP config the resume and crash tests interrupt: dropout and a shuffled sampler, so
    an inexact resume (RNG, data position, schedule) shows in the weights. `train` overrides."""
    return {
        "name": name,
        "seed": seed,
        "data": {"dataset": str(folder)},
        "model": {"type": "mlp", "hidden_sizes": [32, 32], "dropout": 0.3},
        "train": {
            "batch_size": 8,
            "sampler": "shuffle",
            "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
            "precision": "fp32",
            "threads": 1,
            "tensorboard": False,
            **train,
        },
    }
