"""Post-training quantization: a trained fp32 model → the tensors and recipe of a variant.

`quantize` never changes the model. It returns `state`, plain tensors for model.safetensors
(int8 values; int4 values packed two per uint8 byte, low nibble first; fp32 scales; every
tensor it leaves in fp32 under its usual name, a tied weight once), and `meta`, the JSON
recipe `models.quantized.restore` follows to swap the layers of a freshly built model:

- dynamic_int8: Linear, LSTM and GRU weights int8, one scale per output row; activations are
  quantized per batch at run time (fbgemm). Text models, MLPs, CNN heads.
- static_int8: FX graph mode on float-input models (cnn, mlp): conv-bn-relu fused, weights
  int8 per output channel, activation scales calibrated once on `calibration` batches.
- int8_weight / int4_weight: Linear weights only, symmetric; int8 with one scale per output
  row (the layout of aten's int8 weight-only kernel; `group_size` is not used), int4 with one
  scale per `group_size` inputs; activations stay floating point.

Embeddings, norms and a Linear tied to an embedding (an LM head) stay fp32 (`meta["kept_fp32"]`
names each with the reason), so ties keep working after restore.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from danlu.errors import ConfigError
from danlu.models import state_for_saving
from danlu.models.quantized import fx_int8, quiet_ao, static_name

METHODS = ("dynamic_int8", "static_int8", "int8_weight", "int4_weight")
LINEARS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)  # exactly these types
RNNS = (nn.LSTM, nn.GRU)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FAST_GROUPS = (32, 64, 128, 256)


def quantize(
    model: nn.Module,
    method: str,
    *,
    calibration: list[torch.Tensor] | None = None,
    group_size: int = 128,
    skip: list[str] = (),
    key: str = "compress",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Returns (state, meta): `state` = plain tensors to save with safetensors as the variant's
    model.safetensors; `meta` = the JSON recipe `models.quantized.restore` needs.
    `calibration`: a few input batches exactly as the model takes them (static_int8 needs
    them). `skip`: layer names (or glob patterns) to keep in fp32. `key` names the config
    entry in error messages (e.g. "compress.variants[2]")."""
    if method not in METHODS:
        raise ConfigError(
            f"{key}.method: '{method}' is not a quantization method",
            fix=f"use one of {', '.join(METHODS)}",
        )
    skip = expand_skip(model, list(skip), key)
    if method == "static_int8":
        state, meta = _static(model, calibration, skip, key)
    else:
        if method == "int4_weight":
            check_group_size(group_size, key)
        layers, kept = select(model, method, group_size, skip)
        if not layers:
            raise no_layer_error(model, method, group_size, kept, key)
        if method == "int4_weight":
            check_divisible(layers, group_size, key)
        state, meta = _per_layer(model, method, layers, group_size)
        meta["kept_fp32"] = kept
    meta["bytes"] = {"fp32": _nbytes(state_for_saving(model)), "state": _nbytes(state)}
    return state, meta


# ------------------------------------------------------------------------------ the layers


def _owners(model: nn.Module) -> dict[tuple[int, int], list[str]]:
    """Storage → the names of every parameter on it (more than one: tied weights)."""
    owners: dict[tuple[int, int], list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            where = (p.untyped_storage().data_ptr(), p.storage_offset())
            owners.setdefault(where, []).append(f"{mname}.{pname}".lstrip("."))
    return owners


def _why_kept(m: nn.Module, method: str, group_size: int) -> str | None:
    """Why `m` (which owns parameters) is not quantized by `method`, or None if it is."""
    if type(m) in LINEARS:  # not subclasses: their forward may differ
        if method == "int4_weight" and m.in_features < group_size:
            return f"{m.in_features} inputs, fewer than group_size {group_size}"
        return None
    if isinstance(m, RNNS) and method == "dynamic_int8":
        if not m.bias or getattr(m, "proj_size", 0):
            return "recurrent layer without bias or with proj_size (no int8 kernel)"
        return None
    if isinstance(m, nn.Embedding):
        return "embedding"
    if isinstance(m, NORMS):
        return "norm"
    return type(m).__name__


def select(
    model: nn.Module, method: str, group_size: int, skip: list[str]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers `method` quantizes, and every other module owning parameters → reason."""
    owners = _owners(model)
    layers: dict[str, nn.Module] = {}
    kept: dict[str, str] = {}
    for name, m in model.named_modules():
        params = list(m.named_parameters(recurse=False))
        if not params:
            continue
        reason = "skipped" if name in skip else _why_kept(m, method, group_size)
        weight = getattr(m, "weight", None)
        if reason is None and isinstance(weight, torch.Tensor):
            names = owners[(weight.untyped_storage().data_ptr(), weight.storage_offset())]
            others = [n for n in names if n != f"{name}.weight"]
            reason = f"tied to {others[0]}" if others else None
        if reason is None:
            layers[name] = m
        else:
            kept[name or "(model)"] = reason
    return layers, kept


def expand_skip(model: nn.Module, patterns: list[str], key: str) -> list[str]:
    """Module names matched by `skip`: a name (and its submodules), a suffix of names
    ("lm_head", "attn.qkv") or a glob pattern ("blocks.*.mlp.up")."""
    names = [n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))]
    out: list[str] = []
    for pattern in patterns:
        hits = [
            n
            for n in names
            if n == pattern
            or n.startswith(f"{pattern}.")
            or n.endswith(f".{pattern}")
            or fnmatch.fnmatchcase(n, pattern)
        ]
        if not hits:
            examples = ", ".join(n for n in names if isinstance(model.get_submodule(n), LINEARS))
            raise ConfigError(
                f"{key}.skip: '{pattern}' names no layer of this {type(model).__name__}",
                fix=f"use layer names (or glob patterns) such as {examples[:200] or names[:5]}",
            )
        out += [n for n in hits if n not in out]
    return out


# -------------------------------------------------------------------------------- checking


def check_group_size(group_size: Any, key: str) -> None:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ConfigError(
            f"{key}.group_size: {group_size!r} is not a positive even number (two int4 values "
            "share a byte)",
            fix=f"use one of {', '.join(map(str, FAST_GROUPS))} (the sizes aten's int4 CPU "
            "kernel runs; others fall back to a slower path)",
        )


def check_divisible(layers: dict[str, nn.Module], group_size: int, key: str) -> None:
    widths = {name: m.in_features for name, m in layers.items()}
    for name, width in widths.items():
        if width % group_size:
            common = math.gcd(*widths.values())
            options = [g for g in FAST_GROUPS if common % g == 0]
            even = [g for g in range(min(common, 256), 1, -1) if common % g == 0 and g % 2 == 0]
            options = options or even[:3]
            fix = f"use group_size {' or '.join(map(str, options))} (they divide every width)"
            raise ConfigError(
                f"{key}.group_size: {group_size} does not divide the {width} inputs of layer "
                f"'{name}'",
                fix=fix if options else f"skip the layer ({key}.skip: ['{name}'])",
            )


def fitting_methods(model: nn.Module, group_size: int) -> list[str]:
    """The methods that find at least one layer to quantize in `model`."""
    fits = [m for m in METHODS if m != "static_int8" and select(model, m, group_size, [])[0]]
    if _float_input(model) and any(isinstance(m, (*CONVS, *LINEARS)) for m in model.modules()):
        fits.insert(min(1, len(fits)), "static_int8")
    return fits


def _float_input(model: nn.Module) -> bool:
    """No embedding or recurrent layer: the model reads float features (FX can trace it)."""
    return not any(isinstance(m, (nn.Embedding, nn.RNNBase)) for m in model.modules())


def census(model: nn.Module) -> str:
    counts = Counter(type(m).__name__ for m in model.modules() if list(m.parameters(recurse=False)))
    return ", ".join(f"{name} ×{n}" for name, n in counts.items()) or "none with weights"


def no_layer_error(
    model: nn.Module, method: str, group_size: int, kept: dict[str, str], key: str
) -> ConfigError:
    detail, fits = "", fitting_methods(model, group_size)
    widths = [m.in_features for m in model.modules() if type(m) in LINEARS]
    if method == "static_int8" and not _float_input(model):
        detail = (
            " (static_int8 quantizes float-input models such as cnn and mlp; this one reads "
            "token ids or runs an RNN)"
        )
    elif method == "int4_weight" and widths and max(widths) < group_size:
        detail = f" (no Linear has group_size={group_size} inputs; the widest has {max(widths)})"
    elif "skipped" in kept.values():
        detail = " (skip leaves none)"
    fix = f"methods that fit this model: {', '.join(fits)}" if fits else "no method fits it"
    if detail.startswith(" (no Linear"):
        fix += f"; or a group_size that divides {max(widths)}"
    return ConfigError(
        f"{key}: {method} finds no layer to quantize in this {type(model).__name__} "
        f"(its layers: {census(model)}){detail}",
        fix=fix,
    )


# ---------------------------------------------------------------------- per-layer methods


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) → int8 values in [-127, 127] and one fp32 scale per row (symmetric)."""
    w = w.detach().float()
    scale = w.abs().amax(1).clamp_min(1e-12) / 127  # (out,)
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) → int4 values in [-7, 7] packed (out, in/2) uint8 (low nibble first, stored
    as value + 8) and fp32 scales (out, in/group_size) (symmetric)."""
    out, width = w.shape
    groups = w.detach().float().view(out, width // group_size, group_size)
    scale = groups.abs().amax(-1).clamp_min(1e-12) / 7  # (out, in/g)
    q = torch.round(groups / scale[..., None]).clamp_(-8, 7).view(out, width).to(torch.int16)
    q = (q + 8).to(torch.uint8)  # (out, in) in [1, 15]
    return q[:, 0::2] | (q[:, 1::2] << 4), scale


def _per_layer(
    model: nn.Module, method: str, layers: dict[str, nn.Module], group_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """dynamic_int8 and the weight-only methods: each weight W of a chosen layer becomes
    W_q, W_scale; its biases and everything outside the chosen layers stay fp32."""
    prefixes = tuple(f"{name}." for name in layers)
    state = {k: v for k, v in state_for_saving(model).items() if not k.startswith(prefixes)}
    info: dict[str, dict[str, Any]] = {}
    for name, m in layers.items():
        for pname, p in m.named_parameters(recurse=False):
            k = f"{name}.{pname}"
            if not pname.startswith("weight"):
                state[k] = p.detach().float().contiguous()
                continue
            q, scale = int4_groups(p, group_size) if method == "int4_weight" else int8_rows(p)
            state[f"{k}_q"], state[f"{k}_scale"] = q, scale
        shape = [m.out_features, m.in_features] if isinstance(m, LINEARS) else None
        shape = shape or [m.input_size, m.hidden_size, m.num_layers]
        info[name] = {"type": type(m).__name__, "shape": shape}
    four = method == "int4_weight"
    meta = {
        "method": method,
        "scheme": "symmetric",
        "bits": 4 if four else 8,
        "group_size": group_size if four else None,
        "scales": f"one per {group_size} inputs of each output row"
        if four
        else "one per output row",
        "activations": "int8, quantized per batch"
        if method == "dynamic_int8"
        else "float (bf16 in aten's kernels and where the CPU has native bf16)",
        "layers": info,
    }
    return state, meta


# ---------------------------------------------------------------------------- static int8


def _static(
    model: nn.Module, calibration: list[torch.Tensor] | None, skip: list[str], key: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    convs_or_linears = any(isinstance(m, (*CONVS, *LINEARS)) for m in model.modules())
    if not (_float_input(model) and convs_or_linears):
        raise no_layer_error(model, "static_int8", 128, {}, key)
    if not calibration:
        raise ConfigError(
            f"{key}: static_int8 needs calibration batches to fix its activation scales, and "
            "got none",
            fix="pass a few input batches (e.g. 4 × 32 training inputs, as the model takes them)",
        )
    example = calibration[0][:1]
    try:
        graph = fx_int8(copy.deepcopy(model), example, skip, calibration)
    except (torch.fx.proxy.TraceError, NotImplementedError, TypeError) as e:
        raise ConfigError(
            f"{key}: static_int8 cannot trace this {type(model).__name__} ({e})",
            fix="use dynamic_int8 or a weight-only method for it",
        ) from None
    state: dict[str, torch.Tensor] = {}
    for k, value in graph.state_dict().items():
        _encode_static(static_name(k), value, state)
    layers = {
        n: {"type": m._get_name()}  # QuantizedConvReLU2d, QuantizedLinear, ...
        for n, m in graph.named_modules()
        if "quantized" in type(m).__module__ and not n.endswith("_packed_params")
    }
    kept = {n: type(m).__name__ for n, m in graph.named_modules() if list(m.parameters(False))}
    meta = {
        "method": "static_int8",
        "scheme": "x86 qconfig: weights int8 symmetric per output channel, activations "
        "uint8 affine per tensor (7 bits: reduce_range)",
        "input_shape": list(example.shape[1:]),
        "skip": skip,
        "calibration_batches": len(calibration),
        "layers": layers,
        "kept_fp32": kept,
    }
    return state, meta


def _encode_static(name: str, value: Any, state: dict[str, torch.Tensor]) -> None:
    """One entry of the converted graph's state as plain tensors (see `static_value`)."""
    if isinstance(value, torch.dtype):
        return
    if isinstance(value, tuple):  # a quantized Linear's packed (weight, bias)
        _encode_static(f"{name}.weight", value[0], state)
        if value[1] is not None:
            state[f"{name}.bias"] = value[1].detach()
        return
    if not value.is_quantized:
        state[name] = value.detach()
        return
    with quiet_ao():
        state[f"{name}_q"] = value.int_repr()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale = value.q_per_channel_scales()  # float64, from fp32 observers: exact in fp32
            exact = torch.equal(scale.float().double(), scale)
            state[f"{name}_scale"] = scale.float() if exact else scale
            state[f"{name}_zero_point"] = value.q_per_channel_zero_points().int()
        else:
            state[f"{name}_scale"] = torch.tensor(value.q_scale(), dtype=torch.float64)
            state[f"{name}_zero_point"] = torch.tensor(value.q_zero_point())


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())
