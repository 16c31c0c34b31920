"""Text augmentation on batches of token ids: random deletion, neighbour swaps, masking.

Like the image augmentations it runs per batch on the device, draws from a generator seeded
by (seed, epoch, batch) so a resumed run sees the same batches, and never touches padding or
protected special tokens ([CLS], [BOS], [EOS], ...).

    t = TokenTransform(pad_id=0, mask_id=4, protected=[5], delete=0.1, swap=0.05, mask=0.1)
    x = t(x, generator)  # (B, L) int64 → (B, L) int64
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenTransform:
    pad_id: int
    mask_id: int  # [MASK] if the vocabulary has it, else [UNK]
    protected: list[int] = field(default_factory=list)
    delete: float = 0.0
    swap: float = 0.0
    mask: float = 0.0

    @property
    def augments(self) -> bool:
        return bool(self.delete or self.swap or self.mask)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None or not self.augments:
            return x
        editable = self._editable(x)
        if self.delete:
            x = delete_tokens(x, editable, self.delete, self.pad_id, generator)
            editable = self._editable(x)
        if self.swap:
            x = swap_neighbours(x, editable, self.swap, generator)
        if self.mask:
            hit = _draw(x.shape, self.mask, generator, x.device) & editable
            x = torch.where(hit, torch.full_like(x, self.mask_id), x)
        return x

    def _editable(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.tensor([self.pad_id, *self.protected], device=x.device)
        return ~torch.isin(x, keep)  # (B, L) bool


def _draw(shape: torch.Size, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(shape, generator=g) < p).to(device)


def delete_tokens(
    x: torch.Tensor, editable: torch.Tensor, p: float, pad_id: int, g: torch.Generator
) -> torch.Tensor:
    """Drop editable tokens with probability p; survivors move left, padding fills the end."""
    drop = _draw(x.shape, p, g, x.device) & editable  # (B, L)
    order = torch.argsort(drop.int(), dim=1, stable=True)  # kept tokens first, in order
    out = x.gather(1, order)
    kept = (~drop).sum(dim=1, keepdim=True)  # (B, 1)
    positions = torch.arange(x.shape[1], device=x.device)[None, :]  # (1, L)
    return torch.where(positions < kept, out, torch.full_like(out, pad_id))


def swap_neighbours(
    x: torch.Tensor, editable: torch.Tensor, p: float, g: torch.Generator
) -> torch.Tensor:
    """Swap pairs (i, i+1) of editable tokens with probability p (pairs never overlap)."""
    b, length = x.shape
    if length < 2:
        return x
    offset = int(torch.randint(0, 2, (1,), generator=g))  # pairs start at even or odd positions
    starts = torch.arange(offset, length - 1, 2, device=x.device)  # (P,)
    chosen = _draw((b, len(starts)), p, g, x.device)  # (B, P)
    chosen &= editable[:, starts] & editable[:, starts + 1]
    out = x.clone()
    left, right = x[:, starts], x[:, starts + 1]  # (B, P)
    out[:, starts] = torch.where(chosen, right, left)
    out[:, starts + 1] = torch.where(chosen, left, right)
    return out
