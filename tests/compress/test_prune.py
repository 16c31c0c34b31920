"""Pruning: sizes after each method, exact round trips through restore + load_weights, dead
units removed without changing outputs, magnitude sparsity, training afterwards, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from danlu import models
from danlu.compress.prune import FINDERS, prune
from danlu.errors import ConfigError
from danlu.models.pruned import restore
from danlu.rundir import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

V = 50
TEXT = {"vocab_size": V, "pad_id": 0, "special_ids": [0]}
TINY = {
    "mlp": {"type": "mlp", "hidden_sizes": [32, 16], "norm": "batch"},
    "cnn": {"type": "cnn", "channels": [4, 8], "head_sizes": [16]},
    "cnn_pool": {
        "type": "cnn", "channels": [4, 8], "head_sizes": [], "global_pool": True,
        "convs_per_block": 2,
    },
    "gpt": {"type": "gpt", "dim": 16, "num_heads": 2, "num_layers": 2},
    "gpt_swiglu": {
        "type": "gpt", "dim": 16, "num_heads": 2, "num_layers": 2, "mlp": "swiglu",
        "bias": False, "norm": "rms",
    },
    "bert": {"type": "bert", "dim": 16, "num_heads": 2, "num_layers": 2, "dropout": 0.0},
    "hf": {"type": "hf"},
    "rnn": {"type": "rnn", "dim": 8, "hidden_size": 8, "num_layers": 1},
}  # fmt: skip
SHAPES = {"mlp": [8], "cnn": [1, 8, 8], "cnn_pool": [1, 8, 8]}
STRUCTURED = [
    ("mlp", "neurons"),
    ("cnn", "channels"),
    ("cnn_pool", "channels"),
    ("gpt", "neurons"),
    ("gpt_swiglu", "neurons"),
    ("bert", "neurons"),
    ("hf", "neurons"),
    ("hf", "heads"),
]


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT architecture (hidden 32, 4 heads of 8, intermediate 64), no weights."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_bert")
    transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def build(name: str, hf_bert: Path | None = None, **changes) -> torch.nn.Module:
    cfg = {**TINY[name], **changes}
    if name == "hf":
        cfg.setdefault("pretrained", str(hf_bert))
    text = None if name in SHAPES else TEXT
    torch.manual_seed(0)
    model = models.build(
        cfg, input_shape=SHAPES.get(name, [8]), task="classification", num_classes=3, text=text,
        weights=False,
    )  # fmt: skip
    return model.eval()


def inputs(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name in SHAPES:
        return torch.randn(5, *SHAPES[name], generator=g)
    ids = torch.randint(1, V, (5, 8), generator=g)
    ids[0, 6:] = 0  # some padding
    return ids


def round_trip(model, meta, fresh, tmp_path: Path) -> torch.nn.Module:
    path = tmp_path / "model.safetensors"
    save_safetensors(path, models.state_for_saving(model))
    return models.load_weights(restore(fresh, json.loads(json.dumps(meta))), path).eval()


# ------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("name", "method", "smaller"),
    [
        ("mlp", "neurons", {"hidden_sizes": [16, 8]}),
        ("cnn", "channels", {"channels": [2, 4]}),
        ("cnn_pool", "channels", {"channels": [2, 4]}),
        ("gpt", "neurons", {"mlp_ratio": 2.0}),  # hidden 64 → 32
        ("gpt_swiglu", "neurons", {"mlp_ratio": 2.0}),  # hidden 48 → 24
        ("bert", "neurons", {"mlp_ratio": 2.0}),
        ("hf", "neurons", None),
        ("hf", "heads", None),
    ],
)
def test_half_the_units_leave_the_parameters_of_a_half_width_model(name, method, smaller, hf_bert):
    model = build(name, hf_bert)
    before = models.count_parameters(model)
    out = model(inputs(name))
    model, meta = prune(model, method, amount=0.5)
    after = models.count_parameters(model)
    if smaller is not None:
        assert after == models.count_parameters(build(name, hf_bert, **smaller))
    elif method == "neurons":  # 2 layers × 32 units × (input row + bias + output column)
        assert before - after == 2 * 32 * (32 + 1 + 32)
    else:  # 2 layers × 2 heads × 8 dims × (q, k, v rows with bias + output columns)
        assert before - after == 2 * 2 * 8 * (3 * 33 + 32)
    assert meta["parameters"] == {"before": before, "after": after}
    assert meta["shrinks"] is True and meta["sparsity"] == round(1 - after / before, 6)
    assert all(layer["removed"] == layer["units"] // 2 for layer in meta["layers"])
    assert model(inputs(name)).shape == out.shape


def test_heads_meta_names_the_kept_heads_and_the_attention_follows(hf_bert):
    model, meta = prune(build("hf", hf_bert), "heads", amount=0.75)
    assert [len(layer["kept_heads"]) for layer in meta["layers"]] == [1, 1]
    attention = model.net.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (1, 8)
    assert attention.query.weight.shape == (8, 32)
    assert model.net.config.num_attention_heads == 4  # the config stays the original


def test_every_layer_keeps_at_least_one_unit():
    model, meta = prune(build("mlp"), "neurons", amount=0.99)
    assert [layer["kept"] for layer in meta["layers"]] == [1, 1]
    assert model.body[0].weight.shape == (1, 8) and model.head.weight.shape == (3, 1)


# ------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("name", "method"), [*STRUCTURED, ("gpt", "magnitude")])
def test_round_trip_through_restore_reproduces_outputs(name, method, hf_bert, tmp_path):
    model, meta = prune(build(name, hf_bert), method, amount=0.5)
    x = inputs(name)
    loaded = round_trip(model, meta, build(name, hf_bert), tmp_path)
    assert torch.equal(loaded(x), model(x))
    assert restore(loaded, meta) is loaded  # restoring again changes nothing
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("method", ["neurons", "heads"])
def test_hf_round_trip_from_the_saved_config(method, hf_bert, tmp_path):
    model, meta = prune(build("hf", hf_bert), method, amount=0.5)
    models.hf.save_config(model, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (saved["intermediate_size"], saved["num_attention_heads"]) == (64, 4)
    assert "pruned_heads" not in saved or not saved["pruned_heads"]
    fresh = build("hf", pretrained=str(tmp_path / "hf"))
    loaded = round_trip(model, meta, fresh, tmp_path)
    assert torch.equal(loaded(inputs("hf")), model(inputs("hf")))


# -------------------------------------------------------------------- dead units


@torch.no_grad()
def kill_even_units(model: torch.nn.Module, method: str) -> None:
    """Zero what makes every even unit of each layer contribute nothing (and score 0)."""
    for g in FINDERS[method](model):
        dead = torch.arange(0, g.units, 2)
        if method == "channels":  # BatchNorm's gamma and beta: the channel is 0 after ReLU
            for path in g.norms:
                norm = model.get_submodule(path)
                norm.weight[dead], norm.bias[dead] = 0.0, 0.0
            continue
        for path, per in g.consumers:  # the unit's output weights
            cols = (dead[:, None] * per + torch.arange(per)).flatten()
            model.get_submodule(path).weight[:, cols] = 0.0


@pytest.mark.parametrize(("name", "method"), STRUCTURED)
def test_pruning_dead_units_leaves_outputs_unchanged(name, method, hf_bert):
    model = build(name, hf_bert)
    kill_even_units(model, method)
    x = inputs(name)
    before = model(x)
    model, meta = prune(model, method, amount=0.5)
    assert meta["sparsity"] > 0
    after = model(x)
    if name.startswith(("gpt", "bert", "hf")):
        assert torch.equal(after, before)
    else:  # narrower matrix products and convolutions sum in another order: float rounding
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


# --------------------------------------------------------------------- magnitude


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("amount", [0.3, 0.8])
def test_magnitude_reaches_the_target_sparsity_without_shrinking(scope, amount):
    model = build("cnn")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model, meta = prune(model, "magnitude", amount=amount, scope=scope)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert meta["shrinks"] is False and meta["modules"] == {}
    assert meta["parameters"]["before"] == meta["parameters"]["after"]
    weights = [model.features[0][0].weight, model.features[1][0].weight, model.head[0].weight]
    zeros = sum(int((w == 0).sum()) for w in weights) + int((model.head[2].weight == 0).sum())
    assert abs(zeros / meta["pruned_weights"] - amount) < 0.01
    assert abs(meta["sparsity"] - amount) < 0.01
    assert [layer["name"] for layer in meta["layers"]] == [
        "features.0.0.weight",
        "features.1.0.weight",
        "head.0.weight",
        "head.2.weight",
    ]  # fmt: skip  (no biases, no BatchNorm)
    if scope == "layer":
        assert all(abs(layer["sparsity"] - amount) < 0.01 for layer in meta["layers"])
    assert not any(hasattr(m, "weight_orig") for m in model.modules())  # made permanent


def test_magnitude_leaves_embeddings_and_a_tied_head_alone():
    model, meta = prune(build("gpt"), "magnitude", amount=0.5)
    assert int((model.tok_emb.weight == 0).sum()) == 0
    assert all("emb" not in layer["name"] for layer in meta["layers"])


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize(("name", "method"), [*STRUCTURED, ("bert", "magnitude")])
def test_a_pruned_model_trains(name, method, hf_bert):
    model, _ = prune(build(name, hf_bert), method, amount=0.5)
    zeros = {n: p == 0 for n, p in model.named_parameters() if n.endswith("weight")}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = inputs(name), torch.tensor([0, 1, 2, 0, 1])
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    if method == "magnitude":  # the pruned weights stay zero through fine-tuning
        params = dict(model.named_parameters())
        pruned = ["blocks.0.ff.0.weight", "blocks.1.attn.qkv.weight", "head.out.weight"]
        assert all(bool((params[n][zeros[n]] == 0).all()) for n in pruned)
        assert zeros["blocks.0.ff.0.weight"].float().mean() > 0.3


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("name", "method", "message", "fix"),
    [
        ("mlp", "channels", "compress.method: channels does not fit this mlp model",
         "methods that fit a mlp model: magnitude, neurons"),
        ("cnn", "heads", "compress.method: heads does not fit this cnn model: it has no "
         "BERT-family attention", "methods that fit a cnn model: magnitude, channels"),
        ("rnn", "neurons", "compress.method: neurons does not fit this rnn model",
         "methods that fit a rnn model: magnitude"),
        ("gpt", "heads", "compress.method: heads cannot shrink the attention of danlu's gpt",
         "heads pruning supports hf (BERT-family) models; use method: neurons"),
        ("bert", "channels", "(its layers: Dropout, Embedding, GELU, LayerNorm, Linear)",
         "methods that fit a bert model: magnitude, neurons"),
    ],
)  # fmt: skip
def test_a_method_that_does_not_fit_the_model_names_the_ones_that_do(name, method, message, fix):
    with pytest.raises(ConfigError) as e:
        prune(build(name), method, amount=0.5)
    assert message in e.value.message and fix in e.value.fix


@pytest.mark.parametrize("amount", [0, 1, 1.5, -0.2, True, float("nan"), "half"])
def test_amount_outside_zero_one_is_refused(amount):
    with pytest.raises(ConfigError, match=r"compress\.prune\.amount: .* is outside \(0, 1\)"):
        prune(build("mlp"), "neurons", amount=amount, key="compress.prune")


def test_unknown_method_and_scope():
    with pytest.raises(ConfigError, match=r"compress\.method: 'rows' is not a pruning method"):
        prune(build("mlp"), "rows", amount=0.5)
    with pytest.raises(ConfigError, match=r"compress\.scope: 'block' is not known"):
        prune(build("mlp"), "magnitude", amount=0.5, scope="block")
