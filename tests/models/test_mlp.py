"""MLP: shapes, heads chosen by `models.build`, loss falls, safetensors round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from danlu import models
from danlu.errors import CheckpointError, ConfigError
from danlu.models.mlp import ACTIVATIONS, MLP
from danlu.rundir import save_safetensors


@pytest.mark.parametrize(
    ("input_shape", "hidden"),
    [([5], []), ([5], [8]), ([5], [8, 4, 3]), ([1, 8, 8], [16]), ([3, 4, 6], [7, 7])],
)
def test_output_shape_on_tables_and_images(input_shape, hidden):
    torch.manual_seed(0)
    model = models.build(
        {"type": "mlp", "hidden_sizes": hidden},
        input_shape=input_shape,
        task="classification",
        num_classes=4,
    )
    x = torch.randn(6, *input_shape)
    assert model(x).shape == (6, 4)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[0].in_features == torch.Size(input_shape).numel()
    assert [m.out_features for m in linears] == [*hidden, 4]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_each_activation(activation):
    torch.manual_seed(0)
    model = MLP(3, [6, 5], num_outputs=2, activation=activation)
    assert model(torch.randn(4, 3)).shape == (4, 2)
    assert [type(model.body[i]) for i in (2, 5)] == [ACTIVATIONS[activation]] * 2
    # the activation is really applied: the hidden output equals activation(linear(x))
    x = torch.randn(4, 3)
    first = model.body[0]
    expected = ACTIVATIONS[activation]()(first(x))
    assert torch.allclose(model.body[:3](x), expected)


def test_no_hidden_layers_is_a_linear_model():
    torch.manual_seed(0)
    model = MLP(4, [], num_outputs=3)
    assert len(model.body) == 0
    x = torch.randn(5, 4)
    expected = x @ model.head.weight.T + model.head.bias
    assert torch.allclose(model(x), expected)


def test_dropout_layers_only_in_training_mode():
    torch.manual_seed(0)
    model = MLP(8, [32, 32], num_outputs=2, dropout=0.5)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    x = torch.randn(16, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    assert MLP(8, [4], num_outputs=2, dropout=0.0).body[-1].__class__ is not nn.Dropout


@pytest.mark.parametrize(("norm", "cls"), [("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm)])
def test_norm_layers(norm, cls):
    torch.manual_seed(0)
    model = MLP(3, [8, 4], num_outputs=2, norm=norm)
    norms = [m for m in model.modules() if isinstance(m, cls)]
    assert [n.normalized_shape[0] if norm == "layer" else n.num_features for n in norms] == [8, 4]
    assert model(torch.randn(10, 3)).shape == (10, 2)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in MLP(3, [8], 2).modules())


@pytest.mark.parametrize(
    ("task", "output", "classes", "expected"),
    [
        ("classification", "softmax", 3, 3),
        ("classification", "softmax", 2, 2),
        ("classification", "auto", 5, 5),
        ("classification", "sigmoid", 2, 1),
        ("classification", "sigmoid", 3, 3),
        ("regression", "linear", None, 1),
        ("regression", "auto", None, 1),
    ],
)
def test_build_head_sizes(task, output, classes, expected):
    model = models.build(
        {"type": "mlp", "hidden_sizes": [4], "output": output},
        input_shape=[2],
        task=task,
        num_classes=classes,
    )
    assert model.head.out_features == expected
    assert model(torch.randn(3, 2)).shape == (3, expected)


def test_output_kind_resolves_auto():
    assert models.output_kind("classification", "auto") == "softmax"
    assert models.output_kind("regression", "auto") == "linear"
    assert models.output_kind("classification", "sigmoid") == "sigmoid"


@pytest.mark.parametrize(
    ("task", "output", "words"),
    [
        ("regression", "softmax", "does not fit task: regression"),
        ("regression", "sigmoid", "does not fit task: regression"),
        ("classification", "linear", "does not fit task: classification"),
    ],
)
def test_build_rejects_head_that_does_not_fit_the_task(task, output, words):
    with pytest.raises(ConfigError, match=words) as e:
        models.build(
            {"type": "mlp", "output": output},
            input_shape=[2],
            task=task,
            num_classes=3 if task == "classification" else None,
        )
    assert "model.output" in str(e.value)


def test_unknown_model_type_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'mlp'"):
        models.build({"type": "mpl"}, input_shape=[2], task="classification", num_classes=2)


def test_loss_falls_on_a_tiny_problem():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()  # 3 classes
    model = MLP(4, [32], num_outputs=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0]


def _train_a_little(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_safetensors_round_trip_with_batch_norm(tmp_path):
    torch.manual_seed(0)
    cfg = {"type": "mlp", "hidden_sizes": [8, 6], "norm": "batch", "dropout": 0.2}
    model = models.build(cfg, input_shape=[1, 4, 4], task="classification", num_classes=3)
    x, y = torch.randn(20, 1, 4, 4) * 3 + 1, torch.arange(20) % 3
    _train_a_little(model, x, y)
    bn = model.body[1]
    assert bn.num_batches_tracked.item() == 5 and not torch.allclose(
        bn.running_mean, torch.zeros(8)
    )
    save_safetensors(tmp_path / "w.safetensors", models.state_for_saving(model))

    torch.manual_seed(1)
    fresh = models.build(cfg, input_shape=[1, 4, 4], task="classification", num_classes=3)
    assert not torch.equal(fresh.head.weight, model.head.weight)
    models.load_weights(fresh, tmp_path / "w.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))


def test_load_weights_rejects_other_shapes_and_keys(tmp_path):
    torch.manual_seed(0)
    small = MLP(3, [4], num_outputs=2)
    save_safetensors(tmp_path / "w.safetensors", small.state_dict())

    wider = MLP(3, [5], num_outputs=2)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        models.load_weights(wider, tmp_path / "w.safetensors")
    assert "body.0.weight" in str(e.value) and "w.safetensors" in str(e.value)
    for key, value in wider.state_dict().items():
        assert torch.equal(value, before[key]), "a failed load must not change the model"

    deeper = MLP(3, [4, 4], num_outputs=2)
    with pytest.raises(CheckpointError, match=r"missing: body\.3\.weight"):
        models.load_weights(deeper, tmp_path / "w.safetensors")

    normed = MLP(3, [4], num_outputs=2, norm="layer")  # body.1 is a LayerNorm: extra keys
    save_safetensors(tmp_path / "n.safetensors", normed.state_dict())
    with pytest.raises(CheckpointError, match=r"unexpected: [^;]*body\.1\.weight"):
        models.load_weights(MLP(3, [4], num_outputs=2), tmp_path / "n.safetensors")


def test_load_weights_unreadable_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        models.load_weights(MLP(3, [4], 2), tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        models.load_weights(MLP(3, [4], 2), tmp_path / "missing.safetensors")


def test_count_parameters():
    assert models.count_parameters(MLP(3, [4], num_outputs=2)) == 3 * 4 + 4 + 4 * 2 + 2
