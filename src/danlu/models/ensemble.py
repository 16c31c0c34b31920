"""An ensemble: several trained models of one task, their predictions averaged.

Classifiers are averaged as probabilities (each member's softmax or sigmoid output turned
into class probabilities first, so members with different heads combine), regressors as
values; weights default to equal. The output of a classifier ensemble is already a
probability (output kind "probability").

    ens = Ensemble([(cnn, "softmax"), (mlp, "softmax")], task="classification")
    ens(x)   # (B, C) averaged probabilities
"""

from __future__ import annotations

import torch
from torch import nn


def probabilities(outputs: torch.Tensor, kind: str) -> torch.Tensor:
    """Model outputs → class probabilities (N, C); a single sigmoid logit gives 2 columns."""
    outputs = outputs.float()
    if kind == "sigmoid":
        p = torch.sigmoid(outputs)
        return torch.cat([1 - p, p], dim=1) if p.shape[1] == 1 else p
    if kind == "probability":  # already probabilities (an ensemble's average)
        return outputs
    return torch.softmax(outputs, dim=1)


class Ensemble(nn.Module):
    def __init__(
        self,
        members: list[tuple[nn.Module, str]],
        *,
        task: str,
        weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList([m for m, _ in members])
        self.kinds = [k for _, k in members]
        self.task = task
        w = torch.tensor(weights or [1.0] * len(members), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum(), persistent=False)

    @property
    def output_kind(self) -> str:
        return "probability" if self.task == "classification" else "linear"

    def member_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's prediction: probabilities for classifiers, values for regressors."""
        outs = [m(x) for m in self.members]
        if self.task == "classification":
            return [probabilities(o, k) for o, k in zip(outs, self.kinds, strict=True)]
        return [o.float().reshape(len(x), -1) for o in outs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(self.member_outputs(x))  # (M, B, C)
        return torch.einsum("m,mbc->bc", self.weights.to(stacked.dtype), stacked)
