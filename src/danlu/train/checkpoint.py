"""Checkpoints: written atomically, read back exactly.

    checkpoints/step-N/
      model.safetensors   parameters and buffers
      optimizer.pt        optimizer state (tensors and numbers only; loaded with weights_only)
      rng.pt              torch / CUDA / numpy / python RNG states
      state.json          step, epoch, data position, schedule, best metric, early stopping

A checkpoint is assembled in a temporary folder, every file and the folder are fsynced, and
only then is the folder renamed to step-N: a crash at any moment leaves either the complete
checkpoint or none. Leftover temporary folders are removed on the next start.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu.errors import CheckpointError
from danlu.rundir import RunDir, atomic_write_json, fsync_dir, read_json, save_safetensors

STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(state["python"]), None))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(
    run: RunDir,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    protect: int | None = None,
) -> Path:
    """Write checkpoints/step-<step>/ atomically, then keep the last `keep` and `protect`."""
    root = run.checkpoints
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    from safetensors.torch import save_file

    from danlu.models import state_for_saving

    save_file(state_for_saving(model), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    atomic_write_json(tmp / "state.json", {**state, "step": step})
    for f in tmp.iterdir():
        _fsync(f)
    fsync_dir(tmp)
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    prune(run, keep, protect)
    return final


def steps(run: RunDir) -> list[int]:
    if not run.checkpoints.is_dir():
        return []
    found = [STEP_DIR.match(p.name) for p in run.checkpoints.iterdir()]
    return sorted(int(m.group(1)) for m in found if m)


def prune(run: RunDir, keep: int, protect: int | None) -> None:
    done = steps(run)
    for s in done[:-keep]:
        if s != protect:
            shutil.rmtree(run.checkpoints / f"step-{s}", ignore_errors=True)


def clean_partial(run: RunDir) -> None:
    """Remove temporary folders left by a crash during a checkpoint write."""
    if run.checkpoints.is_dir():
        for p in run.checkpoints.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)


def latest(run: RunDir) -> Path | None:
    clean_partial(run)
    for s in reversed(steps(run)):
        path = run.checkpoints / f"step-{s}"
        if (path / "state.json").is_file():
            return path
    return None


def load(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states; returns the trainer state (state.json)."""
    from safetensors.torch import load_file

    try:
        from danlu.models import restore

        restore(model, load_file(str(path / "model.safetensors")))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint '{path}' cannot be restored ({str(e).splitlines()[0]})",
            fix="delete that step folder to resume from the previous checkpoint",
        ) from None
    return read_json(path / "state.json")


def save_weights(run: RunDir, model: torch.nn.Module, **meta: Any) -> None:
    """The run's model.safetensors: the weights every later stage uses."""
    from danlu.models import state_for_saving

    save_safetensors(run.weights, state_for_saving(model), {k: str(v) for k, v in meta.items()})
