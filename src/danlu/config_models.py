"""The `model:` section of the schema: one section class per model family.

Text families (rnn, gpt, bert, seq2seq) share the keys that decide how a pretrained run is
reused (`init_from`) and how a sequence becomes one prediction (`pooling`, `output`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


Output = Literal["auto", "softmax", "sigmoid", "linear"]
_OUTPUT = "auto = softmax for classes, linear for regression; sigmoid = one logit for 2 classes"
_INIT = "a danlu run (runs/<name>) whose weights start this model; the task head is new"
_CONTEXT = "longest sequence the model takes (default: data.block_size / tokenizer.max_length)"


class MLPConfig(Section):
    type: Literal["mlp"]
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = [128]
    activation: Literal["relu", "gelu", "tanh", "sigmoid", "linear"] = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    norm: Literal["none", "batch", "layer"] = "none"
    output: Output = Field("auto", description=_OUTPUT)


class CNNConfig(Section):
    type: Literal["cnn"]
    channels: list[Annotated[int, Field(ge=1)]] = Field([32, 64, 128], min_length=1)
    kernel_size: int = Field(3, ge=1, le=11)
    convs_per_block: int = Field(1, ge=1, le=4)
    pool: Literal["max", "avg", "none"] = "max"
    batch_norm: bool = True
    activation: Literal["relu", "gelu"] = "relu"
    block_dropout: float = Field(0.0, ge=0, lt=1)
    global_pool: bool = Field(False, description="average-pool the last block instead of flatten")
    head_sizes: list[Annotated[int, Field(ge=1)]] = [128]
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the MLP head")
    output: Output = Field("auto", description=_OUTPUT)


class FreezeConfig(Section):
    """Parameters that keep their pretrained values (the rest train)."""

    embeddings: bool = Field(False, description="token/position embeddings (and their norm)")
    layers: int = Field(0, ge=0, description="the first N layers (blocks) of the body")
    backbone: bool = Field(False, description="everything but the task head")


class LoRAConfig(Section):
    """Low-rank adapters (PEFT) on the linear layers whose names match `target`; the base
    weights are frozen, the adapters and the new task head train."""

    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0, description="scale = alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1)
    target: list[str] | None = Field(
        None,
        description="regular expressions matched against full module names (re.search); "
        "default: the attention and MLP projections of the architecture",
    )
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: the frozen base weights are int8 (torchao weight-only)"
    )


class TextModel(Section):
    init_from: str | None = Field(None, description=_INIT)
    context: int | None = Field(None, ge=2, description=_CONTEXT)
    output: Output = Field("auto", description=_OUTPUT)
    freeze: FreezeConfig | None = None
    lora: LoRAConfig | None = None


class RNNConfig(TextModel):
    type: Literal["rnn"]
    cell: Literal["lstm", "gru"] = "lstm"
    num_layers: int = Field(2, ge=1, le=16)
    dim: int = Field(256, ge=1, description="embedding size")
    hidden_size: int = Field(512, ge=1)
    bidirectional: bool = Field(False, description="classification only")
    dropout: float = Field(0.1, ge=0, lt=1)
    tie_weights: bool = Field(True, description="language model: output layer = embedding")
    pooling: Literal["last", "mean"] = "last"


class Transformer(TextModel):
    num_layers: int = Field(4, ge=1, le=96)
    num_heads: int = Field(4, ge=1)
    dim: int = Field(256, ge=8)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)


class GPTConfig(Transformer):
    type: Literal["gpt"]
    dropout: float = Field(0.0, ge=0, lt=1)
    positions: Literal["learned", "rotary"] = "learned"
    norm: Literal["layer", "rms"] = "layer"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    tie_weights: bool = True
    bias: bool = True
    pooling: Literal["last", "mean"] = Field("last", description="classification head input")


class BERTConfig(Transformer):
    type: Literal["bert"]
    tie_weights: bool = True
    pooling: Literal["cls", "mean"] = "cls"


class Seq2SeqConfig(Transformer):
    type: Literal["seq2seq"]
    num_layers: int = Field(3, ge=1, le=48, description="encoder layers")
    decoder_layers: int | None = Field(None, ge=1, le=48, description="default: num_layers")
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    activation: Literal["gelu", "relu"] = "gelu"


class HFConfig(Section):
    """A pretrained Hugging Face checkpoint loaded through the transformers Auto classes, with
    the head the task needs (sequence classification/regression, causal LM or seq2seq LM)."""

    type: Literal["hf"]
    pretrained: str = Field(description="checkpoint folder, or a hub name (online only)")
    output: Output = Field("auto", description=_OUTPUT)
    context: int | None = Field(
        None, ge=2, description="longest input (default: the checkpoint's positions)"
    )
    dropout: float | None = Field(
        None, ge=0, lt=1, description="classifier dropout (default: the checkpoint's)"
    )
    freeze: FreezeConfig | None = None
    lora: LoRAConfig | None = None
    trust_remote_code: bool = Field(False, description="run code shipped with the checkpoint")


class EnsembleConfig(Section):
    """Several trained runs of one task averaged: written by `danlu ensemble`, not trained."""

    type: Literal["ensemble"]
    members: list[str] = Field(min_length=2, description="member runs, relative to the run")
    weights: list[float] | None = Field(None, description="default: equal weights")
    sources: list[str] | None = Field(None, description="the runs the members were copied from")
    output: Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _weights_fit(self) -> EnsembleConfig:
        if self.weights is not None:
            if len(self.weights) != len(self.members) or min(self.weights) < 0:
                raise ValueError(
                    f"model.weights needs one weight ≥ 0 per member ({len(self.members)}), "
                    f"got {self.weights}"
                )
            if sum(self.weights) <= 0:
                raise ValueError("model.weights must not all be 0")
        return self


_FAMILIES = (MLPConfig, CNNConfig, RNNConfig, GPTConfig, BERTConfig, Seq2SeqConfig, HFConfig)
ModelConfig = Annotated[
    Union[(*_FAMILIES, EnsembleConfig)],
    Field(discriminator="type"),
]
TEXT_MODELS = ("rnn", "gpt", "bert", "seq2seq", "hf")
