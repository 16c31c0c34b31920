"""CNN: shapes for every block option, loss falls, safetensors round trip with BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_images
from danlu import models
from danlu.errors import CheckpointError, ConfigError
from danlu.models.cnn import CNN
from danlu.rundir import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


def _spatial_after_blocks(model: CNN, shape: list[int]) -> tuple[int, int, int]:
    with torch.no_grad():
        out = model.eval().features(torch.zeros(1, *shape))
    return tuple(out.shape[1:])


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
@pytest.mark.parametrize("global_pool", [False, True])
@pytest.mark.parametrize("size", [5, 7, 8])
def test_output_shape_for_pool_options_and_odd_sizes(pool, global_pool, size):
    torch.manual_seed(0)
    model = CNN([1, size, size], 3, channels=[4, 6], pool=pool, global_pool=global_pool)
    assert model(torch.randn(2, 1, size, size)).shape == (2, 3)
    h = size if pool == "none" else size // 4
    assert _spatial_after_blocks(model, [1, size, size]) == (6, h, h)
    pools = [m for m in model.features.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    expected = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}.get(pool)
    assert len(pools) == (0 if pool == "none" else 2)
    assert all(isinstance(p, expected) for p in pools)
    width = 6 if global_pool else 6 * h * h
    assert model.head[0].in_features == width


def test_pooling_stops_when_the_map_is_one_pixel():
    model = CNN([1, 5, 5], 2, channels=[2, 2, 2, 2])  # 5 → 2 → 1 → 1 → 1
    assert _spatial_after_blocks(model, [1, 5, 5]) == (2, 1, 1)
    assert model(torch.randn(3, 1, 5, 5)).shape == (3, 2)


def test_three_channels_two_convs_per_block_no_batch_norm():
    torch.manual_seed(0)
    model = CNN(
        [3, 7, 7],
        4,
        channels=[5, 8],
        convs_per_block=2,
        batch_norm=False,
        activation="gelu",
        kernel_size=5,
        head_sizes=[16, 8],
        dropout=0.1,
        block_dropout=0.1,
    )
    assert model(torch.randn(2, 3, 7, 7)).shape == (2, 4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 5), (5, 5), (5, 8), (8, 8)]
    assert all(c.bias is not None and c.kernel_size == (5, 5) for c in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 4 + 2
    assert sum(isinstance(m, nn.Dropout2d) for m in model.modules()) == 2
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [16, 8, 4]


def test_batch_norm_convs_have_no_bias():
    model = CNN([1, 8, 8], 2, channels=[4])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.bias is None
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1


def test_no_head_layers():
    model = CNN([1, 8, 8], 3, channels=[4], head_sizes=[], global_pool=True)
    assert len(model.head) == 1 and model.head[0].in_features == 4
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_same_output_for_contiguous_and_channels_last_inputs():
    torch.manual_seed(0)
    model = CNN([3, 8, 8], 3, channels=[4, 4]).eval()
    x = torch.randn(2, 3, 8, 8)
    a = model(x)
    b = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("task", "output", "classes", "expected"),
    [
        ("classification", "auto", 3, 3),
        ("classification", "sigmoid", 2, 1),
        ("classification", "sigmoid", 3, 3),
        ("regression", "linear", None, 1),
    ],
)
def test_build_cnn_heads(task, output, classes, expected):
    model = models.build(
        {"type": "cnn", "channels": [4], "head_sizes": [8], "output": output},
        input_shape=[3, 6, 6],
        task=task,
        num_classes=classes,
    )
    assert isinstance(model, CNN)
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, expected)


def test_cnn_on_table_input_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.type: cnn needs image inputs.*shape \(5,\)"):
        models.build({"type": "cnn"}, input_shape=[5], task="classification", num_classes=2)


def test_cnn_with_softmax_on_regression_is_a_config_error():
    with pytest.raises(ConfigError, match="does not fit task: regression"):
        models.build(
            {"type": "cnn", "output": "softmax"},
            input_shape=[1, 8, 8],
            task="regression",
            num_classes=None,
        )


def _images(n: int = 48, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_images(n, classes=3, size=8, channels=channels, seed=seed)
    return (torch.from_numpy(x).float() - 128) / 64, torch.from_numpy(y)


def test_loss_falls_on_a_tiny_problem():
    torch.manual_seed(0)
    x, y = _images()
    model = CNN([1, 8, 8], 3, channels=[4, 8], head_sizes=[16])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0]


def test_safetensors_round_trip_with_batch_norm(tmp_path):
    torch.manual_seed(0)
    cfg = {"type": "cnn", "channels": [4, 6], "convs_per_block": 2, "head_sizes": [8]}
    model = models.build(cfg, input_shape=[3, 8, 8], task="classification", num_classes=3)
    x, y = _images(24, channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(int(b.num_batches_tracked) == 4 for b in bns)
    save_safetensors(tmp_path / "cnn.safetensors", models.state_for_saving(model))

    torch.manual_seed(5)
    fresh = models.build(cfg, input_shape=[3, 8, 8], task="classification", num_classes=3)
    models.load_weights(fresh, tmp_path / "cnn.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_load_weights_of_another_cnn_is_a_checkpoint_error(tmp_path):
    torch.manual_seed(0)
    save_safetensors(tmp_path / "w.safetensors", CNN([1, 8, 8], 3, channels=[4]).state_dict())
    with pytest.raises(CheckpointError, match="wrong shape"):
        models.load_weights(CNN([1, 8, 8], 3, channels=[6]), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        models.load_weights(CNN([1, 8, 8], 3, channels=[4, 4]), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="unexpected"):
        models.load_weights(
            CNN([1, 8, 8], 3, channels=[4], batch_norm=False), tmp_path / "w.safetensors"
        )
