"""GPT: a decoder-only Transformer language model (or sequence classifier), with generation.

token embedding (+ learned positions) → N pre-norm blocks [norm → causal self-attention (RoPE
on q, k with positions: rotary) → residual; norm → MLP → residual] → final norm → LM head (the
token embedding, transposed, when tie_weights) or a pooled head.

    model = GPT(vocab_size=65, context=128, num_layers=4, num_heads=4, dim=256)
    logits = model(torch.randint(0, 65, (8, 128)))                        # (8, 128, 65)
    out = model.generate(ids, mask, max_new_tokens=100, temperature=0.0)  # (B, T + 100)

Padding: an attention_mask (B, T) bool marks the real tokens. Positions count real tokens
only (cumsum(mask) - 1), so a left-padded prompt gets exactly the logits of the unpadded one.

Generation keeps keys and values in a KVCache allocated once per call. `decode` runs the
prompt (prefill), then each new token, through the blocks' arithmetic without nn.Module
dispatch (which costs more than a small model's matrix products on CPU) and with (in, out)
weight copies (twice as fast for matrix-vector products on CPU). Past `context` tokens,
each step reads the last `context` tokens without the cache (a sliding window).

GELU is GPT-2's tanh approximation. SwiGLU's hidden width is 2/3 · mlp_ratio · dim rounded up
to a multiple of 8, about the parameters of the GELU MLP (688 for dim 256, mlp_ratio 4).
Init is GPT-2's: normal(0, 0.02), residual projections scaled by 1/sqrt(2 · num_layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import ConfigError
from danlu.models.heads import SequenceHead
from danlu.models.layers import run_layer
from danlu.models.sampling import check_options, emit
from danlu.registry import MODELS

NORMS: dict[str, Callable[[int, bool], nn.Module]] = {
    "layer": lambda dim, bias: nn.LayerNorm(dim, bias=bias),
    "rms": lambda dim, bias: nn.RMSNorm(dim, eps=1e-5),
}


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, value = h.chunk(2, dim=-1)  # (..., hidden) each
    return F.silu(gate) * value


ACTIVATIONS = {"gelu": lambda h: F.gelu(h, approximate="tanh"), "swiglu": swiglu}


# -------------------------------------------------------------------------------- blocks


def rotary_tables(context: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, ...]:
    """cos and sin of every (position, frequency) pair, each (context, head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(context).float(), inv_freq)  # (context, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (context, hd)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, T, hd): rotate each pair (x_i, x_{i + hd/2}) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, hd/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin  # (B, H, T, hd)


class KVCache:
    """Keys and values of every layer for one generate call, allocated once; `decode` writes
    positions [length, length + T) and attends to [0, length + T)."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int, like):
        shape = (layers, batch, heads, max_len, head_dim)
        self.k, self.v = like.new_zeros(shape), like.new_zeros(shape)  # (L, B, H, max_len, hd)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # views
        self.max_len, self.length = max_len, 0  # positions filled (advanced after all layers)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, dim // num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)  # one fused projection
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, rope, mask) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        p = self.dropout if self.training else 0.0  # mask (B, 1, T, T) bool, True = may attend
        y = F.scaled_dot_product_attention(q, k, v, mask, p, mask is None)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, kind: str, bias: bool) -> None:
        super().__init__()
        swiglu = kind == "swiglu"
        hidden = math.ceil(2 / 3 * ratio * dim / 8) * 8 if swiglu else int(ratio * dim)
        self.up = nn.Linear(dim, 2 * hidden if swiglu else hidden, bias=bias)
        self.act = ACTIVATIONS[kind]
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))  # (B, T, D)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, dropout, norm, mlp, bias) -> None:
        super().__init__()
        self.norm1, self.norm2 = NORMS[norm](dim, bias), NORMS[norm](dim, bias)
        self.attn = SelfAttention(dim, num_heads, dropout, bias)
        self.mlp = MLP(dim, mlp_ratio, mlp, bias)
        self.dropout = dropout

    def forward(self, x, rope, mask) -> torch.Tensor:
        a = self.attn(self.norm1(x), rope, mask)  # (B, T, D)
        x = x + (F.dropout(a, self.dropout, self.training) if self.dropout else a)
        m = self.mlp(self.norm2(x))  # (B, T, D)
        return x + (F.dropout(m, self.dropout, self.training) if self.dropout else m)


def attention_mask_2d(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool real tokens → (B, 1, T, T) bool: causal, real keys only. Every query also
    sees itself, so a padding row is never all False (which would give NaN)."""
    T = mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril_()  # (T, T)
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)  # (T, T)
    return (causal & mask[:, None, None, :]) | eye  # (B, 1, T, T)


def positions_of(mask: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """Position ids: (T,) when every token is real, else (B, T) counting real tokens only."""
    if mask is None:
        return torch.arange(T, device=device)  # (T,)
    return (mask.long().cumsum(1) - 1).clamp_min(0)  # (B, T)


# --------------------------------------------------------------------------------- model


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        context: int,
        *,
        num_layers: int = 4,
        num_heads: int = 4,
        dim: int = 256,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        positions: str = "learned",  # or "rotary"
        norm: str = "layer",  # or "rms"
        mlp: str = "gelu",  # or "swiglu"
        tie_weights: bool = True,
        bias: bool = True,
        num_outputs: int | None = None,  # None: LM head; else a pooled head with this width
        pooling: str = "last",
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        check_shape(dim, num_heads, positions)
        self.vocab_size, self.context, self.pad_id = vocab_size, context, pad_id
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, dim // num_heads
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(context, dim) if positions == "learned" else None
        if positions == "rotary":
            cos, sin = rotary_tables(context, self.head_dim)
            self.register_buffer("cos", cos, persistent=False)  # (context, hd)
            self.register_buffer("sin", sin, persistent=False)
        self.dropout = dropout
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, dropout, norm, mlp, bias) for _ in range(num_layers)
        )
        self.gradient_checkpointing = False  # train.gradient_checkpointing (layers.run_layer)
        self.norm = NORMS[norm](dim, bias)
        lm = num_outputs is None
        self.lm_head = nn.Linear(dim, vocab_size, bias=False) if lm and not tie_weights else None
        self.head = None if lm else SequenceHead(dim, num_outputs, pooling, dropout)
        self._decode_weights: tuple | None = None  # see decode_layers
        residual = ("attn.proj.weight", "mlp.down.weight")  # scaled to keep the stream's variance
        for name, p in self.named_parameters():  # GPT-2's init
            if p.dim() == 2:  # linear and embedding weights
                scale = math.sqrt(2 * num_layers) if name.endswith(residual) else 1.0
                nn.init.normal_(p, 0.0, 0.02 / scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, T) ids → (B, T, D) final-normed hidden states."""
        T = self._check_length(ids, "a sequence")
        if attention_mask is None and self.head is not None:
            attention_mask = ids != self.pad_id
        mask = None if attention_mask is None else attention_mask.bool()
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the fast causal kernel
        pos = positions_of(mask, T, ids.device)  # (T,) or (B, T)
        return self._body(ids, pos, None if mask is None else attention_mask_2d(mask))

    def _check_length(self, ids: torch.Tensor, what: str) -> int:
        if ids.shape[1] > self.context:
            raise ConfigError(
                f"{what} of {ids.shape[1]} tokens is longer than model.context={self.context}",
                fix="raise model.context, or lower data.block_size / data.tokenizer.max_length "
                "(prompts: keep their last model.context tokens)",
            )
        return ids.shape[1]

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """LM: (B, T) → (B, T, V) logits; with a head: (B, T) → (B, num_outputs)."""
        if self.head is None:
            return self.logits(self.hidden(ids, attention_mask))  # (B, T, V)
        mask = ids != self.pad_id if attention_mask is None else attention_mask.bool()
        return self.head(self.hidden(ids, mask), mask)  # (B, C)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden → (..., V) next-token logits."""
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.tok_emb.weight)

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """Token (+ learned position) embeddings (B, T, D), and RoPE's cos, sin (or None)."""
        x = self.tok_emb(ids)  # (B, T, D)
        if self.pos_emb is not None:
            return x + self.pos_emb(pos), None  # (T, D) or (B, T, D) broadcast
        cos, sin = self.cos[pos], self.sin[pos]  # (T, hd) or (B, T, hd)
        return x, (cos, sin) if pos.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))

    def _body(self, ids, pos, mask) -> torch.Tensor:
        x, rope = self._embed(ids, pos)  # (B, T, D)
        if self.dropout:
            x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = run_layer(block, self.gradient_checkpointing, x, rope, mask)  # (B, T, D)
        return self.norm(x)  # (B, T, D)

    # -------------------------------------------------------------------------- generate

    def generate(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        on_token: Callable[[torch.Tensor], bool] | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue LEFT-padded prompts (B, T) → (B, T + n), n ≤ max_new_tokens. Rows that
        produced eos_id get pad_id afterwards; stops early when every row has, or when
        on_token(step_tokens (B,)) returns True. Runs in eval mode (then restores the mode)."""
        if self.head is not None:
            raise ConfigError(
                "this GPT has a classification head: it predicts labels, not next tokens",
                fix="generate with a language-model run (data.task: language_modeling)",
            )
        check_options(temperature, top_k, top_p, repetition_penalty)
        self._check_length(ids, "a prompt")
        sample = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        sample |= {"repetition_penalty": repetition_penalty, "generator": generator}
        was_training = self.training
        self.eval()
        try:
            out = self._generate(
                ids, attention_mask, max_new_tokens, eos_id, on_token, use_cache, sample
            )
        finally:
            self.train(was_training)
        return out.clone()  # a normal tensor: inference tensors cannot enter autograd

    @torch.inference_mode()
    def _generate(self, ids, attention_mask, max_new, eos_id, on_token, use_cache, sample):
        B, T = ids.shape
        out = ids.new_full((B, T + max_new), self.pad_id)  # (B, T + max_new)
        out[:, :T] = ids
        real = torch.ones_like(out, dtype=torch.bool)  # (B, T + max_new): generated are real
        if attention_mask is not None:
            real[:, :T] = attention_mask.bool()
        finished = ids.new_zeros(B, dtype=torch.bool)  # (B,)
        step = Stepper(self, out, real, T, max_new, use_cache)
        for n in range(max_new):
            logits = step(n)  # (B, V)
            args = {"eos_id": eos_id, "pad_id": self.pad_id, "on_token": on_token}
            if emit(logits, out, T + n, finished, **args, sample=sample):
                return out[:, : T + n + 1]
        return out

    def decode_layers(self) -> list[tuple[Callable, ...]]:
        """Per block, `decode`'s norm1, qkv, proj, norm2, up, act, down: a plain nn.Linear as
        addmm with an (in, out) weight copy, kept until a weight changes; others as they are."""
        linears = [m for m in self.blocks.modules() if type(m) is nn.Linear]
        key = [(m.weight.data_ptr(), m.weight._version) for m in linears]
        if self._decode_weights is None or self._decode_weights[0] != key:
            cpu = self.tok_emb.weight.device.type == "cpu"  # elsewhere a view does as well
            copies = {m: m.weight.detach().t() for m in linears}  # (in, out)
            copies = {m: w.contiguous() for m, w in copies.items()} if cpu else copies
            self._decode_weights = (key, copies)
        copies = self._decode_weights[1]

        def linear(m: nn.Module) -> Callable:
            if m not in copies:
                return m
            w, b = copies[m], m.bias  # (in, out), (out,)
            return (lambda x: torch.addmm(b, x, w)) if b is not None else (lambda x: x @ w)

        def layer(b: Block) -> tuple[Callable, ...]:
            attn = (norm_fn(b.norm1), linear(b.attn.qkv), linear(b.attn.proj))
            return (*attn, norm_fn(b.norm2), linear(b.mlp.up), b.mlp.act, linear(b.mlp.down))

        return [layer(b) for b in self.blocks]


def norm_fn(m: nn.Module) -> Callable:
    """A LayerNorm or RMSNorm as a plain function of its parameters (anything else: itself)."""
    if type(m) is nn.LayerNorm:
        shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
        return lambda x: torch.layer_norm(x, shape, w, b, eps)
    if type(m) is nn.RMSNorm:
        shape, w, eps = m.normalized_shape, m.weight, m.eps
        return lambda x: torch.rms_norm(x, shape, w, eps)
    return m


def decode(x, layers, cache: KVCache, rope, mask, num_heads: int) -> torch.Tensor:
    """New tokens (B, T, D) through every block, extending the cache → (B, T, D): the blocks'
    arithmetic in eval mode (tests check that it agrees with forward)."""
    B, T, D = x.shape
    p, x = cache.length, x.reshape(B * T, D)  # (B·T, D): the linears are addmm
    for (k_all, v_all), layer in zip(cache.layers, layers, strict=True):
        norm1, qkv, proj, norm2, up, act, down = layer
        qkv_ = qkv(norm1(x)).view(B, T, 3, num_heads, D // num_heads)  # (B, T, 3, H, hd)
        q, k, v = qkv_.permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        k_all.narrow(2, p, T).copy_(k)
        v_all.narrow(2, p, T).copy_(v)
        keys, values = k_all.narrow(2, 0, p + T), v_all.narrow(2, 0, p + T)  # (B, H, p+T, hd)
        causal = mask is None and T > 1  # the prompt (p = 0); one new token sees every key
        y = F.scaled_dot_product_attention(q, keys, values, mask, is_causal=causal)
        x = x + proj(y.transpose(1, 2).reshape(B * T, D))  # (B·T, D)
        x = x + down(act(up(norm2(x))))  # (B·T, D)
    cache.length += T
    return x.view(B, T, D)


class Stepper:
    """Next-token logits (B, V) at step n of one generate call: the prompt through the cache
    first (prefill), then one token at a time; past `context`, a window without the cache."""

    def __init__(self, model: GPT, out, real, T: int, max_new: int, use_cache: bool) -> None:
        self.model, self.out, self.real, self.T = model, out, real, T
        self.padded = not bool(real[:, :T].all())
        self.cache = None
        if use_cache:
            B, size, w = out.shape[0], min(T + max_new, model.context), model.tok_emb.weight
            shape = (model.num_layers, B, model.num_heads, size, model.head_dim)
            self.cache, self.layers = KVCache(*shape, w), model.decode_layers()
            # additive key mask for the one-token steps: 0 = real, -inf = padding
            self.bias = torch.zeros_like(real, dtype=w.dtype).masked_fill_(~real, float("-inf"))

    def __call__(self, n: int) -> torch.Tensor:
        model, cache, end = self.model, self.cache, self.T + n
        if cache is None or end > cache.max_len:  # uncached, or past the context: a window
            start = max(0, end - model.context)
            h = model.hidden(self.out[:, start:end], self.real[:, start:end])  # (B, W, D)
            return model.logits(h[:, -1])  # (B, V)
        if n == 0:  # prefill
            mask = self.real[:, :end] if self.padded else None
            pos = positions_of(mask, end, self.out.device)  # (T,) or (B, T)
            self.next_pos = mask.sum(1, keepdim=True) if self.padded else pos[-1:] + 1
            attn = attention_mask_2d(mask) if self.padded else None  # (B, 1, T, T)
            ids = self.out[:, :end]  # (B, T)
        else:  # one new token: it attends to every real key in the cache
            pos, attn = self.next_pos, self.bias[:, None, None, :end] if self.padded else None
            ids, self.next_pos = self.out[:, end - 1 : end], self.next_pos + 1  # (B, 1)
        x, rope = model._embed(ids, pos)  # (B, T, D)
        x = decode(x, self.layers, cache, rope, attn, model.num_heads)  # (B, T, D)
        return model.logits(model.norm(x[:, -1]))  # (B, V)


def check_shape(dim: int, num_heads: int, positions: str) -> None:
    if dim % num_heads:
        divisors = ", ".join(str(d) for d in range(1, dim + 1) if dim % d == 0)
        raise ConfigError(
            f"model.num_heads: {num_heads} does not divide model.dim: {dim}",
            fix=f"choose num_heads among {divisors} (divisors of dim)",
        )
    if positions == "rotary" and (dim // num_heads) % 2:
        raise ConfigError(
            f"model.positions: rotary needs an even head size, but model.dim / model.num_heads "
            f"= {dim} / {num_heads} = {dim // num_heads}",
            fix="choose num_heads so that dim / num_heads is even, or positions: learned",
        )


@MODELS.register("gpt")
def build_gpt(
    input_shape: list[int],
    num_outputs: int | None,
    vocab_size: int,
    pad_id: int | None,
    special_ids: dict[str, int] | None = None,
    *,
    context: int | None = None,
    **family_keys,
) -> GPT:
    """`model.type: gpt`. family_keys are GPT's: num_layers=4, num_heads=4, dim=256,
    mlp_ratio=4.0, dropout=0.0, positions="learned", norm="layer", mlp="gelu",
    tie_weights=True, bias=True, pooling="last". context defaults to the data's width."""
    pad = pad_id if pad_id is not None else 0
    return GPT(
        vocab_size, context or input_shape[0], num_outputs=num_outputs, pad_id=pad, **family_keys
    )
