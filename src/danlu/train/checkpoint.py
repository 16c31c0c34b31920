"""Checkpoints: written atomically, read back exactly, a damaged one skipped and kept.

    checkpoints/step-N/
      model.safetensors   parameters and buffers
      optimizer.pt        optimizer state (tensors and numbers only; loaded with weights_only)
      rng.pt              torch / CUDA / numpy / python RNG states
      state.json          step, epoch, data position, schedule, best metric, early stopping,
                          non-finite counters, grad scaler

A checkpoint is assembled in a temporary folder (.tmp-step-N-PID), every file and the folder
are fsynced, and only then is the folder renamed to step-N: a crash at any moment leaves
either the complete checkpoint or none. Folders are removed the same way round: renamed to
.del-* first (atomic), then deleted, so a crash while pruning never leaves a half-deleted
step-N. Leftover .tmp-* / .del-* folders are removed on the next start.

`restore` resumes from the newest checkpoint that loads. One that does not (a truncated
safetensors file, a garbage optimizer.pt, a bad state.json: damage from outside, since writes
are atomic) is renamed to step-N.corrupt — kept for inspection, never deleted, and out of the
way of the step-N the resumed run writes again — and the previous one is tried, with one line
saying so.

DANLU_TEST_SLOW_CHECKPOINT=SECONDS (tests only) sleeps that long between the files written
into the temporary folder, so a crash test can kill a run in the middle of a write.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from danlu.errors import CheckpointError
from danlu.rundir import RunDir, atomic_write_json, fsync_dir, save_safetensors

STEP_DIR = re.compile(r"^step-(\d+)$")
SLOW_ENV = "DANLU_TEST_SLOW_CHECKPOINT"


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


def _test_pause() -> None:
    """The crash test's window: DANLU_TEST_SLOW_CHECKPOINT seconds between two files."""
    seconds = float(os.environ.get(SLOW_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def save(
    run: RunDir,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    protect: int | None = None,
) -> Path:
    """Write checkpoints/step-<step>/ atomically, then keep the last `keep` and `protect`.
    `weights` and `optimizer_state` are full states (train.sharded gathers them under FSDP)."""
    from safetensors.torch import save_file

    root = run.checkpoints
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / "model.safetensors"))
    _test_pause()
    torch.save(optimizer_state, tmp / "optimizer.pt")
    _test_pause()
    torch.save(rng_state(), tmp / "rng.pt")
    _test_pause()
    atomic_write_json(tmp / "state.json", {**state, "step": step})
    for f in tmp.iterdir():
        _fsync(f)
    fsync_dir(tmp)
    final = root / f"step-{step}"
    old = _set_aside(final) if final.exists() else None
    os.rename(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(run, keep, protect)
    return final


def _set_aside(path: Path) -> Path:
    """Rename a folder out of the step-N namespace (atomic) before deleting it."""
    aside = path.with_name(f".del-{path.name}-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(path, aside)
    return aside


def steps(run: RunDir) -> list[int]:
    if not run.checkpoints.is_dir():
        return []
    found = [STEP_DIR.match(p.name) for p in run.checkpoints.iterdir()]
    return sorted(int(m.group(1)) for m in found if m)


def prune(run: RunDir, keep: int, protect: int | None) -> None:
    done = steps(run)
    for s in done[:-keep]:
        if s != protect:
            shutil.rmtree(_set_aside(run.checkpoints / f"step-{s}"), ignore_errors=True)


def clean_partial(run: RunDir) -> None:
    """Remove the folders a crash left behind: half-written (.tmp-*), half-deleted (.del-*)."""
    if run.checkpoints.is_dir():
        for pattern in (".tmp-step-*", ".del-*"):
            for p in run.checkpoints.glob(pattern):
                shutil.rmtree(p, ignore_errors=True)


def latest(run: RunDir) -> Path | None:
    """The newest step-N folder with a state.json (unchecked; `restore` checks and falls back)."""
    clean_partial(run)
    for s in reversed(steps(run)):
        path = run.checkpoints / f"step-{s}"
        if (path / "state.json").is_file():
            return path
    return None


def load(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore model, optimizer and RNG states; returns the trainer state (state.json).

    Raises CheckpointError naming the reason when any file is missing or damaged."""
    try:
        return _load(path, model, optimizer)
    except Exception as e:  # any damage: safetensors, unpickling, zip, JSON, shape errors
        raise CheckpointError(
            f"checkpoint '{path}' cannot be restored ({_reason(e)})",
            fix="delete that step folder to resume from the previous checkpoint",
        ) from None


def _load(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """`load` without the error wrapping; every file is read before anything is restored."""
    from safetensors.torch import load_file

    from danlu.train import sharded

    state = _read(path / "state.json", lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json: no step")
    weights = _read(path / "model.safetensors", lambda p: load_file(str(p)))
    torch_load = functools.partial(torch.load, weights_only=True)
    optim = _read(path / "optimizer.pt", torch_load) if optimizer is not None else None
    rng = _read(path / "rng.pt", torch_load)
    try:
        sharded.load_model_state(model, weights)  # FSDP: each rank keeps its shard
        if optimizer is not None:
            sharded.load_optimizer_state(optimizer, optim)
    except Exception as e:
        raise _Mismatch(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    set_rng_state(rng)
    return state


class _Damaged(Exception):
    """A checkpoint file that cannot be read; the message names the file."""


class _Mismatch(Exception):
    """Readable files that do not fit this model or optimizer (another config): not damage."""


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(path)
    except FileNotFoundError:
        raise _Damaged(f"{path.name} is missing") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:120]
        raise _Damaged(f"{path.name}: {type(e).__name__}: {first}") from None


def _reason(e: Exception) -> str:
    """The first line of an error, with its type unless it says which file it is about."""
    if isinstance(e, (_Damaged, _Mismatch)):
        return str(e)
    first = (str(e).splitlines() or [""])[0].strip()
    return f"{type(e).__name__}: {first}"[:200] if first else type(e).__name__


@dataclass
class Restored:
    path: Path
    state: dict[str, Any]
    applied: Any = None  # what `apply` returned
    notes: list[str] = field(default_factory=list)  # one line per checkpoint skipped

    @property
    def step(self) -> int:
        return int(self.state["step"])


def restore_latest(
    run: RunDir,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    apply: Callable[[dict[str, Any]], Any] = lambda state: None,
) -> Restored | None:
    """Load the newest checkpoint that restores; None when the run has no checkpoint.

    `apply(state)` restores the rest (schedule, counters) and counts as part of the load: if
    it fails, the checkpoint is unreadable too; its result is `Restored.applied`. Each
    unreadable one is renamed step-N.corrupt and reported in `notes`; if none restores,
    CheckpointError lists them. Files that read fine but do not fit the model (a resume
    with another architecture) raise at once and set nothing aside."""
    clean_partial(run)
    notes, failures = [], []
    for s in reversed(steps(run)):
        path = run.checkpoints / f"step-{s}"
        try:
            state = _load(path, model, optimizer)
            if state["step"] != s:
                raise ValueError(f"state.json says step {state['step']}")
            applied = apply(dict(state))
        except _Mismatch as e:  # the run's own files, another model: nothing is set aside
            raise CheckpointError(
                f"checkpoint step-{s} of '{run.path}' does not fit the model built from this "
                f"config ({e})",
                fix="resume with the config the run was trained with",
            ) from None
        except Exception as e:  # damage: safetensors, unpickling, zip, JSON, missing keys
            kept = quarantine(path)
            failures.append(f"step-{s} ({_reason(e)})")
            notes.append(f"checkpoint step-{s} is unreadable ({_reason(e)}), renamed {kept.name}")
            continue
        if notes:
            notes[-1] += f"; resuming from step-{s}"
        return Restored(path, state, applied, notes)
    if failures:
        raise CheckpointError(
            f"no checkpoint of '{run.path}' can be restored: {'; '.join(failures)}",
            fix="start the run again without --resume (the damaged folders are kept as "
            "step-N.corrupt)",
        )
    return None


def quarantine(path: Path) -> Path:
    """Rename a damaged step-N to step-N.corrupt (step-N.corrupt-2, ... if taken)."""
    target, n = path.with_name(f"{path.name}.corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    os.rename(path, target)
    return target


def save_weights(run: RunDir, weights: dict[str, torch.Tensor], **meta: Any) -> None:
    """The run's model.safetensors: the weights every later stage uses (a full state)."""
    save_safetensors(run.weights, weights, {k: str(v) for k, v in meta.items()})
