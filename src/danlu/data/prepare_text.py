"""Text raws → DataBundles: labelled documents, parallel pairs and language-model corpora.

The tokenizer is trained on the training split only (or loaded from `data.tokenizer.path`),
every text is encoded once in batches by the Rust tokenizer, and the splits hold (N, L) int64
ids padded to the longest text (at most `max_length`). The fitted tokenizer travels with the
bundle and is saved in the run as tokenizer.json.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu.config import TokenizerConfig
from danlu.data.blocks import TokenSplit, holdout
from danlu.data.card import build_card, findings_for
from danlu.data.loader import Split
from danlu.data.prepare import DataBundle
from danlu.data.spec import DataSpec
from danlu.data.splits import split_positions, subset
from danlu.data.tables import encode_labels
from danlu.data.text import RawCorpus, RawPairs, RawText
from danlu.data.token_cache import build_token_cache, cached_tokenizer
from danlu.data.tokenize import TRAINED_TYPES, TextEncoder, build_tokenizer
from danlu.errors import DataError

TEXT_TASKS = ("classification", "regression")


def tokenizer_options(tokenizer: dict[str, Any] | None) -> dict[str, Any]:
    """`data.tokenizer` with its defaults filled in (a BPE vocabulary of 8,000 when unset)."""
    return TokenizerConfig(**(tokenizer or {})).model_dump()


def texts(
    raw: RawText,
    dataset: str,
    *,
    task: str | None,
    tokenizer: dict[str, Any] | None,
    split: dict[str, Any],
    seed: int,
    max_samples: int | None,
    max_eval_samples: int | None,
) -> DataBundle:
    origin = raw.origin
    task = task or raw.task or "classification"
    if task not in TEXT_TASKS:
        raise DataError(
            f"{origin}: labelled texts support task classification or regression, got {task}",
            fix="set data.task, or point data.dataset at a corpus for language_modeling",
        )
    has_test = raw.test_texts is not None
    all_labels = np.concatenate([raw.labels, raw.test_labels]) if has_test else raw.labels
    _, classes = encode_labels(pd.Series(all_labels, name=raw.label_name), task, origin)
    y, _ = encode_labels(pd.Series(raw.labels, name=raw.label_name), task, origin, classes)
    pos, how = split_positions(
        len(raw.texts),
        y if classes else None,
        val=split["val"],
        test=split["test"],
        has_official=has_test,
        seed=seed,
        stratify=split["stratify"],
        origin=origin,
    )
    parts: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
    for name, p in pos.items():
        p = subset(
            p, y if classes else None, max_samples if name == "train" else max_eval_samples, seed
        )
        parts[name] = ([raw.texts[i] for i in p], y[p], p)
    if how == "official":
        ty, _ = encode_labels(
            pd.Series(raw.test_labels, name=raw.label_name), task, origin, classes
        )
        p = subset(np.arange(len(ty)), ty if classes else None, max_eval_samples, seed)
        parts["test"] = ([raw.test_texts[i] for i in p], ty[p], p)
    if classes and len(np.unique(parts["train"][1])) < 2:
        raise DataError(
            f"{origin}: the training split holds only one class",
            fix="classification needs at least two classes; check data.label",
        )

    options = tokenizer_options(tokenizer)
    encoder = build_tokenizer(**options, texts=parts["train"][0])
    splits, lengths = {}, {}
    for name, (docs, labels, p) in parts.items():
        ids, n_tokens = _encode(encoder, docs, options["max_length"], origin)
        splits[name] = Split(torch.from_numpy(ids), torch.from_numpy(labels), p)
        lengths[name] = n_tokens
    width = max(s.x.shape[1] for s in splits.values())
    splits = {k: _pad_to(s, width, encoder.pad_id or 0) for k, s in splits.items()}
    spec = DataSpec(
        task, "text", [width], classes, raw.label_name, text=text_spec(encoder, width, options)
    )
    digest = _hash_texts(raw.texts, all_labels, raw.test_texts)
    findings = findings_for(splits, classes, {k: s.x.numpy() for k, s in splits.items()})
    findings += _length_findings(lengths["train"], options["max_length"])
    card = build_card(
        dataset=dataset,
        origin=origin,
        task=task,
        input_kind="text",
        splits=splits,
        class_names=classes,
        how_test=how,
        content_hash=digest,
        details={"text": _length_stats(lengths, options), "label": raw.label_name},
        findings=findings,
    )
    return DataBundle(splits, spec, card, digest, raw=raw, encoder=encoder)


def short_pairs(raw: RawPairs, max_words: int) -> RawPairs:
    """The pairs whose source and target both have at most `max_words` words."""
    keep = [
        i
        for i, (a, b) in enumerate(zip(raw.sources, raw.targets, strict=True))
        if len(a.split()) <= max_words and len(b.split()) <= max_words
    ]
    if not keep:
        raise DataError(
            f"{raw.origin}: no pair has at most data.max_words={max_words} words on both sides",
            fix="raise data.max_words (or remove it)",
        )
    pick = lambda items: [items[i] for i in keep]  # noqa: E731
    return RawPairs(
        pick(raw.sources),
        pick(raw.targets),
        f"{raw.origin}, pairs of ≤ {max_words} words ({len(keep):,} of {len(raw.sources):,})",
        pick(raw.keys) if raw.keys else None,
        raw.unmatched,
    )


def pairs(
    raw: RawPairs,
    dataset: str,
    *,
    tokenizer: dict[str, Any] | None,
    split: dict[str, Any],
    seed: int,
    max_samples: int | None,
    max_eval_samples: int | None,
) -> DataBundle:
    """Source/target pairs for seq2seq: x = source ids, y = target ids (one shared tokenizer)."""
    origin = raw.origin
    pos, how = split_positions(
        len(raw.sources),
        None,
        val=split["val"],
        test=0.2 if split["test"] in ("auto", "official") else split["test"],
        has_official=False,
        seed=seed,
        stratify=False,
        origin=origin,
    )
    pos = {
        k: subset(p, None, max_samples if k == "train" else max_eval_samples, seed)
        for k, p in pos.items()
    }
    options = tokenizer_options(tokenizer)
    train = pos["train"]
    corpus = [raw.sources[i] for i in train] + [raw.targets[i] for i in train]
    encoder = build_tokenizer(**options, texts=corpus)
    splits, lengths = {}, {}
    for name, p in pos.items():
        src, n_src = _encode(encoder, [raw.sources[i] for i in p], options["max_length"], origin)
        tgt, n_tgt = _encode_targets(encoder, [raw.targets[i] for i in p], options["max_length"])
        splits[name] = Split(torch.from_numpy(src), torch.from_numpy(tgt), p)
        lengths[name] = np.concatenate([n_src, n_tgt])
    spec = DataSpec(
        "seq2seq",
        "text",
        [options["max_length"]],  # the longest source or target a model must take
        None,
        None,
        text=text_spec(encoder, options["max_length"], options),
    )
    digest = _hash_texts(raw.sources, np.asarray(raw.targets), None)
    card = build_card(
        dataset=dataset,
        origin=origin,
        task="seq2seq",
        input_kind="text",
        splits=splits,
        class_names=None,
        how_test=how,
        content_hash=digest,
        details={"text": _length_stats(lengths, options), "unmatched": raw.unmatched or {}},
        findings=_length_findings(lengths["train"], options["max_length"]),
    )
    return DataBundle(splits, spec, card, digest, raw=raw, encoder=encoder)


# ------------------------------------------------------------------------------- helpers


def text_spec(encoder: TextEncoder, width: int, options: dict[str, Any]) -> dict[str, Any]:
    """What a run needs to encode new text exactly as in training (saved in preprocess.json)."""
    return {
        "tokenizer": "tokenizer.json",
        "tokenizer_hash": encoder.hash,
        "vocab_size": encoder.vocab_size,
        "max_length": options["max_length"],
        "width": width,
        "truncation": options["truncation"],
        "pad_id": encoder.pad_id if encoder.pad_id is not None else 0,
        "special_ids": encoder.special_ids,
    }


def _encode(
    encoder: TextEncoder, docs: list[str], max_length: int, origin: str
) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) ids padded to the longest document (≤ max_length) and each one's full length."""
    if not docs:
        return np.zeros((0, 1), np.int64), np.zeros(0, np.int64)
    full = np.array([len(ids) for ids in encoder.encode_ids(docs, add_special_tokens=True)])
    enc = encoder.encode_batch(docs, max_length=max_length, padding="longest")
    return enc.ids, full


def target_markers(special_ids: dict[str, int]) -> tuple[int, int]:
    """The (start, end) ids that frame a seq2seq target: BOS/EOS, else CLS/SEP; a tokenizer
    with neither BOS nor CLS starts targets with PAD, as T5 does."""
    start = special_ids.get("bos", special_ids.get("cls", special_ids.get("pad")))
    end = special_ids.get("eos", special_ids.get("sep"))
    if start is None or end is None:
        raise DataError(
            "seq2seq targets need start and end tokens, and the tokenizer has neither "
            "[BOS]/[EOS] nor [CLS]/[SEP]",
            fix="train the tokenizer with danlu (data.tokenizer.type: bpe, wordpiece, ...) or "
            "use one that defines them",
        )
    return start, end


def _encode_targets(
    encoder: TextEncoder, docs: list[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) target ids framed as start … end (the decoder reads start … and predicts
    … end), truncated to max_length including both, padded to the longest; full lengths."""
    start, end = target_markers(encoder.special_ids)
    pad = encoder.pad_id if encoder.pad_id is not None else 0
    rows = [[start, *ids, end] for ids in encoder.encode_ids(docs, add_special_tokens=False)]
    full = np.array([len(r) for r in rows], dtype=np.int64)
    if not rows:
        return np.zeros((0, 2), np.int64), full
    cut = [r if len(r) <= max_length else [*r[: max_length - 1], end] for r in rows]
    width = max(len(r) for r in cut)
    out = np.full((len(cut), width), pad, dtype=np.int64)
    for i, r in enumerate(cut):
        out[i, : len(r)] = r
    return out, full


def _pad_to(split: Split, width: int, pad_id: int) -> Split:
    if split.x.shape[1] == width:
        return split
    pad = torch.full((len(split), width - split.x.shape[1]), pad_id, dtype=split.x.dtype)
    return Split(torch.cat([split.x, pad], dim=1), split.y, split.index)


def _length_stats(lengths: dict[str, np.ndarray], options: dict[str, Any]) -> dict[str, Any]:
    limit = options["max_length"]
    out: dict[str, Any] = {"max_length": limit}
    for name, n in lengths.items():
        if len(n):
            out[name] = {
                "mean_tokens": float(n.mean()),
                "p50": float(np.median(n)),
                "p90": float(np.percentile(n, 90)),
                "max": int(n.max()),
                "truncated_share": float((n > limit).mean()),
            }
    return out


def _length_findings(train_lengths: np.ndarray, limit: int) -> list[dict[str, str]]:
    if not len(train_lengths):
        return []
    share = float((train_lengths > limit).mean())
    if share < 0.05:
        return []
    p90 = int(np.percentile(train_lengths, 90))
    return [
        {
            "level": "warning",
            "message": f"{share:.0%} of training texts are longer than max_length={limit} "
            "tokens and get truncated",
            "action": f"raise data.tokenizer.max_length (90% fit in {p90} tokens) if the end "
            "of a text matters",
        }
    ]


def _hash_texts(texts: list[str], labels: np.ndarray, test: list[str] | None) -> str:
    h = hashlib.sha256()
    for part in (texts, [str(v) for v in labels], test or []):
        for t in part:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()


def corpus(
    raw: RawCorpus,
    dataset: str,
    *,
    tokenizer: dict[str, Any] | None,
    block_size: int,
    pack: bool,
    memory_cap_mb: int | None,
    cache_dir: str | None,
    split: dict[str, Any],
    seed: int,
) -> DataBundle:
    """A language-model corpus: tokenized once into the token cache, held out by position.

    The validation split is the last `split.val` of the tokens (and a test split, if
    `split.test` is a fraction, the tokens before it), so evaluation reads text the model
    never saw in order. The tokenizer is trained on the whole corpus (as character and BPE
    vocabularies usually are); only the model is kept away from the held-out text."""
    options = tokenizer_options(tokenizer)
    if options["type"] in TRAINED_TYPES:  # trained once per (corpus, options), then reused
        keys = ("type", "vocab_size", "min_frequency", "lowercase")
        trained = cached_tokenizer(raw, cache_dir=cache_dir, **{k: options[k] for k in keys})
        encoder = TextEncoder(
            trained, max_length=options["max_length"], truncation=options["truncation"]
        )
    else:
        encoder = build_tokenizer(**options)
    cache = build_token_cache(
        raw, encoder, add_eos=True, cache_dir=cache_dir, memory_cap_mb=memory_cap_mb
    )
    whole = TokenSplit.of(cache)
    test = split["test"] if isinstance(split["test"], float) else 0.0
    rest, held_test = holdout(whole, test, key="data.split.test")
    val = split["val"] / (1 - test) if test else split["val"]
    train, held_val = holdout(rest, val)
    splits = {"train": train, "val": held_val, "test": held_test}
    text = {**text_spec(encoder, block_size, options), "block_size": block_size, "pack": pack}
    spec = DataSpec("language_modeling", "text", [block_size], text=text)
    card = {
        "dataset": dataset,
        "origin": raw.origin,
        "task": "language_modeling",
        "input": "text",
        "content_hash": raw.content_hash,
        "size_bytes": raw.size_bytes,
        "sizes": {k: len(s) for k, s in splits.items()},  # tokens
        "documents": {k: s.n_documents for k, s in splits.items()},
        "test_split": f"last {test:.0%} of the tokens" if test else "none",
        "val_split": f"last {split['val']:.0%} of the tokens before the test split",
        "text": {
            "vocab_size": encoder.vocab_size,
            "tokenizer": options["type"],
            "block_size": block_size,
            "pack": pack,
            "token_cache": str(cache.path),
            "tokens_per_document": len(whole) / max(whole.n_documents, 1),
        },
        "findings": [],
    }
    digest = hashlib.sha256(f"{raw.content_hash}:{encoder.hash}".encode()).hexdigest()
    return DataBundle(splits, spec, card, digest, raw=raw, encoder=encoder)
