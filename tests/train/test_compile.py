"""Precision (auto / fp16 with a grad scaler / lineage), train.compile and gradient
checkpointing for the Transformer families."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, tiny_gpt_config
from danlu import api, models
from danlu.data.loader import BatchLoader, Split
from danlu.device import grad_scaler, resolve_precision
from danlu.errors import ConfigError
from danlu.models.bert import BERT
from danlu.models.gpt import GPT
from danlu.models.mlp import MLP
from danlu.models.seq2seq import Seq2Seq
from danlu.rundir import RunDir
from danlu.train import loop
from danlu.train.objectives import Supervised, make_loss
from tiny_hf import tiny_bert  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ precision


def test_fp16_is_for_cuda_and_auto_picks_it_on_gpus_without_bf16(monkeypatch):
    with pytest.raises(ConfigError, match=r"train.precision: fp16 needs a CUDA GPU.*on cpu"):
        resolve_precision("fp16", CPU)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("fp16", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    assert grad_scaler(CPU, "bf16") is None and grad_scaler(CPU, "fp32") is None
    assert isinstance(grad_scaler(CPU, "fp16"), torch.amp.GradScaler)


def test_fp16_on_a_cpu_config_is_one_clear_error(blobs_csv):
    cfg = tiny_config(str(blobs_csv), data={"label": "kind"}, train={"precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU") as info:
        api.train(cfg)
    assert "bf16" in info.value.fix


def _fit(path: Path, max_steps: int, **kwargs):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.eye(3)[y].repeat(1, 2) * 2 + torch.randn(60, 6, generator=g)
    torch.manual_seed(0)
    model = MLP(6, [16], num_outputs=3, dropout=0.1)
    train = BatchLoader(Split(x, y, np.arange(60)), 8, order="shuffle", seed=0)
    objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", list("abc"))
    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    options = {"optimizer": {"name": "adam", "lr": 0.01}, "checkpoint_every": 10,
               "tensorboard": False, "show_progress": False, "device": "cpu", **kwargs}  # fmt: skip
    return model, loop.fit(model, objective, train, None, run, max_steps=max_steps, **options), run


def test_fp16_grad_scaler_state_is_checkpointed_and_resumed_exactly(tmp_path, monkeypatch):
    """fp16 runs on CUDA only; the scaler's bookkeeping is the same on CPU (torch.amp
    GradScaler("cpu") with fp16 autocast), which is what this test drives."""
    monkeypatch.setattr(loop, "resolve_precision", lambda precision, dev: "fp16")
    reference, result, run = _fit(tmp_path / "a", 30)
    assert result.precision == "fp16"
    state = json.loads((run.checkpoints / "step-30" / "state.json").read_text())
    assert state["scaler"]["scale"] == 65536.0 and state["scaler"]["_growth_tracker"] == 30

    _fit(tmp_path / "b", 20)
    model, result, run = _fit(tmp_path / "b", 30, resume=True)
    assert result.resumed_from == 20
    resumed = json.loads((run.checkpoints / "step-30" / "state.json").read_text())
    assert resumed["scaler"] == state["scaler"]  # the tracker went on from 20, not from 0
    expected = reference.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


def test_lineage_records_the_precision_auto_chose(blobs_csv):
    cfg = tiny_config(str(blobs_csv), data={"label": "kind"}, train={"precision": "auto"})
    result = api.train(cfg, ["train.epochs=1"])
    lineage = json.loads(result.run.lineage.read_text())
    assert lineage["precision"] == resolve_precision("auto", CPU) == result.fit.precision


# ------------------------------------------------------------------------------- compile


def test_train_compile_compiles_the_model_in_place(blobs_csv, monkeypatch):
    """The switch reaches fit, which compiles in place (nn.Module.compile): the state dict
    keeps its names. The real compilation runs in the slow test below."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    cfg = tiny_config(str(blobs_csv), data={"label": "kind"}, train={"compile": True})
    result = api.train(cfg, ["train.epochs=1"])
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "MLP"
    assert "_orig_mod" not in " ".join(load_file(str(result.run.weights)))


@pytest.mark.slow  # a cold torch.compile of a tiny MLP takes ~50 s on 2 CPU cores
def test_a_compiled_run_trains_and_saves_loadable_weights(blobs_csv):
    cfg = tiny_config(str(blobs_csv), data={"label": "kind"}, train={"compile": True})
    result = api.train(cfg, ["train.epochs=3"])
    history = [json.loads(x) for x in result.run.history.read_text().splitlines()]
    losses = [h["train_loss"] for h in history if h["split"] == "train"]
    assert losses[-1] < losses[0]
    weights = load_file(str(result.run.weights))
    assert not [k for k in weights if "_orig_mod" in k]
    metrics = api.evaluate(result.run, "val")  # a fresh, uncompiled model loads them (strict)
    assert metrics["accuracy"] > 0.8


# ------------------------------------------------------------------ gradient checkpointing


def _transformers() -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    ids = torch.randint(1, 20, (4, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    return {
        "gpt": (GPT(20, 16, num_layers=3, num_heads=2, dim=16, dropout=0.1), (ids,)),
        "bert": (BERT(20, 0, 16, 3, num_layers=3, num_heads=2, dim=16, dropout=0.1), (ids,)),
        "seq2seq": (
            Seq2Seq(20, 0, 16, num_layers=3, num_heads=2, dim=16, dropout=0.1),
            (ids, ids.roll(1, 1)),
        ),
    }


def _pass(model: torch.nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict, int]:
    """Loss, gradients, and the elements of the tensors autograd saved for backward."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both passes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*inputs).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved[0]


@pytest.mark.parametrize("family", ["gpt", "bert", "seq2seq"])
def test_gradient_checkpointing_same_loss_and_gradients_fewer_saved_tensors(family):
    model, inputs = _transformers()[family]
    model.train()
    loss, grads, saved = _pass(model, inputs)
    models.enable_gradient_checkpointing(model, family)
    assert model.gradient_checkpointing
    loss_ckpt, grads_ckpt, saved_ckpt = _pass(model, inputs)
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ckpt[name], rtol=1e-5, atol=1e-7), name
    assert saved_ckpt < saved / 2, (saved_ckpt, saved)
    with torch.no_grad():  # inference never checkpoints
        torch.manual_seed(1)
        model.eval()
        assert model(*inputs).shape[0] == 4


def test_gradient_checkpointing_of_a_hugging_face_model(tiny_bert):  # noqa: F811
    from danlu.models.hf import HFModel

    torch.manual_seed(0)
    model = HFModel(
        str(tiny_bert), task="classification", num_outputs=3, vocab_size=30522, pad_id=0
    )
    model.train()
    ids = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(0))
    loss, grads, saved = _pass(model, (ids,))
    models.enable_gradient_checkpointing(model, "hf")
    flag = getattr(type(model.net), "is_activation_checkpointing", None)
    assert model.net.is_activation_checkpointing if flag else model.net.is_gradient_checkpointing
    loss_ckpt, grads_ckpt, saved_ckpt = _pass(model, (ids,))
    assert torch.allclose(loss, loss_ckpt)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ckpt[name], rtol=1e-4, atol=1e-6), name
    assert saved_ckpt < saved


@pytest.mark.parametrize("family", ["mlp", "cnn", "rnn"])
def test_gradient_checkpointing_is_refused_for_models_without_layers(family):
    model = MLP(4, [8], num_outputs=2)
    with pytest.raises(
        ConfigError, match=f"works with Transformer models, not model.type: {family}"
    ):
        models.enable_gradient_checkpointing(model, family)


def test_gradient_checkpointing_refused_before_the_run_exists(blobs_csv, tmp_path):
    cfg = tiny_config(
        str(blobs_csv), data={"label": "kind"}, train={"gradient_checkpointing": True}
    )
    with pytest.raises(ConfigError, match=r"not model\.type: mlp"):
        api.train(cfg, run_dir=tmp_path / "R")
    assert not (tmp_path / "R").exists()


def test_a_checkpointed_gpt_run_trains_like_a_plain_one(tmp_path, monkeypatch):
    import torch.utils.checkpoint as tuc

    plain = api.train(tiny_gpt_config(tmp_path, 12, dropout=0.1), run_dir=tmp_path / "a")
    calls, real = [], tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt = api.train(
        tiny_gpt_config(tmp_path, 12, dropout=0.1),
        ["train.gradient_checkpointing=true"],
        run_dir=tmp_path / "b",
    )
    assert len(calls) >= 12  # each training forward went through the checkpointed layer
    a, b = load_file(str(plain.run.weights)), load_file(str(ckpt.run.weights))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
