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

from danlu.errors import CheckpointError, ConfigError
from danlu.models import cnn, mlp  # noqa: F401  (register the families)
from danlu.registry import MODELS


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
    model_cfg: dict[str, Any], *, input_shape: list[int], task: str, num_classes: int | None
) -> nn.Module:
    kwargs = dict(model_cfg)
    family = kwargs.pop("type")
    kind = output_kind(task, kwargs.pop("output", "auto"))
    return MODELS[family](
        input_shape=list(input_shape), num_outputs=num_outputs(task, num_classes, kind), **kwargs
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state (parameters and buffers such as BatchNorm statistics)."""
    return {k: v for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors weights into a model built from the same config (strict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read weights '{path}' ({e})") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {list(state[k].shape)} (model: {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"weights '{path}' do not fit the model built from the run's config "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: "
            f"{', '.join(unexpected[:5]) or 'none'}; wrong shape: {', '.join(wrong[:5]) or 'none'})",
            fix="the config.yaml or weights were changed after training",
        )
    model.load_state_dict(state)
    return model
