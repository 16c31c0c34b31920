"""Choosing the next token from logits, and left-padding prompts for batched generation.

    token = next_token(logits, generated=ids, temperature=0.8, top_k=50, top_p=0.95)  # (B,)
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)  # ids [[5, 6, 7], [0, 0, 8]]

Order of operations (as in Hugging Face transformers): repetition penalty on the raw logits,
then temperature, then top-k, then top-p, then a draw. Temperature 0 is greedy (argmax after
the repetition penalty). The repetition penalty is CTRL's: a logit of a token that already
occurs in `generated` is divided by the penalty when positive, multiplied when negative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from danlu.errors import ConfigError


def check_options(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> None:
    """Raise a ConfigError for a sampling option out of range."""
    if temperature < 0:
        raise ConfigError(
            f"temperature must be 0 or more, got {temperature}",
            fix="use 0 for greedy decoding, or a positive value such as 0.8",
        )
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be 1 or more, got {top_k}", fix="use e.g. 50, or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(
            f"top_p must be in (0, 1], got {top_p}", fix="use e.g. 0.9, or None (no nucleus)"
        )
    if repetition_penalty <= 0:
        raise ConfigError(
            f"repetition_penalty must be positive, got {repetition_penalty}",
            fix="use 1.0 for none, or a value such as 1.2 to discourage repeats",
        )


def penalize_repeats(logits: torch.Tensor, generated: torch.Tensor, penalty: float):
    """(B, V) logits with those of tokens in generated (B, t) divided (> 0) or multiplied
    (< 0) by penalty; a new tensor."""
    score = logits.gather(1, generated)  # (B, t)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, generated, score)  # (B, V)


def next_token(
    logits: torch.Tensor,
    *,
    generated: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """(B, V) logits → (B,) long token ids. `generator` may be one per row (a list): each
    row then draws from its own, as it would alone (rows of several requests batched)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and generated is not None and generated.shape[1]:
        logits = penalize_repeats(logits, generated, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the better tokens
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))  # the best always stays
        logits = torch.empty_like(logits).scatter_(1, order, ordered)
    probs = logits.softmax(-1)  # (B, V)
    if isinstance(generator, list):
        draws = [
            torch.multinomial(p[None], 1, generator=g)
            for p, g in zip(probs, generator, strict=True)
        ]
        return torch.cat(draws).squeeze(1)  # (B,)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)


def emit(
    logits: torch.Tensor,
    out: torch.Tensor,
    pos: int,
    finished: torch.Tensor,
    *,
    eos_id: int | None,
    pad_id: int,
    on_token: Callable[[torch.Tensor], bool] | None,
    sample: dict,
) -> bool:
    """Choose every row's next token from `logits` (B, V) into out[:, pos]; rows that have
    produced eos_id get pad_id. True when generation should stop (on_token says so, or every
    row has finished)."""
    penalize = sample["repetition_penalty"] != 1.0
    token = next_token(logits, generated=out[:, :pos] if penalize else None, **sample)  # (B,)
    if eos_id is not None:
        token.masked_fill_(finished, pad_id)
        finished |= token == eos_id
    out[:, pos] = token
    stop = on_token is not None and on_token(token)
    return stop or (eos_id is not None and bool(finished.all()))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → ids (B, T) long, padded on the left, and mask (B, T) bool (True =
    real token), T the longest row."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = True
    return ids, mask
