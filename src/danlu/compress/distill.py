"""Knowledge distillation: a smaller student learns from the parent run (the teacher) through
the one `fit` loop, with the teacher's soft targets added to the student's own loss.

    loss = (1 − α) · task_loss(student, y) + α · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

(Hinton et al., 2015: the T² keeps the soft term's gradients on the scale of the hard one.)
Regression students match the teacher's value (MSE); a one-logit binary head matches its
sigmoid; causal language models match the teacher's next-token distribution at every scored
position. `Distill` wraps the objective the student's config builds, so metrics, validation and
checkpoints are the student's, exactly as in a normal run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu import models
from danlu.errors import ConfigError
from danlu.evaluate.tokens import IGNORE, token_outputs
from danlu.train.objectives import Step, Supervised, TokenObjective


class Distill:
    def __init__(
        self, base: Any, teacher: nn.Module, *, temperature: float, alpha: float, key: str
    ) -> None:
        if isinstance(base, TokenObjective) and base.name != "causal_lm":
            raise ConfigError(
                f"{key}: distillation supports classifiers, regressors and causal language "
                f"models; this run trains {base.name}",
                fix="distill a classification, regression or language_modeling run",
            )
        if not isinstance(base, Supervised | TokenObjective):
            raise ConfigError(f"{key}: this run's objective cannot be distilled")
        self.base, self.teacher = base, teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, model: nn.Module, batch: Any) -> Step:
        loss, outputs, targets = self.base(model, batch)
        if self.alpha == 0:
            return loss, outputs, targets
        with torch.no_grad():
            if isinstance(self.base, TokenObjective):
                teacher, _ = token_outputs(
                    self.teacher, "causal_lm", batch.x, batch.y, text=self.base.text or {}
                )
            else:
                teacher = self.teacher(batch.x)
        soft = self.soft_loss(outputs, teacher.to(outputs.dtype), targets)
        return (1 - self.alpha) * loss + self.alpha * soft, outputs, targets

    def soft_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        t = self.temperature
        if isinstance(self.base, TokenObjective):  # (B, T, V): only the scored positions
            keep = targets.reshape(-1) != IGNORE
            student = student.reshape(-1, student.shape[-1])[keep]
            teacher = teacher.reshape(-1, teacher.shape[-1])[keep]
        elif self.base.kind == "linear":  # regression: match the teacher's value
            return F.mse_loss(student.float(), teacher.float())
        elif student.shape[-1] == 1:  # one sigmoid logit
            target = torch.sigmoid(teacher.float() / t)
            return F.binary_cross_entropy_with_logits(student.float() / t, target) * t * t
        return (
            F.kl_div(
                F.log_softmax(student.float() / t, dim=-1),
                F.log_softmax(teacher.float() / t, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )

    def metrics(self) -> Any:
        return self.base.metrics()


def student_config(teacher: dict[str, Any], changes: dict[str, Any], key: str) -> dict[str, Any]:
    """The student's `model:` section: the teacher's with `changes`, or `changes` alone when
    they name another family (`type:`). Pretrained sources and adapters are not inherited."""
    if "type" in changes and changes["type"] != teacher["type"]:
        return dict(changes)
    out = {k: v for k, v in teacher.items() if k not in ("init_from", "lora", "freeze")}
    unknown = sorted(set(changes) - set(out) - {"type"})
    if unknown:
        raise ConfigError(
            f"{key}.student: {', '.join(unknown)} is not a key of model.type {teacher['type']}",
            fix=f"use keys of the teacher's model section ({', '.join(sorted(out))}), or give "
            "student.type to train another family",
        )
    return {**out, **changes}


def check_smaller(student: nn.Module, teacher: nn.Module, key: str) -> tuple[int, int]:
    """(student, teacher) parameter counts; a student that is not smaller is refused."""
    s, t = models.count_parameters(student), models.count_parameters(teacher)
    if s >= t:
        raise ConfigError(
            f"{key}: the student has {s:,} parameters, the teacher {t:,}; a student must be "
            "smaller",
            fix="reduce its layers or widths in student: (e.g. num_layers, dim, hidden_sizes)",
        )
    return s, t
