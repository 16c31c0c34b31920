"""Fine-tuning strategies through the one fit: freezing, LoRA (only adapters train), merge
parity, layer-wise and head learning rates, on HF and danlu-native models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import danlu
from danlu.errors import CheckpointError, ConfigError
from danlu.merge import merge
from danlu.models import finetune
from tiny_hf import classify, tiny_bert, topics_csv  # noqa: F401  (fixtures)


def pretrained_state(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint (a bare BertModel) under the names it has inside an HFModel."""
    return {f"net.bert.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}


def trained(cfg: dict, tmp_path: Path, name: str = "run"):
    return danlu.train(cfg, run_dir=tmp_path / name, show_progress=False).run


def test_freeze_embeddings_and_first_layer_keep_their_values(tiny_bert: Path, tmp_path: Path):
    cfg = classify(
        tiny_bert, topics_csv(tmp_path / "t.csv"), freeze={"embeddings": True, "layers": 1}
    )
    run = trained(cfg, tmp_path)
    before, after = pretrained_state(tiny_bert), load_file(str(run.weights))
    frozen = [
        k for k in after if k.startswith(("net.bert.embeddings.", "net.bert.encoder.layer.0."))
    ]
    assert len(frozen) == 21  # 5 embedding + 16 layer-0 tensors
    for k in frozen:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["net.bert.encoder.layer.1.output.dense.weight"],
                           before["net.bert.encoder.layer.1.output.dense.weight"])  # fmt: skip
    lineage = run.read("lineage.json")
    assert lineage["trainable_parameters"] < lineage["parameters"]


def test_freeze_backbone_trains_only_the_head(tiny_bert: Path, tmp_path: Path):
    run = trained(
        classify(tiny_bert, topics_csv(tmp_path / "t.csv"), freeze={"backbone": True}), tmp_path
    )
    before, after = pretrained_state(tiny_bert), load_file(str(run.weights))
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert changed == set()
    assert run.read("lineage.json")["trainable_parameters"] == 32 * 3 + 3


def test_lora_trains_only_adapters_and_head_then_merges_within_tolerance(
    tiny_bert: Path, tmp_path: Path
):
    cfg = classify(
        tiny_bert, topics_csv(tmp_path / "t.csv"), lora={"rank": 4, "target": ["query", "value"]}
    )
    run = trained(cfg, tmp_path)
    after = load_file(str(run.weights))
    before = pretrained_state(tiny_bert)
    lora = [k for k in after if ".lora_" in k]
    assert len(lora) == 2 * 2 * 2  # 2 layers × (query, value) × (A, B)
    for k, v in after.items():
        base = k.replace("base_model.model.", "").replace(".base_layer", "")
        if base in before:  # every pretrained weight is untouched
            assert torch.equal(v, before[base]), k
    assert any(not torch.all(after[k] == 0) for k in lora if "lora_B" in k)  # B starts at zero
    trainable = run.read("lineage.json")["trainable_parameters"]
    assert trainable == 2 * 2 * 4 * (32 + 32) + (32 * 3 + 3)

    result = merge(run)
    assert result.max_difference <= 1e-4 and result.inputs == 24
    merged = load_file(str(result.run.weights))
    assert not any("lora" in k for k in merged) and "net.classifier.weight" in merged
    assert result.run.load_config().model.lora is None
    assert result.run.read("lineage.json")["merged"]["max_difference"] == result.max_difference
    a, b = danlu.evaluate(run), danlu.evaluate(result.run)
    assert a["accuracy"] == b["accuracy"] and abs(a["log_loss"] - b["log_loss"]) < 1e-4


def test_merge_refuses_when_outputs_differ_and_saves_nothing(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run = trained(classify(tiny_bert, topics_csv(tmp_path / "t.csv"), lora={"rank": 2}), tmp_path)
    real = finetune.merge

    def broken(model):  # a merge that corrupts one weight
        merged = real(model)
        with torch.no_grad():
            merged.net.classifier.weight.add_(0.01)
        return merged

    monkeypatch.setattr(finetune, "merge", broken)
    with pytest.raises(
        CheckpointError, match=r"differ from the adapter model's by .* nothing was saved"
    ):
        merge(run)
    assert not (tmp_path / "run-merged").exists()
    assert not list(tmp_path.glob(".run-merged.tmp-*"))


def test_merge_cli_and_a_run_without_lora(tiny_bert: Path, tmp_path: Path):
    from danlu.cli import app

    plain = trained(classify(tiny_bert, topics_csv(tmp_path / "t.csv")), tmp_path, "plain")
    result = CliRunner().invoke(app, ["merge", str(plain.path)])
    assert result.exit_code == 2 and "has no LoRA adapters to merge" in result.output


def test_lora_target_that_matches_nothing_lists_the_modules(tiny_bert: Path, tmp_path: Path):
    cfg = classify(tiny_bert, topics_csv(tmp_path / "t.csv"), lora={"target": ["q_proj"]})
    with pytest.raises(ConfigError) as e:
        trained(cfg, tmp_path)
    msg = str(e.value)
    assert "model.lora.target: ['q_proj'] matches no linear module; the model has:" in msg
    assert "net.bert.encoder.layer.N.attention.self.query" in msg


def test_layer_decay_and_head_lr_groups(tiny_bert: Path):
    from danlu.models.hf import HFModel

    model = HFModel(
        str(tiny_bert), task="classification", num_outputs=3, vocab_size=30522, pad_id=0
    )
    groups = finetune.param_groups(model, lr=1e-3, weight_decay=0.01, layer_decay=0.5, head_lr=0.1)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["net.classifier.weight"])] == 0.1
    assert rate[id(named["net.bert.pooler.dense.weight"])] == 1e-3  # above the stack: full lr
    assert rate[id(named["net.bert.encoder.layer.1.attention.self.query.weight"])] == 1e-3 * 0.5
    assert rate[id(named["net.bert.encoder.layer.0.attention.self.query.weight"])] == 1e-3 * 0.25
    assert rate[id(named["net.bert.embeddings.word_embeddings.weight"])] == 1e-3 * 0.125
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(named["net.bert.embeddings.LayerNorm.weight"])] == 0.0
    assert decay[id(named["net.classifier.weight"])] == 0.01


def test_native_gpt_layout_freeze_and_lora(tmp_path: Path):
    from danlu.models.gpt import GPT

    model = GPT(vocab_size=40, context=16, num_layers=3, num_heads=2, dim=16, num_outputs=2)
    layout = finetune.Layout.of(model)
    assert layout.stack == "blocks" and len(layout.layers) == 3
    assert layout.embeddings == ["tok_emb.weight", "pos_emb.weight"]
    assert layout.head == ["head.out.weight", "head.out.bias"]
    assert layout.top == ["norm.weight", "norm.bias"]
    frozen = finetune.freeze(model, {"layers": 2})
    assert all(k.startswith(("blocks.0.", "blocks.1.")) for k in frozen) and frozen
    with pytest.raises(ConfigError, match=r"freeze\.layers: 4 but the model has 3 layers"):
        finetune.freeze(model, {"layers": 4})
    wrapped = finetune.add_lora(GPT(vocab_size=40, context=16, num_layers=2, num_heads=2, dim=16,
                                    num_outputs=2), {"rank": 2, "alpha": 4, "dropout": 0.0,
                                                     "target": ["qkv"]})  # fmt: skip
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {
        *(f"base_model.model.blocks.{i}.attn.qkv.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"),
        "base_model.model.head.out.weight", "base_model.model.head.out.bias",
    }  # fmt: skip
    assert wrapped(torch.randint(1, 40, (2, 8))).shape == (2, 2)


def test_lora_over_an_int8_base_trains_saves_only_what_it_trained(tiny_bert: Path, tmp_path: Path):
    pytest.importorskip("torchao")
    lora = {"rank": 4, "target": ["query", "value"], "quantize": "int8"}
    run = trained(classify(tiny_bert, topics_csv(tmp_path / "t.csv"), lora=lora), tmp_path)
    saved = load_file(str(run.weights))
    assert not any(k.endswith("query.base_layer.weight") for k in saved)  # rebuilt from int8
    assert any(k.endswith("query.lora_A.default.weight") for k in saved)
    assert "base_model.model.net.bert.encoder.layer.0.output.dense.weight" in saved  # not int8
    import json

    evals = [json.loads(line) for line in run.history.read_text().splitlines()]
    recorded = min(e["val_loss"] for e in evals if "val_loss" in e)  # the best = saved weights
    # the reloaded run (int8 base rebuilt from the checkpoint + saved adapters) scores the same
    assert danlu.evaluate(run, "val")["log_loss"] == pytest.approx(recorded, abs=1e-5)
    with pytest.raises(ConfigError, match="adapts an int8 base"):
        merge(run)
