"""The token cache: a corpus is tokenized once, then memory-mapped by every later run.

    cache = build_token_cache(corpus, encoder, add_eos=True, memory_cap_mb=64)
    cache.tokens            # (N,) uint16 memmap (uint32 when the vocabulary exceeds 65,535)
    cache.document(3)       # the tokens of document 3

An entry lives in <cache root>/tokens/<key>/, the root being `data.cache_dir`, else
$DANLU_CACHE, else ~/.cache/danlu. The key is the SHA-256 of the corpus content hash, the
tokenizer hash and the encoding options, so anything that changes the tokens changes the key.

    tokens.bin    all documents' token ids back to back (raw little-endian, see meta.json)
    offsets.npy   (documents + 1,) int64: where each document starts; the last is N
    meta.json     dtype, counts, key parts, SHA-256 of both files, danlu version: written
                  LAST, inside a temporary folder that is then renamed into place

Building streams: documents are encoded in batches (`encode_batch`, parallel in Rust) and
appended to tokens.bin chunk by chunk, so only one batch (sized by `memory_cap_mb`) is ever in
memory, whatever the corpus size. A document is the unit: one document must fit in memory.
Opening an entry checks sizes and checksums; a damaged or half-written entry is removed and
rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from danlu.data.builtin import cache_dir
from danlu.data.text import RawCorpus
from danlu.data.tokenize import TextEncoder, load_tokenizer, train_tokenizer
from danlu.errors import DataError
from danlu.rundir import atomic_write_json, atomic_write_text, fsync_dir, now, sha256_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger("danlu")

FORMAT = 1
DEFAULT_BATCH_CHARS = 1 << 20  # characters encoded per batch without a memory cap
BYTES_PER_CHAR = 64  # rough peak memory per character in flight (Rust encodings + Python ids)


@dataclass
class TokenCache:
    """One verified cache entry, memory-mapped read-only."""

    path: Path
    key: str
    tokens: np.ndarray  # (N,) uint16 | uint32 memmap
    offsets: np.ndarray  # (D + 1,) int64 memmap: document starts, then N
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def cache_root(configured: str | Path | None = None) -> Path:
    """<data.cache_dir | $DANLU_CACHE | ~/.cache/danlu>/tokens."""
    return cache_dir(str(configured) if configured else None).parent / "tokens"


def cache_key(source_hash: str, tokenizer_hash: str, **options: Any) -> tuple[str, dict]:
    """The entry key and the parts it hashes (stored in meta.json for inspection)."""
    parts = {"format": FORMAT, "source": source_hash, "tokenizer": tokenizer_hash, **options}
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest(), parts


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65_535 else np.uint32)


def build_token_cache(
    corpus: RawCorpus,
    encoder: TextEncoder,
    *,
    add_bos: bool = False,
    add_eos: bool = True,
    lowercase: bool = False,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    memory_cap_mb: int | None = None,
) -> TokenCache:
    """The corpus's tokens from the cache, built (streaming) on a miss or a damaged entry.

    add_bos / add_eos put the tokenizer's BOS / EOS (else CLS / SEP) around every document;
    lowercase lowers the text before the tokenizer sees it; max_length caps the tokens kept
    per document (special tokens included).
    """
    options = {"add_bos": add_bos, "add_eos": add_eos, "lowercase": lowercase}
    key, parts = cache_key(corpus.content_hash, encoder.hash, **options, max_length=max_length)
    root = cache_root(cache_dir)
    entry = root / key
    if entry.exists():
        try:
            cache = open_token_cache(entry)
            log.info("token cache hit %s (%s tokens)", key, f"{len(cache):,}")
            return cache
        except DataError as e:
            log.warning("token cache entry %s is damaged (%s): rebuilding it", key, e.message)
            shutil.rmtree(entry, ignore_errors=True)
    log.info("token cache miss %s: tokenizing %s", key, corpus.origin)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key[:16]}.", suffix=".tmp"))
    try:
        meta = _write_entry(tmp, corpus, encoder, key, parts, _batch_chars(memory_cap_mb))
        _publish(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = open_token_cache(entry)
    log.info(
        "token cache built %s: %s tokens in %s documents, %.1f s",
        key,
        f"{meta['n_tokens']:,}",
        f"{meta['n_documents']:,}",
        meta["build_seconds"],
    )
    return cache


def cached_tokenizer(
    corpus: RawCorpus, *, cache_dir: str | Path | None = None, **options: Any
) -> Tokenizer:
    """train_tokenizer(corpus.documents(), **options), trained once per (corpus, options) and
    kept in <cache root>/tokenizers/<key>.json. WordPiece and Unigram training is not
    deterministic across processes (tokenizers issue #1794), so training again would change
    the tokenizer hash and miss the token cache."""
    import tokenizers

    version = tokenizers.__version__
    key, _ = cache_key(corpus.content_hash, "trained", tokenizers=version, **options)
    path = cache_root(cache_dir).parent / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            tok = load_tokenizer(path)
            log.info("tokenizer cache hit %s", key)
            return tok
        except DataError as e:
            log.warning("cached tokenizer %s is damaged (%s): training again", key, e.message)
    tok = train_tokenizer(corpus.documents(), **options)
    atomic_write_text(path, tok.to_str())
    return tok


def open_token_cache(path: str | Path, *, verify: bool = True) -> TokenCache:
    """Open an entry folder, checking meta.json, file sizes and (verify) both SHA-256s."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"token cache entry '{path}' has no meta.json (half-written)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        dtype, n, docs = np.dtype(meta["dtype"]), int(meta["n_tokens"]), int(meta["n_documents"])
        sums = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"token cache entry '{path}': unreadable meta.json ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"token cache entry '{path}': format {meta.get('format')} != {FORMAT}")
    tokens_file, offsets_file = path / "tokens.bin", path / "offsets.npy"
    for f in (tokens_file, offsets_file):
        if not f.is_file():
            raise DataError(f"token cache entry '{path}' has no {f.name}")
    if tokens_file.stat().st_size != n * dtype.itemsize:
        raise DataError(f"token cache entry '{path}': tokens.bin size does not match meta.json")
    if verify:
        for f in (tokens_file, offsets_file):
            if _sha256(f) != sums.get(f.name):
                raise DataError(f"token cache entry '{path}': {f.name} fails its SHA-256 check")
    try:
        offsets = np.load(offsets_file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"token cache entry '{path}': unreadable offsets.npy ({e})") from None
    if offsets.shape != (docs + 1,) or offsets[0] != 0 or offsets[-1] != n:
        raise DataError(f"token cache entry '{path}': offsets.npy does not match meta.json")
    tokens = np.memmap(tokens_file, dtype=dtype, mode="r", shape=(n,))
    return TokenCache(path, path.name, tokens, offsets, meta)


# ------------------------------------------------------------------------------ building


def _batch_chars(memory_cap_mb: int | None) -> int:
    if memory_cap_mb is None:
        return DEFAULT_BATCH_CHARS
    return int(min(max(memory_cap_mb * (1 << 20) // BYTES_PER_CHAR, 4096), 4 * (1 << 20)))


def _batches(documents: Iterable[str], max_chars: int, lowercase: bool) -> Iterator[list[str]]:
    """Lists of documents of about max_chars characters (a longer document goes alone)."""
    batch, size = [], 0
    for doc in documents:
        if lowercase:
            doc = doc.lower()
        if batch and size + len(doc) > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(doc)
        size += len(doc)
    if batch:
        yield batch


def _write_entry(
    tmp: Path,
    corpus: RawCorpus,
    encoder: TextEncoder,
    key: str,
    parts: dict[str, Any],
    max_chars: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    dtype = token_dtype(encoder.vocab_size)
    bos, eos = _special(encoder, "bos", "cls", parts), _special(encoder, "eos", "sep", parts)
    h, n_tokens, n_docs = hashlib.sha256(), 0, 0
    with open(tmp / "tokens.bin", "wb") as ftok, open(tmp / "offsets.tmp", "wb") as foff:
        for docs in _batches(corpus.documents(), max_chars, parts["lowercase"]):
            flat, lengths = _join(encoder.encode_ids(docs), dtype, bos, eos, parts["max_length"])
            starts = n_tokens + np.concatenate([[0], np.cumsum(lengths[:-1])])
            data = flat.tobytes()
            ftok.write(data)
            h.update(data)
            foff.write(starts.astype("<i8").tobytes())
            n_tokens += len(flat)
            n_docs += len(docs)
        _sync(ftok)
    if n_tokens == 0:
        raise DataError(
            f"{corpus.origin}: the corpus has no tokens ({n_docs} documents, all empty)",
            fix="check data.dataset (and data.text for tables)",
        )
    _finish_offsets(tmp, n_docs, n_tokens)
    meta = {
        "format": FORMAT,
        "key": key,
        "key_parts": parts,
        "origin": corpus.origin,
        "dtype": dtype.name,
        "vocab_size": encoder.vocab_size,
        "n_tokens": n_tokens,
        "n_documents": n_docs,
        "sha256": {"tokens.bin": h.hexdigest(), "offsets.npy": _sha256(tmp / "offsets.npy")},
        "danlu_version": _version(),
        "created": now(),
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(tmp / "meta.json", meta)  # last: an entry without it is incomplete
    return meta


def _special(encoder: TextEncoder, role: str, fallback: str, parts: dict[str, Any]) -> int | None:
    if not parts[f"add_{role}"]:
        return None
    found = encoder.special_ids.get(role, encoder.special_ids.get(fallback))
    if found is None:
        raise DataError(
            f"add_{role} is set but the tokenizer has no {role.upper()} (or "
            f"{fallback.upper()}) token",
            fix=f"add one to data.tokenizer, or build the token cache with add_{role}=False",
        )
    return found


def _join(
    ids: list[list[int]], dtype: np.dtype, bos: int | None, eos: int | None, cap: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """One flat array of documents (with BOS/EOS, capped) and each document's length."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    content = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    extra = (bos is not None) + (eos is not None)
    if cap is not None:
        keep_n = np.minimum(lengths, max(cap - extra, 0))
        within = np.arange(len(content)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        content = content[within < np.repeat(keep_n, lengths)]
        lengths = keep_n
    if not extra:
        return content, lengths
    total = lengths + extra
    ends = np.cumsum(total)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_content = np.ones(len(flat), dtype=bool)
    if bos is not None:
        flat[ends - total] = bos
        is_content[ends - total] = False
    if eos is not None:
        flat[ends - 1] = eos
        is_content[ends - 1] = False
    flat[is_content] = content
    return flat, total


def _finish_offsets(tmp: Path, n_docs: int, n_tokens: int) -> None:
    """offsets.tmp (raw starts) → offsets.npy with the final end appended, chunk by chunk."""
    raw_file = tmp / "offsets.tmp"
    out = np.lib.format.open_memmap(
        tmp / "offsets.npy", mode="w+", dtype=np.int64, shape=(n_docs + 1,)
    )
    if n_docs:
        raw = np.memmap(raw_file, dtype="<i8", mode="r", shape=(n_docs,))
        step = 1 << 20
        for i in range(0, n_docs, step):
            j = min(i + step, n_docs)
            out[i:j] = raw[i:j]
        del raw
    out[n_docs] = n_tokens
    out.flush()
    del out
    raw_file.unlink()
    with open(tmp / "offsets.npy", "rb+") as f:
        _sync(f)


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _publish(tmp: Path, entry: Path) -> None:
    """Rename the finished folder into place; if another process won the race, keep theirs."""
    fsync_dir(tmp)
    try:
        os.rename(tmp, entry)
    except OSError:
        if not entry.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build published first
        return
    fsync_dir(entry.parent)


def _sha256(path: Path) -> str:
    """SHA-256 of a file through hashlib's small reusable buffer (Python ≥ 3.11)."""
    if not hasattr(hashlib, "file_digest"):
        return sha256_file(path)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _version() -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("danlu")
    return None
