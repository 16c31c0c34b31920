"""Fine-tuning strategies on any danlu model (native or `hf`): freezing, LoRA, per-layer
learning rates, and merging LoRA back into the base weights.

    layout = Layout.of(model)            # embeddings / layers[0..L-1] / head, by parameter name
    freeze(model, {"embeddings": True, "layers": 2})
    model = add_lora(model, {"rank": 8, "alpha": 16, "dropout": 0.05, "target": None})
    groups = param_groups(model, lr=2e-5, weight_decay=0.01, layer_decay=0.8, head_lr=1e-3)

A model is read as: the parameters before its stack of layers (embeddings), the stack (the
largest nn.ModuleList of identical blocks), the parameters after it (final norm, pooler) and
the task head (a danlu SequenceHead, or whatever a transformers model adds outside its base
model: classifier, score, lm_head).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from danlu.errors import ConfigError

log = logging.getLogger("danlu")


@dataclass
class Layout:
    embeddings: list[str]  # parameter names before the layer stack
    layers: list[list[str]]  # parameter names of layer i
    top: list[str]  # after the stack (final norm, pooler), not the head
    head: list[str]  # the task head
    stack: str  # module name of the layer stack ("" when none was found)

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        names = [n for n, _ in model.named_parameters()]
        stack = _layer_stack(model)
        heads = _head_prefixes(model)
        head = [n for n in names if n.startswith(heads)]
        layers: list[list[str]] = []
        if stack:
            mod = model.get_submodule(stack)
            layers = [[n for n in names if n.startswith(f"{stack}.{i}.")] for i in range(len(mod))]
        in_layers = {n for group in layers for n in group}
        first = min((names.index(n) for n in in_layers), default=len(names))
        rest = [n for n in names if n not in in_layers and n not in head]
        emb = [n for n in rest if names.index(n) < first]
        top = [n for n in rest if names.index(n) > first]
        return cls(emb, layers, top, head, stack)


def _layer_stack(model: nn.Module) -> str:
    """The name of the largest ModuleList whose children are all the same class."""
    best, size = "", 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > size:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1:
                best, size = name, len(mod)
    return best


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    from danlu.models.heads import SequenceHead

    found = [f"{n}." for n, m in model.named_modules() if isinstance(m, SequenceHead)]
    for name, mod in model.named_modules():  # transformers: what lies outside the base model
        prefix = getattr(mod, "base_model_prefix", None)
        if prefix and isinstance(getattr(mod, prefix, None), nn.Module) and hasattr(mod, "config"):
            base = f"{name}.{prefix}." if name else f"{prefix}."
            outside = [
                n
                for n, _ in mod.named_parameters()
                if not f"{name}.{n}".lstrip(".").startswith(base)
            ]
            found += [f"{name}.{n}".lstrip(".") for n in outside]
            break
    found += [f"{n}." for n, m in model.named_modules() if n.endswith("lm_head")]
    return tuple(found)


# ---------------------------------------------------------------------------------- freeze


def freeze(model: nn.Module, options: dict[str, Any] | None) -> list[str]:
    """Stop gradients for the chosen parts; returns the frozen parameter names."""
    if not options:
        return []
    layout = Layout.of(model)
    chosen: list[str] = []
    n = options.get("layers", 0)
    if n > len(layout.layers):
        raise ConfigError(
            f"model.freeze.layers: {n} but the model has {len(layout.layers)} layers",
            fix=f"use a number from 0 to {len(layout.layers)}",
        )
    if options.get("backbone"):
        chosen = [k for k, _ in model.named_parameters() if k not in set(layout.head)]
        if not layout.head:
            raise ConfigError(
                "model.freeze.backbone: this model has no separate task head to train",
                fix="use freeze.layers / freeze.embeddings, or LoRA (model.lora)",
            )
    else:
        if options.get("embeddings"):
            chosen += layout.embeddings
        for group in layout.layers[:n]:
            chosen += group
    frozen = set(chosen)
    for k, p in model.named_parameters():
        if k in frozen:
            p.requires_grad_(False)
    return chosen


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# ------------------------------------------------------------------------------------ LoRA


def linear_names(model: nn.Module) -> list[str]:
    """Module names of the linear layers LoRA can adapt (nn.Linear, transformers Conv1D)."""
    return [n for n, m in model.named_modules() if _is_linear(m)]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def lora_targets(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Full names of the linear modules to adapt: those matching any pattern (re.search), or
    by default every linear layer inside the layer stack."""
    layout = Layout.of(model)
    head = tuple(layout.head)
    names = [n for n in linear_names(model) if not any(h.startswith(f"{n}.") for h in head)]
    if patterns is None:
        found = [n for n in names if layout.stack and n.startswith(f"{layout.stack}.")]
        if not found:
            raise ConfigError(
                "model.lora: found no layer stack to adapt by default",
                fix="name the modules with model.lora.target (regular expressions)",
            )
        return found
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(
                f"model.lora.target: '{p}' is not a regular expression ({e})"
            ) from None
    found = [n for n in names if any(c.search(n) for c in compiled)]
    if not found:
        shown = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
        raise ConfigError(
            f"model.lora.target: {patterns} matches no linear module; the model has: "
            f"{', '.join(shown[:24])}",
            fix="use a pattern that matches some of these names, e.g. 'query|value' or 'proj'",
        )
    return found


def add_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """Wrap `model` with PEFT LoRA adapters; the base weights are frozen, the adapters and the
    task head train. Returns the PEFT model (its forward is the model's forward)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("model.lora needs the PEFT library", fix="pip install peft") from None
    layout = Layout.of(model)
    targets = lora_targets(model, options.get("target"))
    if options.get("quantize", "none") == "int8":
        quantize_base(model, targets)
    config = LoraConfig(
        r=options["rank"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=targets,
    )
    with warnings.catch_warnings():  # PEFT: merging a torchao base is not possible (we refuse)
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        wrapped = get_peft_model(model, config)
    head = set(layout.head)
    for name, p in model.named_parameters():
        if name in head:
            p.requires_grad_(True)
    return wrapped


def quantize_base(model: nn.Module, targets: list[str]) -> None:
    """int8 weight-only base weights for the adapted layers (torchao), where available."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError(
            "model.lora.quantize: int8 needs torchao, which is not installed",
            fix="pip install torchao, or use model.lora.quantize: none",
        ) from None
    wanted = set(targets)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in wanted)


def merge(model: nn.Module) -> nn.Module:
    """The base model with every LoRA update added into its weights (full precision)."""
    return model.merge_and_unload()


# ---------------------------------------------------------------------- learning rates


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    head_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on matrices only; with layer_decay < 1, layer i of L
    trains at lr × decay^(L − i), the embeddings at lr × decay^(L + 1) and what lies above
    the stack at lr; the head at head_lr when given."""
    params = dict(model.named_parameters())
    scale: dict[str, float] = dict.fromkeys(params, 1.0)
    layout = Layout.of(model) if (layer_decay != 1.0 or head_lr is not None) else None
    if layout is not None and layer_decay != 1.0:
        L = len(layout.layers)
        for i, group in enumerate(layout.layers):
            scale.update(dict.fromkeys(group, layer_decay ** (L - i)))
        scale.update(dict.fromkeys(layout.embeddings, layer_decay ** (L + 1)))
    head = set(layout.head) if layout is not None and head_lr is not None else set()
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    for name, p in params.items():
        if not p.requires_grad:
            continue
        rate = head_lr if name in head else lr * scale[name]
        groups.setdefault((rate, p.ndim >= 2), []).append(p)
    return [
        {"params": ps, "lr": rate, "weight_decay": weight_decay if matrix else 0.0}
        for (rate, matrix), ps in groups.items()
    ]
