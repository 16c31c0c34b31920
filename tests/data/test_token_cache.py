"""Token cache: miss then hit, dtype choice, damaged entries rebuilt, streaming under a cap."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from danlu.data.text import RawCorpus
from danlu.data.token_cache import (
    build_token_cache,
    cache_root,
    open_token_cache,
    token_dtype,
)
from danlu.data.tokenize import TextEncoder, train_tokenizer
from danlu.errors import DataError

WORDS = ["the", "of", "and", "to", "in", "that", "was", "he", "it", "for", "with", "his", "on"]


def corpus_of(docs: list[str], origin: str = "tiny") -> RawCorpus:
    h = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    return RawCorpus(lambda: iter(docs), origin, h, sum(len(d) for d in docs))


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(train_tokenizer(sentences(200), type="bpe", vocab_size=300))


class Counting:
    """Wraps an encoder, counting encode_ids calls (a cache hit makes none)."""

    def __init__(self, enc: TextEncoder) -> None:
        self.enc, self.calls = enc, 0

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def encode_ids(self, texts, **kwargs):
        self.calls += 1
        return self.enc.encode_ids(texts, **kwargs)


def expected_tokens(enc: TextEncoder, docs: list[str], bos: bool = False, eos: bool = True):
    out = []
    for d in docs:
        out.append([enc.bos_id] * bos + enc.encode(d) + [enc.eos_id] * eos)
    return out


def test_miss_then_hit(encoder, caplog):
    docs = sentences(300, seed=1)
    corpus, enc = corpus_of(docs), Counting(encoder)
    with caplog.at_level(logging.INFO, logger="danlu"):
        first = build_token_cache(corpus, enc)
    assert "token cache miss" in caplog.text and enc.calls >= 1
    want = expected_tokens(encoder, docs)
    assert first.tokens.dtype == np.uint16 and first.n_documents == len(docs)
    assert first.tokens.tolist() == [t for doc in want for t in doc]
    assert first.document(7).tolist() == want[7]
    assert first.offsets.dtype == np.int64 and first.offsets[-1] == len(first)
    entry = cache_root() / first.key
    assert first.path == entry and sorted(p.name for p in entry.iterdir()) == [
        "meta.json",
        "offsets.npy",
        "tokens.bin",
    ]
    assert [p.name for p in cache_root().iterdir()] == [first.key]  # no temp folder left
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key_parts"]["tokenizer"] == encoder.hash
    assert meta["key_parts"]["source"] == corpus.content_hash
    assert meta["n_tokens"] == len(first) and meta["danlu_version"]

    caplog.clear()
    calls = enc.calls
    with caplog.at_level(logging.INFO, logger="danlu"):
        second = build_token_cache(corpus, enc)
    assert f"token cache hit {first.key}" in caplog.text
    assert enc.calls == calls  # nothing re-tokenized
    assert np.array_equal(second.tokens, first.tokens)


def test_key_changes_with_source_tokenizer_and_options(encoder):
    docs = sentences(20)
    base = build_token_cache(corpus_of(docs), encoder)
    other_text = build_token_cache(corpus_of([*docs, "more"]), encoder)
    other_tok = build_token_cache(
        corpus_of(docs), TextEncoder(train_tokenizer(docs, type="char", vocab_size=64))
    )
    with_bos = build_token_cache(corpus_of(docs), encoder, add_bos=True, add_eos=False)
    capped = build_token_cache(corpus_of(docs), encoder, max_length=4)
    lowered = build_token_cache(corpus_of(["THE LORD"]), encoder, lowercase=True)
    keys = {c.key for c in (base, other_text, other_tok, with_bos, capped, lowered)}
    assert len(keys) == 6
    assert with_bos.document(0).tolist() == expected_tokens(encoder, docs[:1], True, False)[0]
    assert max(np.diff(capped.offsets)) <= 4
    assert capped.document(0).tolist() == [*expected_tokens(encoder, docs[:1])[0][:3], 3]
    assert lowered.document(0).tolist() == [*encoder.encode("the lord"), encoder.eos_id]


def test_cache_dir_option_wins_over_the_environment(encoder, tmp_path):
    cache = build_token_cache(corpus_of(["a b"]), encoder, cache_dir=tmp_path / "elsewhere")
    assert cache.path.parent == tmp_path / "elsewhere" / "tokens"
    assert cache_root() == tmp_path / "cache" / "tokens"  # $DANLU_CACHE from conftest


def test_uint16_or_uint32_by_vocabulary_size():
    assert token_dtype(65_535) == np.uint16 and token_dtype(65_536) == np.uint32
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cache = build_token_cache(corpus_of(["w5 w69999 w65535", "w0"]), TextEncoder(tok))
    assert cache.tokens.dtype == np.uint32 and cache.meta["dtype"] == "uint32"
    assert cache.tokens.tolist() == [8, 70_002, 65_538, 2, 3, 2]


def damage(entry: Path, how: str) -> None:
    if how == "tokens.bin flipped":
        data = bytearray((entry / "tokens.bin").read_bytes())
        data[5] ^= 0xFF
        (entry / "tokens.bin").write_bytes(bytes(data))
    elif how == "tokens.bin truncated":
        data = (entry / "tokens.bin").read_bytes()
        (entry / "tokens.bin").write_bytes(data[: len(data) // 2])
    elif how == "offsets.npy flipped":
        data = bytearray((entry / "offsets.npy").read_bytes())
        data[-3] ^= 0x01
        (entry / "offsets.npy").write_bytes(bytes(data))
    elif how == "offsets.npy missing":
        (entry / "offsets.npy").unlink()
    elif how == "meta.json garbage":
        (entry / "meta.json").write_text('{"format": 1, "dtype": ')
    elif how == "meta.json missing (half-written)":
        (entry / "meta.json").unlink()


@pytest.mark.parametrize(
    "how",
    [
        "tokens.bin flipped",
        "tokens.bin truncated",
        "offsets.npy flipped",
        "offsets.npy missing",
        "meta.json garbage",
        "meta.json missing (half-written)",
    ],
)
def test_damaged_entry_is_detected_removed_and_rebuilt(encoder, caplog, how):
    docs = sentences(50, seed=2)
    good = build_token_cache(corpus_of(docs), encoder)
    reference = np.array(good.tokens)
    del good
    damage(cache_root() / build_token_cache(corpus_of(docs), encoder).key, how)
    with pytest.raises(DataError):
        open_token_cache(next(cache_root().iterdir()))
    enc = Counting(encoder)
    with caplog.at_level(logging.INFO, logger="danlu"):
        rebuilt = build_token_cache(corpus_of(docs), enc)
    assert "damaged" in caplog.text and enc.calls >= 1
    assert np.array_equal(rebuilt.tokens, reference)
    assert open_token_cache(rebuilt.path).meta["n_tokens"] == len(reference)


def test_stray_temporary_folder_is_ignored(encoder):
    docs = sentences(10)
    key = build_token_cache(corpus_of(docs), encoder).key
    shutil.rmtree(cache_root() / key)
    stray = cache_root() / f".{key[:16]}.crashed.tmp"
    stray.mkdir()
    (stray / "tokens.bin").write_bytes(b"\x00" * 10)  # a build that died half way
    cache = build_token_cache(corpus_of(docs), encoder)
    assert cache.tokens.tolist() == [t for d in expected_tokens(encoder, docs) for t in d]


def test_empty_corpus_is_a_data_error(encoder):
    with pytest.raises(DataError, match="no tokens"):
        build_token_cache(corpus_of(["", ""], origin="empty.txt"), encoder, add_eos=False)
    assert not any(cache_root().iterdir())


def test_missing_eos_token_is_a_data_error():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(DataError, match=r"add_eos .* no EOS"):
        build_token_cache(corpus_of(["a a"]), TextEncoder(tok))


def test_large_corpus_streams_under_a_small_memory_cap(encoder):
    """2.5 MB of generated text through a 1 MB cap: Python's peak stays under the cap, far
    below the corpus (documents come from a generator and are never held as a whole)."""
    rng = np.random.default_rng(3)
    pool = sentences(500, seed=4)
    picks = rng.integers(0, len(pool), size=45_000)
    size = sum(len(pool[i]) for i in picks)
    assert size > 2_500_000

    def documents() -> Iterator[str]:
        for i in picks:
            yield pool[i]

    corpus = RawCorpus(documents, "generated", "generated-corpus-v1", size)
    tracemalloc.start()
    try:
        cache = build_token_cache(corpus, encoder, memory_cap_mb=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"peak Python memory {peak:,} bytes"
    assert cache.n_documents == len(picks)
    for i in (0, 12_345, len(picks) - 1):
        assert cache.document(i).tolist() == [*encoder.encode(pool[picks[i]]), encoder.eos_id]


def test_trained_tokenizer_is_cached_per_corpus_and_options(monkeypatch, caplog):
    import danlu.data.token_cache as tc

    calls = []

    def counting(texts, **options):
        calls.append(options)
        return train_tokenizer(texts, **options)

    monkeypatch.setattr(tc, "train_tokenizer", counting)
    corpus = corpus_of(sentences(100, seed=5))
    first = tc.cached_tokenizer(corpus, type="wordpiece", vocab_size=120)
    with caplog.at_level(logging.INFO, logger="danlu"):
        again = tc.cached_tokenizer(corpus, type="wordpiece", vocab_size=120)
    assert "tokenizer cache hit" in caplog.text and len(calls) == 1
    assert TextEncoder(again).hash == TextEncoder(first).hash
    tc.cached_tokenizer(corpus, type="wordpiece", vocab_size=130)  # other options: trained
    assert len(calls) == 2
    for saved in (cache_root().parent / "tokenizers").iterdir():
        saved.write_text("{not json")
    assert TextEncoder(tc.cached_tokenizer(corpus, type="wordpiece", vocab_size=120)).vocab_size
    assert len(calls) == 3  # a damaged file is trained again, never used
