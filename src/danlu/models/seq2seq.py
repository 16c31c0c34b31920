"""Encoder–decoder Transformer ("Attention is all you need") with cached generation.

One token embedding (scaled by √dim) serves the source, the target and, tied, the output
projection. Positions are sinusoidal (default) or learned. The encoder is pre-norm
self-attention blocks with the source padding mask; each decoder block is causal
self-attention (plus the target padding mask), cross-attention over the encoder output (with
the source padding mask) and a feed-forward layer (GELU or ReLU); both stacks end with a
LayerNorm. Attention is our own module (layers.Attention), so generation keeps a
pre-allocated KV cache per decoder layer and computes the cross-attention keys and values once
per source.

    model = Seq2Seq(vocab_size=1000, pad_id=0, context=64, num_layers=2, dim=64)
    logits = model(src, tgt[:, :-1])                           # (B, T-1, 1000) vs tgt[:, 1:]
    out = model.generate(src, bos_id=1, eos_id=2, num_beams=4)  # (B, n) without bos

Beam search ranks finished hypotheses by log p(y | x) / lp(|y|) with GNMT's length penalty
lp(n) = ((5 + n) / 6) ** length_penalty (0 = raw log-probability; |y| counts the eos).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import ConfigError
from danlu.models.layers import (
    Attention,
    EncoderBlock,
    FeedForward,
    KVCache,
    check_heads,
    check_length,
    key_padding_mask,
    run_layer,
    sinusoidal_table,
)
from danlu.models.sampling import check_options, next_token
from danlu.registry import MODELS

POSITIONS = ("sinusoidal", "learned")


class DecoderBlock(nn.Module):
    """Pre-norm: x + self-attn(LN x), x + cross-attn(LN x, memory), x + feed-forward(LN x)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, dropout: float, activation: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads, dropout, cross=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, hidden, activation, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, self_mask, kv, src_mask, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.norm1(x), self_mask, cache=cache))  # (B, T, D)
        x = x + self.drop(self.cross_attn(self.norm2(x), src_mask, kv=kv))  # (B, T, D)
        return x + self.drop(self.ff(self.norm3(x)))  # (B, T, D)


class DecodeState:
    """What a generator keeps per decoder layer: the self-attention cache, the memory k, v."""

    def __init__(self, model: Seq2Seq, memory: torch.Tensor, src_mask: torch.Tensor, length: int):
        self.src_mask = src_mask  # (B, 1, 1, S)
        self.kv = [block.cross_attn.memory_kv(memory) for block in model.decoder]
        self.caches = [KVCache(length) for _ in model.decoder]

    @property
    def length(self) -> int:
        return self.caches[0].size

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            cache.reorder(index)


class Seq2Seq(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        context: int,
        *,
        num_layers: int = 3,
        decoder_layers: int | None = None,
        num_heads: int = 4,
        dim: int = 256,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        positions: str = "sinusoidal",
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        check_heads(num_heads, dim)
        if positions not in POSITIONS:
            raise ConfigError(
                f"model.positions: '{positions}' is not known", fix=f"use one of {POSITIONS}"
            )
        self.vocab_size, self.pad_id, self.context, self.dim = vocab_size, pad_id, context, dim
        self.positions = positions
        self.embed = nn.Embedding(vocab_size, dim)
        if positions == "learned":
            self.src_pos = nn.Parameter(torch.randn(context, dim) * 0.02)
            self.tgt_pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        else:
            self.register_buffer("table", sinusoidal_table(context, dim), persistent=False)
        self.drop = nn.Dropout(dropout)
        hidden = int(dim * mlp_ratio)
        self.encoder = nn.ModuleList(
            EncoderBlock(dim, num_heads, hidden, dropout, activation) for _ in range(num_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderBlock(dim, num_heads, hidden, dropout, activation)
            for _ in range(num_layers if decoder_layers is None else decoder_layers)
        )
        self.enc_norm = nn.LayerNorm(dim)
        self.dec_norm = nn.LayerNorm(dim)
        self.gradient_checkpointing = False  # train.gradient_checkpointing (layers.run_layer)
        for name, p in self.named_parameters():
            if p.dim() > 1 and "pos" not in name:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.embed.weight, std=dim**-0.5)  # unit variance after the √dim scale

    def embed_tokens(self, ids: torch.Tensor, side: str, offset: int = 0) -> torch.Tensor:
        t = ids.shape[1]
        table = self.table if self.positions == "sinusoidal" else getattr(self, f"{side}_pos")
        pos = table[offset : offset + t]  # (T, D)
        return self.drop(self.embed(ids) * math.sqrt(self.dim) + pos)  # (B, T, D)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) source ids → memory (B, S, D) and its padding mask (B, 1, 1, S)."""
        check_length(src.shape[1], self.context, "a source batch")
        src_mask = key_padding_mask(src != self.pad_id)  # (B, 1, 1, S)
        x = self.embed_tokens(src, "src")  # (B, S, D)
        for block in self.encoder:
            x = run_layer(block, self.gradient_checkpointing, x, src_mask)  # (B, S, D)
        return self.enc_norm(x), src_mask

    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder hidden states (B, S, D); padding always comes from pad_id."""
        return self.encode(ids)[0]

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor):
        """(B, T) target inputs attending to memory (B, S, D) → logits (B, T, V)."""
        t = tgt_in.shape[1]
        check_length(t, self.context, "a target batch")
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).tril()  # (T, T)
        real = (tgt_in != self.pad_id)[:, None, None, :]  # (B, 1, 1, T)
        eye = torch.eye(t, dtype=torch.bool, device=tgt_in.device)  # a PAD query sees itself
        self_mask = (causal & real) | eye  # (B, 1, T, T)
        x = self.embed_tokens(tgt_in, "tgt")  # (B, T, D)
        for block in self.decoder:
            kv = block.cross_attn.memory_kv(memory)
            x = run_layer(block, self.gradient_checkpointing, x, self_mask, kv, src_mask)
        return F.linear(self.dec_norm(x), self.embed.weight)  # (B, T, V)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_mask = self.encode(src)  # (B, S, D), (B, 1, 1, S)
        return self.decode(tgt_in, memory, src_mask)  # (B, T, V)

    def step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """One cached decoder step: the last tokens (N,) → next-token logits (N, V)."""
        x = self.embed_tokens(tokens[:, None], "tgt", offset=state.length)  # (N, 1, D)
        for block, kv, cache in zip(self.decoder, state.kv, state.caches, strict=True):
            x = block(x, None, kv, state.src_mask, cache=cache)  # (N, 1, D)
        return F.linear(self.dec_norm(x[:, 0]), self.embed.weight)  # (N, V)

    def next_logits(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """step() in float32 with PAD ruled out: generators never emit PAD (it pads finished
        rows), and a PAD inside a prefix would be masked when the prefix is scored again."""
        logits = self.step(tokens, state).float()  # (N, V)
        return logits.index_fill_(1, torch.tensor([self.pad_id], device=logits.device), -math.inf)

    @torch.no_grad()
    def generate(
        self,
        src: torch.Tensor,
        *,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        bos_id: int,
        eos_id: int | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B, S) sources → (B, n) target ids without bos; finished rows continue with PAD.

        num_beams == 1 decodes greedily (temperature 0) or samples (models.sampling);
        num_beams > 1 runs beam search (deterministic, so no sampling options).
        """
        sampling = temperature > 0 or top_k or top_p or repetition_penalty != 1.0
        self._check_options(max_new_tokens, num_beams, bool(sampling))
        check_options(temperature, top_k, top_p, repetition_penalty)
        eos_id = -1 if eos_id is None else eos_id  # -1: never produced, rows never finish
        memory, src_mask = self.encode(src)  # (B, S, D), (B, 1, 1, S)
        if num_beams > 1:
            return self._beam_search(
                memory, src_mask, max_new_tokens, num_beams, length_penalty, bos_id, eos_id
            )
        pick = partial(
            next_token,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            generator=generator,
        )
        return self._decode_one(memory, src_mask, max_new_tokens, bos_id, eos_id, pick)

    def _check_options(self, max_new_tokens: int, num_beams: int, sampling: bool) -> None:
        if not 1 <= max_new_tokens <= self.context:
            raise ConfigError(
                f"max_new_tokens: {max_new_tokens} is not within 1..model.context ({self.context})",
                fix=f"ask for 1 to {self.context} new tokens, or train with a larger model.context",
            )
        if num_beams < 1:
            raise ConfigError(f"num_beams must be 1 or more, got {num_beams}", fix="use e.g. 4")
        if num_beams > 1 and sampling:
            raise ConfigError(
                f"num_beams: {num_beams} cannot be combined with sampling options",
                fix="use temperature 0 and no top_k/top_p/repetition_penalty with beam search",
            )

    def _decode_one(self, memory, src_mask, max_new_tokens, bos_id, eos_id, pick):
        """Greedy decoding or sampling: pick(logits (B, V), generated=(B, t)) → (B,) tokens."""
        state = DecodeState(self, memory, src_mask, max_new_tokens)
        b = memory.shape[0]
        tokens = torch.full((b,), bos_id, dtype=torch.long, device=memory.device)  # (B,)
        finished = torch.zeros(b, dtype=torch.bool, device=memory.device)  # (B,)
        out = torch.empty(b, 0, dtype=torch.long, device=memory.device)  # (B, t)
        for _ in range(max_new_tokens):
            logits = self.next_logits(tokens, state)  # (B, V)
            tokens = pick(logits, generated=out)  # (B,)
            tokens = tokens.masked_fill(finished, self.pad_id)
            out = torch.cat([out, tokens[:, None]], 1)  # (B, t + 1)
            finished |= tokens == eos_id
            if finished.all():
                break
        return out

    def _beam_search(self, memory, src_mask, max_new_tokens, k, alpha, bos_id, eos_id):
        """Batched beam search over B·k rows; returns each source's best hypothesis."""
        b, device, n = memory.shape[0], memory.device, max_new_tokens
        state = DecodeState(
            self, memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0), n
        )
        scores = torch.full((b, k), -math.inf, device=device)
        scores[:, 0] = 0.0  # (B, k) summed log-probs; only the first beam is alive at start
        tokens = torch.full((b * k,), bos_id, dtype=torch.long, device=device)  # (B·k,)
        seqs = torch.empty(b * k, 0, dtype=torch.long, device=device)  # (B·k, t)
        best = torch.full((b,), -math.inf, device=device)  # (B,) best finished normed score
        best_seq = torch.full((b, n), self.pad_id, dtype=torch.long, device=device)  # (B, n)
        best_len = torch.zeros(b, dtype=torch.long, device=device)  # (B,)
        rows = torch.arange(b, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)  # (B,)

        def lp(length: int) -> float:
            return ((5 + length) / 6) ** alpha

        for t in range(n):
            logp = self.next_logits(tokens, state).log_softmax(-1)  # (B·k, V)
            v = logp.shape[1]
            cand = (scores.view(-1, 1) + logp).view(b, k * v)  # (B, k·V)
            top, index = cand.topk(min(2 * k, k * v), dim=1)  # (B, 2k)
            parent, word = index // v, index % v  # (B, 2k) each
            eos = word == eos_id  # (B, 2k)
            # a hypothesis ending in eos among the k best candidates is finished
            ranked = torch.arange(top.shape[1], device=device) < k  # (2k,)
            normed = torch.where(eos & ranked & ~done[:, None], top / lp(t + 1), -math.inf)
            score, which = normed.max(1)  # (B,)
            better = score > best  # (B,)
            hyp = torch.full((b, n), self.pad_id, dtype=torch.long, device=device)  # (B, n)
            hyp[:, :t] = seqs.view(b, k, t)[rows, parent[rows, which]]
            hyp[:, t] = eos_id
            best = torch.where(better, score, best)
            best_seq = torch.where(better[:, None], hyp, best_seq)
            best_len = torch.where(better, t + 1, best_len)
            # the k best candidates not ending in eos stay alive
            order = torch.where(eos, 2 * k, torch.arange(top.shape[1], device=device))
            keep = order.argsort(dim=1, stable=True)[:, :k]  # (B, k)
            scores = top.gather(1, keep)  # (B, k)
            flat = (rows[:, None] * k + parent.gather(1, keep)).view(-1)  # (B·k,)
            tokens = word.gather(1, keep).view(-1)  # (B·k,)
            seqs = torch.cat([seqs.index_select(0, flat), tokens[:, None]], 1)  # (B·k, t + 1)
            state.reorder(flat)
            # done once no alive beam can still beat the best finished one (scores only fall)
            done |= best >= scores.amax(1) / max(lp(min(t + 2, n)), lp(n))
            if done.all():
                break
        # sources still open at the length limit take their best unfinished beam if it wins
        alive = scores / lp(seqs.shape[1])  # (B, k)
        score, which = alive.max(1)  # (B,)
        better = (score > best) & ~done
        last = seqs.view(b, k, -1)[rows, which]  # (B, t)
        best_seq[better, : last.shape[1]] = last[better]
        best_len = torch.where(better, last.shape[1], best_len)
        return best_seq[:, : int(best_len.max())]


@MODELS.register("seq2seq")
def build_seq2seq(
    input_shape: list[int],
    num_outputs: int | None,
    vocab_size: int,
    pad_id: int,
    special_ids: dict[str, int],
    *,
    num_layers: int = 3,
    decoder_layers: int | None = None,
    num_heads: int = 4,
    dim: int = 256,
    mlp_ratio: float = 4.0,
    dropout: float = 0.1,
    context: int | None = None,
    positions: str = "sinusoidal",
    activation: str = "gelu",
) -> Seq2Seq:
    if num_outputs is not None:
        raise ConfigError(
            f"model.type: seq2seq generates sequences and has no {num_outputs}-output head",
            fix="use seq2seq with data.task: seq2seq, or bert/gpt for classification",
        )
    return Seq2Seq(
        vocab_size,
        pad_id,
        context or input_shape[0],
        num_layers=num_layers,
        decoder_layers=decoder_layers,
        num_heads=num_heads,
        dim=dim,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
        positions=positions,
        activation=activation,
    )
