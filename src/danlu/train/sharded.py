"""Full states of an FSDP2-sharded model and its optimizer, and back (train.strategy: fsdp).

`fully_shard` turns each parameter into a DTensor that holds this rank's shard. Checkpoints and
model.safetensors always hold full tensors in the layout one process writes (the optimizer
state keeps torch's own index-keyed format), so a run moves between one process, DDP and FSDP
freely. Gathering is a collective: under FSDP every rank calls `full_model_state` /
`full_optimizer_state`, in the same order, and rank 0 writes. Loading needs no communication:
every rank reads the full files and keeps its own shard (`distribute_tensor` with
`src_data_rank=None`). Without DTensors every function here is the plain one-process path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support
        return None
    return DTensor


def _is_dtensor(value: Any) -> bool:
    kind = _dtensor()
    return kind is not None and isinstance(value, kind)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    return bool(_fsdp_modules(model)) or any(_is_dtensor(p) for p in model.parameters())


def _resharded(model: nn.Module) -> nn.Module:
    """The model with every parameter back to its DTensor shard: FSDP2 keeps the root's
    parameters whole from a forward (validation) until the next backward."""
    for module in _fsdp_modules(model):
        module.reshard()
    return model


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (an all-gather for a DTensor: every rank must call it)."""
    if _is_dtensor(value):
        value = value.full_tensor()
    return value.detach().cpu().contiguous()


def _entries(model: nn.Module) -> dict[str, Any]:
    """The sharded model's state entries that are saved: each parameter once (a tied weight
    under its first name, as models.state_for_saving does) and plain or DTensor buffers."""
    out, seen = {}, set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if _is_dtensor(value) or type(value) in (torch.Tensor, nn.Parameter):
            out[name] = value
    return out


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What model.safetensors holds. Under FSDP a collective: call it on every rank."""
    from danlu.models import state_for_saving

    if not is_sharded(model):
        return state_for_saving(model)
    return {name: _full(value) for name, value in _entries(_resharded(model)).items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded state tensor gathered (a collective under
    FSDP). New dicts: the optimizer's own state is left as it is."""
    saved = optimizer.state_dict()
    if not any(_is_dtensor(v) for s in saved["state"].values() for v in s.values()):
        return saved
    state = {
        index: {k: _full(v) if _is_dtensor(v) else v for k, v in saved["state"][index].items()}
        for index in sorted(saved["state"])  # the same order on every rank
    }
    return {**saved, "state": state}


def _shard_like(full: torch.Tensor, like: Any) -> Any:
    """This rank's part of `full`, placed as the DTensor `like` is (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    local = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state (models.state_for_saving's layout) into the model, sharded or not.
    Raises RuntimeError naming missing or unexpected keys, as models.restore does."""
    from danlu.models import restore

    if not is_sharded(model):
        restore(model, state)
        return
    entries = _entries(_resharded(model))
    missing = [k for k in entries if k not in state]
    unexpected = [k for k in state if k not in entries]
    if missing or unexpected:
        raise RuntimeError(
            f"missing: {', '.join(missing[:5]) or 'none'}; unexpected: "
            f"{', '.join(unexpected[:5]) or 'none'}"
        )
    shaped = {
        k: _shard_like(v, entries[k]) if _is_dtensor(entries[k]) else v for k, v in state.items()
    }
    model.load_state_dict(shaped, strict=False)  # tied names are restored through the tie


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state; under FSDP each tensor shaped like its parameter is cut
    to this rank's shard first."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(_is_dtensor(p) for p in params):
        per_param = {}
        for index, entry in state["state"].items():
            p = params[int(index)]
            per_param[index] = {
                k: _shard_like(v, p)
                if _is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape
                else v
                for k, v in entry.items()
            }
        state = {**state, "state": per_param}
    optimizer.load_state_dict(state)
