"""Exact and near duplicates, within the training split and across splits (leakage).

Every example becomes a 64-bit hash of its input (never of its label), once as it is and once
normalized, so that copies differing only in noise-level detail collide:

- text: lowercased, punctuation and runs of whitespace collapsed to one space;
- images: average-pooled to sides of at most 16 pixels and quantized to 8 grey levels;
- tables: numbers rounded to 3 significant digits, strings lowercased and trimmed.

Hashing is O(n) and fast (0.3 s for the 70,000 Fashion-MNIST images), so it runs before every
training. The price: a near copy is found only when its changes stay inside the quantization
bins. A few retouched pixels or re-encoded flat regions are caught; noise or a brightness shift
over the whole image crosses a bin edge somewhere and is missed. Near-duplicate counts are a
lower bound.

    h = {name: hashes(inputs[name], "image", near=True) for name in inputs}
    stats = duplicate_stats(h)   # within-split copies, val/test rows also in train, examples
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import numpy as np
import pandas as pd

NEAR_SIDE = 16  # images: pool until both sides are at most this
NEAR_LEVELS = 8  # images: grey levels kept (256 / 8 = bins of 32)
NEAR_DIGITS = 3  # tables: significant digits kept
_PUNCT = re.compile(r"[\W_]+")


def normalize_text(s: str) -> str:
    """Lowercase; punctuation, underscores and whitespace runs become one space."""
    return _PUNCT.sub(" ", s.lower()).strip()


def hashes(inputs: Any, kind: str, *, near: bool = False) -> np.ndarray:
    """One uint64 per example. inputs: a DataFrame (table), (N, C, H, W) uint8 array (image),
    a list of strings (text), or any (N, ...) array (hashed as bytes)."""
    if kind == "text":
        texts = [normalize_text(t) for t in inputs] if near else list(inputs)
        return _digest([t.encode("utf-8", "surrogatepass") for t in texts])
    if kind == "table" and isinstance(inputs, pd.DataFrame):
        frame = _rounded(inputs) if near else inputs
        return pd.util.hash_pandas_object(frame, index=False).to_numpy(np.uint64)
    a = np.asarray(inputs)
    if not len(a):
        return np.zeros(0, np.uint64)
    if near and kind == "image":
        a = _coarse_image(a)
    elif near:
        a = _round_significant(a.astype(np.float64))
    return _digest_rows(a.reshape(len(a), -1))


def duplicate_stats(
    h: dict[str, np.ndarray], labels: dict[str, np.ndarray] | None = None, examples: int = 10
) -> dict[str, Any]:
    """Copies within each split, val/test rows whose input also occurs in train, and label
    conflicts (identical inputs with different labels, over all splits)."""
    train = h["train"]
    uniq, first = np.unique(train, return_index=True)
    out: dict[str, Any] = {"within": {}, "in_train": {}, "share_in_train": {}, "examples": []}
    for name, v in h.items():
        out["within"][name] = int(len(v) - len(np.unique(v)))
    for name, v in h.items():
        if name == "train" or not len(v):
            continue
        hit = np.isin(v, uniq)
        out["in_train"][name] = int(hit.sum())
        out["share_in_train"][name] = float(hit.mean())
        rows = np.nonzero(hit)[0][:examples]
        at = first[np.searchsorted(uniq, v[rows])]
        out["examples"] += [[name, int(r), "train", int(t)] for r, t in zip(rows, at, strict=True)]
    copies = np.nonzero(first[np.searchsorted(uniq, train)] != np.arange(len(train)))[0]
    for r in copies[:examples]:
        out["examples"].append(
            ["train", int(r), "train", int(first[np.searchsorted(uniq, train[r])])]
        )
    if labels is not None:
        out["label_conflicts"] = label_conflicts(h, labels)
    return out


def label_conflicts(h: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> int:
    """How many groups of identical inputs (across all splits) carry more than one label."""
    names = [n for n in h if len(h[n])]
    if not names:
        return 0
    frame = pd.DataFrame(
        {
            "h": np.concatenate([h[n] for n in names]),
            "y": np.concatenate([np.asarray(labels[n]) for n in names]),
        }
    )
    sizes = frame.groupby("h")["y"].nunique()
    return int((sizes > 1).sum())


# ------------------------------------------------------------------------------ helpers


def _digest(items: list[bytes]) -> np.ndarray:
    if not items:
        return np.zeros(0, np.uint64)
    joined = b"".join(hashlib.blake2b(b, digest_size=8).digest() for b in items)
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64)


def _digest_rows(a: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes, vectorized over rows: xor-multiply over 8-byte
    words, then the splitmix64 finalizer (a blake2b per row costs ~10× more)."""
    raw = np.ascontiguousarray(a).view(np.uint8).reshape(len(a), -1)
    pad = -raw.shape[1] % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(raw), pad), np.uint8)], axis=1)
    words = raw.view("<u8")  # (N, W)
    h = np.full(len(a), np.uint64(raw.shape[1]) ^ _SEED, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h = (h ^ words[:, j]) * _PRIME
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


_SEED, _PRIME = np.uint64(0x9E3779B97F4A7C15), np.uint64(0x100000001B3)


def _coarse_image(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 → pooled to sides ≤ NEAR_SIDE, quantized to NEAR_LEVELS levels."""
    n, c, hgt, wid = x.shape
    k = max(1, math.ceil(max(hgt, wid) / NEAR_SIDE))
    h2, w2 = hgt // k, wid // k
    acc = np.zeros((n, c, h2, w2), np.uint32)
    for i in range(k):  # k² strided adds: far faster than a reshape + sum over two axes
        for j in range(k):
            acc += x[:, :, i : h2 * k : k, j : w2 * k : k]
    return (acc // (k * k) // (256 // NEAR_LEVELS)).astype(np.uint8)


def _round_significant(v: np.ndarray, digits: int = NEAR_DIGITS) -> np.ndarray:
    finite = np.isfinite(v) & (v != 0)
    mag = np.zeros_like(v)
    mag[finite] = np.floor(np.log10(np.abs(v[finite])))
    scale = 10.0 ** (digits - 1 - mag)
    out = np.where(finite, np.round(v * scale) / scale, v)
    return out + 0.0  # -0.0 → 0.0


def _rounded(frame: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for c in frame.columns:
        col = frame[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            out[c] = _round_significant(col.to_numpy(np.float64))
        else:
            out[c] = col.astype("string").str.lower().str.strip().fillna("<missing>")
    return pd.DataFrame(out)
