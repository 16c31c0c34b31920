"""Export: ONNX parity per family on batch sizes and lengths the export never saw, OnnxModel,
int8 quantization, TorchScript and safetensors round trips, clear errors, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from danlu import models
from danlu.compress.export import FILES, export
from danlu.compress.onnx_check import parity, quantize_onnx
from danlu.errors import ConfigError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 50
TEXT = {"vocab_size": V, "pad_id": 0, "special_ids": [0]}
TINY = {
    "mlp": ({"type": "mlp", "hidden_sizes": [16], "norm": "batch"}, [6]),
    "cnn": ({"type": "cnn", "channels": [4, 8], "head_sizes": [16]}, [1, 8, 8]),
    "gpt": ({"type": "gpt", "dim": 16, "num_heads": 2, "num_layers": 1}, [12]),
    "rnn": ({"type": "rnn", "dim": 8, "hidden_size": 8, "num_layers": 1}, [12]),
}


def build(family: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    cfg, shape = TINY[family]
    text = TEXT if len(shape) == 1 and family != "mlp" else None
    return models.build({**cfg, **extra}, input_shape=shape, task="classification",
                        num_classes=3, text=text)  # fmt: skip


def ids(n: int, t: int, pad: str = "none") -> torch.Tensor:
    """Token ids 1..V-1 with 3 pads at the start (left) or end (right) of the first rows."""
    x = torch.randint(1, V, (n, t), generator=torch.Generator().manual_seed(n * 100 + t))
    if pad == "left":
        x[: n // 2 + 1, :3] = 0
    elif pad == "right":
        x[: n // 2 + 1, -3:] = 0
    return x


def held_out(family: str) -> list[torch.Tensor]:
    """Batches unlike the export example (4 rows; 8 tokens for text)."""
    if family in ("mlp", "cnn"):
        g = torch.Generator().manual_seed(1)
        shape = TINY[family][1]
        return [torch.randn(3, *shape, generator=g), torch.randn(9, *shape, generator=g)]
    return [ids(3, 5), ids(7, 11), ids(2, 9, "left"), ids(5, 10, "right"), ids(1, 12, "right")]


def example(family: str) -> torch.Tensor:
    return ids(4, 8) if family not in ("mlp", "cnn") else torch.randn(4, *TINY[family][1])


def input_dims(path: Path) -> list[str | int]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = build("mlp")
    model.train()
    return model, export(model, "onnx", tmp_path_factory.mktemp("mlp"), torch.randn(4, 6))


# ----------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("family", ["cnn", "gpt"])
def test_onnx_matches_torch_on_unseen_batch_sizes_and_lengths(family: str, tmp_path: Path):
    model = build(family)
    path = export(model, "onnx", tmp_path, example(family))
    assert path == tmp_path / "model.onnx" and model.training  # the mode is restored
    result = parity(model, path, held_out(family), tolerance=1e-4)
    assert result["max_abs_diff"] < 1e-4 and result["argmax_agreement"] == 1.0
    assert result["inputs"] == len(held_out(family))
    assert input_dims(path) == (["batch", "sequence"] if family == "gpt" else ["batch", 1, 8, 8])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left


def test_onnx_mlp_parity_and_one_file(mlp_onnx):
    model, path = mlp_onnx
    result = parity(model, path, held_out("mlp"), tolerance=1e-4)
    assert result["max_abs_diff"] < 1e-4 and result["inputs"] == 2
    assert input_dims(path) == ["batch", 6]
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # weights inside
    assert model.training  # parity restores the mode too


def test_onnx_hf_bert_matches_on_padded_batches(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    ).save_pretrained(folder)  # fmt: skip
    torch.manual_seed(0)
    model = models.build({"type": "hf", "pretrained": str(folder)}, input_shape=[16],
                         task="classification", num_classes=3, text=TEXT, weights=False)  # fmt: skip
    path = export(model, "onnx", tmp_path / "out", ids(2, 6))
    result = parity(model, path, held_out("hf"), tolerance=1e-4)
    assert result["max_abs_diff"] < 1e-4 and result["argmax_agreement"] == 1.0
    assert input_dims(path) == ["batch", "sequence"]


def test_onnx_model_runs_like_the_torch_model(mlp_onnx):
    from danlu.models.onnx_runtime import OnnxModel

    model, path = mlp_onnx
    model.eval()
    ort = OnnxModel(path, threads=1)
    assert ort.eval().to("cpu") is ort and next(ort.parameters(), None) is None
    x = torch.randn(5, 6, dtype=torch.float64)  # cast to the graph's float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ort(x)
    assert out.dtype == torch.float32 and out.shape == (5, 3) and out.device == x.device
    with torch.no_grad():
        torch.testing.assert_close(out, model(x.float()), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match=r"shape \(5, 7\)"):
        ort(torch.randn(5, 7))


def test_onnx_model_missing_file(tmp_path: Path):
    from danlu.errors import CheckpointError
    from danlu.models.onnx_runtime import OnnxModel

    with pytest.raises(CheckpointError, match="not found"):
        OnnxModel(tmp_path / "nope.onnx")


# ----------------------------------------------------------------------------- int8


def test_quantize_onnx_is_smaller_and_keeps_the_predictions(tmp_path: Path):
    """A classifier trained on well-separated blobs has wide logit margins, so int8 noise
    (~1e-2 relative) should not flip its predictions; a random one's near-tied logits would."""
    torch.manual_seed(0)
    model = models.build({"type": "mlp", "hidden_sizes": [64, 64]}, input_shape=[8],
                         task="classification", num_classes=3)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 2
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 8, generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    fp32 = export(model, "onnx", tmp_path, x[:4])
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx")
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size  # 20 kB of weights → 5 kB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "model.onnx"]
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "MatMulInteger" in ops
    test = centers[y[:200]] + torch.randn(200, 8, generator=g)
    result = parity(model, int8, [test[:64], test[64:]], tolerance=float("inf"))
    assert result["argmax_agreement"] >= 0.9 and 0 < result["max_abs_diff"] < 1.0


# -------------------------------------------------------------- torchscript, safetensors


@pytest.mark.parametrize("family", ["rnn", "gpt"])
def test_torchscript_round_trip_takes_the_padded_path(family: str, tmp_path: Path):
    """Traced on an example WITHOUT padding, the file still masks pads in other batches."""
    model = build(family, **({"bidirectional": True} if family == "rnn" else {}))
    path = export(model, "torchscript", tmp_path, ids(4, 8))
    assert path.name == FILES["torchscript"]
    result = parity(model, path, held_out(family), tolerance=1e-5)
    assert result["max_abs_diff"] < 1e-5 and result["argmax_agreement"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.torchscript.pt"]


def test_safetensors_round_trip(tmp_path: Path):
    from safetensors.torch import load_file

    model = build("mlp")
    model.train()
    model(torch.randn(16, 6))  # BatchNorm statistics change: buffers must travel too
    path = export(model, "safetensors", tmp_path, torch.randn(2, 6))
    state = load_file(str(path))
    assert state.keys() == model.state_dict().keys()
    assert torch.equal(state["body.1.running_mean"], model.state_dict()["body.1.running_mean"])
    assert parity(model, path, held_out("mlp"), tolerance=0.0)["max_abs_diff"] == 0.0


# ------------------------------------------------------------------------------ errors


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_data_dependent_control_flow_names_the_line_and_torchscript(tmp_path: Path):
    (tmp_path / "model.onnx").write_bytes(b"an older export")
    with pytest.raises(ConfigError) as info:
        export(Branchy(), "onnx", tmp_path, torch.randn(2, 4))
    message = str(info.value)
    assert "data-dependent control flow `if x.sum() > 0:` (test_export.py:" in message
    assert "--format torchscript" in message and "\n" not in message
    assert info.value.__cause__ is not None  # the exporter's error, for --debug
    assert (tmp_path / "model.onnx").read_bytes() == b"an older export"  # left untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_unsupported_operator_is_named(tmp_path: Path):
    class Cummax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cummax(x, dim=1).values

    with pytest.raises(ConfigError, match=r"operator aten\.cummax has no ONNX translation.*torchscript"):  # fmt: skip
        export(Cummax(), "onnx", tmp_path, torch.randn(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_reports_the_max_difference(mlp_onnx, tmp_path: Path):
    model, path = mlp_onnx
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if t.name.endswith("head.bias"))
    values = onnx.numpy_helper.to_array(bias).copy()
    values[1] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(tmp_path / "model.onnx"))
    with pytest.raises(ConfigError, match=r"max abs diff 0\.5 > tolerance 0\.001 on 2 held-out"):
        parity(model, tmp_path / "model.onnx", held_out("mlp"))
    assert parity(model, tmp_path / "model.onnx", held_out("mlp"), tolerance=0.6)["inputs"] == 2


def test_unknown_format(tmp_path: Path):
    with pytest.raises(ConfigError, match="export format 'tflite' is not known"):
        export(build("mlp"), "tflite", tmp_path, torch.randn(2, 6))
