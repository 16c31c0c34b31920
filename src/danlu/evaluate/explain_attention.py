"""Attention maps of a Transformer for one input: weights (layers, heads, T, T).

danlu's own attention (gpt.SelfAttention, layers.Attention) runs through
F.scaled_dot_product_attention, which returns no weights. Forward hooks, registered for one
forward pass and removed after it, read each attention module's inputs and recompute
softmax(q kᵀ / √d + mask) from the module's own projections (and rotary positions), so the
models' forward path and speed stay as they are. Only the encoder of a seq2seq model runs:
its self-attention over the source. Hugging Face models are asked for `output_attentions`
with their eager attention, switched back afterwards.

    maps = attention_maps(model, ids)   # ids (1, T) → (L, H, T, T), each row sums to 1
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from danlu.errors import ConfigError
from danlu.models import gpt, layers
from danlu.models.hf import HFModel, unwrap
from danlu.models.seq2seq import Seq2Seq


@torch.no_grad()
def attention_maps(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Attention weights of every layer and head for token ids (1, T) → (L, H, T, T)."""
    base = unwrap(model)
    if isinstance(base, HFModel):
        return _hf_maps(base, ids)
    modules = [
        m
        for m in base.modules()
        if isinstance(m, gpt.SelfAttention) or (isinstance(m, layers.Attention) and not m.cross)
    ]
    if not modules:
        raise ConfigError(
            f"a {type(base).__name__} model has no attention layers",
            fix="explain it with integrated_gradients or feature_ablation",
        )
    maps: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        maps.append(weights(module, args, kwargs)[0])  # (H, T, T)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        (base.encode if isinstance(base, Seq2Seq) else base)(ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(maps).float()  # (L, H, T, T)


def weights(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) of one call of a danlu attention module → (B, H, T, S)."""
    if isinstance(module, gpt.SelfAttention):  # forward(x, rope, mask)
        x, rope, mask = args
        B, T, _ = x.shape
        qkv = module.qkv(x).view(B, T, 3, module.num_heads, module.head_dim)  # (B, T, 3, H, hd)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        if rope is not None:
            q, k = gpt.rotate(q, *rope), gpt.rotate(k, *rope)
        causal = mask is None  # the fast path: SDPA's is_causal
    else:  # layers.Attention self-attention: forward(x, mask, *, causal)
        x = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        q, k, _ = (module.split_heads(y) for y in module.qkv(x).chunk(3, dim=-1))
        causal = kwargs.get("causal", False) and mask is None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        T, S = scores.shape[-2:]
        above = torch.ones(T, S, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores.float().softmax(-1)  # (B, H, T, S)


def _hf_maps(base: HFModel, ids: torch.Tensor) -> torch.Tensor:
    """A transformers model's `output_attentions`, with eager attention for this one call."""
    net = base.net
    previous = getattr(net.config, "_attn_implementation", None)
    setter = getattr(net, "set_attn_implementation", None)
    mask = (ids != base.pad_id).long() if base.padded else None
    try:
        if setter is not None and previous != "eager":
            setter("eager")
        if base.kind == "seq2seq":
            out = net.get_encoder()(input_ids=ids, attention_mask=mask, output_attentions=True)
        else:
            out = net(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        if setter is not None and previous not in (None, "eager"):
            setter(previous)
    found = getattr(out, "attentions", None)
    if not found or found[0] is None:
        raise ConfigError(
            f"this {net.config.model_type} model returns no attention weights",
            fix="explain it with integrated_gradients or feature_ablation",
        )
    return torch.stack([a[0] for a in found]).float()  # (L, H, T, T)
