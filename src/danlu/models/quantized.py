"""Quantized models at load time: swap the layers of a freshly built fp32 model.

`compress.quantize` writes a variant as plain tensors — int8 values, int4 values packed two
per uint8 byte (low nibble first), their scales, and every weight it keeps in fp32 under its
usual name — plus a JSON recipe `meta`. `restore` builds nothing new from data: it loads the
fp32 tensors into the model built from the run's config, then swaps each quantized layer,
packing the stored integers for the CPU kernels (exact: no calibration, no requantization):

- dynamic_int8: torch.ao dynamic Linear / LSTM / GRU (fbgemm int8 matmuls; activations are
  quantized per batch), weights int8 with one scale per output row;
- static_int8: the FX graph (conv-bn-relu fused, activations int8 between layers) is traced
  again from the fresh model, then its int8 weights and activation scales are loaded
  (packed for fbgemm's kernels for small batches and x86's for big ones: `StaticInt8`);
- int8_weight / int4_weight: `QuantizedLinear`, int8 weights (one scale per output row) or
  int4 weights (one scale per `group_size` inputs): aten's weight-only CPU kernels for a few
  rows (decoding), a dequantized matmul for many (bf16 where the CPU has it natively).

A quantized weight `W` is stored as `W_q` and `W_scale` (static_int8 also `W_zero_point`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu.errors import CheckpointError

INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes aten's int4 CPU kernel accepts
INT4_KERNEL_ROWS = 16  # ... and its output width must be a multiple of this (padded)


@contextlib.contextmanager
def quiet_ao() -> Iterator[None]:
    """torch.ao's deprecation notices and its note on observers that saw no data (restore
    converts an uncalibrated graph, then loads the calibrated scales)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|observer|quant_min).*")
        yield


# ----------------------------------------------------------------------- weight-only linear


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8, two values per byte, low nibble first → (out, in) uint8 in [0, 15]
    (value + 8)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(1)  # (out, in)


@functools.cache
def matmul_dtype() -> torch.dtype:
    """The dtype of dequantized matmuls on this CPU: bf16 where it is native (AVX512-BF16,
    AMX: about twice fp32's speed), fp32 elsewhere."""
    from danlu.device import cpu_bf16_native

    return torch.bfloat16 if cpu_bf16_native() else torch.float32


class QuantizedLinear(nn.Module):
    """y = x · Wᵀ + b with W = q · scale, symmetric: `bits` 8 → q int8 (out, in) and one
    scale per output row; `bits` 4 → q packed (out, in/2) uint8 and scales
    (out, in/group_size).

    Up to KERNEL_ROWS rows (decoding, small batches) run aten's weight-only CPU kernels
    (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu: groups of 32 to 256) on bf16
    activations — their fp32 versions are scalar, ~40× slower. More rows dequantize the
    weight and run one matmul (bf16 where the CPU has it natively). `pack` prepares the
    kernel's layout once after loading."""

    KERNEL_ROWS = 16  # measured: above this, dequantize + matmul is faster

    def __init__(
        self, in_features: int, out_features: int, *, bits: int, group_size: int | None = None,
        bias: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        assert bits in (4, 8) and (bits == 8 or (group_size and in_features % group_size == 0))
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if bits == 8 else int(group_size)
        q_shape = (out_features, in_features if bits == 8 else in_features // 2)
        q_dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("weight_q", torch.zeros(q_shape, dtype=q_dtype))
        groups = (out_features,) if bits == 8 else (out_features, in_features // self.group_size)
        self.register_buffer("weight_scale", torch.ones(groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel: tuple[torch.Tensor, torch.Tensor] | None = None  # set by pack()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        kernel = "aten kernel" if self.kernel is not None else "no kernel"
        return f"{self.in_features}, {self.out_features}, bits={self.bits}{group}, {kernel}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) the integers stand for."""
        if self.bits == 8:
            return self.weight_q.to(dtype) * self.weight_scale.to(dtype)[:, None]
        q = nibbles(self.weight_q).to(dtype).view(self.out_features, -1, self.group_size)
        return q.sub_(8).mul_(self.weight_scale.to(dtype)[..., None]).flatten(1)  # (out, in)

    def pack(self) -> None:
        """Prepare aten's CPU kernel layout (none when the kernel is unavailable)."""
        self.kernel = None
        scale = self.weight_scale.to(torch.bfloat16)
        if self.bits == 8 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            self.kernel = (self.weight_q, scale)
        elif self.bits == 4 and self.group_size in INT4_KERNEL_GROUPS:
            rows = -(-self.out_features // INT4_KERNEL_ROWS) * INT4_KERNEL_ROWS
            pad = rows - self.out_features  # padded rows: value 8 = 0
            values = F.pad(nibbles(self.weight_q).to(torch.int32), (0, 0, 0, pad), value=8)
            scale = F.pad(scale, (0, 0, 0, pad), value=1.0).t()  # (in/g, rows)
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
            except (AttributeError, RuntimeError):
                return
            zeros = torch.zeros_like(scale)  # symmetric: the kernel computes (q - 8) · s + 0
            self.kernel = (packed, torch.stack([scale, zeros], dim=-1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        cpu = x.device.type == "cpu"
        if self.kernel is not None and cpu and x2.shape[0] <= self.KERNEL_ROWS:
            weight, scale = self.kernel
            x2 = x2.to(torch.bfloat16).contiguous()
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(x2, weight, scale)  # (M, out)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, self.group_size, scale)
                y = y[:, : self.out_features]  # (M, out) without the padded rows
            y = y.to(x.dtype)
        else:
            dtype = matmul_dtype() if cpu and x.dtype == torch.float32 else x.dtype
            y = F.linear(x2.to(dtype), self.dequantize(dtype)).to(x.dtype)  # (M, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


# ----------------------------------------------------------------------------------- restore


def restore(model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> nn.Module:
    """`model` is freshly built from the run's config (fp32, any init, the architecture that
    was quantized). Returns the quantized model, `state` loaded, in eval mode, for CPU
    inference (no parameter requires grad: the int8/int4 kernels have no backward)."""
    method = meta.get("method")
    model.eval()
    if method == "static_int8":
        model = _restore_static(model, state, meta)
    elif method in ("dynamic_int8", "int8_weight", "int4_weight"):
        layers: dict[str, dict[str, Any]] = meta["layers"]
        _load_fp32(model, state, tuple(f"{name}." for name in layers))
        for name, info in layers.items():
            mine = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise mismatch(f"quantized layer '{name}' is not in it") from None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _layer(old, name, info, mine, meta))
    else:
        raise CheckpointError(f"quantized weights name an unknown method {method!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def mismatch(what: str) -> CheckpointError:
    return CheckpointError(
        f"quantized weights do not fit the model built from the run's config: {what}",
        fix="the config.yaml was changed after the model was quantized",
    )


def _load_fp32(model: nn.Module, state: dict[str, torch.Tensor], quantized: tuple[str, ...]):
    """Load the tensors kept in fp32; every weight of the model outside the quantized layers
    must be there (a tied weight once, under its first name)."""
    from danlu.models import mismatch as state_mismatch
    from danlu.models import state_for_saving

    expected = {k: v for k, v in state_for_saving(model).items() if not k.startswith(quantized)}
    rest = {k: v for k, v in state.items() if not k.startswith(quantized)}
    problem = state_mismatch(expected, rest)
    if problem:
        raise mismatch(problem)
    model.load_state_dict(rest, strict=False)


def _need(mine: dict[str, torch.Tensor], key: str, name: str, shape=None) -> torch.Tensor:
    """Tensor `key` of layer `name` (with `shape`, when given)."""
    label = f"{name}.{key}" if name else key
    if key not in mine:
        raise mismatch(f"'{label}' is missing")
    if shape is not None and tuple(mine[key].shape) != tuple(shape):
        raise mismatch(f"'{label}' is {list(mine[key].shape)}, the model needs {list(shape)}")
    return mine[key]


def per_channel_int8(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """int8 values and per-row scales → a torch qint8 tensor (symmetric: zero points 0)."""
    zeros = torch.zeros(scale.numel(), dtype=torch.long)
    with quiet_ao():
        return torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, axis)


def _layer(old: nn.Module, name: str, info: dict, mine: dict[str, torch.Tensor], meta: dict):
    """The quantized replacement of `old` from its own tensors (keys without the prefix)."""
    if info.get("type") != type(old).__name__:
        raise mismatch(f"'{name}' was a {info.get('type')}, it is a {type(old).__name__}")
    if meta["method"] != "dynamic_int8":
        new = QuantizedLinear(
            old.in_features, old.out_features, bits=4 if meta["method"] == "int4_weight" else 8,
            group_size=meta.get("group_size"), bias=old.bias is not None,
        )  # fmt: skip
        new.load_state_dict({k: _need(mine, k, name, v.shape) for k, v in new.state_dict().items()})
        new.pack()
        return new
    from torch.ao.nn.quantized import dynamic as dq

    with quiet_ao():
        if isinstance(old, nn.Linear):
            new = dq.Linear(old.in_features, old.out_features, bias_=old.bias is not None)
            q = _need(mine, "weight_q", name, old.weight.shape)
            weight = per_channel_int8(q, _need(mine, "weight_scale", name))
            new.set_weight_bias(weight, mine.get("bias"))
            return new
        cls = {"LSTM": dq.LSTM, "GRU": dq.GRU}[old.mode]
        args = (old.input_size, old.hidden_size, old.num_layers, old.bias, old.batch_first)
        new = cls(*args, old.dropout, old.bidirectional, dtype=torch.qint8)
        weights = {}
        for k, p in old.named_parameters():  # weight_ih_l0, bias_ih_l0, ...
            if k.startswith("weight"):
                q = _need(mine, f"{k}_q", name, p.shape)
                weights[k] = per_channel_int8(q, _need(mine, f"{k}_scale", name))
            else:
                weights[k] = _need(mine, k, name, p.shape)
        new.set_weight_bias(weights)
        return new


# ------------------------------------------------------------------------------ static int8


def fx_int8(
    model: nn.Module,
    example: torch.Tensor,
    skip: list[str],
    calibration: list[torch.Tensor] | None = None,
) -> nn.Module:
    """Trace `model` (eval mode) with FX, fuse conv-bn-relu, observe `calibration` (none at
    restore: its scales are loaded afterwards) and convert to fbgemm/x86 int8 modules.

    `x.flatten(1)` becomes `torch.flatten(x, 1)`, which FX quantization knows keeps the
    scale of its input: the flattened activations stay int8 (no dequantize + quantize)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mapping = get_default_qconfig_mapping("x86")
    for name in skip:
        mapping.set_module_name(name, None)
    traced = torch.fx.symbolic_trace(model.eval())
    for node in traced.graph.nodes:
        if node.op == "call_method" and node.target == "flatten":
            node.op, node.target = "call_function", torch.flatten
    traced.recompile()
    with quiet_ao(), torch.no_grad():
        prepared = prepare_fx(traced, mapping, (example,))
        for batch in calibration or ():
            prepared(batch)
        return convert_fx(prepared)


class StaticInt8(nn.Module):
    """A static int8 graph packed twice: fbgemm's kernels for batches of up to SMALL_BATCH
    rows (the least overhead per call) and x86's for bigger ones (oneDNN convolutions on
    VNNI CPUs: faster on big batches, but slower after the batch size changes, as oneDNN
    keeps its prepared kernel for one input shape). Measured on the Fashion-MNIST CNN."""

    SMALL_BATCH = 4

    def __init__(self, small: nn.Module, large: nn.Module) -> None:
        super().__init__()
        self.small, self.large = small, large

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.small if x.shape[0] <= self.SMALL_BATCH else self.large)(x)


def _restore_static(model: nn.Module, state: dict[str, torch.Tensor], meta: dict) -> nn.Module:
    if {"fbgemm", "x86"} <= set(torch.backends.quantized.supported_engines):
        small = _static_graph(copy.deepcopy(model), state, meta, "fbgemm")
        return StaticInt8(small, _static_graph(model, state, meta, "x86"))
    return _static_graph(model, state, meta, torch.backends.quantized.engine)


def _static_graph(model: nn.Module, state: dict, meta: dict, engine: str) -> nn.Module:
    """The converted graph of the fresh `model` holding the stored int8 weights and scales,
    packed for `engine`'s kernels (packed weights keep the engine they were packed for)."""
    before, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
    try:
        graph = fx_int8(model, torch.zeros(1, *meta["input_shape"]), list(meta.get("skip", [])))
        target = graph.state_dict()
        rebuilt = type(target)((k, static_value(k, v, state)) for k, v in target.items())
        rebuilt._metadata = getattr(target, "_metadata", None)  # modules' state versions
        with quiet_ao():
            graph.load_state_dict(rebuilt)
    finally:
        torch.backends.quantized.engine = before
    return graph


def static_name(key: str) -> str:
    """A converted graph's state key as stored: packed (weight, bias) under the layer name."""
    return key.removesuffix("._packed_params._packed_params")


def static_value(key: str, like: Any, state: dict[str, torch.Tensor]) -> Any:
    """The value for state key `key` of the converted graph, shaped like its own `like`."""
    name = static_name(key)
    if isinstance(like, torch.dtype):
        return like
    if isinstance(like, tuple):  # a quantized Linear's packed (weight, bias)
        weight = static_value(f"{name}.weight", like[0], state)
        return (weight, state.get(f"{name}.bias"))
    if isinstance(like, torch.Tensor) and like.is_quantized:
        q = _need(state, f"{name}_q", "", like.shape)
        scale, zero = _need(state, f"{name}_scale", ""), _need(state, f"{name}_zero_point", "")
        with quiet_ao():
            if like.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                axis = like.q_per_channel_axis()
                scale, zero = scale.double(), zero.long()  # stored as fp32, int32
                return torch._make_per_channel_quantized_tensor(q, scale, zero, axis)
            return torch._make_per_tensor_quantized_tensor(q, float(scale), int(zero))
    return _need(state, name, "", like.shape)
