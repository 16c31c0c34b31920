"""The hot path: one optimizer step and one pass over a validation split.

Small, typed functions that `fit` calls and `torch.compile` could take whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from danlu.data.loader import Batch, BatchLoader
from danlu.device import autocast
from danlu.evaluate.metrics import scalars


def train_step(
    model: nn.Module,
    objective: Any,
    batches: list[Batch],
    opt: torch.optim.Optimizer,
    dev: torch.device,
    prec: str,
    grad_clip: float | None,
    l1: float,
) -> float:
    """One optimizer step over micro-batches; returns the mean loss per example."""
    opt.zero_grad(set_to_none=True)
    n = sum(len(b) for b in batches)
    total = 0.0
    for b in batches:
        b = _to(b, dev)
        with autocast(dev, prec):
            loss, _, _ = objective(model, b)
        (loss * (len(b) / n)).backward()
        total += float(loss.detach()) * len(b) / n
    if l1:
        penalty = sum(p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim >= 2)
        (l1 * penalty).backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return total


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
