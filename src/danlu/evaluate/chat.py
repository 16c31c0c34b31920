"""Score a chat model on what it answers: held-out conversations are cut before their last
assistant turn, the model answers greedily, and the answers are compared with the reference
turns by exact match (after whitespace normalisation, case-insensitive) and ROUGE-L F1.

    scores = answer_scores(model, tok, conversations, max_new_tokens=64)
"""

from __future__ import annotations

from typing import Any

import torch

from danlu.data import chat
from danlu.models.sampling import left_pad


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


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
    from rouge_score import rouge_scorer

    stop = chat.end_of_turn_id(tok)
    eos = tok.eos_token_id
    pairs = [chat.prompt_and_reference(c, tok) for c in conversations]
    device = next(model.parameters()).device
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
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, a)["rougeL"].fmeasure for r, a in zip(refs, answers, strict=True)]
    exact = [_norm(a) == _norm(r) for r, a in zip(refs, answers, strict=True)]
    n = max(len(answers), 1)
    return {
        "exact_match": sum(exact) / n,
        "rouge_l": sum(rouge) / n,
        "generated": len(answers),
        "examples": [
            {"prompt": p[-300:], "reference": r, "generated": a}
            for (p, r), a in list(zip(pairs, answers, strict=True))[:keep]
        ],
    }
