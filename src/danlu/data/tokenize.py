"""Tokenizers: train one on the training text, or load a tokenizer.json / checkpoint / hub name.

Everything here stands on the Hugging Face `tokenizers` library (the `text` extra); danlu only
chooses the pieces for each `data.tokenizer.type` and wraps the result in a TextEncoder:

    tok = train_tokenizer(texts, type="bpe", vocab_size=8000, min_frequency=2, lowercase=False)
    enc = TextEncoder(tok, max_length=256)
    batch = enc.encode_batch(["hello world", "hi"])   # ids (2, L), attention_mask (2, L)
    enc.save(run.path / "tokenizer.json")             # atomic; enc.hash keys the token cache

| type      | model                              | round trip decode(encode(x)) == x        |
|-----------|------------------------------------|------------------------------------------|
| bpe       | byte-level BPE (GPT-2 style)       | exact (no unknown tokens: 256 byte units) |
| wordpiece | WordPiece on BERT pre-tokenization | up to spacing around punctuation          |
| unigram   | Unigram LM on Metaspace            | exact for characters seen in training     |
| char      | one token per character seen       | exact for characters kept                 |

Trained vocabularies begin with the special tokens, so [PAD] is id 0. `char` keeps every
character seen (min_frequency does not apply), the most frequent ones first when vocab_size
caps it; the others become [UNK].
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from danlu.errors import DataError
from danlu.rundir import atomic_write_text

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
TRAINED_TYPES = ("bpe", "wordpiece", "unigram", "char")
# the names a role goes by in common tokenizers (ours first, then BERT, GPT-2, Llama, T5...)
ROLES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "bos": ("[BOS]", "<s>", "<bos>", "<|startoftext|>", "<|begin_of_text|>"),
    "eos": ("[EOS]", "</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
    "mask": ("[MASK]", "<mask>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
}


def _lib() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "text data needs the Hugging Face `tokenizers` library, which is not installed",
            fix="pip install 'danlu[text]'",
        ) from None
    return tokenizers


# ------------------------------------------------------------------------------ training


def train_tokenizer(
    texts: Iterable[str],
    *,
    type: str = "bpe",
    vocab_size: int = 8000,
    min_frequency: int = 2,
    lowercase: bool = False,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> Tokenizer:
    """Train a tokenizer of `type` on `texts` (streamed once; may be a generator)."""
    tk = _lib()
    if type not in TRAINED_TYPES:
        raise DataError(
            f"data.tokenizer.type: cannot train a tokenizer of type '{type}'",
            fix=f"use one of {', '.join(TRAINED_TYPES)} (or file / pretrained with `path`)",
        )
    specials = ["[PAD]", *(t for t in special_tokens if t != "[PAD]")]  # PAD is id 0
    if type != "bpe" and "[UNK]" not in specials:
        specials.insert(1, "[UNK]")
    if type == "bpe":  # every byte must stay representable: the minimum is known up front
        _check_size(vocab_size, len(specials) + 256, type)
    tok, trainer = _PIECES[type](tk, vocab_size, min_frequency, specials)
    if lowercase:
        tok.normalizer = tk.normalizers.Lowercase()
    stream = _Stream(texts, lowercase, count_chars=type == "unigram")
    try:
        tok.train_from_iterator(stream, trainer)
    except Exception as e:  # the Rust trainers raise plain Exceptions
        if type == "unigram" and "not large enough" in str(e):
            _check_size(vocab_size, len(specials) + stream.alphabet() + 1, type)
        raise DataError(f"training the {type} tokenizer failed: {e}") from None
    if stream.count == 0:
        raise DataError(
            "no text to train the tokenizer on",
            fix="check data.dataset and data.text: the training split has no documents",
        )
    minimum = len(specials) + stream.alphabet() + 1 if type == "unigram" else tok.get_vocab_size()
    if tok.get_vocab_size() > vocab_size:
        _check_size(vocab_size, minimum, type)
    return tok


def _check_size(vocab_size: int, minimum: int, type: str) -> None:
    if vocab_size < minimum:
        raise DataError(
            f"data.tokenizer.vocab_size={vocab_size} is too small for a {type} tokenizer on "
            f"this text: it needs at least {minimum} (special tokens + base alphabet)",
            fix=f"set data.tokenizer.vocab_size to {minimum} or more",
        )


class _Stream:
    """Passes texts through to a trainer, counting them (and the characters seen)."""

    def __init__(self, texts: Iterable[str], lowercase: bool, count_chars: bool) -> None:
        self.texts, self.lowercase, self.count_chars = texts, lowercase, count_chars
        self.count, self.chars = 0, set()

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.count += 1
            if self.count_chars:
                self.chars.update(text)
            yield text

    def alphabet(self) -> int:
        """Distinct characters after normalization (Metaspace turns spaces into '▁')."""
        chars = {c.lower() for c in self.chars} if self.lowercase else set(self.chars)
        return len({"▁" if c == " " else c for c in chars})


def _bpe(tk: Any, vocab_size: int, min_frequency: int, specials: list[str]) -> tuple:
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def _wordpiece(tk: Any, vocab_size: int, min_frequency: int, specials: list[str]) -> tuple:
    tok = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tk.decoders.WordPiece()
    trainer = tk.trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        show_progress=False,
    )
    return tok, trainer


def _unigram(tk: Any, vocab_size: int, min_frequency: int, specials: list[str]) -> tuple:
    tok = tk.Tokenizer(tk.models.Unigram())
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    tok.decoder = tk.decoders.Metaspace()
    trainer = tk.trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="[UNK]", show_progress=False
    )
    return tok, trainer


def _char(tk: Any, vocab_size: int, min_frequency: int, specials: list[str]) -> tuple:
    tok = tk.Tokenizer(tk.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = tk.decoders.Fuse()
    _check_size(vocab_size, len(specials) + 1, "char")
    trainer = tk.trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False
    )
    return tok, trainer


_PIECES = {"bpe": _bpe, "wordpiece": _wordpiece, "unigram": _unigram, "char": _char}


# ------------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, a checkpoint folder holding one, or a hub name (online only)."""
    tk = _lib()
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return _from_file(tk, p / "tokenizer.json")
        return _from_transformers(str(p), f"folder '{p}' has no tokenizer.json and")
    if p.is_file():
        return _from_file(tk, p)
    name = str(path)
    if p.suffix == ".json" or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(
            f"tokenizer file '{p}' not found",
            fix="check data.tokenizer.path (a tokenizer.json, a checkpoint folder or a hub name)",
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise DataError(
            f"tokenizer '{name}' is not a local file or folder, and the hub is offline "
            "(HF_HUB_OFFLINE is set)",
            fix="point data.tokenizer.path at a local tokenizer.json or checkpoint folder",
        )
    return _from_transformers(name, f"hub tokenizer '{name}'")


def _from_file(tk: Any, file: Path) -> Tokenizer:
    try:
        return tk.Tokenizer.from_file(str(file))
    except Exception as e:  # unparseable JSON or an unknown component: a plain Exception
        raise DataError(
            f"tokenizer file '{file}' is corrupt or not a Hugging Face tokenizer.json ({e})",
            fix="re-save it with tokenizers' Tokenizer.save, or point data.tokenizer.path "
            "at another file",
        ) from None


def _from_transformers(name: str, what: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(
            f"{what} needs `transformers` to load", fix="pip install 'danlu[text]'"
        ) from None
    try:
        auto = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "could not load"
        raise DataError(
            f"{what} could not be loaded by transformers.AutoTokenizer ({e})",
            fix="check data.tokenizer.path",
        ) from None
    if not getattr(auto, "is_fast", False):
        raise DataError(f"{what} has no fast (Rust) tokenizer", fix="use one with tokenizer.json")
    return auto.backend_tokenizer


def build_tokenizer(
    *,
    type: str = "bpe",
    vocab_size: int = 8000,
    path: str | None = None,
    lowercase: bool = False,
    min_frequency: int = 2,
    max_length: int | None = None,
    truncation: str = "truncate",
    texts: Iterable[str] | None = None,
) -> TextEncoder:
    """The TextEncoder for `data.tokenizer` (flat keys): trained on `texts`, or loaded."""
    if type in TRAINED_TYPES:
        if texts is None:
            raise ValueError(f"training a {type} tokenizer needs texts")
        tok = train_tokenizer(
            texts,
            type=type,
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            lowercase=lowercase,
        )
    else:
        if type not in ("file", "pretrained") or not path:
            raise DataError(
                f"data.tokenizer: type '{type}' with path {path!r} cannot make a tokenizer",
                fix="train bpe/wordpiece/unigram/char, or give file/pretrained with a path",
            )
        tok = load_tokenizer(path)
        if lowercase:
            tk = _lib()
            steps = [tok.normalizer] if tok.normalizer is not None else []
            tok.normalizer = tk.normalizers.Sequence([*steps, tk.normalizers.Lowercase()])
    return TextEncoder(tok, max_length=max_length, truncation=truncation)


# ------------------------------------------------------------------------------- encoder


@dataclass
class Encoded:
    """A padded batch: ids and attention_mask (B, L) int64; lengths (B,) real tokens per row."""

    ids: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class TextEncoder:
    """A Tokenizer with danlu's defaults: special ids, padded batches, decode, save, hash.

    The wrapped tokenizer is a private copy with the file's own truncation and padding
    switched off; `encode_batch` sets them per call (max_length, padding), so the same text
    always gives the same ids whatever was saved in a checkpoint's tokenizer.json.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, max_length: int | None = None, truncation: str = "truncate"
    ) -> None:
        if truncation not in ("truncate", "error"):
            raise ValueError(f"truncation must be 'truncate' or 'error', got {truncation!r}")
        self.tokenizer = _lib().Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_length, self.truncation = max_length, truncation
        self._configured: dict[tuple, Tokenizer] = {}

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> TextEncoder:
        return cls(load_tokenizer(path), **kwargs)

    def __repr__(self) -> str:
        return f"TextEncoder(vocab_size={self.vocab_size}, hash={self.hash[:12]})"

    # -- identity ------------------------------------------------------------------------

    @cached_property
    def json_text(self) -> str:
        return self.tokenizer.to_str()

    @cached_property
    def hash(self) -> str:
        """SHA-256 of the tokenizer's JSON (without truncation/padding): the cache key part."""
        return hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> dict[str, int]:
        """{role: id} for the roles this tokenizer has (pad, unk, bos, eos, mask, cls, sep)."""
        out = {}
        for role, names in ROLES.items():
            ids = [self.tokenizer.token_to_id(n) for n in names]
            found = [i for i in ids if i is not None]
            if found:
                out[role] = found[0]
        return out

    pad_id = property(lambda self: self.special_ids.get("pad"))
    unk_id = property(lambda self: self.special_ids.get("unk"))
    bos_id = property(lambda self: self.special_ids.get("bos"))
    eos_id = property(lambda self: self.special_ids.get("eos"))
    mask_id = property(lambda self: self.special_ids.get("mask"))
    cls_id = property(lambda self: self.special_ids.get("cls"))
    sep_id = property(lambda self: self.special_ids.get("sep"))

    # -- encoding ------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of one text, unpadded and untruncated."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_ids(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of many texts, unpadded and untruncated (parallel in Rust)."""
        encs = self.tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding: str = "longest",
        truncation: str | None = None,
        add_special_tokens: bool = True,
        first_index: int = 0,
    ) -> Encoded:
        """Pad to the longest text (or to max_length with padding="max_length"), truncating
        longer texts to max_length, or raising a DataError naming the example (index
        first_index + i) when truncation="error". Defaults come from the encoder."""
        max_length = max_length or self.max_length
        truncation = truncation or self.truncation
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        texts = list(texts)
        if not texts:
            empty = np.zeros((0, 0), dtype=np.int64)
            return Encoded(empty, empty.copy(), np.zeros(0, dtype=np.int64))
        tok = self._for(max_length, padding)
        encs = tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        if truncation == "error":
            for i, e in enumerate(encs):
                if e.overflowing:
                    self._too_long(texts[i], first_index + i, max_length)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return Encoded(ids, mask, mask.sum(axis=1))

    def _for(self, max_length: int | None, padding: str) -> Tokenizer:
        """A copy configured for (max_length, padding), made once: tokenizers are shared by
        threads (the server), so one object's settings are never changed per call."""
        key = (max_length, padding)
        if key not in self._configured:
            tok = _lib().Tokenizer.from_str(self.json_text)
            if max_length is not None:
                tok.enable_truncation(max_length)
            pad_id = self.pad_id if self.pad_id is not None else 0
            tok.enable_padding(
                pad_id=pad_id,
                pad_token=tok.id_to_token(pad_id) or "",
                length=max_length if padding == "max_length" else None,
            )
            self._configured[key] = tok
        return self._configured[key]

    @staticmethod
    def _too_long(text: str, index: int, max_length: int | None) -> None:
        preview = text[:60] + ("..." if len(text) > 60 else "")
        raise DataError(
            f"example {index} ({preview!r}) is longer than data.tokenizer.max_length="
            f"{max_length} tokens",
            fix="raise data.tokenizer.max_length, or set data.tokenizer.truncation: truncate",
        )

    # -- decoding and saving -------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ids (-100 targets and padding are dropped with skip_special_tokens)."""
        ids = [int(i) for i in np.asarray(ids).ravel() if i >= 0]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, rows: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(r, **kwargs) for r in rows]

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (a folder gets <folder>/tokenizer.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write_text(path, self.tokenizer.to_str(pretty=True))
        return path
