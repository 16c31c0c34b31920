"""Labelled texts and parallel pairs become padded token ids with a tokenizer fit on train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from danlu.data import build
from danlu.errors import DataError

WORDS = {
    "sport": ["match", "goal", "team", "score", "league", "coach"],
    "food": ["bread", "soup", "salt", "cheese", "apple", "onion"],
    "tech": ["chip", "code", "robot", "laptop", "server", "cable"],
}


def _texts_csv(tmp_path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    rows = ["text,topic"]
    labels = list(WORDS)
    for i in range(n):
        topic = labels[i % 3]
        words = rng.choice(WORDS[topic], size=rng.integers(3, 9))
        rows.append(f"{' '.join(words)},{topic}")
    path = tmp_path / "texts.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


TOKENIZER = {"type": "wordpiece", "vocab_size": 120, "min_frequency": 1, "max_length": 16}


def test_texts_become_padded_ids_with_labels(tmp_path: Path) -> None:
    bundle = build(
        dataset=str(_texts_csv(tmp_path)),
        text="text",
        label="topic",
        tokenizer=TOKENIZER,
        split={"val": 0.2, "test": 0.2},
        seed=0,
    )
    spec = bundle.spec
    assert spec.input == "text" and spec.task == "classification"
    assert spec.class_names == ["food", "sport", "tech"]
    sizes = {k: len(s) for k, s in bundle.splits.items()}
    assert sizes == {"train": 36, "val": 12, "test": 12}
    width = spec.input_shape[0]
    pad = spec.text["pad_id"]
    for s in bundle.splits.values():
        assert s.x.dtype == torch.int64 and s.x.shape[1] == width <= 16
        lengths = (s.x != pad).sum(dim=1)
        assert torch.all(lengths >= 3)  # at least the words (plus specials)
    # the stored ids decode back to the original words
    first = bundle.splits["train"]
    row = int(first.index[0])
    original = _texts_csv(tmp_path).read_text().splitlines()[row + 1].split(",")[0]
    assert bundle.encoder.tokenizer.decode(first.x[0].tolist()) == original
    assert spec.text["vocab_size"] == bundle.encoder.vocab_size
    assert bundle.card["input"] == "text" and bundle.card["text"]["train"]["max"] >= 3


def test_long_texts_are_truncated_and_the_card_says_how_many(tmp_path: Path) -> None:
    bundle = build(
        dataset=str(_texts_csv(tmp_path)),
        text="text",
        label="topic",
        tokenizer={**TOKENIZER, "max_length": 5},
        seed=0,
    )
    assert bundle.spec.input_shape == [5]
    stats = bundle.card["text"]["train"]
    assert stats["truncated_share"] > 0.5
    assert any("get truncated" in f["message"] for f in bundle.card["findings"])


def test_truncation_error_names_the_example(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="example"):
        build(
            dataset=str(_texts_csv(tmp_path)),
            text="text",
            label="topic",
            tokenizer={**TOKENIZER, "max_length": 4, "truncation": "error"},
            seed=0,
        )


def test_the_tokenizer_is_trained_on_the_training_split_only(tmp_path: Path) -> None:
    path = _texts_csv(tmp_path, 45)
    lines = path.read_text().splitlines()
    # give every row a word of its own (no word is a prefix of another): row 7 says "u007z"
    lines = [lines[0]] + [
        f"{text} u{i:03d}z,{label}"
        for i, (text, label) in enumerate(line.rsplit(",", 1) for line in lines[1:])
    ]
    path.write_text("\n".join(lines) + "\n")
    bundle = build(
        dataset=str(path),
        text="text",
        label="topic",
        tokenizer={**TOKENIZER, "vocab_size": 2000},
        split={"val": 0.2, "test": 0.2},
        seed=0,
    )
    vocab = bundle.encoder.tokenizer.get_vocab()
    assert all(f"u{i:03d}z" in vocab for i in bundle.splits["train"].index)
    held_out = [*bundle.splits["val"].index, *bundle.splits["test"].index]
    assert held_out and not any(f"u{i:03d}z" in vocab for i in held_out)


def test_text_augmentation_reaches_training_batches(tmp_path: Path) -> None:
    from danlu.config import AugmentConfig

    augment = AugmentConfig(token_delete=0.3, token_mask=0.3).model_dump()
    bundle = build(
        dataset=str(_texts_csv(tmp_path)),
        text="text",
        label="topic",
        tokenizer=TOKENIZER,
        augment=augment,
        seed=0,
    )
    train = bundle.loader("train", 16, order="shuffle", train=True)
    plain = bundle.loader("train", 16, order="shuffle")
    a, b = next(train.epoch(0)), next(plain.epoch(0))
    assert len(a.x) == len(b.x) and a.x.shape[1] <= b.x.shape[1]  # deletions shorten rows
    padded = torch.nn.functional.pad(a.x, (0, b.x.shape[1] - a.x.shape[1]), value=0)
    assert not torch.equal(padded, b.x)
    assert torch.equal(a.x, next(train.epoch(0)).x)  # seeded


def test_pairs_give_source_and_target_ids(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"source": f"one two {w}", "target": f"uno dos {w}"} for w in "abcdefghijklmnopqrst"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bundle = build(
        dataset=str(path),
        task="seq2seq",
        text="source",
        target="target",
        tokenizer={"type": "char", "vocab_size": 64, "max_length": 32},
        split={"val": 0.1, "test": 0.1},
        seed=0,
    )
    assert bundle.spec.task == "seq2seq"
    train = bundle.splits["train"]
    assert len(train) == 16 and train.x.shape[0] == train.y.shape[0]
    i = int(train.index[0])
    decode = bundle.encoder.tokenizer.decode
    assert decode(train.x[0].tolist()).replace(" ", "") == rows[i]["source"].replace(" ", "")
    assert decode(train.y[0].tolist()).replace(" ", "") == rows[i]["target"].replace(" ", "")


def test_text_runs_need_a_sequence_model(tmp_path: Path) -> None:
    from conftest import tiny_config
    from danlu.api import train
    from danlu.errors import ConfigError

    cfg = tiny_config(str(_texts_csv(tmp_path)), data={"text": "text", "label": "topic"})
    with pytest.raises(ConfigError, match="not token ids"):
        train(cfg, run_dir=tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_a_corpus_becomes_blocks_with_the_last_tokens_held_out(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    for f in range(3):
        paragraphs = [" ".join(rng.choice(words, size=12)) for _ in range(20)]
        (folder / f"part{f}.txt").write_text("\n\n".join(paragraphs) + "\n")
    bundle = build(
        dataset=str(folder),
        task="language_modeling",
        block_size=16,
        tokenizer={"type": "char", "vocab_size": 64},
        split={"val": 0.1, "test": 0},
        cache_dir=str(tmp_path / "cache"),
        seed=0,
    )
    sizes = bundle.card["sizes"]
    total = sizes["train"] + sizes["val"]
    assert sizes["test"] == 0 and abs(sizes["val"] - round(0.1 * total)) <= 1
    assert bundle.splits["val"].start == sizes["train"]  # the tail of the corpus
    assert bundle.spec.task == "language_modeling" and bundle.spec.text["block_size"] == 16
    train = bundle.loader("train", 4, train=True, seed=0)
    batch = next(train.epoch(0))
    assert batch.x.shape == batch.y.shape == (4, 16)
    assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])  # targets are inputs shifted by one
    assert torch.equal(next(train.epoch(0)).x, batch.x)  # a pure function of (seed, epoch)
    val = bundle.loader("val", 4)
    seen = sum(int((b.y != -100).sum()) for b in val.epoch(0))
    assert seen == sizes["val"] - 1  # every held-out token after the first is a target once
    text = bundle.encoder.tokenizer.decode(batch.x[0].tolist())
    assert set(text.replace(" ", "")) <= set("".join(words)) | {"[", "]", "E", "O", "S"}
    # a second build reads the token cache instead of tokenizing again
    again = build(
        dataset=str(folder),
        task="language_modeling",
        block_size=16,
        tokenizer={"type": "char", "vocab_size": 64},
        split={"val": 0.1, "test": 0},
        cache_dir=str(tmp_path / "cache"),
        seed=0,
    )
    assert again.card["text"]["token_cache"] == bundle.card["text"]["token_cache"]
    assert again.content_hash == bundle.content_hash
