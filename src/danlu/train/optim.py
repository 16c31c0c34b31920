"""Optimizers (SGD, Adam, AdamW) and learning-rate schedules.

The learning rate is a pure function of the step (linear warmup × constant / step / cosine
shape) times a plateau scale that evaluations lower, so resuming restores it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from danlu.errors import ConfigError


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float = 1.0,
    head_lr: float | None = None,
) -> torch.optim.Optimizer:
    """Weight decay applies to weight matrices and kernels only, not to biases or norms;
    frozen parameters are left out; layer_decay and head_lr set per-layer rates
    (models.finetune.param_groups)."""
    from danlu.models.finetune import param_groups

    groups = param_groups(
        model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, head_lr=head_lr
    )
    if not groups:
        raise ConfigError(
            "every parameter of the model is frozen: there is nothing to train",
            fix="freeze less (model.freeze), or add LoRA adapters (model.lora)",
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=tuple(betas), eps=eps)


class Schedule:
    """lr(step) = base lr × warmup(step) × shape(step) × plateau scale."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        name: str = "constant",
        warmup_steps: int = 0,
        step_size: int = 1000,
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        factor: float = 0.5,
        patience: int = 2,
        lower_is_better: bool = True,
    ) -> None:
        self.optimizer, self.total, self.name = optimizer, max(total_steps, 1), name
        self.warmup, self.step_size, self.gamma = warmup_steps, step_size, gamma
        self.min_ratio, self.factor, self.patience = min_lr_ratio, factor, patience
        self.lower = lower_is_better
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.scale, self.best, self.bad = 1.0, None, 0
        self.apply(0)

    def factor_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.name == "step":
            shape = self.gamma ** (step // self.step_size)
        elif self.name == "cosine":
            t = min(1.0, max(0, step - self.warmup) / max(1, self.total - self.warmup))
            shape = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        else:
            shape = 1.0
        return warm * shape * self.scale

    def apply(self, step: int) -> None:
        f = self.factor_at(step)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * f

    def observe(self, value: float) -> bool:
        """Plateau schedule: lower the lr after `patience` evaluations without improvement."""
        if self.name != "plateau" or value is None or math.isnan(value):
            return False
        better = self.best is None or (value < self.best if self.lower else value > self.best)
        if better:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad > self.patience:
            self.scale *= self.factor
            self.bad = 0
            return True
        return False

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.bad = state["scale"], state["best"], state["bad"]
