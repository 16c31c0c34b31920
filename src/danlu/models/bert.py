"""BERT-style bidirectional Transformer encoder with a masked-LM head or a sequence head.

Token + learned position embeddings → dropout → pre-norm blocks (multi-head self-attention
with a key-padding mask, GELU feed-forward) → final LayerNorm. Without `num_outputs` the model
is a masked language model: Linear → GELU → LayerNorm → a decoder tied to the token embedding
(with its own bias) gives logits over the vocabulary at every position. With `num_outputs` a
SequenceHead pools the hidden states ("cls": the first position, or "mean") for classification
or regression. `mask_tokens` corrupts a batch for MLM pre-training (BERT's 15% / 80-10-10).

    model = BERT(vocab_size=1000, pad_id=0, context=128, num_layers=2, num_heads=4, dim=64)
    inputs, labels = mask_tokens(ids, vocab_size=1000, mask_id=4, special_ids=[0, 1, 2, 3, 4])
    logits = model(inputs)  # (B, T, 1000); cross-entropy against labels (-100 = ignore)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import ConfigError
from danlu.models.heads import SequenceHead
from danlu.models.layers import (
    EncoderBlock,
    check_heads,
    check_length,
    key_padding_mask,
    run_layer,
)
from danlu.registry import MODELS

BERT_POOLINGS = ("cls", "mean")


def mask_tokens(
    ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: list[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids → (inputs, labels) for masked-LM training.

    Each row selects round(probability × its number of ordinary tokens) positions (at least
    one), never a special token; pass the pad id among `special_ids`. Labels hold the original
    ids there and -100 elsewhere. Of the selected tokens 80% become `mask_id`, 10% a random
    ordinary token and 10% stay unchanged.
    """
    device = ids.device
    specials = torch.tensor(sorted(set(special_ids)), dtype=ids.dtype, device=device)
    ordinary = ~torch.isin(ids, specials)  # (B, T) candidates
    count = (ordinary.sum(1) * probability).round().long()  # (B,)
    count = torch.where(ordinary.any(1), count.clamp_min(1), 0)  # (B,)
    score = torch.rand(ids.shape, generator=generator, device=device)  # (B, T)
    score = score.masked_fill(~ordinary, 2.0)  # specials sort last, never selected
    rank = score.argsort(1).argsort(1)  # (B, T) rank of each position within its row
    chosen = rank < count[:, None]  # (B, T)
    labels = torch.where(chosen, ids, -100).long()  # (B, T)

    u = torch.rand(ids.shape, generator=generator, device=device)  # (B, T)
    allowed = torch.arange(vocab_size, device=device)
    allowed = allowed[~torch.isin(allowed, specials)]  # (V',) ordinary token ids
    pick = torch.randint(len(allowed), ids.shape, generator=generator, device=device)  # (B, T)
    inputs = torch.where(chosen & (u < 0.8), mask_id, ids)  # (B, T)
    inputs = torch.where(chosen & (u >= 0.8) & (u < 0.9), allowed[pick].to(ids.dtype), inputs)
    return inputs, labels


class MLMHead(nn.Module):
    """Hidden states → Linear → GELU → LayerNorm → vocabulary logits.

    With tied weights the decoder matrix is the token embedding, passed in at call time
    rather than shared as a Parameter, so the state dict holds it once (safetensors refuses
    tensors that share memory).
    """

    def __init__(self, dim: int, vocab_size: int, tied: bool):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.decoder = None if tied else nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, tied_weight: torch.Tensor | None) -> torch.Tensor:
        h = self.transform(hidden)  # (B, T, D)
        weight = tied_weight if self.decoder is None else self.decoder.weight  # (V, D)
        return F.linear(h, weight, self.bias)  # (B, T, V)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class BERT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        context: int,
        num_outputs: int | None = None,
        *,
        num_layers: int = 4,
        num_heads: int = 4,
        dim: int = 256,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        pooling: str = "cls",
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        check_heads(num_heads, dim)
        if pooling not in BERT_POOLINGS:
            raise ConfigError(
                f"model.pooling: '{pooling}' is not available for bert",
                fix=f"use one of {', '.join(BERT_POOLINGS)}",
            )
        self.vocab_size, self.pad_id, self.context = vocab_size, pad_id, context
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        hidden = int(dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, num_heads, hidden, dropout) for _ in range(num_layers)
        )
        self.gradient_checkpointing = False  # train.gradient_checkpointing (layers.run_layer)
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)
        if num_outputs is None:
            self.mlm = MLMHead(dim, vocab_size, tied=tie_weights)
            self.mlm.apply(_init_weights)
            self.head = None
        else:
            self.mlm = None
            self.head = SequenceHead(dim, num_outputs, pooling, dropout)

    def hidden(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids → (B, T, D) final-normed hidden states; PAD keys are never attended."""
        t = ids.shape[1]
        check_length(t, self.context)
        real = ids != self.pad_id if attention_mask is None else attention_mask.bool()  # (B, T)
        mask = key_padding_mask(real)  # (B, 1, 1, T)
        positions = torch.arange(t, device=ids.device)  # (T,)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))  # (B, T, D)
        for block in self.blocks:
            x = run_layer(block, self.gradient_checkpointing, x, mask)  # (B, T, D)
        return self.norm(x)  # (B, T, D)

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        real = ids != self.pad_id if attention_mask is None else attention_mask.bool()  # (B, T)
        h = self.hidden(ids, real)  # (B, T, D)
        if self.mlm is not None:
            return self.mlm(h, self.tok_emb.weight)  # (B, T, V)
        return self.head(h, real)  # (B, num_outputs)


@MODELS.register("bert")
def build_bert(
    input_shape: list[int],
    num_outputs: int | None,
    vocab_size: int,
    pad_id: int,
    special_ids: dict[str, int],
    *,
    num_layers: int = 4,
    num_heads: int = 4,
    dim: int = 256,
    mlp_ratio: float = 4.0,
    dropout: float = 0.1,
    context: int | None = None,
    pooling: str = "cls",
    tie_weights: bool = True,
) -> BERT:
    return BERT(
        vocab_size,
        pad_id,
        context or input_shape[0],
        num_outputs,
        num_layers=num_layers,
        num_heads=num_heads,
        dim=dim,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
        pooling=pooling,
        tie_weights=tie_weights,
    )
