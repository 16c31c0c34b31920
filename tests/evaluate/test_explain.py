"""`danlu explain`: attributions that find what a tiny model was trained to look at, attention
maps that agree with the modules' own outputs, the HTML and JSON, the CLI, and bad inputs.

The sanity tests train tiny seeded runs on tasks whose label depends on one known feature or
token (x3's sign, a bright quadrant, the word "zebra", a copied letter) and check that the
attribution ranks it first.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import danlu
from conftest import tiny_config, write_idx
from danlu.api_explain import explain
from danlu.cli import app
from danlu.errors import ConfigError, DataError
from danlu.evaluate.explain_attention import attention_maps
from danlu.evaluate.explain_html import render
from danlu.models import gpt, layers
from danlu.models.bert import BERT
from danlu.models.gpt import GPT
from danlu.models.seq2seq import Seq2Seq
from danlu.serve.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = {"batch_size": 16, "tensorboard": False, "precision": "fp32", "log_every": 1000}
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "red", "blue", "green", "big", "small"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    """A folder for the module's runs, with its own cache (module fixtures run before the
    per-test isolation)."""
    folder = tmp_path_factory.mktemp("explain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DANLU_CACHE", str(folder / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield folder


@pytest.fixture(scope="module")
def table_run(root: Path) -> Path:
    """label = x3 > 0; x1, x2, x4 and a categorical column are noise."""
    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame({f"x{i}": rng.normal(size=n) for i in (1, 2, 3, 4)})
    frame["colour"] = rng.choice(["red", "green", "blue"], n)
    frame["y"] = np.where(frame.x3 > 0, "pos", "neg")
    frame.to_csv(root / "table.csv", index=False)
    cfg = tiny_config(str(root / "table.csv"), data={"label": "y"}, train={"epochs": 20})
    return danlu.train(cfg, run_dir=root / "table", show_progress=False).run.path


def quadrant_image(bright: str, seed: int) -> np.ndarray:
    """8×8 noise with one bright 4×4 quadrant: tl (top left) or br (bottom right)."""
    img = np.random.default_rng(seed).integers(0, 60, (8, 8)).astype(np.uint8)
    rows, cols = (slice(0, 4), slice(0, 4)) if bright == "tl" else (slice(4, 8), slice(4, 8))
    img[rows, cols] = 250
    return img


@pytest.fixture(scope="module")
def image_run(root: Path) -> Path:
    """Class 1: the top-left quadrant is bright; class 0: the bottom-right one."""
    folder = root / "idx"
    folder.mkdir()
    images = np.stack([quadrant_image("tl" if i % 2 else "br", i) for i in range(200)])
    labels = np.arange(200) % 2
    write_idx(folder / "train-images-idx3-ubyte.gz", images[:150])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:150])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[150:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[150:])
    cfg = tiny_config(str(folder), train={"epochs": 5})
    cfg["model"] = {"type": "cnn", "channels": [8], "head_sizes": [16]}
    return danlu.train(cfg, run_dir=root / "image", show_progress=False).run.path


def text_csv(path: Path) -> Path:
    """label yes ⇔ the text contains "zebra"; the other words are noise."""
    rng = random.Random(0)
    rows = []
    for i in range(240):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), "zebra")
        rows.append({"text": " ".join(words), "label": "yes" if i % 2 else "no"})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def text_runs(root: Path) -> dict[str, Path]:
    data = text_csv(root / "texts.csv")
    runs = {}
    for family in ("rnn", "bert"):
        sizes = {"hidden_size": 32} if family == "rnn" else {"num_heads": 2}
        cfg = {
            "seed": 0,
            "data": {"dataset": str(data), "text": "text", "label": "label",
                     "tokenizer": {"type": "wordpiece", "vocab_size": 60, "min_frequency": 1}},
            "model": {"type": family, "num_layers": 1, "dim": 32, **sizes},
            "train": {**TRAIN, "epochs": 6, "optimizer": {"lr": 5e-3}},
        }  # fmt: skip
        runs[family] = danlu.train(cfg, run_dir=root / family, show_progress=False).run.path
    return runs


def copy_corpus(path: Path, lines: int = 600, seed: int = 0) -> Path:
    """Lines of five random letters a-h with one of X, Y, Z at a random place, then '=' and
    that capital again: 'abXcde=X'. The token after '=' copies one prompt token."""
    path.write_text("\n".join(copy_line(random.Random(seed + i)) for i in range(lines)) + "\n")
    return path


def copy_line(rng: random.Random) -> str:
    letters = [rng.choice("abcdefgh") for _ in range(5)]
    letters.insert(rng.randrange(6), rng.choice("XYZ"))
    return "".join(letters) + "=" + next(c for c in letters if c.isupper())


def lm_config(corpus: Path, family: str, steps: int) -> dict:
    sizes = {"hidden_size": 64} if family == "rnn" else {"num_heads": 2}
    return {
        "seed": 0,
        "data": {"dataset": str(corpus), "task": "language_modeling",
                 "tokenizer": {"type": "char", "vocab_size": 32}, "block_size": 24,
                 "split": {"val": 0.1, "test": 0.0}},
        "model": {"type": family, "num_layers": 1, "dim": 32, **sizes},
        "train": {**TRAIN, "max_steps": steps, "eval_every": 1000, "optimizer": {"lr": 1e-2}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def copy_lm(root: Path) -> Path:
    """An LSTM language model that has learned to copy the capital after '='."""
    cfg = lm_config(copy_corpus(root / "copy.txt"), "rnn", 1000)
    return danlu.pretrain(cfg, run_dir=root / "copy_lm", show_progress=False).run.path


@pytest.fixture(scope="module")
def gpt_lm(root: Path) -> Path:
    """A barely trained GPT language model (for shapes, not for what it learned)."""
    cfg = lm_config(copy_corpus(root / "gpt.txt", 100), "gpt", 20)
    return danlu.pretrain(cfg, run_dir=root / "gpt_lm", show_progress=False).run.path


# --------------------------------------------------------------------- sanity: tables


@pytest.mark.parametrize(
    "method", ["integrated_gradients", "feature_ablation", "lime", "kernel_shap"]
)
def test_tabular_methods_rank_the_deciding_column_first(table_run: Path, method: str) -> None:
    row = {"x1": 0.4, "x2": -1.2, "x3": 1.1, "x4": 0.3, "colour": "green"}
    result = explain(table_run, row, method=method)
    assert result["prediction"]["label"] == "pos" and result["target"]["label"] == "pos"
    names = [f["name"] for f in result["features"]]
    assert names == ["x1", "x2", "x3", "x4", "colour"]  # one-hot columns summed back
    ranked = sorted(result["features"], key=lambda f: -abs(f["score"]))
    assert ranked[0]["name"] == "x3" and ranked[0]["score"] > 0
    assert ranked[0]["value"] == 1.1 and result["features"][4]["value"] == "green"
    negative = explain(table_run, {**row, "x3": -1.1}, method=method, target="pos")
    x3 = next(f for f in negative["features"] if f["name"] == "x3")
    assert x3["score"] < 0  # x3 < 0 speaks against "pos"


def test_integrated_gradients_converge_and_add_up(table_run: Path) -> None:
    row = {"x1": 0.4, "x2": -1.2, "x3": 1.1, "x4": 0.3, "colour": "green"}
    result = explain(table_run, row, n_steps=64)
    assert result["converged"] and "warning" not in result
    total = sum(f["score"] for f in result["features"])
    assert total - result["output_change"] == pytest.approx(result["convergence_delta"], abs=1e-5)
    assert abs(result["convergence_delta"]) < 0.01 * abs(result["output_change"])


def test_regression_explains_the_value(root: Path) -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({f"x{i}": rng.normal(size=200) for i in (1, 2, 3)})
    frame["y"] = 3 * frame.x3 + rng.normal(0, 0.1, 200)
    frame.to_csv(root / "reg.csv", index=False)
    cfg = tiny_config(str(root / "reg.csv"), data={"label": "y", "task": "regression"})
    run = danlu.train(cfg, run_dir=root / "reg", show_progress=False).run.path
    result = explain(run, {"x1": 0.1, "x2": -0.3, "x3": 1.5})
    assert set(result["prediction"]) == {"value"} and result["target"] is None
    assert max(result["features"], key=lambda f: abs(f["score"]))["name"] == "x3"
    with pytest.raises(ConfigError, match=r"--target applies to classification runs"):
        explain(run, {"x1": 0.1, "x2": -0.3, "x3": 1.5}, target="high")


# --------------------------------------------------------------------- sanity: images


@pytest.mark.parametrize("method", ["integrated_gradients", "occlusion"])
def test_image_attribution_concentrates_in_the_bright_quadrant(
    image_run: Path, method: str
) -> None:
    for bright, label, quadrant in (("tl", "1", np.s_[:4, :4]), ("br", "0", np.s_[4:, 4:])):
        result = explain(image_run, quadrant_image(bright, 1000), method=method)
        assert result["prediction"]["label"] == label
        heat = np.asarray(result["map"])
        assert heat.shape == (8, 8)
        positive = heat.clip(min=0)
        assert positive[quadrant].sum() / positive.sum() > 0.6, (method, bright)


# ---------------------------------------------------------------------- sanity: texts


@pytest.mark.parametrize("family", ["rnn", "bert"])
@pytest.mark.parametrize("method", ["integrated_gradients", "feature_ablation", "kernel_shap"])
def test_the_deciding_token_gets_the_top_attribution(text_runs, family, method) -> None:
    result = explain(text_runs[family], "the red cat zebra sat on a mat", method=method)
    assert result["prediction"]["label"] == "yes"
    top = max(range(len(result["scores"])), key=lambda i: result["scores"][i])
    assert result["tokens"][top].strip() == "zebra"
    assert "".join(result["tokens"]) == "the red cat zebra sat on a mat"


def test_non_convergence_is_flagged_and_more_steps_fix_it(text_runs) -> None:
    few = explain(text_runs["bert"], "the cat zebra sat", n_steps=4)
    assert not few["converged"] and few["relative_delta"] > 0.05
    assert "raise n_steps (now 4)" in few["warning"]
    many = explain(text_runs["bert"], "the cat zebra sat", n_steps=1000)
    # more steps cut the error (to under 5% for most trained models; the wordpiece vocabulary,
    # and so the model, can differ between processes), and the flag follows the error
    assert many["relative_delta"] < few["relative_delta"] / 2
    assert many["converged"] == (many["relative_delta"] <= 0.05)


# -------------------------------------------------------------- sanity: generated text


def test_generated_token_rests_on_the_prompt_token_it_copies(copy_lm: Path) -> None:
    """Feature ablation (each prompt token replaced by UNK) puts the copied capital first
    (for most prompts: the LSTM's memory of a capital survives some ablations). Integrated
    gradients put '=' or the capital first: '=' decides that a capital comes (log p rises
    from about 1/20 to 1/3), the capital which one (1/3 to 1), so in log-probability '='
    weighs more; never one of the random small letters. Prompts start on a new line, as
    every training line does."""
    rng = random.Random(123)
    prompts = ["\n" + copy_line(rng)[:-1] for _ in range(8)]
    ablation_hits = 0
    for prompt in prompts:
        capital = next(c for c in prompt if c.isupper())
        ablation = explain(copy_lm, prompt, method="feature_ablation", max_new_tokens=1)
        assert ablation["generated_tokens"] == [capital]
        assert ablation["tokens"] == ["[EOS]", *prompt]
        row = ablation["scores"][0]
        ablation_hits += ablation["tokens"][int(np.argmax(row))] == capital
        gradients = explain(copy_lm, prompt, max_new_tokens=1)
        row = gradients["scores"][0]
        assert gradients["tokens"][int(np.argmax(row))] in (capital, "=")
        assert gradients["converged"]
    assert ablation_hits >= 6


def test_generation_matrix_shape_and_normalisation(gpt_lm: Path) -> None:
    prompt = "abXc"
    result = explain(gpt_lm, prompt, max_new_tokens=5)
    [expected] = danlu.generate(gpt_lm, prompt, max_new_tokens=5, temperature=0)
    assert result["generated_text"] == expected  # the same greedy continuation as generate
    G, P = len(result["generated_tokens"]), len(result["tokens"])
    assert 1 + len(prompt) == P and 1 <= G <= 5
    scores, normalized = np.asarray(result["scores"]), np.asarray(result["normalized"])
    assert scores.shape == normalized.shape == (G, P) and len(result["logprobs"]) == G
    assert np.allclose(np.abs(normalized).max(1), 1.0)  # each row scaled by its largest |score|
    assert np.allclose(normalized * np.abs(scores).max(1, keepdims=True), scores, atol=1e-4)
    assert len(result["convergence_deltas"]) == G


# ---------------------------------------------------------------------- attention maps


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, gpt.SelfAttention) or (isinstance(m, layers.Attention) and not m.cross)
    ]


def check_against_outputs(model, run, maps: torch.Tensor) -> None:
    """Each module's real output = its output projection of (weights @ values): the maps are
    the weights the SDPA kernel used."""
    calls = []
    handles = [
        m.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
        for m in attention_modules(model)
    ]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    assert len(calls) == len(maps)
    with torch.no_grad():
        for (m, x, out), weights in zip(calls, maps, strict=True):
            B, T, D = x.shape
            H = m.num_heads
            v = m.qkv(x).chunk(3, dim=-1)[2].view(B, T, H, D // H).transpose(1, 2)
            y = (weights[None] @ v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
            proj = m.proj if isinstance(m, gpt.SelfAttention) else m.out
            torch.testing.assert_close(proj(y), out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt_rotary", "gpt_learned", "bert", "seq2seq"])
def test_attention_maps_match_a_manual_computation(kind: str) -> None:
    torch.manual_seed(0)
    if kind.startswith("gpt"):
        positions = kind.split("_")[1]
        model = GPT(50, 16, num_layers=2, num_heads=2, dim=16, positions=positions)
    elif kind == "bert":
        model = BERT(50, 0, 16, 2, num_layers=2, num_heads=2, dim=16, dropout=0.0)
    else:
        model = Seq2Seq(50, 0, 16, num_layers=2, decoder_layers=1, num_heads=2, dim=16, dropout=0)
    model.eval()
    ids = torch.tensor([[5, 9, 23, 41, 7, 12, 0, 0]])  # BERT and seq2seq: two pads at the end
    before = model.encode(ids)[0] if kind == "seq2seq" else model(ids)
    maps = attention_maps(model, ids)
    assert maps.shape == (2, 2, 8, 8)  # seq2seq: the encoder's layers only
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 8))
    if kind.startswith("gpt"):
        assert maps.triu(1).abs().max() == 0  # causal: nothing from the future
    else:
        assert maps[..., 6:].abs().max() == 0  # padding keys get no attention
    after = model.encode(ids)[0] if kind == "seq2seq" else model(ids)
    assert torch.equal(before, after)  # the forward path is untouched
    assert all(not m._forward_hooks for m in attention_modules(model))  # hooks removed
    run = (lambda: model.encode(ids)) if kind == "seq2seq" else (lambda: model(ids))
    check_against_outputs(model, run, maps)


def test_seq2seq_and_masked_lm_runs_explain_with_attention(root: Path) -> None:
    seq2seq = {
        "data": {"dataset": "copy-task", "max_samples": 200, "max_eval_samples": 20,
                 "tokenizer": {"type": "wordpiece", "vocab_size": 120, "max_length": 16}},
        "model": {"type": "seq2seq", "num_layers": 2, "num_heads": 2, "dim": 16},
        "train": {**TRAIN, "max_steps": 2},
    }  # fmt: skip
    corpus = root / "mlm.txt"
    corpus.write_text(
        "\n\n".join(" ".join(random.Random(i).choices(WORDS, k=30)) for i in range(40))
    )
    masked = lm_config(corpus, "bert", 2)
    masked["data"]["tokenizer"] = {"type": "wordpiece", "vocab_size": 60, "min_frequency": 1}
    for name, cfg in (("seq2seq", seq2seq), ("mlm", masked)):
        run = danlu.train(cfg, run_dir=root / name, show_progress=False).run.path
        result = explain(run, "the cat sat")
        assert result["method"] == "attention" and result["kind"] == "text"
        T = len(result["tokens"])
        assert np.asarray(result["attention"]).shape == (2 if name == "seq2seq" else 1, T, T)
        with pytest.raises(ConfigError, match=r"use one of: attention$"):
            explain(run, "the cat sat", method="generation")


def test_attention_of_a_run_averages_heads_or_picks_one(text_runs) -> None:
    mean = explain(text_runs["bert"], "the cat zebra sat", method="attention")
    assert (mean["layers"], mean["heads"], mean["head"]) == (1, 2, None)
    T = len(mean["tokens"])
    assert np.asarray(mean["attention"]).shape == (1, T, T)
    assert np.allclose(np.asarray(mean["attention"]).sum(-1), 1.0, atol=1e-3)
    heads = [
        explain(text_runs["bert"], "the cat zebra sat", method="attention", head=h) for h in (0, 1)
    ]
    average = (np.asarray(heads[0]["attention"]) + np.asarray(heads[1]["attention"])) / 2
    assert np.allclose(average, mean["attention"], atol=1e-4)
    with pytest.raises(ConfigError, match=r"--head 2: the model has 2 heads per layer"):
        explain(text_runs["bert"], "the cat", method="attention", head=2)


# ---------------------------------------------------------------- Hugging Face models


@pytest.fixture(scope="module")
def tiny_llama(root: Path) -> Path:
    """A 2-layer Llama checkpoint with a small BPE tokenizer, written here."""
    transformers = pytest.importorskip("transformers")
    from danlu.data.tokenize import train_tokenizer

    folder = root / "tiny_llama"
    corpus = [" ".join([*WORDS, "zebra"])] * 20
    tok = train_tokenizer(corpus, type="bpe", vocab_size=300, min_frequency=1)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
        unk_token="[UNK]",
    )  # fmt: skip
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_hf_classifier_tokens_and_eager_attention(root: Path, tiny_llama: Path) -> None:
    cfg = {
        "seed": 0,
        "data": {"dataset": str(text_csv(root / "hf_texts.csv")), "text": "text",
                 "label": "label", "tokenizer": {"max_length": 32}},
        "model": {"type": "hf", "pretrained": str(tiny_llama)},
        "train": {**TRAIN, "epochs": 1, "threads": 1},
    }  # fmt: skip
    run = danlu.train(cfg, run_dir=root / "hf_cls", show_progress=False).run.path
    text = "the cat zebra sat"
    gradients = explain(run, text)
    assert len(gradients["scores"]) == len(gradients["tokens"]) > 0
    assert "".join(gradients["tokens"]) == text
    attention = explain(run, text, method="attention")
    maps = np.asarray(attention["attention"])
    assert (attention["layers"], attention["heads"]) == (2, 2)
    assert maps.shape == (2, len(attention["tokens"]), len(attention["tokens"]))
    assert np.allclose(maps.sum(-1), 1.0, atol=1e-3) and np.allclose(np.triu(maps[0], 1), 0)
    p = Predictor.load(run)
    assert p.model.net.config._attn_implementation != "eager"  # a fresh load: sdpa
    from danlu.evaluate.explain_attention import attention_maps as maps_of

    maps_of(p.model, p.prepare(text).x)
    assert p.model.net.config._attn_implementation != "eager"  # switched back


def test_hf_causal_lm_generation(root: Path, tiny_llama: Path) -> None:
    corpus = root / "hf_corpus.txt"
    corpus.write_text(" ".join(["the cat sat on the mat"] * 100))
    cfg = {
        "data": {"dataset": str(corpus), "task": "language_modeling", "block_size": 16},
        "model": {"type": "hf", "pretrained": str(tiny_llama)},
        "train": {**TRAIN, "max_steps": 2, "batch_size": 4, "threads": 1},
    }
    run = danlu.train(cfg, run_dir=root / "hf_lm", show_progress=False).run.path
    result = explain(run, "the cat", max_new_tokens=3)
    [expected] = danlu.generate(run, "the cat", max_new_tokens=3, temperature=0)
    assert result["generated_text"] == expected
    assert np.asarray(result["scores"]).shape == (len(result["generated_tokens"]), 3)
    assert result["model"] == "gpt" and result["kind"] == "generation"


# -------------------------------------------------------------------- the Predictor


def test_prepare_gives_the_inputs_predict_uses(table_run: Path, text_runs, copy_lm: Path):
    p = Predictor.load(table_run)
    row = {"x1": 0.4, "x2": -1.2, "x3": 1.1, "x4": 0.3, "colour": "green"}
    prepared = p.prepare(row)
    torch.testing.assert_close(prepared.x, p.spec.table_features(pd.DataFrame([row])))
    assert prepared.features == [
        "x1",
        "x2",
        "x3",
        "x4",
        "colour=blue",
        "colour=green",
        "colour=red",
    ]
    assert prepared.names == ["1"] and prepared.kind == "rows"
    with torch.no_grad():
        probs = torch.softmax(p.model(prepared.x), -1)[0].numpy()
    np.testing.assert_allclose(p.predict(row)[["prob_neg", "prob_pos"]].to_numpy()[0], probs, 1e-5)

    texts = Predictor.load(text_runs["rnn"]).prepare(["the cat", "a big red dog"])
    assert texts.x.shape == (2, 4) and texts.mask.tolist()[0] == [True, True, False, False]
    assert texts.tokens == [["the", " cat", "[PAD]", "[PAD]"], ["a", " big", " red", " dog"]]

    lm = Predictor.load(copy_lm)
    prompt = lm.prepare("abXc=")
    eos = lm.spec.text["special_ids"]["eos"]
    assert prompt.x.tolist() == [[eos, *lm.encoder.encode("abXc=")]]
    assert prompt.tokens == [["[EOS]", "a", "b", "X", "c", "="]] and prompt.stop_id == eos


# ------------------------------------------------------------------- HTML and JSON


class Page(HTMLParser):
    """The tags, token spans and data: images of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.spans: list[dict] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self._in_span = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "span" and attrs.get("class") == "tok":
            self.spans.append({"style": attrs["style"], "title": attrs["title"], "text": ""})
            self._in_span = True
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        self._in_span = self._in_span and tag != "span"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_span:
            self.spans[-1]["text"] += data


def parse(path: str) -> Page:
    page = Page()
    page.feed(Path(path).read_text(encoding="utf-8"))
    return page


def test_text_page_highlights_tokens(text_runs) -> None:
    text = "the cat zebra sat"
    result = explain(text_runs["rnn"], text)
    page = parse(result["files"]["html"])
    assert [s["text"] for s in page.spans] == result["tokens"] == ["the", " cat", " zebra", " sat"]
    assert [float(s["title"]) for s in page.spans] == pytest.approx(result["scores"], rel=1e-3)
    zebra = next(s for s in page.spans if s["text"].strip() == "zebra")
    assert zebra["style"].startswith("background:rgba(22,150,60,")  # green: speaks for "yes"
    on_disk = json.loads(Path(result["files"]["json"]).read_text())
    assert on_disk == {k: v for k, v in result.items() if k != "files"}
    assert Path(result["files"]["html"]).parent == text_runs["rnn"] / "explanations"


def test_pages_escape_text(table_run: Path) -> None:
    tokens = ["<b>", "cat", "</b>", " & ", "<script>alert(1)</script>", "\n"]
    result = {
        "run": "runs/<i>x</i>", "input": "<b>&</b>", "kind": "text", "method": "lime",
        "model": "gpt", "task": "classification", "tokens": tokens, "scores": [1, -1, 0, 2, 3, 0],
    }  # fmt: skip
    page = Page()
    page.feed(render(result))
    assert not {"b", "i", "script"} & set(page.tags)  # the texts' tags stay text
    assert [s["text"] for s in page.spans] == [*tokens[:-1], "↵\n"]
    assert "runs/<i>x</i>" in page.text
    row = {**ROW, "colour": "<i>red</i>"}
    table = parse(explain(table_run, row)["files"]["html"])
    assert "i" not in table.tags and "<i>red</i>" in table.text


def test_image_page_embeds_png_data(image_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(quadrant_image("tl", 7)).save(tmp_path / "q.png")
    result = explain(image_run, tmp_path / "q.png", out=tmp_path / "pages" / "q.html")
    assert result["files"] == {
        "html": str(tmp_path / "pages" / "q.html"),
        "json": str(tmp_path / "pages" / "q.json"),
    }
    page = parse(result["files"]["html"])
    assert len(page.images) == 2
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.size == (256, 256)


def test_generation_page_has_a_row_per_generated_token(copy_lm: Path, tmp_path: Path) -> None:
    result = explain(copy_lm, "abXcde=", max_new_tokens=3, out=tmp_path)
    page = parse(result["files"]["html"])
    assert Path(result["files"]["html"]).name == "abxcde-generation.html"
    prompt, generated = len(result["tokens"]), len(result["generated_tokens"])
    # the whole text once, then the prompt highlighted once per generated token
    assert len(page.spans) == prompt + generated + generated * prompt
    assert page.tags.count("table") == 2  # the facts and the generated × prompt heat-map


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli(*args: object):
    r = runner.invoke(app, ["explain", *map(str, args)])
    return r.exit_code, ANSI.sub("", r.stdout), ANSI.sub("", r.stderr)


def test_cli_explains_a_row_and_a_prompt(table_run: Path, copy_lm: Path) -> None:
    code, out, err = cli(
        table_run, '{"x1": 0.4, "x2": -1.2, "x3": 1.1, "x4": 0.3, "colour": "red"}'
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("prediction: pos (probability ")
    assert lines[1] == "integrated gradients of pos, strongest first:"
    assert lines[2].split()[0] == "x3"
    assert f"wrote {table_run}/explanations/row-integrated_gradients.html" in out
    assert (table_run / "explanations" / "row-integrated_gradients.json").is_file()
    pd.DataFrame([{"x1": 0, "x2": 0, "x3": -2, "x4": 0, "colour": "red"}] * 2).to_csv("rows.csv")
    code, out, err = cli(table_run, "rows.csv", "--row", 2, "--method", "lime", "--out", "e")
    assert code == 0 and out.startswith("prediction: neg"), err
    assert Path("e/rows-csv-row-2-lime.html").is_file()
    code, out, err = cli(copy_lm, "abYcde=", "--method", "feature_ablation", "--max-new-tokens", 2)
    assert code == 0, err
    assert out.startswith("generated: 'Y\\n'")
    assert "'Y' ← 'Y'" in out


def test_cli_warns_when_integrated_gradients_do_not_converge(text_runs) -> None:
    code, _out, err = cli(text_runs["bert"], "the cat zebra", "--n-steps", 3)
    assert code == 0
    assert "warning: integrated gradients did not converge" in err and "--n-steps 12" in err


# ------------------------------------------------------------------------ bad inputs

ROW = {"x1": 0.4, "x2": -1.2, "x3": 1.1, "x4": 0.3, "colour": "green"}


@pytest.mark.parametrize(
    ("inputs", "options", "error", "message"),
    [
        ({k: v for k, v in ROW.items() if k != "x3"}, {}, DataError,
         "missing feature column(s) x3. the model expects columns: x1, x2, x3, x4, colour"),
        ({**ROW, "x2": "high"}, {}, DataError, "column 'x2': value 'high' is not a number"),
        ('{"x1": 0.4, "x2": [1, 2]}', {}, DataError, "column 'x2': value [1, 2] is not a single"),
        ('{"x1": 0.4,', {}, DataError, "INPUT starts like a JSON row but is not valid JSON"),
        ("the cat sat", {}, DataError, "a text was given, but run"),
        (ROW, {"method": "attention"}, ConfigError,
         "use one of: integrated_gradients, feature_ablation, lime, kernel_shap"),
        (ROW, {"target": "maybe"}, DataError,
         "target 'maybe' is not a label of this model. use one of: neg, pos"),
        (ROW, {"n_steps": 0}, ConfigError, "n_steps (0) and max_new_tokens (20) must be 1 or more"),
        ("", {}, DataError, "the input is empty. pass a row as JSON"),
        ("{}", {}, DataError, "the input is empty"),
        ({}, {}, DataError, "the input is empty"),
        ("rows.csv", {"row": 3}, DataError, "--row 3: rows.csv has 2 rows. choose a row from 1 to 2"),
    ],
)  # fmt: skip
def test_table_input_errors(table_run: Path, inputs, options, error, message) -> None:
    pd.DataFrame([ROW, ROW]).to_csv("rows.csv", index=False)
    with pytest.raises(error) as info:
        explain(table_run, inputs, **options)
    assert message in str(info.value)


def test_image_errors_say_expected_and_got(image_run: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((16, 12), np.uint8)).save("big.png")
    with pytest.raises(DataError) as info:
        explain(image_run, "big.png")
    assert str(info.value).startswith(
        "big.png is 16×12 with 1 channel, but the model takes 8×8 with 1 channel. resize"
    )
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save("rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png is 8×8 with 3 channels, but the model takes"):
        explain(image_run, "rgb.png")
    with pytest.raises(DataError, match=r"the array is 8×8 with 3 channels"):
        explain(image_run, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"image 'gone\.png' not found"):
        explain(image_run, "gone.png")
    with pytest.raises(DataError, match=r"a text was given, but run .* is an image model"):
        explain(image_run, "a cat")
    with pytest.raises(ConfigError, match=r"use one of: integrated_gradients, occlusion"):
        explain(image_run, quadrant_image("tl", 0), method="lime")


def test_text_and_language_model_errors(text_runs, copy_lm: Path) -> None:
    with pytest.raises(DataError, match=r"^the input is empty"):
        explain(text_runs["rnn"], "   ")
    with pytest.raises(ConfigError) as info:
        explain(text_runs["rnn"], "the cat", method="attention")
    assert "use one of: integrated_gradients, feature_ablation, lime, kernel_shap" in str(
        info.value
    )
    assert "attention" not in str(info.value).split("use one of:")[1]  # an LSTM has none
    with pytest.raises(DataError, match=r"target 'cat' is not a label.*use one of: no, yes"):
        explain(text_runs["bert"], "the cat", target="cat")
    with pytest.raises(ConfigError) as info:
        explain(copy_lm, "abc", method="lime")
    assert str(info.value) == (
        f"method 'lime' does not fit run '{copy_lm}' (model rnn, task language_modeling). "
        "use one of: generation, feature_ablation"
    )
    with pytest.raises(ConfigError, match=r"--target applies to classification runs"):
        explain(copy_lm, "abc", target="X")


def test_cli_errors_are_one_line(table_run: Path) -> None:
    code, out, err = cli(table_run, "the cat sat")
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().splitlines() == [
        f"error: a text was given, but run '{table_run}' is a table model. pass a row as JSON "
        '(\'{"x1": ..., "x2": ..., "x3": ...}\') or a CSV/Parquet file; columns: x1, x2, x3, '
        "x4, colour"
    ]
