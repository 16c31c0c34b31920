"""Objectives: what `fit` minimizes. An objective maps (model, batch) to (loss, outputs,
targets), where `outputs` and `targets` are what its metrics accumulator scores.

Supervised classification and regression, causal and masked language modelling and seq2seq
teacher forcing all have that shape, so there is one loop for all of them.

    objective = TokenObjective("causal_lm", spec.text)
    loss, logits, targets = objective(model, batch)      # logits (B, T, V), targets (B, T)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from danlu.data.loader import Batch
from danlu.errors import ConfigError
from danlu.evaluate.streaming import TokenMetrics, accumulator
from danlu.evaluate.tokens import IGNORE, objective_name, token_outputs

Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # loss, outputs, targets

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

    def __call__(self, model: torch.nn.Module, batch: Batch) -> Step:
        outputs = model(batch.x)  # (B, C) or (B, 1)
        return self.loss_fn(outputs, batch.y), outputs, batch.y

    def metrics(self):
        return accumulator(self.task, self.class_names, self.kind)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE; logits (B, T, V)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(),  # (B·T, V)
        targets.flatten(),  # (B·T,)
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


class TokenObjective:
    """causal_lm: x is a block of tokens, y the block shifted by one.
    masked_lm: BERT's 15 % of real tokens, 80 % → [MASK], 10 % random, 10 % kept, predicted
    back (training masks with the checkpointed global RNG, so resume is exact; validation with
    a generator seeded by the batch, so every evaluation scores the same positions).
    seq2seq: teacher forcing, target[:-1] in, target[1:] predicted, padding not scored.
    The forward pass is evaluate.tokens.token_outputs, shared with `danlu evaluate`."""

    def __init__(
        self,
        name: str,
        text: dict[str, Any] | None,
        label_smoothing: float = 0.0,
        mlm_probability: float = 0.15,
    ) -> None:
        self.name, self.text = name, text
        self.label_smoothing, self.mlm_probability = label_smoothing, mlm_probability

    def __call__(self, model: torch.nn.Module, batch: Batch) -> Step:
        logits, targets = token_outputs(
            model,
            self.name,
            batch.x,
            batch.y,
            text=self.text or {},
            mlm_probability=self.mlm_probability,
        )
        return token_loss(logits, targets, self.label_smoothing), logits, targets

    def metrics(self) -> TokenMetrics:
        return TokenMetrics()


def build_objective(train: dict[str, Any], spec: Any, family: str, kind: str, bundle: Any):
    """The objective for a training config (`train` section as a dict) and a data spec."""
    name = objective_name(train["objective"], spec.task, family)
    fits = {
        "supervised": spec.task in ("classification", "regression"),
        "causal_lm": spec.task in ("language_modeling", "chat") and family in ("gpt", "rnn"),
        "masked_lm": spec.task == "language_modeling" and family == "bert",
        "seq2seq": spec.task == "seq2seq",
    }
    if not fits[name]:
        raise ConfigError(
            f"train.objective: {name} does not fit data.task: {spec.task} with model.type: "
            f"{family}",
            fix="leave train.objective: auto (causal_lm for gpt/rnn on a corpus, masked_lm "
            "for bert, seq2seq for pairs, supervised for labels)",
        )
    smoothing = train["label_smoothing"]
    if name != "supervised" and (train["class_weights"] != "none" or train["loss"] != "auto"):
        raise ConfigError(
            f"train.class_weights and train.loss apply to supervised tasks, not {name}",
            fix="remove them (token objectives use cross-entropy; train.label_smoothing applies)",
        )
    if name == "masked_lm" and "mask" not in spec.text["special_ids"]:
        raise ConfigError(
            "masked_lm needs a [MASK] token, and this tokenizer has none",
            fix="train the tokenizer with danlu (data.tokenizer.type: wordpiece/bpe/...) or "
            "use one that defines a mask token",
        )
    if name != "supervised":
        return TokenObjective(name, spec.text, smoothing, train["mlm_probability"])
    weights = None
    if spec.task == "classification":
        weights = class_weights(bundle.splits["train"].y, spec.num_classes, train["class_weights"])
    elif train["class_weights"] != "none":
        raise ConfigError("train.class_weights needs a classification task")
    loss = make_loss(train["loss"], kind, label_smoothing=smoothing, class_weights=weights)
    return Supervised(loss, spec.task, kind, spec.class_names)
