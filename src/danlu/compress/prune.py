"""Pruning: zero the smallest weights, or cut whole units (hidden neurons, conv channels,
attention heads) out of a model.

`magnitude` zeroes the Linear, conv and recurrent weights of smallest |w| to `amount` sparsity
over all of them (scope: global, one threshold) or in each layer (scope: layer). Tensors keep
their shapes (meta["shrinks"] is False), and gradient hooks hold the zeros at zero while the
model is fine-tuned afterwards (plain SGD/Adam/AdamW then never move them).

The structured methods find, per layer, a `Group` of units: the modules whose output rows make
the units (producers), per-unit norms, and the modules whose input columns read them
(consumers). They score each unit, keep the best (1 - amount) of every layer (at least one)
and slice every tensor involved with danlu.models.pruned.select, so the model really shrinks.
meta["modules"] holds each touched module's new shapes for danlu.models.pruned.restore; the
rest of meta is a JSON-able summary.

    model, meta = prune(model, "neurons", amount=0.5)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from danlu.errors import ConfigError
from danlu.models import count_parameters
from danlu.models.pruned import select, set_attrs, spec

METHODS = ("magnitude", "neurons", "channels", "heads")
SCOPES = ("global", "layer")
NEEDS = {
    "magnitude": "Linear, conv or recurrent weights",
    "neurons": "MLP hidden layers or Transformer feed-forward blocks",
    "channels": "conv blocks of a danlu cnn",
    "heads": "BERT-family attention (self.query/key/value and output.dense)",
}


@dataclass
class Group:
    """One layer's prunable units. A producer's rows are blocks × units × size (a SwiGLU
    projection has a gate and a value block; a head spans head_dim rows); a consumer's input
    columns are units × per (per = H·W when a conv feeds a flattened head)."""

    name: str
    units: int
    producers: list[tuple[str, int]]  # (module path, blocks)
    consumers: list[tuple[str, int]]  # (module path, columns per unit)
    norms: list[str] = field(default_factory=list)
    size: int = 1
    attention: str | None = None  # a module whose head count follows (hf attention)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_linear(module: nn.Module, path: str) -> bool:
    try:
        return isinstance(module.get_submodule(path), nn.Linear)
    except AttributeError:
        return False


# ------------------------------------------------------------------ finding the units


def _ffn(path: str, units: int, ins: list[str], out: str, blocks: int = 1) -> Group:
    """A feed-forward block: input projection(s) `ins` make the units, `out` reads them."""
    return Group(path, units, [(_join(path, i), blocks) for i in ins], [(_join(path, out), 1)])


def neuron_groups(model: nn.Module) -> list[Group]:
    """Hidden units of danlu's mlp, the feed-forward blocks of danlu's gpt, bert and seq2seq,
    and of hf BERT-family (intermediate/output.dense) and Llama-family (gate/up/down) layers."""
    from danlu.models import gpt, layers, mlp

    groups: list[Group] = []
    for path, m in model.named_modules():
        if isinstance(m, mlp.MLP):
            groups += _mlp_groups(path, m)
        elif isinstance(m, gpt.MLP):  # SwiGLU's up projection: gate rows, then value rows
            blocks = 2 if m.act is gpt.swiglu else 1
            groups.append(_ffn(path, m.down.in_features, ["up"], "down", blocks))
        elif isinstance(m, layers.FeedForward):
            groups.append(_ffn(path, m[0].out_features, ["0"], "3"))
        elif _is_linear(m, "intermediate.dense") and _is_linear(m, "output.dense"):
            units = m.intermediate.dense.out_features
            groups.append(_ffn(path, units, ["intermediate.dense"], "output.dense"))
        elif all(_is_linear(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            units = m.up_proj.out_features
            groups.append(_ffn(path, units, ["gate_proj", "up_proj"], "down_proj"))
    return groups


def _mlp_groups(path: str, m: nn.Module) -> list[Group]:
    """Each hidden Linear of danlu's MLP, its norm, and the next Linear (or the head)."""
    body = [(_join(path, "body", n), c) for n, c in m.body.named_children()]
    linears = [i for i, (_, c) in enumerate(body) if isinstance(c, nn.Linear)]
    groups = []
    for n, i in enumerate(linears):
        (name, linear), after = body[i], _join(path, "head")
        if n + 1 < len(linears):
            after = body[linears[n + 1]][0]
        norm = body[i + 1] if i + 1 < len(body) else ("", None)
        norms = [norm[0]] if isinstance(norm[1], nn.BatchNorm1d | nn.LayerNorm) else []
        groups.append(Group(name, linear.out_features, [(name, 1)], [(after, 1)], norms))
    return groups


def channel_groups(model: nn.Module) -> list[Group]:
    """Output channels of every conv of danlu's cnn: its BatchNorm, the next conv's input
    channels, and for the last conv the head's first Linear (C·H·W flattened, or pooled)."""
    from danlu.models import cnn

    groups: list[Group] = []
    for path, m in model.named_modules():
        if not isinstance(m, cnn.CNN):
            continue
        mods = {_join(path, "features", n): c for n, c in m.features.named_modules()}
        convs = [n for n, c in mods.items() if isinstance(c, nn.Conv2d) and c.groups == 1]
        head = next(n for n, c in m.head.named_children() if isinstance(c, nn.Linear))
        for i, name in enumerate(convs):
            parent, _, idx = name.rpartition(".")
            bn = f"{parent}.{int(idx) + 1}"  # conv_block: Conv → BatchNorm (or Identity) → act
            norms = [bn] if isinstance(mods.get(bn), nn.BatchNorm2d) else []
            channels = mods[name].out_channels
            if i + 1 < len(convs):
                after = (convs[i + 1], 1)
            else:  # flatten keeps C·H·W order (channels-last memory does not change it)
                after = (_join(path, "head", head), m.head[int(head)].in_features // channels)
            groups.append(Group(name, channels, [(name, 1)], [after], norms))
    return groups


def head_groups(model: nn.Module, key: str = "compress") -> list[Group]:
    """Attention heads of hf BERT-family layers: q, k, v rows and the output projection's
    columns of each head; the attention module's head count follows."""
    from danlu.models import gpt, layers

    groups: list[Group] = []
    for path, m in model.named_modules():
        if isinstance(m, layers.Attention | gpt.SelfAttention):
            raise ConfigError(
                f"{key}.method: heads cannot shrink the attention of danlu's {family(model)}: "
                "it reshapes its output to model.dim, so every layer needs all its heads",
                fix="heads pruning supports hf (BERT-family) models; use method: neurons to "
                "shrink this model's feed-forward blocks",
            )
        qkv = [f"self.{n}" for n in ("query", "key", "value")]
        if all(_is_linear(m, n) for n in qkv) and _is_linear(m, "output.dense"):
            att = m.get_submodule("self")
            heads, size = att.num_attention_heads, att.attention_head_size
            ins, outs = [(_join(path, n), 1) for n in qkv], [(_join(path, "output.dense"), size)]
            groups.append(Group(path, heads, ins, outs, size=size, attention=_join(path, "self")))
    return groups


FINDERS: dict[str, Callable[[nn.Module], list[Group]]] = {
    "neurons": neuron_groups,
    "channels": channel_groups,
    "heads": head_groups,
}


# ------------------------------------------------------------------ scoring and cutting


def _per_unit(root: nn.Module, paths: list[tuple[str, int]], units: int, rows: bool):
    """Each unit's weights side by side: (units, n) over the given producers or consumers."""
    parts = []
    for path, k in paths:
        w = root.get_submodule(path).weight.detach().float()
        w = w.reshape(k, units, -1) if rows else w.reshape(w.shape[0], units, -1)
        parts.append(w.transpose(0, 1).reshape(units, -1))
    return torch.cat(parts, dim=1)


def importance(root: nn.Module, g: Group, method: str) -> torch.Tensor:
    """(units,) scores. neurons: L2 of a unit's input weights × L2 of its output weights;
    channels: L1 of the filter × |BatchNorm gamma|; heads: L2 of the output projection slice."""
    if method == "heads":
        return _per_unit(root, g.consumers, g.units, rows=False).norm(dim=1)
    if method == "channels":
        score = _per_unit(root, g.producers, g.units, rows=True).abs().sum(1)
        for path in g.norms:
            gamma = getattr(root.get_submodule(path), "weight", None)
            score = score * gamma.detach().abs().float() if gamma is not None else score
        return score
    score = _per_unit(root, g.producers, g.units, rows=True).norm(dim=1)
    return score * _per_unit(root, g.consumers, g.units, rows=False).norm(dim=1)


def _rows(keep: torch.Tensor, units: int, size: int, blocks: int) -> torch.Tensor:
    one = (keep[:, None] * size + torch.arange(size)).flatten()  # rows of the kept units
    return torch.cat([b * units * size + one for b in range(blocks)])


def _cut(root: nn.Module, g: Group, keep: torch.Tensor, records: dict[str, Any]) -> None:
    for path, blocks in g.producers:
        records[path] = select(root.get_submodule(path), 0, _rows(keep, g.units, g.size, blocks))
    for path in g.norms:
        records[path] = select(root.get_submodule(path), 0, keep)
    for path, per in g.consumers:
        cols = (keep[:, None] * per + torch.arange(per)).flatten()
        records[path] = select(root.get_submodule(path), 1, cols)
    if g.attention:
        heads = {"num_attention_heads": len(keep), "all_head_size": len(keep) * g.size}
        set_attrs(root.get_submodule(g.attention), heads)
        records[g.attention] = spec(root.get_submodule(g.attention), heads)


def _structured(model: nn.Module, groups: list[Group], method: str, amount: float) -> dict:
    records: dict[str, Any] = {}
    layers = []
    for g in groups:
        kept = max(1, g.units - round(amount * g.units))
        keep = importance(model, g, method).topk(kept).indices.sort().values
        _cut(model, g, keep, records)
        layer = {"name": g.name, "units": g.units, "kept": kept, "removed": g.units - kept}
        layers.append(layer | ({"kept_heads": keep.tolist()} if method == "heads" else {}))
    return {"shrinks": True, "scope": "layer", "layers": layers, "modules": records}


# ------------------------------------------------------------------ magnitude


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight matrices of Linear, conv and recurrent layers, each once; a Linear that shares
    its weight with an embedding (a tied LM head) is left out, as are biases and norms."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, nn.Parameter] = {}
    seen = set(embeddings)
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd):
            named = [("weight", m.weight)]
        elif isinstance(m, nn.RNNBase):
            named = [(n, p) for n, p in m.named_parameters(recurse=False) if n.startswith("weight")]
        else:
            continue
        for name, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                out[_join(path, name)] = p
    return out


def _threshold(values: torch.Tensor, amount: float) -> float:
    k = round(amount * values.numel())
    return float(values.kthvalue(k).values) if k else float("-inf")


def hold_zeros(weights: dict[str, nn.Parameter]) -> None:
    """Zero the gradient of every zero weight, so fine-tuning keeps the sparsity."""
    for w in weights.values():
        if w.requires_grad:
            keep = (w.detach() != 0).to(w.dtype)
            w.register_hook(lambda g, keep=keep: g * keep.to(g.device))


@torch.no_grad()
def _magnitude(model: nn.Module, amount: float, scope: str) -> dict[str, Any]:
    weights = prunable_weights(model)
    if scope == "global":
        everything = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])
        limit = _threshold(everything, amount)
    layers, zeros = [], 0
    for name, w in weights.items():
        t = limit if scope == "global" else _threshold(w.detach().abs().float().flatten(), amount)
        w.masked_fill_(w.abs() <= t, 0)
        z = int((w == 0).sum())
        zeros += z
        layers.append({"name": name, "weights": w.numel(), "sparsity": round(z / w.numel(), 6)})
    hold_zeros(weights)
    total = sum(w.numel() for w in weights.values())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"shrinks": False, "scope": scope, "sparsity": round(zeros / total, 6),
            "pruned_weights": total, "nonzero_parameters": nonzero, "zeros_held": True,
            "layers": layers, "modules": {}}  # fmt: skip


# ------------------------------------------------------------------ entry point


def family(model: nn.Module) -> str:
    """What messages call the model: a danlu family, or `hf <model_type>`."""
    from danlu.models import hf

    base = hf.unwrap(model)
    if isinstance(base, hf.HFModel):
        return f"hf {base.config.model_type}"
    return type(base).__name__.lower()


def fits(model: nn.Module, method: str) -> bool:
    if method == "magnitude":
        return bool(prunable_weights(model))
    try:
        return bool(FINDERS[method](model))
    except ConfigError:
        return False


def _check(method: str, amount: float, scope: str, key: str) -> None:
    if method not in METHODS:
        raise ConfigError(
            f"{key}.method: '{method}' is not a pruning method",
            fix=f"use one of {', '.join(METHODS)}",
        )
    number = isinstance(amount, int | float) and not isinstance(amount, bool)
    if not number or not 0 < amount < 1:
        raise ConfigError(
            f"{key}.amount: {amount!r} is outside (0, 1)",
            fix="give the fraction of weights (magnitude) or of each layer's units to remove, "
            "e.g. 0.5",
        )
    if scope not in SCOPES:
        raise ConfigError(f"{key}.scope: '{scope}' is not known", fix="use global or layer")


def _misfit(model: nn.Module, method: str, key: str) -> ConfigError:
    name = family(model)
    layers = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    others = [m for m in METHODS if m != method and fits(model, m)]
    return ConfigError(
        f"{key}.method: {method} does not fit this {name} model: it has no {NEEDS[method]} "
        f"(its layers: {', '.join(layers[:10])})",
        fix=f"methods that fit a {name} model: {', '.join(others) or 'none'}",
    )


def prune(
    model: nn.Module, method: str, *, amount: float, scope: str = "global", key: str = "compress"
) -> tuple[nn.Module, dict[str, Any]]:
    """Prunes `model` in place and returns (model, meta). Structured methods remove `amount`
    of every layer's units (scope does not apply to them: meta["scope"] is "layer"). meta is
    JSON-able: method, amount, scope, family, shrinks, parameters before/after, sparsity
    (magnitude: zero fraction of the pruned weights; structured: fraction of parameters
    removed), per-layer details, and `modules` for danlu.models.pruned.restore."""
    _check(method, amount, scope, key)
    if not fits(model, method):
        if method == "heads":
            head_groups(model, key)  # danlu's own attention: its own, more precise message
        raise _misfit(model, method, key)
    before = count_parameters(model)
    if method == "magnitude":
        details = _magnitude(model, amount, scope)
    else:
        details = _structured(model, FINDERS[method](model), method, amount)
    after = count_parameters(model)
    if details["shrinks"]:
        details["sparsity"] = round(1 - after / before, 6)
    head = {"method": method, "amount": amount, "family": family(model)}
    return model, head | {"parameters": {"before": before, "after": after}} | details
