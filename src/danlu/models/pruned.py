"""Pruned models: cut a layer's units out of its tensors, and rebuild those sizes at load time.

Structured pruning (danlu.compress.prune) removes hidden units, channels or attention heads by
slicing the tensors of the modules involved along one dimension (`select`). What a run needs
to load the result is only each touched module's new tensor shapes and size attributes
(`spec`): `restore` gives a model freshly built from the run's config (original sizes) empty
tensors of those shapes, so that `danlu.models.load_weights` then fills them. The record is
absolute (shapes, not "remove k more"), so restoring twice, or onto a model that already has
the pruned sizes, changes nothing.

    spec = select(model.body[0], 0, torch.tensor([0, 2, 5]))  # keep 3 output units
    restore(fresh_model, {"modules": {"body.0": spec}})      # same shapes, empty tensors
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from danlu.errors import CheckpointError

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.RMSNorm)


def _size_attrs(module: nn.Module) -> dict[str, Any]:
    """The size attributes a module keeps next to its tensors."""
    if isinstance(module, nn.Linear):
        return {"out_features": module.weight.shape[0], "in_features": module.weight.shape[1]}
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        return {"out_channels": w.shape[0], "in_channels": w.shape[1] * module.groups}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return {"num_features": module.num_features}
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return {"normalized_shape": list(module.normalized_shape)}
    return {}


def _units(module: nn.Module) -> int:
    """How many output units (dim 0 entries) the module has."""
    if isinstance(module, NORMS):
        attrs = _size_attrs(module)
        return attrs.get("num_features") or attrs["normalized_shape"][-1]
    return module.weight.shape[0]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's), by name."""
    own = dict(module.named_parameters(recurse=False))
    own.update((k, v) for k, v in module.named_buffers(recurse=False) if v is not None)
    return own


def _put(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by `value`, keeping its kind, trainability and layout."""
    old = getattr(module, name)
    if old.dim() == 4 and old.is_contiguous(memory_format=torch.channels_last):
        value = value.contiguous(memory_format=torch.channels_last)  # the CNN's layout
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = value


def set_attrs(module: nn.Module, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        setattr(module, k, tuple(v) if isinstance(getattr(module, k, None), tuple) else v)


def spec(module: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `restore` needs to give a module its current sizes: tensor shapes and size
    attributes (plus `extra` attributes, e.g. an attention module's head count). JSON-able."""
    shapes = {k: list(v.shape) for k, v in _tensors(module).items()}
    return {"tensors": shapes, "attrs": {**_size_attrs(module), **(extra or {})}}


@torch.no_grad()
def select(module: nn.Module, dim: int, index: torch.Tensor) -> dict[str, Any]:
    """Keep the entries `index` of a Linear's, conv's or norm's tensors along `dim`, in place.
    dim 0 (output units) slices a Linear's or conv's rows and bias, or a norm's per-feature
    tensors and statistics; dim 1 (input units) slices the weight's columns. Returns the
    module's new `spec`."""
    units = _units(module) if dim == 0 else None
    for name, t in _tensors(module).items():
        if t.dim() > dim and (dim == 1 or t.shape[0] == units):
            _put(module, name, t.index_select(dim, index.to(t.device)).clone())
    if isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = len(index)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        module.normalized_shape = (len(index),)
    set_attrs(module, _size_attrs(module))
    return spec(module)


def resize(module: nn.Module, record: dict[str, Any]) -> None:
    """Give `module` the shapes and attributes of `record` (see `spec`); new tensors are
    uninitialised (the weights follow). Tensors that already have their shape are kept."""
    own = _tensors(module)
    for name, shape in record["tensors"].items():
        if name not in own:
            raise CheckpointError(f"the pruning record names a tensor '{name}' the model lacks")
        if list(own[name].shape) != shape:
            _put(module, name, own[name].new_empty(shape))
    set_attrs(module, record["attrs"])


def restore(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """`model` is freshly built from the run's config (original sizes). Resize its modules as
    recorded in `meta` so that danlu.models.load_weights(model, saved_file) loads the pruned
    weights. Returns the model (unpruned and magnitude-pruned runs: unchanged)."""
    for path, record in (meta.get("modules") or {}).items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(
                f"the run was pruned ({meta.get('method')}) in a layer '{path}' that the model "
                "built from its config lacks",
                fix="the run's config.yaml or prune record was changed after compression",
            ) from None
        resize(module, record)
    return model
