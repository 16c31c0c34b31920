"""Task heads on top of any sequence encoder: pool the hidden states, then a linear layer.

    head = SequenceHead(dim=256, num_outputs=8, pooling="mean")
    logits = head(hidden, mask)          # hidden (B, T, D), mask (B, T) True = real token → (B, 8)

Pooling: "cls" takes the first position (BERT's [CLS]), "mean" averages the real tokens,
"last" takes each row's last real token (a causal model's summary of the whole sequence; it
works with left and right padding alike).
"""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("cls", "mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, D) hidden states → (B, D)."""
    if how == "cls":
        return hidden[:, 0]  # (B, D)
    if mask is None:
        return hidden.mean(1) if how == "mean" else hidden[:, -1]
    mask = mask.to(hidden.device)
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)  # (B, D)
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(1).clamp_min(0)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
    raise ValueError(f"unknown pooling '{how}' (known: {', '.join(POOLINGS)})")


class SequenceHead(nn.Module):
    """Pooled hidden state → dropout → linear: class logits, or one value for regression."""

    def __init__(self, dim: int, num_outputs: int, pooling: str = "mean", dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling '{pooling}' (known: {', '.join(POOLINGS)})")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.dropout(pool(hidden, mask, self.pooling)))  # (B, num_outputs)
