"""Multi-layer perceptron: input → [Linear → norm → activation → dropout] × N → Linear.

Images are flattened, so the same model covers the brief's 784-64-10 MNIST network, the 2-2-1
sigmoid network on XOR, and (with no hidden layers) linear and logistic regression.

    model = MLP(in_features=784, hidden_sizes=[64], num_outputs=10)
    logits = model(torch.randn(8, 1, 28, 28))  # (8, 10)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from danlu.registry import MODELS

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
}


def norm_layer(kind: str, width: int) -> nn.Module:
    return (
        {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[kind](width)
        if kind != "none"
        else nn.Identity()
    )


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        num_outputs: int,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), norm_layer(norm, size), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, F)
        return self.head(self.body(x))  # (B, num_outputs)


@MODELS.register("mlp")
def build_mlp(input_shape: list[int], num_outputs: int, **kwargs) -> MLP:
    return MLP(math.prod(input_shape), num_outputs=num_outputs, **kwargs)
