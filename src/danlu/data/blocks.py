"""Language-model batches: fixed-length blocks of block_size + 1 tokens from a token memmap.

A block's first block_size tokens are the input x and its last block_size tokens the target
y (x shifted by one). Two layouts:

- pack=True: documents run back to back (the token cache puts EOS after each), and a block
  may span several documents. Training draws random block starts; evaluation walks the split
  in consecutive blocks, so every token after the first is a target exactly once.
- pack=False: one document per block. A document longer than a block is cut into several
  blocks (consecutive blocks share one token, so again every target appears once); a shorter
  block is padded with PAD and its padded targets are -100 (ignored by the loss).

Orders are pure functions of (seed, epoch) and the batch number, so `epoch(e, start=k)` gives
exactly the batches k, k+1, ... of epoch e without producing the first k: resume is exact.

    train, val = holdout(TokenSplit.of(cache), 0.05)           # the last 5 % of the tokens
    loader = BlockLoader(train, batch_size=32, block_size=256, order="random", seed=0)
    for batch in loader.epoch(0): ...                           # Batch(x, y, rows)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from danlu.data.loader import Batch
from danlu.errors import DataError

IGNORE = -100  # target value the cross-entropy loss skips


@dataclass(frozen=True)
class TokenSplit:
    """A contiguous run of a corpus's tokens with its document boundaries. len() = tokens."""

    tokens: np.ndarray  # (N,) uint16 | uint32, usually a view of the cache's memmap
    offsets: np.ndarray  # (D + 1,) int64 document starts within `tokens`, then N
    start: int = 0  # where tokens[0] sits in the whole corpus

    @classmethod
    def of(cls, cache: Any) -> TokenSplit:
        """The whole corpus of a TokenCache (anything with .tokens and .offsets)."""
        return cls(cache.tokens, np.asarray(cache.offsets, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    def slice(self, a: int, b: int) -> TokenSplit:
        """Tokens [a, b); a document cut by a or b keeps its part on this side."""
        i = np.searchsorted(self.offsets, a, side="right")
        j = np.searchsorted(self.offsets, b, side="left")
        offsets = np.concatenate([[a], self.offsets[i:j], [b]]).astype(np.int64) - a
        if b <= a:
            offsets = np.zeros(1, dtype=np.int64)  # no tokens, no documents
        return TokenSplit(self.tokens[a:b], offsets, self.start + a)


def holdout(
    split: TokenSplit, fraction: float, *, by: str = "tokens", key: str = "data.split.val"
) -> tuple[TokenSplit, TokenSplit]:
    """(head, tail): the tail is the last `fraction` of the tokens (by="tokens") or of the
    documents (by="documents": the cut falls on a document boundary)."""
    if not 0 <= fraction < 1:
        raise DataError(f"{key}={fraction} must be a fraction in [0, 1)")
    n = len(split)
    if by == "tokens":
        cut = n - round(fraction * n)
    elif by == "documents":
        cut = int(split.offsets[split.n_documents - round(fraction * split.n_documents)])
    else:
        raise ValueError(f"by must be 'tokens' or 'documents', got {by!r}")
    if fraction > 0 and (cut == n or cut == 0):
        unit = "tokens" if by == "tokens" else "documents"
        count = n if by == "tokens" else split.n_documents
        raise DataError(
            f"{key}={fraction} of {count} {unit} leaves one side empty",
            fix=f"use a larger corpus or another {key}",
        )
    return split.slice(0, cut), split.slice(cut, n)


class BlockLoader:
    """Deterministic, resumable (B, block_size) batches over a TokenSplit.

    order: "random" (training: random starts with pack, shuffled document blocks without) or
    "sequential" (evaluation: the whole split once). A random epoch holds `blocks_per_epoch`
    blocks, by default as many as the sequential walk, so it reads about every token once.
    """

    def __init__(
        self,
        split: TokenSplit,
        batch_size: int,
        block_size: int,
        *,
        order: str = "random",
        seed: int = 0,
        pack: bool = True,
        pad_id: int = 0,
        blocks_per_epoch: int | None = None,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> None:
        if order not in ("random", "sequential"):
            raise ValueError(f"order must be 'random' or 'sequential', got {order!r}")
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.order, self.seed, self.pack, self.pad_id = order, seed, pack, pad_id
        self.device, self.drop_last = torch.device(device), drop_last
        n = len(split)
        if pack and order == "random" and n < block_size + 1:
            raise DataError(
                f"data.block_size={block_size} needs at least {block_size + 1} tokens per "
                f"training block, but the split has {n}",
                fix="lower data.block_size or use a larger corpus",
            )
        if not pack:  # document pieces: (start, length) of every block, in document order
            self.piece_starts, self.piece_lengths = _pieces(split.offsets, block_size)
            if order == "random" and not len(self.piece_starts):
                raise DataError(
                    f"data.pack: false needs documents of 2+ tokens, but the split's "
                    f"{split.n_documents} documents have fewer",
                    fix="use data.pack: true or a larger corpus",
                )
        sequential = len(self.piece_starts) if not pack else -(-max(n - 1, 0) // block_size)
        self.blocks = blocks_per_epoch or sequential
        if order == "sequential":
            self.blocks = sequential

    def __len__(self) -> int:
        if self.drop_last:
            return self.blocks // self.batch_size
        return -(-self.blocks // self.batch_size)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, beginning at batch `start`."""
        perm = None
        if not self.pack and self.order == "random":
            perm = _rng(self.seed, epoch).permutation(len(self.piece_starts))
        for b in range(start, len(self)):
            starts, lengths = self.starts(epoch, b, perm)
            yield self.make(starts, lengths)

    def starts(
        self, epoch: int, b: int, perm: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Block starts (B,) and lengths (B,) of batch b of `epoch`."""
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.blocks)
        full = self.block_size + 1
        if self.pack and self.order == "random":
            high = len(self.split) - self.block_size  # last start with a full block
            starts = _rng(self.seed, epoch, b).integers(0, high, size=hi - lo)
            return starts, np.full(hi - lo, full)
        if self.pack:  # sequential: consecutive blocks, the last one possibly short
            starts = np.arange(lo, hi, dtype=np.int64) * self.block_size
            return starts, np.minimum(full, len(self.split) - starts)
        if perm is None and self.order == "random":
            perm = _rng(self.seed, epoch).permutation(len(self.piece_starts))
        rows = perm[lo:hi] if perm is not None else np.arange(lo, hi)
        return self.piece_starts[rows], self.piece_lengths[rows]

    def make(self, starts: np.ndarray, lengths: np.ndarray) -> Batch:
        """Gather blocks from the memmap; positions past a block's length are padding."""
        T, n = self.block_size, len(self.split)
        pos = np.arange(T + 1)
        valid = pos < lengths[:, None]  # (B, T + 1)
        idx = np.minimum(starts[:, None] + pos, n - 1)  # (B, T + 1)
        data = self.split.tokens[idx].astype(np.int64)  # (B, T + 1)
        data[~valid] = self.pad_id
        # copies, not views: with one row both slices would share `data`, and y's IGNORE
        # would leak into x
        x = torch.from_numpy(data[:, :-1].copy())  # (B, T)
        y = data[:, 1:].copy()  # (B, T)
        y[~valid[:, 1:]] = IGNORE
        y = torch.from_numpy(y)
        rows = torch.from_numpy(starts.astype(np.int64))
        return Batch(x.to(self.device), y.to(self.device), rows)


def _pieces(offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the blocks that cut each document (≥ 2 tokens) into pieces of at
    most block_size + 1 tokens, consecutive pieces sharing one token."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    count = np.where(lengths >= 2, -(-(lengths - 1) // block_size), 0)  # pieces per document
    doc = np.repeat(np.arange(len(lengths)), count)
    first = np.cumsum(count) - count
    k = np.arange(len(doc)) - np.repeat(first, count)  # piece number within its document
    starts = offsets[doc] + k * block_size
    return starts, np.minimum(block_size + 1, offsets[doc + 1] - starts)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, *stream])
