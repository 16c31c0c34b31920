"""Post-training quantization: each method on a tiny model → save_safetensors → load_file →
restore into a freshly built model (another seed) → outputs close to fp32, the saved file
smaller, int8 values unchanged by the round trip; LSTM, tied heads, skip, every bad input.

Tolerances: outputs are compared by relative RMS error ‖q − f‖ / ‖f‖ over a batch. int8
(one scale per row: error ≤ half a step of max|w|/127) measures 0.003–0.015 on these models
→ bound 0.05; int4 (15 levels per group of 32: steps 18× coarser) measures 0.016–0.08 → bound
0.15. Argmax agreement ≥ 0.95 is asked of models trained for a few steps first (measured 1.0):
at random init the top two logits of many rows differ by less than any quantization error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.ao.nn.quantized import dynamic as dq

from danlu import models
from danlu.compress.quantize import METHODS, int4_groups, int8_rows, quantize
from danlu.errors import CheckpointError, ConfigError
from danlu.models.quantized import QuantizedLinear, StaticInt8, nibbles, restore
from danlu.rundir import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, K = 64, 16, 5
TEXT = {"vocab_size": V, "pad_id": 0, "special_ids": {}}
GPT = {"type": "gpt", "dim": 64, "num_layers": 2, "num_heads": 4}
BERT = {"type": "bert", "dim": 64, "num_layers": 2, "num_heads": 4, "dropout": 0.0}
RNN = {"type": "rnn", "cell": "lstm", "dim": 16, "hidden_size": 32, "num_layers": 2,
       "dropout": 0.0}  # fmt: skip
CNN = {"type": "cnn", "channels": [8, 16], "head_sizes": [64]}
IMAGE = [1, 12, 12]
RMS = {"dynamic_int8": 0.05, "int8_weight": 0.05, "int4_weight": 0.15, "static_int8": 0.05}
SIZE = {"dynamic_int8": 0.33, "int8_weight": 0.33, "int4_weight": 0.23}  # embeddings stay fp32


def build(cfg: dict, seed: int, *, task: str = "classification") -> nn.Module:
    image = cfg["type"] == "cnn"
    torch.manual_seed(seed)
    return models.build(
        cfg, input_shape=IMAGE if image else [T], task=task,
        num_classes=K if task == "classification" else None, text=None if image else TEXT,
        weights=False,
    ).eval()  # fmt: skip


def data(cfg: dict, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs; the label is the pooled token mod K (BERT pools the first position,
    the others the last; images: the bright row's band)."""
    g = torch.Generator().manual_seed(seed)
    if cfg["type"] == "cnn":
        y = torch.randint(0, K, (n,), generator=g)
        x = torch.rand(n, *IMAGE, generator=g) * 0.3
        x[torch.arange(n), 0, 2 * y + 1] += 1.0  # (n, 12) bright row 2y + 1
        return x, y
    x = torch.randint(1, V, (n, T), generator=g)
    return x, x[:, 0 if cfg["type"] == "bert" else -1] % K


def trained(cfg: dict, steps: int = 60) -> nn.Module:
    """A few Adam steps: logits far enough apart for argmax agreement to mean something."""
    model = build(cfg, 0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x, y = data(cfg, 64, seed=100 + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def roundtrip(
    model: nn.Module, cfg: dict, method: str, tmp_path: Path, *, task: str = "classification",
    **options,
) -> tuple[nn.Module, dict, dict, float]:  # fmt: skip
    """quantize → save → load → restore into a fresh model (seed 1). Returns the restored
    model, the loaded state, meta (through JSON, as compression.json keeps it) and the
    saved file's size over the fp32 file's."""
    state, meta = quantize(model, method, **options)
    save_safetensors(tmp_path / "q.safetensors", state)
    save_safetensors(tmp_path / "fp32.safetensors", models.state_for_saving(model))
    loaded = load_file(str(tmp_path / "q.safetensors"))
    meta = json.loads(json.dumps(meta))
    restored = restore(build(cfg, 1, task=task), loaded, meta)
    sizes = [(tmp_path / f"{n}.safetensors").stat().st_size for n in ("q", "fp32")]
    return restored, loaded, meta, sizes[0] / sizes[1]


@torch.no_grad()
def compare(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(relative RMS error of b against a, argmax agreement)."""
    fa, fb = a(x), b(x)
    agreement = (fa.argmax(-1) == fb.argmax(-1)).float().mean()
    return float((fb - fa).norm() / fa.norm()), float(agreement)


@pytest.fixture(scope="module")
def gpt() -> nn.Module:
    return trained(GPT)


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return trained(BERT)


# ------------------------------------------------------------------- Transformers, LSTM, CNN


@pytest.mark.parametrize("method", ["dynamic_int8", "int8_weight", "int4_weight"])
@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_transformer_round_trip(family, method, gpt, bert, tmp_path):
    model, cfg = (gpt, GPT) if family == "gpt" else (bert, BERT)
    restored, state, meta, ratio = roundtrip(model, cfg, method, tmp_path, group_size=32)
    error, agreement = compare(model, restored, data(cfg, 256, seed=7)[0])
    assert error < RMS[method] and agreement >= 0.95, (error, agreement)
    assert ratio < SIZE[method]
    assert meta["kept_fp32"]["tok_emb"] == "embedding" and meta["kept_fp32"]["norm"] == "norm"
    layer = restored.blocks[0].attn.qkv  # GPT and BERT blocks name it alike
    name = "blocks.0.attn.qkv"
    if method == "dynamic_int8":
        assert isinstance(layer, dq.Linear)
        assert torch.equal(layer.weight().int_repr(), state[f"{name}.weight_q"])
    else:
        assert isinstance(layer, QuantizedLinear) and layer.kernel is not None
        assert layer.bits == (4 if method == "int4_weight" else 8)
        assert torch.equal(layer.weight_q, state[f"{name}.weight_q"])
    # the layers themselves: int8 ≈ 1/4 of fp32 (+ a scale and a bias per row), int4 ≈ 1/8
    layer_bytes = sum(v.nbytes for k, v in state.items() if k.startswith(f"{name}."))
    fp32_bytes = 4 * (64 * 192 + 192)
    assert layer_bytes / fp32_bytes < (0.28 if method != "int4_weight" else 0.17)


def test_lstm_dynamic_with_padded_rows(tmp_path):
    model = trained(RNN)
    restored, state, meta, ratio = roundtrip(model, RNN, "dynamic_int8", tmp_path)
    assert isinstance(restored.rnn, dq.LSTM)
    assert set(meta["layers"]) == {"rnn", "head.out"}
    assert meta["layers"]["rnn"] == {"type": "LSTM", "shape": [16, 32, 2]}
    x = data(RNN, 256, seed=7)[0]
    x[::2, 10:] = 0  # right-padded rows run as packed sequences
    error, agreement = compare(model, restored, x)
    assert error < RMS["dynamic_int8"] and agreement >= 0.95, (error, agreement)
    assert ratio < 0.40  # the embedding (64 × 16) stays fp32
    # the LSTM: int8 weights, a scale per row of 48 or 64 inputs, fp32 biases ≈ 0.31 of fp32
    fp32 = sum(p.nbytes for p in model.rnn.parameters())
    assert sum(v.nbytes for k, v in state.items() if k.startswith("rnn.")) / fp32 < 0.33
    weights = restored.rnn.get_weight()
    assert torch.equal(weights["weight_hh_l1"].int_repr(), state["rnn.weight_hh_l1_q"])


def test_static_int8_cnn(tmp_path):
    model = trained(CNN, steps=40)
    calibration = [data(CNN, 32, seed=s)[0] for s in (1, 2)]
    restored, state, meta, ratio = roundtrip(
        model, CNN, "static_int8", tmp_path, calibration=calibration
    )
    assert meta["input_shape"] == IMAGE and meta["calibration_batches"] == 2
    kinds = {layer["type"] for layer in meta["layers"].values()}
    assert {"QuantizedConvReLU2d", "QuantizedLinearReLU", "QuantizedLinear"} <= kinds
    assert isinstance(restored, StaticInt8)  # fbgemm kernels for ≤ 4 rows, x86's for more
    for graph in (restored.small, restored.large):
        conv = graph.get_submodule("features.0.0")
        assert torch.equal(conv.weight().int_repr(), state["features.0.0.weight_q"])
    x, y = data(CNN, 256, seed=7)
    error, agreement = compare(model, restored, x)
    assert error < RMS["static_int8"] and agreement >= 0.95, (error, agreement)
    # conv-bn folded, int8 weights, fp32 biases and scales; ~60 small tensors make the
    # safetensors header a sixth of this tiny file
    assert ratio < 0.40 and meta["bytes"]["state"] / meta["bytes"]["fp32"] < 0.30
    assert conv.weight().q_per_channel_scales().dtype == torch.float64  # exact round trip
    with torch.no_grad():
        assert (restored(x).argmax(-1) == y).float().mean() >= 0.9
        small = torch.cat([restored(x[i : i + 4]) for i in range(0, 32, 4)])  # (32, K)
        assert torch.allclose(small, restored(x[:32]), atol=1e-5)  # both kernels agree


def test_hf_bert_masked_lm_keeps_its_tied_decoder(hf_bert, tmp_path):
    cfg = {"type": "hf", "pretrained": str(hf_bert)}
    model = build(cfg, 0, task="language_modeling")
    # untrained, so logits are close: int4's agreement measures 0.90 (int8: 1.0)
    for method, agree in (("dynamic_int8", 0.95), ("int8_weight", 0.95), ("int4_weight", 0.85)):
        restored, _, meta, _ = roundtrip(
            model, cfg, method, tmp_path, task="language_modeling", group_size=32
        )
        decoder = "net.cls.predictions.decoder"
        assert meta["kept_fp32"][decoder] == "tied to net.bert.embeddings.word_embeddings.weight"
        net = restored.net
        assert net.cls.predictions.decoder.weight is net.bert.embeddings.word_embeddings.weight
        assert torch.equal(
            net.bert.embeddings.word_embeddings.weight,
            model.net.bert.embeddings.word_embeddings.weight,
        )
        query = net.bert.encoder.layer[0].attention.self.query
        assert isinstance(query, dq.Linear if method == "dynamic_int8" else QuantizedLinear)
        error, agreement = compare(model, restored, data(cfg, 32, seed=7)[0])
        assert error < RMS[method] and agreement >= agree, (method, error, agreement)


def test_gpt_tied_lm_head_generates(tmp_path):
    model = build(GPT, 0, task="language_modeling")
    restored, _, meta, ratio = roundtrip(
        model, GPT, "int4_weight", tmp_path, task="language_modeling", group_size=32
    )
    assert restored.lm_head is None and "lm_head" not in meta["layers"]
    assert torch.equal(restored.tok_emb.weight, model.tok_emb.weight)  # the head, in fp32
    x = data(GPT, 64, seed=7)[0]
    error, agreement = compare(model, restored, x)
    assert error < RMS["int4_weight"] and agreement >= 0.95, (error, agreement)
    out = restored.generate(x[:2, :8], max_new_tokens=6, temperature=0.0)
    assert out.shape == (2, 14) and bool((out[:, :8] == x[:2, :8]).all())
    assert ratio < SIZE["int4_weight"]


def test_skip_keeps_layers_in_fp32(gpt, tmp_path):
    restored, _, meta, _ = roundtrip(
        gpt, GPT, "int8_weight", tmp_path, skip=["head.out", "blocks.1.mlp.*"]
    )
    for name in ("head.out", "blocks.1.mlp.up", "blocks.1.mlp.down"):
        assert meta["kept_fp32"][name] == "skipped" and name not in meta["layers"]
        assert type(restored.get_submodule(name)) is nn.Linear
    assert torch.equal(restored.head.out.weight, gpt.head.out.weight)
    assert "blocks.0.mlp.up" in meta["layers"]


# --------------------------------------------------------------------------- QuantizedLinear


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_kernel_and_fallback_agree(bits):
    torch.manual_seed(0)
    w, b = torch.randn(24, 64), torch.randn(24)  # 24 rows: the int4 kernel pads them to 32
    q, scale = int8_rows(w) if bits == 8 else int4_groups(w, 32)
    layer = QuantizedLinear(64, 24, bits=bits, group_size=32)
    layer.load_state_dict({"weight_q": q, "weight_scale": scale, "bias": b})
    layer.pack()
    weight = layer.dequantize()
    step = scale[:, None] if bits == 8 else scale.repeat_interleave(32, dim=1)
    assert bool(((weight - w).abs() <= step / 2 + 1e-6).all())  # round to nearest
    if bits == 4:
        assert q.shape == (24, 32) and int(nibbles(q).min()) >= 1  # values −7..7 stored + 8
    x = torch.randn(40, 64)
    exact = F.linear(x, weight, b)  # (40, 24)
    with torch.no_grad():
        small, large = layer(x[:4]), layer(x.view(2, 20, 64))  # kernel path, dequantize path
    # both paths run activations (and weights) in bf16: ~3 significant digits
    assert float((small - exact[:4]).norm() / exact[:4].norm()) < 1e-2
    assert float((large.reshape(40, 24) - exact).norm() / exact.norm()) < 1e-2


def test_restore_into_another_architecture_fails(gpt, tmp_path):
    state, meta = quantize(gpt, "int8_weight")
    with pytest.raises(
        CheckpointError, match=r"wrong shape: tok_emb.weight \[64, 64\] \(model: \[64, 32\]\)"
    ):
        restore(build({**GPT, "dim": 32}, 1), state, meta)


# ------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT architecture (hidden 32, intermediate 64), config only."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_bert")
    transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=T,
    ).save_pretrained(folder)  # fmt: skip
    return folder


BAD = [
    ("gpt", "int3", {}, "compress.variants[1].method: 'int3' is not a quantization method. "
     "use one of " + ", ".join(METHODS)),
    ("gpt", "static_int8", {}, "static_int8 finds no layer to quantize in this GPT (its layers: "
     "Embedding ×2, LayerNorm ×5, Linear ×9) (static_int8 quantizes float-input models"),
    ("gpt", "static_int8", {},
     "methods that fit this model: dynamic_int8, int8_weight, int4_weight"),
    ("cnn", "static_int8", {}, "static_int8 needs calibration batches"),
    ("cnn", "int4_weight", {}, "int4_weight finds no layer to quantize in this CNN (its layers: "
     "Conv2d ×2, BatchNorm2d ×2, Linear ×2) (no Linear has group_size=128 inputs; the widest has "
     "72). methods that fit this model: dynamic_int8, static_int8, int8_weight; or a group_size "
     "that divides 72"),
    ("gpt", "int4_weight", {"group_size": 48}, "compress.variants[1].group_size: 48 does not "
     "divide the 64 inputs of layer 'blocks.0.attn.qkv'. use group_size 32 or 64"),
    ("gpt", "int4_weight", {"group_size": 33}, "group_size: 33 is not a positive even number"),
    ("cnn", "int4_weight", {"group_size": 16}, "group_size: 16 does not divide the 72 inputs of "
     "layer 'head.0'. use group_size 8 or 4 or 2 (they divide every width)"),
    ("gpt", "int8_weight", {"skip": ["lm_head"]}, "compress.variants[1].skip: 'lm_head' names no "
     "layer of this GPT"),
]  # fmt: skip


@pytest.mark.parametrize(("family", "method", "options", "message"), BAD)
def test_bad_input_messages(family, method, options, message):
    narrow_cnn = {**CNN, "channels": [4, 8], "head_sizes": [16]}  # Linear widths 72 and 16
    model = build({"gpt": GPT, "cnn": narrow_cnn}[family], 0)
    with pytest.raises(ConfigError) as e:
        quantize(model, method, key="compress.variants[1]", **options)
    assert message in str(e.value) and "\n" not in str(e.value)
