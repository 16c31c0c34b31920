"""The hot path: one optimizer step, one pass over a validation split, the NaN/Inf guard.

Small, typed functions that `fit` calls and `torch.compile` could take whole.

Non-finite values (`NonFiniteGuard`, config `train.nonfinite`). After backward and before the
optimizer step, `train_step` checks the loss (a Python float already) and the global gradient
norm: the one clipping computes anyway, else a single fused `torch._foreach_norm` — one sync
per step. A bad step never reaches the optimizer: its gradients are dropped. Then
  policy "stop": RUN/nonfinite.json (step, epoch, batch positions and row indices of the
    micro-batches, the loss, the parameters whose gradients are not finite, the last
    checkpoint) and TrainingDiverged;
  policy "skip": the step still counts — its data is consumed and the learning-rate schedule
    moves on, only the update is dropped (optimizer moments and step count untouched) — so the
    run stays a function of the step counter and resumes exactly; each skip is a history.jsonl
    line (split "skipped"); `max_consecutive` skips in a row stop like "stop".
With fp16 the grad scaler owns gradient overflow (it skips those steps and lowers its scale,
which is normal), so only the loss is checked there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu.data.loader import Batch, BatchLoader
from danlu.device import autocast
from danlu.errors import DanluError
from danlu.evaluate.metrics import scalars
from danlu.rundir import RunDir, atomic_write_json
from danlu.train import checkpoint, sharded

SHOWN_PARAMETERS = 20  # names of parameters with non-finite gradients kept in the diagnostic


class TrainingDiverged(DanluError):
    """The loss or the gradients became NaN/Inf (train.nonfinite)."""


def train_step(
    model: nn.Module,
    objective: Any,
    batches: list[Batch],
    opt: torch.optim.Optimizer,
    dev: torch.device,
    prec: str,
    grad_clip: float | None,
    l1: float,
    *,
    scaler: torch.amp.GradScaler | None = None,
    guard: NonFiniteGuard | None = None,
) -> float:
    """One optimizer step over micro-batches; returns the mean loss per example. With a
    `guard`, a step with a non-finite loss or gradient is not applied (see the module doc)."""
    opt.zero_grad(set_to_none=True)
    n = sum(len(b) for b in batches)
    total, losses = 0.0, []
    for b in batches:
        b = _to(b, dev)
        with autocast(dev, prec):
            loss, _, _ = objective(model, b)
        scaled = loss * (len(b) / n)
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        losses.append(float(loss.detach()))
        total += losses[-1] * len(b) / n
    if l1:
        penalty = sum(p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim >= 2)
        (l1 * penalty if scaler is None else scaler.scale(l1 * penalty)).backward()
    if scaler is not None:
        scaler.unscale_(opt)
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    if guard is not None and not guard.inspect(model, losses, norm, grads=scaler is None):
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # the inf check was recorded by unscale_: the scale backs off
        return total
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return total


def grad_norm(model: nn.Module) -> torch.Tensor | None:
    """The global L2 norm of all gradients in one fused pass (NaN/Inf if any gradient is).
    Under FSDP the gradients are shards (DTensors): torch's total norm reduces across ranks."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    if sharded.is_sharded(model):
        return _whole(nn.utils.get_total_norm(grads))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _whole(value: Any) -> Any:
    """A DTensor result (a norm under FSDP) as a plain tensor; anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (a DTensor shard under FSDP): checked without a collective."""
    return grad.to_local() if hasattr(grad, "to_local") else grad


class NonFiniteGuard:
    """Checks each step for NaN/Inf and applies train.nonfinite's policy (module doc)."""

    def __init__(self, run: RunDir, policy: str = "stop", max_consecutive: int = 5) -> None:
        self.run, self.policy, self.max_consecutive = run, policy, max_consecutive
        self.skipped = 0  # steps skipped in the whole run (checkpointed)
        self.consecutive = 0  # bad steps in a row (checkpointed)
        self.pending: dict[str, Any] | None = None  # what `inspect` found in the last step

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])

    def inspect(
        self, model: nn.Module, losses: list[float], norm: torch.Tensor | None, *, grads: bool
    ) -> bool:
        """True when the step may be applied; else the findings wait in `pending`."""
        loss_ok, norm = all(math.isfinite(v) for v in losses), _whole(norm)
        if grads and loss_ok and norm is None:
            norm = grad_norm(model)
        grads_ok = not grads or norm is None or bool(torch.isfinite(norm))
        if loss_ok and grads_ok:
            return True
        if grads and norm is None:  # the diagnostic's gradient norm
            norm = grad_norm(model)
        bad = [
            name
            for name, p in model.named_parameters()
            if grads and p.grad is not None and not bool(torch.isfinite(_local(p.grad)).all())
        ]
        self.pending = {
            "losses": losses,
            "grad_norm": _number(float(norm)) if norm is not None else None,
            "parameters": bad,
        }
        return False

    def settle(
        self,
        loss: float,
        batches: list[Batch],
        step: int,
        epoch: int,
        position: int,
        log: Any,
    ) -> bool:
        """After a step: True when it was skipped; raises TrainingDiverged when the policy
        says stop. A step run without `inspect` (DP-SGD) is judged by its loss alone."""
        found, self.pending = self.pending, None
        if found is None and not math.isfinite(loss):
            found = {"losses": [loss], "grad_norm": None, "parameters": []}
        if found is None:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        reason = _reason(loss, found)
        if self.policy == "stop" or self.consecutive >= self.max_consecutive:
            self._stop(reason, found, loss, batches, step=step, epoch=epoch, position=position)
        log.write(
            {"step": step, "epoch": epoch, "split": "skipped", "reason": reason,
             "skipped_steps": self.skipped}
        )  # fmt: skip
        log.note(f"step {step} skipped: {reason} ({self.skipped} skipped so far)")
        return True

    def _stop(
        self,
        reason: str,
        found: dict[str, Any],
        loss: float,
        batches: list[Batch],
        *,
        step: int,
        epoch: int,
        position: int,
    ) -> None:
        last = last_finite_checkpoint(self.run)
        if self.consecutive > 1:
            reason = f"{self.consecutive} steps in a row were not finite, the last one: {reason}"
        diagnostic = {
            "step": step,
            "epoch": epoch,
            "policy": self.policy,
            "reason": reason,
            "loss": _number(loss),
            "grad_norm": found["grad_norm"],
            "parameters_with_nonfinite_grads": found["parameters"],
            "micro_batches": [
                {"batch": position + i, "rows": b.rows.tolist(), "loss": _number(v)}
                for i, (b, v) in enumerate(zip(batches, found["losses"], strict=False))
            ],
            "skipped_steps": self.skipped,
            "last_checkpoint": str(last) if last is not None else None,
        }
        path = self.run.path / "nonfinite.json"
        atomic_write_json(path, diagnostic)
        good = f"last good checkpoint {last}" if last else "no checkpoint was written before it"
        raise TrainingDiverged(
            f"training diverged at step {step}: {reason}; {good}; details in {path}",
            fix="lower train.optimizer.lr or set train.grad_clip (and check the data for "
            "inf/NaN values); train.nonfinite.policy: skip steps over rare bad batches",
        )


def last_finite_checkpoint(run: RunDir) -> Path | None:
    """The newest checkpoint whose weights are all finite (an update with finite gradients
    can still overflow the weights, e.g. SGD at lr 1e6, so the newest one is checked)."""
    from safetensors.torch import load_file

    for s in reversed(checkpoint.steps(run)):
        path = run.checkpoints / f"step-{s}"
        try:
            weights = load_file(str(path / "model.safetensors"))
        except Exception:  # unreadable: not a good checkpoint either
            continue
        if all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point()):
            return path
    return None


def _reason(loss: float, found: dict[str, Any]) -> str:
    bad = found["parameters"]
    shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    what = f"{len(bad)} parameter{'s' if len(bad) > 1 else ''}"
    grads = f"the gradients of {what} are not finite ({shown})" if bad else ""
    losses = [v for v in found["losses"] if not math.isfinite(v)]
    if losses:
        return f"loss is {losses[0]}" + (f" and {grads}" if grads else "")
    return f"loss is {loss:.4g} but {grads or 'the gradient norm is not finite'}"


def _number(value: float) -> float | str:
    """JSON-safe: finite floats as numbers, NaN/Inf as the strings "nan", "inf", "-inf"."""
    return value if math.isfinite(value) else str(value)


@torch.no_grad()
def validate(
    model: nn.Module,
    objective: Any,
    loader: BatchLoader,
    dev: torch.device,
    prec: str,
    prefix: str = "val_",
) -> dict[str, float]:
    """Loss and task metrics on a split, as {prefix + name: value}."""
    was_training = model.training
    model.eval()
    acc = objective.metrics()
    loss_sum, n = 0.0, 0
    for b in loader.epoch(0):
        b = _to(b, dev)
        with autocast(dev, prec):
            loss, outputs, targets = objective(model, b)
        loss_sum += float(loss) * len(b)
        n += len(b)
        acc.update(outputs, targets)
    model.train(was_training)
    return {
        f"{prefix}loss": loss_sum / max(n, 1),
        **{f"{prefix}{k}": v for k, v in scalars(acc.compute()).items()},
    }


def _to(batch: Batch, dev: torch.device) -> Batch:
    if batch.x.device == dev:
        return batch
    return Batch(batch.x.to(dev), batch.y.to(dev), batch.rows)
