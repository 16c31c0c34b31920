"""Model families, one self-contained file each, built by name from flat keyword arguments.

    model = build({"type": "mlp", "hidden_sizes": [64]}, input_shape=[784], task="classification",
                  num_classes=10)

`output` decides the head: softmax (one logit per class), sigmoid (one logit for two classes,
one per class otherwise) or linear (regression). Models never see the data layer: they get the
input shape and the number of classes as plain values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu.config_models import TEXT_MODELS
from danlu.errors import CheckpointError, ConfigError
from danlu.models import bert, cnn, gpt, hf, mlp, rnn, seq2seq  # noqa: F401  (register the families)
from danlu.registry import MODELS

TOKEN_TASKS = ("language_modeling", "seq2seq", "chat")


def output_kind(task: str, output: str) -> str:
    """Resolve `model.output: auto` and reject heads that do not fit the task."""
    if output == "auto":
        return "linear" if task == "regression" else "softmax"
    if task == "regression" and output != "linear":
        raise ConfigError(
            f"model.output: {output} does not fit task: regression",
            fix="use model.output: linear (or auto)",
        )
    if task == "classification" and output == "linear":
        raise ConfigError(
            "model.output: linear does not fit task: classification",
            fix="use softmax or sigmoid (or auto), or set data.task: regression",
        )
    return output


def num_outputs(task: str, num_classes: int | None, kind: str) -> int:
    if task == "regression":
        return 1
    assert num_classes is not None
    return 1 if (kind == "sigmoid" and num_classes == 2) else num_classes


def build(
    model_cfg: dict[str, Any],
    *,
    input_shape: list[int],
    task: str,
    num_classes: int | None,
    text: dict[str, Any] | None = None,
    weights: bool = True,
) -> nn.Module:
    """`text` (the data spec's text section: vocab_size, pad_id, special_ids) is required by
    the sequence families; language modelling and seq2seq get a vocabulary head. The model is
    bare: fine-tuning strategies (model.freeze, model.lora) are applied by `adapt`. `weights`
    (hf only): load the checkpoint's weights, or only its architecture (a run's weights
    follow)."""
    kwargs = dict(model_cfg)
    family = kwargs.pop("type")
    for key in ("init_from", "freeze", "lora"):
        kwargs.pop(key, None)
    kind = output_kind(task, kwargs.pop("output", "auto"))
    if family not in TEXT_MODELS:
        if task in TOKEN_TASKS:
            raise ConfigError(
                f"model.type: {family} cannot do data.task: {task}",
                fix="use a sequence model: gpt, rnn or bert (language_modeling), seq2seq",
            )
        return MODELS[family](
            input_shape=list(input_shape),
            num_outputs=num_outputs(task, num_classes, kind),
            **kwargs,
        )
    if text is None:
        raise ConfigError(
            f"model.type: {family} reads token ids, but the data is not text",
            fix="use mlp or cnn for tables and images, or text data (data.text / a corpus)",
        )
    if family == "hf":
        return hf.HFModel(
            task=task,
            num_outputs=None if task in TOKEN_TASKS else num_outputs(task, num_classes, kind),
            vocab_size=text["vocab_size"],
            pad_id=text["pad_id"],
            weights=weights,
            grow_vocabulary=text.get("template") == "chatml",  # ChatML's two new tokens
            **kwargs,
        )
    if (family == "seq2seq") != (task == "seq2seq"):
        raise ConfigError(
            f"model.type: {family} does not fit data.task: {task}",
            fix="seq2seq data (source → target pairs) needs model.type: seq2seq, and "
            "model.type: seq2seq needs seq2seq data",
        )
    return MODELS[family](
        input_shape=list(input_shape),
        num_outputs=None if task in TOKEN_TASKS else num_outputs(task, num_classes, kind),
        vocab_size=text["vocab_size"],
        pad_id=text["pad_id"],
        special_ids=text["special_ids"],
        **kwargs,
    )


def build_for(model_cfg: dict[str, Any], spec: Any, *, weights: bool = True) -> nn.Module:
    """`build` with the shapes a data spec records (input shape, task, classes, text)."""
    return build(
        model_cfg,
        input_shape=spec.input_shape,
        task=spec.task,
        num_classes=spec.num_classes,
        text=spec.text,
        weights=weights,
    )


def family(model: nn.Module, configured: str) -> str:
    """The native family an `hf` model behaves like for objectives and generation: bert (a
    masked LM), gpt (a causal LM), seq2seq; other families are themselves."""
    if configured != "hf":
        return configured
    kind = getattr(hf.unwrap(model), "kind", None)  # None: an ONNX Runtime session
    return {"masked_lm": "bert", "language_modeling": "gpt", "seq2seq": "seq2seq"}.get(kind, "hf")


def adapt(model: nn.Module, model_cfg: dict[str, Any]) -> nn.Module:
    """Apply `model.freeze` and `model.lora` (in that order) to a built model."""
    from danlu.models import finetune

    finetune.freeze(model, model_cfg.get("freeze"))
    if model_cfg.get("lora"):
        model = finetune.add_lora(model, model_cfg["lora"])
    return model


def enable_gradient_checkpointing(model: nn.Module, model_type: str) -> None:
    """train.gradient_checkpointing: Transformer layers recompute their activations in
    backward instead of keeping them (danlu's gpt, bert, seq2seq per layer; `hf` models
    through transformers). Families without a layer stack are refused."""
    inner = hf.unwrap(model)  # the model inside a PEFT (LoRA) wrapper
    if isinstance(inner, hf.HFModel):  # transformers 5: "activation checkpointing"
        enable = getattr(inner.net, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            inner.net.gradient_checkpointing_enable({"use_reentrant": False})
    elif isinstance(getattr(inner, "gradient_checkpointing", None), bool):
        inner.gradient_checkpointing = True
    else:
        raise ConfigError(
            f"train.gradient_checkpointing works with Transformer models, not model.type: "
            f"{model_type}",
            fix="remove it (or use a gpt, bert, seq2seq or hf model)",
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state (parameters and buffers such as BatchNorm statistics), each tensor once:
    a weight tied to another (a language-model head sharing the embedding table) is stored
    under its first name only, and restored through the tie (see `restore`). Quantized base
    weights (LoRA over an int8 base) are not saved: they are rebuilt from the pretrained
    checkpoint, exactly, by quantizing it again."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in model.state_dict().items():
        if type(v) not in (torch.Tensor, nn.Parameter):  # a torchao quantized tensor
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a state saved by `state_for_saving` (strict, except for tied weights)."""
    expected = state_for_saving(model)
    problems = model.load_state_dict(state, strict=False)
    missing = [k for k in problems.missing_keys if k in expected]
    if missing or problems.unexpected_keys:
        raise RuntimeError(
            f"missing: {', '.join(missing[:5]) or 'none'}; unexpected: "
            f"{', '.join(problems.unexpected_keys[:5]) or 'none'}"
        )


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights into a model built from the same config (strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read weights '{path}' ({e})") from None
    problem = mismatch(state_for_saving(model), state)
    if problem:
        raise CheckpointError(
            f"weights '{path}' do not fit the model built from the run's config ({problem})",
            fix="the config.yaml or weights were changed after training",
        )
    restore(model, state)
    return model


def mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into a model whose state is `expected`, or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {list(state[k].shape)} (model: {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong):
        return None
    return (
        f"missing: {', '.join(missing[:5]) or 'none'}; unexpected: "
        f"{', '.join(unexpected[:5]) or 'none'}; wrong shape: {', '.join(wrong[:5]) or 'none'}"
    )


# ------------------------------------------------------------- starting from a pretraining run


def inherit_architecture(
    pretrained: dict[str, Any], pretrained_length: int, model_cfg: dict[str, Any], given: set[str]
) -> dict[str, Any]:
    """The model keys of a run that starts from `model.init_from`: the pretraining run's
    architecture, with the keys the user wrote (`given`) on top. An unset context becomes the
    pretraining sequence length, so learned positions keep their table size."""
    if pretrained["type"] != model_cfg["type"]:
        raise ConfigError(
            f"model.init_from points at a {pretrained['type']} run, but model.type is "
            f"{model_cfg['type']}",
            fix=f"set model.type: {pretrained['type']} (the architecture comes from the run), "
            "or start from a run of the same architecture",
        )
    merged = {k: v for k, v in pretrained.items() if k not in ("init_from", "output")}
    merged.update(
        {k: v for k, v in model_cfg.items() if k in given or k in ("init_from", "output")}
    )
    if merged.get("context") is None and merged["type"] != "rnn":  # an RNN has no limit
        merged["context"] = pretrained_length
    return merged


def load_backbone(model: nn.Module, path: str | Path, origin: str) -> list[str]:
    """Load a pretraining run's weights into a model for a new task: every weight of the
    model but its new task head must come from the run, with the same shape. Pretraining
    heads (LM, MLM) that the new model lacks are dropped. Returns the new head's keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from danlu.models.heads import SequenceHead

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read weights '{path}' ({e})") from None
    heads = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, SequenceHead))
    expected = model.state_dict()
    new = [k for k in expected if k.startswith(heads) and k not in state]
    missing = [k for k in expected if k not in state and k not in new]
    wrong = [
        f"{k} {list(state[k].shape)} (model: {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if any(k.startswith(("embed", "tok", "wte")) for k in wrong):
        raise ConfigError(
            f"model.init_from: the vocabulary of {origin} does not match this run's tokenizer "
            f"({'; '.join(wrong[:2])})",
            fix="fine-tune with the pretraining run's tokenizer (leave data.tokenizer unset)",
        )
    if missing or wrong:
        raise ConfigError(
            f"model.init_from: the weights of {origin} do not fit this model (missing: "
            f"{', '.join(missing[:5]) or 'none'}; wrong shape: {', '.join(wrong[:5]) or 'none'})",
            fix="keep the pretraining run's architecture keys (leave them unset: they are "
            "inherited from the run)",
        )
    model.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
    return new
