"""`danlu.generate` and `danlu generate` on real (tiny) runs: what comes out, streamed and
batched, with stop strings, and the one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import danlu
from danlu.cli import app
from danlu.data.tokenize import TextEncoder
from danlu.errors import ConfigError
from danlu.evaluate.run import load_model
from danlu.rundir import RunDir

TRAIN = {"batch_size": 16, "eval_every": 100, "log_every": 100, "tensorboard": False}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny character GPT that has learned 'abcabc...' text."""
    root = tmp_path_factory.mktemp("lm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join("abc " * 30 for _ in range(40)) + "\n")
    cfg = {
        "name": "abc",
        "runs_dir": str(root / "runs"),
        "data": {
            "dataset": str(corpus),
            "task": "language_modeling",
            "tokenizer": {"type": "char", "vocab_size": 32},
            "block_size": 24,
            "split": {"val": 0.1, "test": 0.0},
        },
        "model": {"type": "gpt", "num_layers": 1, "num_heads": 2, "dim": 32},
        "train": {"max_steps": 120, "optimizer": {"lr": 1.0e-2}, **TRAIN},
    }
    torch.manual_seed(0)
    return danlu.pretrain(cfg, show_progress=False).run.path


def test_greedy_continuation_follows_the_learned_pattern(lm_run: Path) -> None:
    (text,) = danlu.generate(lm_run, "abc ab", max_new_tokens=9, temperature=0)
    assert text == "c abc abc"


def test_the_api_equals_model_generate_on_the_same_tokens(lm_run: Path) -> None:
    model, _, spec, _ = load_model(RunDir.open(lm_run))
    encoder = TextEncoder.load(lm_run / "tokenizer.json")
    eos = spec.text["special_ids"]["eos"]
    ids = torch.tensor([[eos, *encoder.encode("ab")]])
    out = model.generate(ids, None, max_new_tokens=6, temperature=0)
    expected = encoder.decode(out[0, ids.shape[1] :].tolist())
    assert danlu.generate(lm_run, ["ab"], max_new_tokens=6, temperature=0) == [expected]


def test_batched_prompts_give_what_each_gives_alone(lm_run: Path) -> None:
    prompts = ["a", "abc abc ab", "c a"]
    batch = danlu.generate(lm_run, prompts, max_new_tokens=7, temperature=0)
    alone = [danlu.generate(lm_run, [p], max_new_tokens=7, temperature=0)[0] for p in prompts]
    assert batch == alone


def test_stop_strings_cut_and_streaming_joins_to_the_result(lm_run: Path) -> None:
    pieces: dict[int, list[str]] = {}
    texts = danlu.generate(
        lm_run,
        ["abc", "a"],
        max_new_tokens=20,
        temperature=0,
        stop=["c a"],
        stream=lambda row, piece: pieces.setdefault(row, []).append(piece),
    )
    assert texts == [" ab", "b"]  # cut before the first "c a"
    assert ["".join(pieces[i]) for i in (0, 1)] == texts


def test_sampling_is_reproducible_with_a_seed(lm_run: Path) -> None:
    opts = {"max_new_tokens": 12, "temperature": 1.5, "top_k": 5, "top_p": 0.9}
    a = danlu.generate(lm_run, ["ab"], seed=3, **opts)
    assert a == danlu.generate(lm_run, ["ab"], seed=3, **opts)
    assert len(a[0]) > 0


def test_generate_errors(lm_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"prompt 2 is empty"):
        danlu.generate(lm_run, ["ab", ""], max_new_tokens=3)
    with pytest.raises(ConfigError, match=r"max_new_tokens"):
        danlu.generate(lm_run, ["ab"], max_new_tokens=0)


def test_cli_streams_one_prompt_and_lists_a_batch(lm_run: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["generate", str(lm_run), "-p", "abc ab", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["generate", str(lm_run), "-p", "abc ab", "--max-new-tokens", "5", "--temperature", "0"],
    )
    assert r.exit_code == 0 and r.stdout.strip() == "abc abc abc"
    r = runner.invoke(
        app,
        [
            "generate",
            str(lm_run),
            "-p",
            "a",
            "-p",
            "c",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
        ],
    )
    lines = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout).strip().splitlines()
    assert r.exit_code == 0 and lines == ["#1 abc ", "#2 c ab"]
    r = runner.invoke(app, ["generate", str(lm_run), "-p", ""])
    assert r.exit_code == 2 and "prompt 1 is empty" in r.stderr and "Traceback" not in r.stderr


def test_a_classification_run_cannot_generate(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    rows = [f"{w} {i},{w}\n" for i, w in enumerate(["ab", "cd"] * 20)]
    csv.write_text("text,label\n" + "".join(rows))
    cfg = {
        "name": "cls",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"dataset": str(csv), "text": "text", "tokenizer": {"type": "char"}},
        "model": {"type": "gpt", "num_layers": 1, "num_heads": 2, "dim": 16},
        "train": {"max_steps": 2, **TRAIN},
    }
    run = danlu.train(cfg, show_progress=False).run
    with pytest.raises(ConfigError, match=r"danlu predict"):
        danlu.generate(run, ["ab"])


def test_a_seq2seq_run_translates_with_beams_from_the_cli(tmp_path: Path) -> None:
    cfg = {
        "name": "copy",
        "runs_dir": str(tmp_path / "runs"),
        "data": {
            "dataset": "copy-task",
            "tokenizer": {"type": "wordpiece", "vocab_size": 120, "max_length": 16},
            "max_samples": 3000,
            "max_eval_samples": 50,
        },
        "model": {"type": "seq2seq", "num_layers": 2, "num_heads": 4, "dim": 64, "dropout": 0},
        "train": {
            **TRAIN,
            "max_steps": 300,
            "batch_size": 32,
            "optimizer": {"lr": 3.0e-3},
            "schedule": {"name": "cosine", "warmup_steps": 30},
            "label_smoothing": 0.1,
            "eval_every": 300,
        },
    }
    run = danlu.pretrain(cfg, show_progress=False).run
    sentence = "the big dog saw a red bird"
    assert danlu.generate(run, [sentence], num_beams=3, max_new_tokens=16) == [sentence]
    r = CliRunner().invoke(app, ["generate", str(run), "-p", sentence, "--num-beams", "3"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == sentence
