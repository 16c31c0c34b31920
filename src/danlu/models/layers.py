"""Transformer pieces shared by the encoder (bert.py) and the encoder–decoder (seq2seq.py).

Attention runs through F.scaled_dot_product_attention with boolean masks (True = may attend)
shaped to broadcast over (B, heads, T_query, T_key). Self-attention projects q, k, v with one
fused Linear; cross-attention projects q from the decoder and k, v (fused) from the encoder
output, so a generator computes the encoder's k, v once per source and appends each new
decoder step's k, v to a pre-allocated KVCache.

    attn = Attention(dim=64, num_heads=4)
    y = attn(x, key_padding_mask(ids != pad_id))  # x (B, T, 64) → (B, T, 64)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import ConfigError

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def check_heads(num_heads: int, dim: int) -> None:
    if num_heads < 1 or dim % num_heads:
        divisors = ", ".join(str(d) for d in range(1, dim + 1) if dim % d == 0)
        raise ConfigError(
            f"model.num_heads: {num_heads} does not divide model.dim: {dim}",
            fix=f"choose num_heads among {divisors} (divisors of dim)",
        )


def run_layer(layer: nn.Module, checkpointed: bool, *args: object) -> torch.Tensor:
    """layer(*args); with `checkpointed` (train.gradient_checkpointing) and autograd on, the
    layer's activations are not kept but recomputed in backward (same RNG, same results)."""
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def check_length(length: int, context: int, what: str = "a batch") -> None:
    if length > context:
        raise ConfigError(
            f"{what} has {length} tokens but model.context is {context}",
            fix=f"set model.context to at least {length} (or shorten the sequences)",
        )


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Fixed positions of "Attention is all you need": sin on even, cos on odd features."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)  # (L, D)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return table


def key_padding_mask(real: torch.Tensor) -> torch.Tensor:
    """(B, T) True = real token → (B, 1, 1, T) attention mask.

    A row without any real token may attend everywhere (its output is never used), which
    keeps the softmax finite instead of producing NaN.
    """
    real = real | ~real.any(1, keepdim=True)  # (B, T)
    return real[:, None, None, :]  # (B, 1, 1, T)


class KVCache:
    """Keys and values of the past decoder steps, in buffers of `length` positions allocated
    at the first step (with that step's dtype, so autocast works)."""

    def __init__(self, length: int):
        self.length = length
        self.k: torch.Tensor | None = None  # (B, H, L, Dh)
        self.v: torch.Tensor | None = None  # (B, H, L, Dh)
        self.size = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            b, h, _, dh = k.shape
            self.k = k.new_zeros(b, h, self.length, dh)  # (B, H, L, Dh)
            self.v = v.new_zeros(b, h, self.length, dh)  # (B, H, L, Dh)
        end = self.size + k.shape[2]
        self.k[:, :, self.size : end] = k
        self.v[:, :, self.size : end] = v
        self.size = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, t, Dh) each

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (beam search: the parents of the surviving beams)."""
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class Attention(nn.Module):
    """Multi-head attention: self-attention (fused qkv) or cross-attention (q, fused kv)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, *, cross: bool = False):
        super().__init__()
        check_heads(num_heads, dim)
        self.num_heads = num_heads
        self.cross = cross
        self.dropout = dropout
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys and values of the encoder output, computed once per source."""
        k, v = self.kv(memory).chunk(2, dim=-1)  # (B, S, D) each
        return self.split_heads(k), self.split_heads(v)  # (B, H, S, Dh) each

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
        memory: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        if self.cross:
            q = self.split_heads(self.q(x))  # (B, H, T, Dh)
            k, v = kv if kv is not None else self.memory_kv(memory)  # (B, H, S, Dh)
        else:
            q, k, v = (self.split_heads(y) for y in self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H, past + T, Dh)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None,
        )  # (B, H, T, Dh)
        return self.out(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class FeedForward(nn.Sequential):
    """Position-wise Linear → activation → dropout → Linear."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0):
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"model.activation: '{activation}' is not known",
                fix=f"use one of {', '.join(ACTIVATIONS)}",
            )
        super().__init__(
            nn.Linear(dim, hidden),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )


class EncoderBlock(nn.Module):
    """Pre-norm block: x + self-attention(LN(x)), then x + feed-forward(LN(x))."""

    def __init__(
        self, dim: int, num_heads: int, hidden: int, dropout: float, activation: str = "gelu"
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, hidden, activation, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))  # (B, T, D)
        return x + self.drop(self.ff(self.norm2(x)))  # (B, T, D)
