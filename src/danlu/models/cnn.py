"""Convolutional network: conv blocks, then an MLP head.

Each block is [Conv → BatchNorm → activation] × convs_per_block, then 2×2 pooling and
optional dropout; the head flattens (or average-pools) the last block and applies Linear
layers. Weights and inputs use the channels-last layout, which oneDNN runs faster on CPU.

    model = CNN(in_shape=[1, 28, 28], channels=[32, 64, 128], num_outputs=10)
    logits = model(torch.randn(8, 1, 28, 28))  # (8, 10)
"""

from __future__ import annotations

import torch
from torch import nn

from danlu.registry import MODELS

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def conv_block(
    c_in: int,
    c_out: int,
    *,
    kernel_size: int,
    convs: int,
    batch_norm: bool,
    activation: str,
    pool: str | None,
    dropout: float,
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(
                c_in if i == 0 else c_out,
                c_out,
                kernel_size,
                padding=kernel_size // 2,
                bias=not batch_norm,
            ),
            nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
            ACTIVATIONS[activation](),
        ]
    if pool:
        layers.append(POOLS[pool](2))
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    def __init__(
        self,
        in_shape: list[int],
        num_outputs: int,
        channels: list[int] = (32, 64, 128),
        kernel_size: int = 3,
        convs_per_block: int = 1,
        pool: str = "max",
        batch_norm: bool = True,
        activation: str = "relu",
        block_dropout: float = 0.0,
        global_pool: bool = False,
        head_sizes: list[int] = (128,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        blocks = []
        for c_out in channels:
            pooled = pool != "none" and h >= 2 and w >= 2
            blocks.append(
                conv_block(
                    c,
                    c_out,
                    kernel_size=kernel_size,
                    convs=convs_per_block,
                    batch_norm=batch_norm,
                    activation=activation,
                    pool=pool if pooled else None,
                    dropout=block_dropout,
                )
            )
            c, h, w = c_out, (h // 2 if pooled else h), (w // 2 if pooled else w)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        width = c if global_pool else c * h * w
        head: list[nn.Module] = []
        for size in head_sizes:
            head += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout:
                head.append(nn.Dropout(dropout))
            width = size
        head.append(nn.Linear(width, num_outputs))
        self.head = nn.Sequential(*head)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
        x = self.pool(self.features(x))  # (B, C', H', W')
        return self.head(x.flatten(1))  # (B, num_outputs)


@MODELS.register("cnn")
def build_cnn(input_shape: list[int], num_outputs: int, **kwargs) -> CNN:
    if len(input_shape) != 3:
        from danlu.errors import ConfigError

        raise ConfigError(
            "model.type: cnn needs image inputs (channels, height, width), but the data gives "
            f"inputs of shape {tuple(input_shape)}",
            fix="use model.type: mlp for tables",
        )
    return CNN(list(input_shape), num_outputs, **kwargs)
