"""Batches from in-memory splits, in an order that is a pure function of (seed, epoch).

Because the order of epoch e is recomputed from the seed, resuming at batch k of epoch e
costs nothing: no batch is replayed or skipped through, and the run continues exactly where
it stopped. Augmentation draws from a generator seeded by (seed, epoch, batch), so it is
reproducible and resumable too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

POISSON = 2**40  # offsets the Poisson draws' seeds from the augmentation generator's


@dataclass
class Split:
    """One split in memory: x (N, F) float32 features or (N, C, H, W) uint8 images; y (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    index: np.ndarray  # position of each example in its source (row or file order)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, rows: np.ndarray) -> Split:
        t = torch.as_tensor(rows, dtype=torch.long)
        return Split(self.x[t], self.y[t], self.index[rows])


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor  # positions in the split, for diagnostics

    def __len__(self) -> int:
        return len(self.y)


class BatchLoader:
    """Deterministic, resumable batches over a Split.

    order: "shuffle" (a fresh permutation per epoch), "weighted" (sampling with replacement by
    `weights`, for class imbalance), "sequential", or "poisson" (differential privacy: each
    batch takes every example independently with probability batch_size / N, so its size
    varies and may be 0; batch b of epoch e is drawn from a generator seeded by (seed, e, b)).

    Padded token ids (`pad_id` given): each batch is cut to its longest row, so a batch of
    short texts costs what short texts cost. `group_by_length` (with "shuffle") draws batches
    of similar lengths: the permutation is cut into chunks of 64 batches, each sorted by
    length, and the batches are shuffled (the longest one first, so memory peaks at once).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        order: str = "sequential",
        seed: int = 0,
        weights: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
        augment: bool = False,
        device: torch.device | str = "cpu",
        drop_last: bool | str = False,
        pad_id: int | None = None,
        group_by_length: bool = False,
        aligned: bool = False,
    ) -> None:
        if order == "weighted" and weights is None:
            raise ValueError("order='weighted' needs per-example weights")
        self.split, self.batch_size, self.order, self.seed = split, batch_size, order, seed
        self.weights, self.transform, self.augment = weights, transform, augment
        self.device = torch.device(device)
        self.pad_id, self.aligned = pad_id, aligned
        self.lengths: torch.Tensor | None = None  # (N,) real tokens per row
        if pad_id is not None and split.x.dim() == 2 and not split.x.is_floating_point():
            real = split.x != pad_id  # (N, L)
            self.lengths = torch.where(real, torch.arange(real.shape[1]) + 1, 0).amax(1)
        self.group_by_length = group_by_length and order == "shuffle" and self.lengths is not None
        # a last batch of one example breaks BatchNorm in training: drop_last="single" skips it
        n = len(split)
        self.drop_last = order != "poisson" and (
            (drop_last is True and n >= batch_size)
            or (drop_last == "single" and n > 1 and n % batch_size == 1)
        )

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order_of(self, epoch: int) -> torch.Tensor:
        n = len(self.split)
        if self.order == "sequential":
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.order == "weighted":
            return torch.multinomial(self.weights, n, replacement=True, generator=g)
        perm = torch.randperm(n, generator=g)
        if not self.group_by_length or self.lengths is None:
            return perm
        size = self.batch_size
        chunks = [perm[i : i + 64 * size] for i in range(0, n, 64 * size)]
        ordered = torch.cat(
            [c[self.lengths[c].argsort(descending=True, stable=True)] for c in chunks]
        )
        batches = list(ordered.split(size))
        full = batches[:-1] if len(batches[-1]) < size else batches  # a short last batch stays last
        longest = max(range(len(full)), key=lambda i: int(self.lengths[full[i]].max()), default=0)
        rest = [b for i, b in enumerate(full) if i != longest]
        shuffled = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
        tail = batches[len(full) :]
        return torch.cat([*full[longest : longest + 1], *shuffled, *tail])

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, beginning at batch `start`."""
        if self.order == "poisson":
            for b in range(start, len(self)):
                yield self.make(self.poisson_rows(epoch, b), epoch, b)
            return
        order = self.order_of(epoch)
        for b in range(start, len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.make(rows, epoch, b)

    def poisson_rows(self, epoch: int, b: int) -> torch.Tensor:
        """Batch b of an epoch under Poisson sampling: each row with probability batch_size / N."""
        n = len(self.split)
        g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + b + POISSON)
        return (torch.rand(n, generator=g) < self.batch_size / max(n, 1)).nonzero().squeeze(1)

    def make(self, rows: torch.Tensor, epoch: int = 0, b: int = 0) -> Batch:
        x = self.split.x[rows].to(self.device, non_blocking=True)
        y = self.split.y[rows].to(self.device, non_blocking=True)
        if self.transform is not None:
            g = None
            if self.augment:
                g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + b)
            x = self.transform(x, g)
        if self.pad_id is not None:
            x = self._trim(x)
            y = y[:, : x.shape[1]] if self.aligned else self._trim(y)
        return Batch(x, y, rows)

    def _trim(self, t: torch.Tensor) -> torch.Tensor:
        """Drop the padding columns every row of a right-padded id batch has."""
        if t.dim() != 2 or t.is_floating_point() or t.shape[1] <= 1:
            return t
        real = (t != self.pad_id).any(0)  # (L,)
        width = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
        return t if width == t.shape[1] else t[:, :width]
