"""Recurrent networks for text: embedding → stacked LSTM/GRU → language-model or sequence head.

Language model (num_outputs None): a unidirectional RNN whose outputs are projected to the
embedding size and scored against the embedding matrix (weight tying), so the logits at
position t depend on tokens ≤ t only. Classifier / regressor (num_outputs C): the outputs are
pooled by heads.SequenceHead — "last" (the final state; a bidirectional RNN concatenates the
forward state at the last real token and the backward state at the first) or "mean".

Pads never change a result: each row's real tokens are moved to the front and run as a packed
sequence, so the RNN never steps over a pad, whether the batch is left- or right-padded.
Generation carries the recurrent state (h, c) from step to step: it is the RNN's cache.

    model = build_rnn([64], None, vocab_size=1000, pad_id=0, special_ids={}, dim=128)
    logits = model(ids)                                         # (8, 64) → (8, 64, 1000)
    out = model.generate(prompt, mask, max_new_tokens=20, temperature=0)  # (B, T + 20)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from danlu.errors import ConfigError
from danlu.models.heads import SequenceHead, pool
from danlu.registry import MODELS

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
POOLINGS = ("last", "mean")
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # GRU: h; LSTM: (h, c)


def run_skipping_pads(
    rnn: nn.RNNBase, x: torch.Tensor, mask: torch.Tensor | None, state: State | None = None
) -> tuple[torch.Tensor, State]:
    """Run `rnn` over the real positions of each row only; pad positions output zeros.

    x (B, T, D), mask (B, T) True = real token (None: all real) → outputs (B, T, H·dirs) and the
    state after each row's last real token. Works for left, right or any padding.
    """
    if mask is None or bool(mask.all()):
        return rnn(x, state)  # (B, T, H·dirs), state
    # Per row, a stable permutation that puts the real positions first (in order).
    order = torch.sort((~mask).to(torch.int32), dim=1, stable=True).indices  # (B, T)
    lengths = mask.sum(1).clamp_min(1).cpu()  # (B,)  an all-pad row runs one pad
    x = x.gather(1, order.unsqueeze(-1).expand_as(x))  # (B, T, D) right-padded
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, state = rnn(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, H')
    out = torch.zeros_like(out).scatter(1, order.unsqueeze(-1).expand_as(out), out)  # (B, T, H')
    return out * mask.unsqueeze(-1).to(out.dtype), state  # (B, T, H·dirs), zeros at pads


def both_ends(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional summary: forward state at the last real token ‖ backward state at the first.

    out (B, T, 2H) → (B, 2H). The backward half's first real token is the last real token of
    the flipped sequence.
    """
    h = out.shape[-1] // 2
    flipped = None if mask is None else mask.flip(1)
    forward_end = pool(out[..., :h], mask, "last")  # (B, H)
    backward_end = pool(out[..., h:].flip(1), flipped, "last")  # (B, H)
    return torch.cat([forward_end, backward_end], -1)  # (B, 2H)


class RNN(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        num_outputs: int | None = None,
        *,
        cell: str = "lstm",
        num_layers: int = 2,
        dim: int = 256,
        hidden_size: int = 512,
        bidirectional: bool = False,
        dropout: float = 0.1,
        tie_weights: bool = True,
        pooling: str = "last",
        context: int | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size, self.pad_id, self.context = vocab_size, pad_id, context
        self.num_outputs, self.pooling = num_outputs, pooling
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.drop = nn.Dropout(dropout)
        self.rnn = CELLS[cell](
            dim,
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,  # between layers
            bidirectional=bidirectional,
        )
        width = hidden_size * (2 if bidirectional else 1)
        lm, tied = num_outputs is None, num_outputs is None and tie_weights
        self.head = SequenceHead(width, num_outputs, pooling, dropout) if not lm else None
        self.proj = nn.Linear(hidden_size, dim) if tied and hidden_size != dim else None
        self.out_bias = nn.Parameter(torch.zeros(vocab_size)) if tied else None
        self.lm_head = nn.Linear(hidden_size, vocab_size) if lm and not tied else None
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # N(0, 1) would make tied logits huge
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()

    def _mask(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The real-token mask: given, else ids != pad for heads and all real for the LM."""
        if attention_mask is not None:
            return attention_mask.to(device=ids.device, dtype=torch.bool)
        return None if self.head is None else ids != self.pad_id

    def _check_length(self, length: int) -> None:
        if self.context is not None and length > self.context:
            raise ConfigError(
                f"a sequence of {length} tokens is longer than model.context: {self.context}",
                fix="raise model.context (or leave it empty: RNNs have no length limit) "
                "or use shorter inputs",
            )

    def _encode(
        self, ids: torch.Tensor, mask: torch.Tensor | None, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        x = self.drop(self.embed(ids))  # (B, T, dim)
        return run_skipping_pads(self.rnn, x, mask, state)  # (B, T, H·dirs), state

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        out = self.drop(out)  # (..., H)
        if self.lm_head is not None:
            return self.lm_head(out)  # (..., V)
        out = self.proj(out) if self.proj is not None else out  # (..., dim)
        return F.linear(out, self.embed.weight, self.out_bias)  # (..., V)

    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids → (B, T, hidden_size · directions) outputs of the top layer (0 at pads)."""
        self._check_length(ids.shape[1])
        return self._encode(ids, self._mask(ids, attention_mask))[0]

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = self._mask(ids, attention_mask)  # (B, T) | None
        out = self.hidden(ids, mask)  # (B, T, H·dirs)
        if self.head is None:
            return self._logits(out)  # (B, T, V)
        if self.pooling == "last" and self.rnn.bidirectional:
            # One position: the head's "last" pooling returns it as it is.
            return self.head(both_ends(out, mask).unsqueeze(1))  # (B, C)
        return self.head(out, mask)  # (B, C)

    @torch.no_grad()
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
        """Continue left-padded prompts (B, T) → (B, T + n), n ≤ max_new_tokens.

        The cache is the recurrent state after each row's last real token; without it every
        step reruns the whole sequence. A mask of None means every token is real. Rows that
        produced eos_id produce pad_id afterwards; on_token(step_tokens) returning True stops
        early. Dropout is off while generating.
        """
        from danlu.models.sampling import check_options

        if self.head is not None:
            raise ConfigError(
                "this RNN has a classification head: it predicts labels, not next tokens",
                fix="generate with a language-model run (data.task: language_modeling)",
            )
        check_options(temperature, top_k, top_p, repetition_penalty)
        self._check_length(ids.shape[1])
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask
        sample = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        sample |= {"repetition_penalty": repetition_penalty, "generator": generator}
        was_training = self.training
        self.eval()
        try:
            return self._generate(
                ids,
                mask.to(ids.device, torch.bool),
                max_new_tokens,
                eos_id,
                on_token,
                use_cache,
                sample,
            )
        finally:
            self.train(was_training)

    def _generate(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        eos_id: int | None,
        on_token: Callable[[torch.Tensor], bool] | None,
        use_cache: bool,
        sample: dict,
    ) -> torch.Tensor:
        from danlu.models.sampling import next_token

        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # (B,)
        out, state = self._encode(ids, mask)  # (B, T, H), state after each last real token
        logits = self._logits(pool(out, mask, "last"))  # (B, V)
        for step in range(max_new_tokens):
            if step and use_cache:
                out, state = self._encode(ids[:, -1:], None, state)  # (B, 1, H)
                logits = self._logits(out[:, -1])  # (B, V)
            elif step:
                logits = self._logits(pool(self._encode(ids, mask)[0], mask, "last"))  # (B, V)
            token = next_token(logits, generated=ids, **sample)  # (B,)
            token = torch.where(done, self.pad_id, token)  # (B,)
            if eos_id is not None:
                done |= token == eos_id
            ids = torch.cat([ids, token[:, None]], 1)  # (B, T + step + 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B, T + step + 1)
            if (on_token is not None and on_token(token)) or bool(done.all()):
                break
        return ids


@MODELS.register("rnn")
def build_rnn(
    input_shape: list[int],
    num_outputs: int | None,
    vocab_size: int,
    pad_id: int,
    special_ids: dict[str, int],
    *,
    cell: str = "lstm",
    num_layers: int = 2,
    dim: int = 256,
    hidden_size: int = 512,
    bidirectional: bool = False,
    dropout: float = 0.1,
    tie_weights: bool = True,
    pooling: str = "last",
    context: int | None = None,
) -> RNN:
    del input_shape, special_ids  # no positions table, no special tokens: any length works
    if cell not in CELLS:
        raise ConfigError(f"model.cell: '{cell}' is not a recurrent cell", fix="use lstm or gru")
    if bidirectional and num_outputs is None:
        raise ConfigError(
            "model.bidirectional: true does not fit language modeling: the backward direction "
            "would read the very tokens the model has to predict",
            fix="set model.bidirectional: false (bidirectional RNNs are for classification "
            "and regression)",
        )
    if pooling not in POOLINGS:
        raise ConfigError(
            f"model.pooling: '{pooling}' is not available for RNNs",
            fix="use model.pooling: last (the final state) or mean (average of all states)",
        )
    if context is not None and context < 1:
        raise ConfigError(
            f"model.context: {context} must be positive", fix="leave it empty (no limit)"
        )
    return RNN(
        vocab_size,
        pad_id,
        num_outputs,
        cell=cell,
        num_layers=num_layers,
        dim=dim,
        hidden_size=hidden_size,
        bidirectional=bidirectional,
        dropout=dropout,
        tie_weights=tie_weights,
        pooling=pooling,
        context=context,
    )
