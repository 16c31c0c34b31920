"""Token-level forward passes and generation metrics, shared by training and evaluation.

Training adds a loss to `token_outputs`; evaluation accumulates the same (logits, targets)
into loss per token, perplexity and accuracy, so `val_loss` during training and `danlu
evaluate` measure exactly the same thing. Seq2seq runs are also scored on what they generate:
exact match, sacreBLEU, chrF and ROUGE against the reference targets.

    logits, targets = token_outputs(model, "causal_lm", batch.x, batch.y, text=spec.text)
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100  # targets the token losses skip (padding, unmasked MLM positions)


def objective_name(setting: str, task: str, family: str) -> str:
    """`train.objective: auto` → supervised, causal_lm (masked_lm for bert) or seq2seq."""
    if setting != "auto":
        return setting
    if task == "language_modeling":
        return "masked_lm" if family == "bert" else "causal_lm"
    if task == "chat":
        return "causal_lm"
    return "seq2seq" if task == "seq2seq" else "supervised"


def token_outputs(
    model: torch.nn.Module,
    objective: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    text: dict[str, Any],
    mlm_probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), targets (B, T)) for causal_lm, masked_lm or seq2seq batches."""
    if objective == "causal_lm":  # x: a block, y: the block shifted by one
        return model(x), y
    if objective == "seq2seq":  # x: source ids, y: target ids with start and end tokens
        logits = model(x, y[:, :-1])  # (B, T-1, V)
        return logits, y[:, 1:].masked_fill(y[:, 1:] == text["pad_id"], IGNORE)
    if objective == "masked_lm":
        from danlu.models.bert import mask_tokens

        generator = None
        if not model.training:  # the same masked positions at every evaluation
            seed = int(x[:, :16].long().sum()) + x.shape[0]
            generator = torch.Generator(x.device).manual_seed(seed)
        ids = text["special_ids"]
        inputs, labels = mask_tokens(
            x,
            vocab_size=text["vocab_size"],
            mask_id=ids["mask"],
            special_ids=sorted({*ids.values(), text["pad_id"]}),
            probability=mlm_probability,
            generator=generator,
        )
        return model(inputs), labels
    raise ValueError(f"not a token objective: {objective}")


@torch.no_grad()
def generation_scores(
    model: torch.nn.Module,
    batches: Any,
    encoder: Any,
    *,
    text: dict[str, Any],
    max_new_tokens: int,
    num_beams: int = 1,
    keep: int = 20,
) -> dict[str, Any]:
    """Generate a target for every source of a seq2seq split and score it against the
    reference: exact match (after whitespace normalisation), corpus sacreBLEU, chrF and
    ROUGE-1/2/L."""
    from danlu.evaluate.metrics import generation_metrics

    ids = text["special_ids"]
    bos = ids.get("bos", ids.get("cls"))
    eos = ids.get("eos", ids.get("sep"))
    hyps: list[str] = []
    refs: list[str] = []
    sources: list[str] = []
    for batch in batches:
        out = model.generate(
            batch.x, max_new_tokens=max_new_tokens, num_beams=num_beams, bos_id=bos, eos_id=eos
        )  # (B, n)
        hyps += encoder.decode_batch(out.tolist())
        refs += encoder.decode_batch(batch.y.tolist())
        if len(sources) < keep:
            sources += encoder.decode_batch(batch.x[: keep - len(sources)].tolist())
    return {
        **generation_metrics(hyps, refs),
        "generated": len(hyps),
        "examples": [
            {"source": s, "reference": r, "generated": h}
            for s, r, h in zip(sources, refs[:keep], hyps[:keep], strict=False)
        ],
    }
