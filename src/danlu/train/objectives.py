"""Objectives: what `fit` minimizes. An objective maps (model, batch) to (loss, outputs).

Supervised classification and regression live here; the text issues add language-model
objectives with the same shape, so there is still one loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from danlu.data.loader import Batch
from danlu.errors import ConfigError
from danlu.evaluate.metrics import accumulator

LOSSES_FOR = {
    "softmax": ("cross_entropy", "hinge"),
    "sigmoid": ("bce", "hinge"),
    "linear": ("mse",),
}


def make_loss(
    name: str, kind: str, *, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A loss function (outputs, targets) → scalar for the head `kind`."""
    if name == "auto":
        name = {"softmax": "cross_entropy", "sigmoid": "bce", "linear": "mse"}[kind]
    if name not in LOSSES_FOR[kind]:
        raise ConfigError(
            f"train.loss: {name} does not fit a {kind} output",
            fix=f"use one of {', '.join(LOSSES_FOR[kind])} (or auto)",
        )
    w = class_weights

    def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            out, y, weight=None if w is None else w.to(out.device), label_smoothing=label_smoothing
        )

    def bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, out.shape[1]).float() if out.shape[1] > 1 else y.float()[:, None]
        if label_smoothing:
            target = target * (1 - label_smoothing) + 0.5 * label_smoothing
        weight = None if w is None else w.to(out.device)[y][:, None]
        return F.binary_cross_entropy_with_logits(out.float(), target, weight=weight)

    def hinge(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.shape[1] == 1:  # binary: labels in {-1, +1}
            margin = F.relu(1 - (2 * y.float() - 1) * out.float().squeeze(1))
            return (margin * (1 if w is None else w.to(out.device)[y])).mean()
        return F.multi_margin_loss(out.float(), y, weight=None if w is None else w.to(out.device))

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.float().squeeze(1), y.float())

    return {"cross_entropy": cross_entropy, "bce": bce, "hinge": hinge, "mse": mse}[name]


def class_weights(
    y: torch.Tensor, num_classes: int, setting: str | list[float]
) -> torch.Tensor | None:
    """'auto' = n / (C × count_c) (inverse frequency, as scikit-learn's 'balanced')."""
    if setting == "none":
        return None
    if isinstance(setting, list):
        if len(setting) != num_classes:
            raise ConfigError(
                f"train.class_weights has {len(setting)} values but the data has {num_classes} classes"
            )
        return torch.tensor(setting, dtype=torch.float32)
    counts = torch.bincount(y, minlength=num_classes).float().clamp_min(1)
    return len(y) / (num_classes * counts)


def sample_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-example weights that make every class equally likely to be drawn."""
    counts = torch.bincount(y, minlength=num_classes).float().clamp_min(1)
    return (1.0 / counts)[y]


class Supervised:
    """Classification or regression: outputs = model(x); loss = loss_fn(outputs, y)."""

    def __init__(self, loss_fn: Callable, task: str, kind: str, class_names: list[str] | None):
        self.loss_fn, self.task, self.kind, self.class_names = loss_fn, task, kind, class_names

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = model(batch.x)
        return self.loss_fn(outputs, batch.y), outputs

    def metrics(self):
        return accumulator(self.task, self.class_names, self.kind)
