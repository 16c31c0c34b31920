"""Score a chat model on what it answers: held-out conversations are cut before their last
assistant turn, the model answers greedily, and the answers are compared with the reference
turns by exact match (after whitespace normalisation, case-insensitive), ROUGE-1/2/L F1,
sacreBLEU and chrF.

    scores = answer_scores(model, tok, conversations, max_new_tokens=64)
"""

from __future__ import annotations

from typing import Any

import torch

from danlu.data import chat
from danlu.evaluate.metrics import generation_metrics
from danlu.models.compressed import device_of
from danlu.models.sampling import left_pad


@torch.no_grad()
def answer_scores(
    model: torch.nn.Module,
    tok: Any,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    pad_id: int,
    batch_size: int = 8,
    keep: int = 20,
) -> dict[str, Any]:
    stop = chat.end_of_turn_id(tok)
    eos = tok.eos_token_id
    pairs = [chat.prompt_and_reference(c, tok) for c in conversations]
    device = device_of(model)
    answers: list[str] = []
    for i in range(0, len(pairs), batch_size):
        rows = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs[i : i + batch_size]]
        ids, mask = left_pad(rows, pad_id)
        out = model.generate(
            ids.to(device),
            mask.to(device),
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            eos_id=stop if stop is not None else eos,
        )
        for row in out[:, ids.shape[1] :].tolist():
            ends = [k for k, t in enumerate(row) if t in (stop, eos)]
            answers.append(tok.decode(row[: ends[0]] if ends else row, skip_special_tokens=True))
    refs = [r for _, r in pairs]
    return {
        **generation_metrics(answers, refs, casefold=True),
        "generated": len(answers),
        "examples": [
            {"prompt": p[-300:], "reference": r, "generated": a}
            for (p, r), a in list(zip(pairs, answers, strict=True))[:keep]
        ],
    }
