"""Pretraining through the one fit, and fine-tuning from a pretraining run (model.init_from).

Tiny models on tiny corpora the tests write: these check wiring, files and error messages;
the model files' own tests check the mathematics.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

import danlu
from danlu.errors import ConfigError, DataError
from danlu.evaluate.streaming import TokenMetrics
from danlu.rundir import RunDir

WORDS = [
    *["in", "the", "beginning", "god", "created", "the", "heavens", "and"],
    *["the", "earth", ".", "the", "earth", "was", "formless"],
]
TRAIN = {
    "optimizer": {"lr": 5.0e-3},
    "batch_size": 8,
    "eval_every": 20,
    "log_every": 20,
    "tensorboard": False,
}


def write_corpus(folder: Path, docs: int = 12, words: int = 200) -> Path:
    rng = random.Random(0)
    folder.mkdir(exist_ok=True)
    for d in range(docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (folder / f"doc{d}.txt").write_text(text + "\n")
    return folder


def lm_config(family: str, **model: Any) -> dict[str, Any]:
    sizes = {"hidden_size": 32} if family == "rnn" else {"num_heads": 2}
    return {
        "name": f"tiny_{family}",
        "data": {
            "dataset": str(write_corpus(Path("corpus"))),
            "task": "language_modeling",
            "tokenizer": {"type": "char", "vocab_size": 64},
            "block_size": 32,
            "split": {"val": 0.1, "test": 0.0},
        },
        "model": {"type": family, "num_layers": 1, "dim": 32, **sizes, **model},
        "train": {"max_steps": 40, **TRAIN},
    }


def labelled_csv(path: Path, n: int = 200) -> Path:
    rng = random.Random(1)
    rows = ["text,label"]
    for i in range(n):
        label = "god" if i % 2 else "earth"
        rows.append(f"{label} {' '.join(rng.choice(WORDS) for _ in range(8))},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("family", ["gpt", "rnn"])
def test_causal_lm_pretraining_writes_a_reusable_run(family: str) -> None:
    torch.manual_seed(0)
    result = danlu.pretrain(lm_config(family), show_progress=False)
    run = result.run
    for name in ("config.yaml", "tokenizer.json", "model.safetensors", "preprocess.json"):
        assert (run.path / name).is_file(), name
    history = [line for line in run.history.read_text().splitlines() if "val_loss" in line]
    assert len(history) == 2 and "val_perplexity" in history[-1]
    metrics = danlu.evaluate(run, "val")
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item())
    assert metrics["loss"] < 2.6  # uniform over the ~20 characters would be ln 20 ≈ 3.0
    assert metrics["count"] > 100  # scored per token


def test_masked_lm_pretraining_and_its_metrics() -> None:
    cfg = lm_config("bert")
    # lowercase: the saved tokenizer must not be lowercased twice when the run is evaluated
    cfg["data"]["tokenizer"] = {
        "type": "wordpiece",
        "vocab_size": 40,
        "min_frequency": 1,
        "lowercase": True,
    }
    result = danlu.pretrain(cfg, show_progress=False)
    assert result.config.train.objective == "auto"
    first = danlu.evaluate(result.run, "val")
    again = danlu.evaluate(result.run, "val")
    assert first["loss"] == again["loss"]  # the same masked positions at every evaluation
    # ~15 % of the validation tokens are predicted
    val_tokens = result.run.read("data_card.json")["sizes"]["val"]
    assert 0.08 * val_tokens < first["count"] < 0.25 * val_tokens


def test_fine_tune_from_a_pretraining_run_inherits_architecture_and_tokenizer() -> None:
    pre = danlu.pretrain(lm_config("gpt", dim=48), show_progress=False).run
    cfg = {
        "name": "tuned",
        "data": {"dataset": str(labelled_csv(Path("labels.csv"))), "text": "text"},
        "model": {"type": "gpt", "init_from": str(pre.path)},
        "train": {**TRAIN, "max_steps": 60, "optimizer": {"lr": 2.0e-3}},
    }
    tuned = danlu.train(cfg, show_progress=False)
    saved = tuned.run.load_config()
    assert saved.model.dim == 48 and saved.model.num_heads == 2  # from the pretraining run
    assert saved.model.context == 32  # the pretraining block size: positions keep their size
    assert saved.data.tokenizer.type == "file"
    assert tuned.run.tokenizer.read_text() == pre.tokenizer.read_text()
    assert danlu.evaluate(tuned.run, "val")["accuracy"] >= 0.75  # the label word is in the text
    preds = danlu.predict(tuned.run, ["god and the earth was", "earth the heavens god"])
    assert list(preds.columns) == ["text", "label", "confidence", "prob_earth", "prob_god"]
    assert preds["confidence"].between(0.5, 1).all()
    csv = Path("new.csv")
    csv.write_text("text\ngod the earth\n")
    assert len(danlu.predict(tuned.run, str(csv))) == 1
    with pytest.raises(DataError, match=r"run '.*' is a language_modeling model"):
        danlu.predict(pre, "in the beginning")


def test_lora_fine_tune_of_a_pretraining_run_then_merge() -> None:
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from danlu.merge import merge

    pre = danlu.pretrain(lm_config("gpt", dim=32), show_progress=False).run
    cfg = {
        "name": "tuned_lora",
        "data": {"dataset": str(labelled_csv(Path("labels.csv"))), "text": "text"},
        "model": {"type": "gpt", "init_from": str(pre.path),
                  "lora": {"rank": 4, "target": ["attn\\.qkv", "mlp"]}},
        "train": {**TRAIN, "max_steps": 30, "optimizer": {"lr": 1.0e-2}},
    }  # fmt: skip
    run = danlu.train(cfg, show_progress=False).run
    base, tuned = load_file(str(pre.weights)), load_file(str(run.weights))
    for k, v in base.items():  # the pretrained weights are untouched
        name = f"base_model.model.{k}"
        name = name if name in tuned else name.replace(".weight", ".base_layer.weight")
        name = name if name in tuned else name.replace(".bias", ".base_layer.bias")
        assert torch.equal(tuned[name], v), k
    assert sum(".lora_" in k for k in tuned) == 3 * 2  # 1 layer: qkv, mlp.up, mlp.down × A, B
    result = merge(run)
    assert result.max_difference <= 1e-4
    assert danlu.evaluate(result.run, "val")["accuracy"] == danlu.evaluate(run, "val")["accuracy"]


def test_init_from_errors_name_the_key() -> None:
    pre = danlu.pretrain(lm_config("rnn"), show_progress=False).run
    base = {
        "name": "tuned",
        "data": {"dataset": str(labelled_csv(Path("labels.csv"))), "text": "text"},
        "train": {"max_steps": 2, **TRAIN},
    }
    with pytest.raises(ConfigError, match=r"init_from points at a rnn run, but model.type is gpt"):
        danlu.train({**base, "model": {"type": "gpt", "init_from": str(pre.path)}})
    with pytest.raises(ConfigError, match=r"model.init_from: nowhere is not a finished danlu run"):
        danlu.train({**base, "model": {"type": "rnn", "init_from": "nowhere"}})
    other = {**base["data"], "tokenizer": {"type": "wordpiece", "vocab_size": 40}}
    with pytest.raises(ConfigError, match=r"another vocabulary"):
        danlu.train({**base, "data": other, "model": {"type": "rnn", "init_from": str(pre.path)}})


def test_pretrain_refuses_a_classification_config_and_text_models_need_text() -> None:
    csv = str(labelled_csv(Path("labels.csv")))
    cfg = {"data": {"dataset": csv, "text": "text"}, "model": {"type": "gpt"}}
    with pytest.raises(ConfigError, match=r"danlu pretrain needs a language-modelling or seq2seq"):
        danlu.pretrain(cfg)
    with pytest.raises(
        ConfigError, match=r"model.type: mlp reads numbers or pixels, not token ids"
    ):
        danlu.train({**lm_config("gpt"), "model": {"type": "mlp"}})
    with pytest.raises(ConfigError, match=r"train.objective: masked_lm does not fit"):
        danlu.train({**lm_config("gpt"), "train": {"objective": "masked_lm", **TRAIN}})
    with pytest.raises(ConfigError, match=r"model.num_heads: 3 does not divide model.dim: 32"):
        danlu.pretrain(lm_config("gpt", num_heads=3))


def test_seq2seq_pretraining_scores_generations(tmp_path: Path) -> None:
    cfg = {
        "name": "copy",
        "data": {
            "dataset": "copy-task",
            "tokenizer": {"type": "wordpiece", "vocab_size": 64, "max_length": 16},
            "max_samples": 400,
            "max_eval_samples": 40,
        },
        "model": {"type": "seq2seq", "num_layers": 1, "num_heads": 2, "dim": 32},
        "train": {"max_steps": 20, **TRAIN},
    }
    run = danlu.pretrain(cfg, show_progress=False).run
    metrics = danlu.evaluate(run)
    assert metrics["generated"] == 40
    assert {"exact_match", "bleu", "chrf", "loss", "perplexity"} <= set(metrics)
    assert 0 <= metrics["exact_match"] <= 1 and len(metrics["examples"]) == 20


def test_token_metrics_equal_cross_entropy_and_skip_ignored() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :2] = -100
    acc = TokenMetrics()
    acc.update(logits[:1], targets[:1])
    acc.update(logits[1:], targets[1:])
    m = acc.compute()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert m["count"] == 8 and m["loss"] == pytest.approx(float(ce), rel=1e-5)
    valid = targets != -100
    hits = (logits.argmax(-1) == targets)[valid].float().mean()
    assert m["accuracy"] == pytest.approx(float(hits))


def test_run_dir_of_pretraining_has_lineage() -> None:
    run: RunDir = danlu.pretrain(lm_config("gpt"), show_progress=False).run
    lineage = run.read("lineage.json")
    assert lineage["status"] == "completed" and lineage["parameters"] > 0
