"""`build(**cfg.data)`: a dataset name or path → splits in memory, a DataSpec and a data card.

bundle = build(dataset="fashion-mnist", seed=0)
loader = bundle.loader("train", 64, order="shuffle", seed=0)
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

from danlu.data import builtin, pii_scan, prepare, prepare_text
from danlu.data.hf import hf_dataset
from danlu.data.images import (
    RawImages,
    find_idx,
    read_cifar_folder,
    read_idx_folder,
    read_image_folder,
)
from danlu.data.prepare import DataBundle
from danlu.data.tables import RawTable, is_table, read_table
from danlu.data.text import (
    RawCorpus,
    RawPairs,
    RawText,
    corpus_from_texts,
    need_columns,
    orange_columns,
    read_corpus,
    read_text_table,
    text_table,
    texts_of,
)
from danlu.errors import ConfigError, DataError

__all__ = ["DataBundle", "build", "resolve"]

log = logging.getLogger("danlu")


def resolve(
    dataset: str,
    *,
    image: dict[str, Any],
    cache_dir: str | None,
    mirror: str | None,
    download: bool,
    task: str | None = None,
    text: str | None = None,
    label: str | None = None,
    target: str | None = None,
    encoding_errors: str = "strict",
) -> builtin.Raw:
    """Read a built-in name, `hf:NAME`, a table, a text file / folder / glob, or image files.

    Text comes back as RawText / RawCorpus / RawPairs: a .jsonl or Orange .tab file, or any
    table when data.text or data.target is set (or task is seq2seq); with task:
    language_modeling, a .txt (or other non-table) file, a folder of .txt files or a glob too.
    """
    if dataset.startswith("hf:"):
        return hf_dataset(dataset, task=task, text=text, label=label, target=target)
    if dataset in builtin.CATALOG:
        return builtin.load(dataset, cache=cache_dir, mirror=mirror, download=download)
    path = Path(dataset).expanduser()
    lm = task == "language_modeling"
    if path.is_file():
        name = path.name.lower()
        if lm and (name.endswith(".txt") or not (is_table(path) or name.endswith(".tab"))):
            return read_corpus(path, encoding_errors=encoding_errors)
        textual = name.endswith((".jsonl", ".ndjson", ".tab")) or text or target
        if textual or task in ("seq2seq", "language_modeling"):
            return _text_table(path, task, text, label, target, encoding_errors)
        if is_table(path):
            return RawTable(read_table(path), str(path))
        raise DataError(
            f"data file '{path}' has an unsupported type '{path.suffix}'",
            fix="use .csv, .tsv, .parquet, .jsonl, or a folder of IDX files, CIFAR batches or "
            "images (text files: task: language_modeling)",
        )
    if path.is_dir():
        if lm:
            return read_corpus(path, encoding_errors=encoding_errors)
        size = tuple(image["resize"]) if image.get("resize") else None
        if find_idx(path):
            return read_idx_folder(path)
        if any(path.glob("data_batch_*.bin")):
            return read_cifar_folder(path)
        return read_image_folder(path, image.get("channels"), size)
    if any(c in dataset for c in "*?["):
        if lm:
            return read_corpus(dataset, encoding_errors=encoding_errors)
        raise DataError(
            f"dataset '{dataset}' is a glob: globs of text files are corpora for language modelling",
            fix="set data.task: language_modeling, or name one file or folder",
        )
    close = difflib.get_close_matches(dataset, builtin.names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise DataError(
        f"dataset '{dataset}' is neither a built-in name nor an existing file or folder",
        fix=f"{hint}built-in datasets: {', '.join(builtin.names())} (see `danlu datasets list`)",
    )


def _text_table(
    path: Path,
    task: str | None,
    text: str | None,
    label: str | None,
    target: str | None,
    encoding_errors: str,
) -> RawText | RawCorpus | RawPairs:
    """A table of texts: labelled documents, a language-modelling corpus, or pairs."""
    frame, origin = read_text_table(path, encoding_errors), str(path)
    if path.name.lower().endswith(".tab"):
        orange_text, orange_label = orange_columns(frame)
        text, label = text or orange_text, label or orange_label
    if task == "language_modeling":
        need_columns(frame, origin, text=text or "text")
        return corpus_from_texts(texts_of(frame[text or "text"]), origin)
    if task == "seq2seq" or target:
        return text_table(frame, origin, text=text or "source", target=target or "target")
    return text_table(frame, origin, text=text or "text", label=label or "label")


def build(
    *,
    dataset: str,
    task: str | None = None,
    label: str | None = None,
    features: list[str] | None = None,
    columns: dict[str, str] | None = None,
    missing: str = "error",
    fill_value: Any = 0,
    split: dict[str, Any] | None = None,
    normalize: bool = True,
    image: dict[str, Any] | None = None,
    augment: dict[str, Any] | None = None,
    max_samples: int | None = None,
    max_eval_samples: int | None = None,
    mirror: str | None = None,
    cache_dir: str | None = None,
    download: bool = True,
    text: str | None = None,
    target: str | None = None,
    tokenizer: dict[str, Any] | None = None,
    block_size: int = 256,
    pack: bool = True,
    encoding_errors: str = "strict",
    memory_cap_mb: int | None = None,
    max_words: int | None = None,
    check: dict[str, Any] | None = None,  # read by `danlu data check`, not here
    sufficiency: dict[str, Any] | None = None,  # read by `danlu data check`, not here
    redact_pii: bool = False,
    pii: dict[str, Any] | None = None,  # kinds, patterns, columns: see pii_scan.py
    seed: int = 0,
) -> DataBundle:
    split = {"val": 0.1, "test": "auto", "stratify": True, "seed": None, **(split or {})}
    image = image or {}
    pii = {"kinds": None, "patterns": None, "columns": None, **(pii or {})}
    if task == "chat" and redact_pii:
        raise ConfigError(
            "data.redact_pii is not supported with data.task: chat yet",
            fix="redact the conversations beforehand, or set data.redact_pii: false",
        )
    if task == "chat":
        from danlu.data.prepare_chat import build_chat

        return build_chat(
            dataset,
            tokenizer=tokenizer,
            block_size=block_size,
            pack=pack,
            split=split,
            seed=split["seed"] if split["seed"] is not None else seed,
            max_samples=max_samples,
            max_eval_samples=max_eval_samples,
            cache_dir=cache_dir,
        )
    raw = resolve(
        dataset,
        image=image,
        cache_dir=cache_dir,
        mirror=mirror,
        download=download,
        task=task,
        text=text,
        label=label,
        target=target,
        encoding_errors=encoding_errors,
    )
    if redact_pii:  # before anything reads the texts: splits, tokenizer, token cache, hashes
        names = (text or "source", target or "target")
        raw, redacted = pii_scan.redact_raw(raw, **pii, names=names)
    opts = dict(
        split=split,
        seed=split["seed"] if split["seed"] is not None else seed,
        max_samples=max_samples,
        max_eval_samples=max_eval_samples,
    )
    if isinstance(raw, RawImages):
        bundle = prepare.images(raw, dataset, task or "classification", image, normalize, **opts)
    elif isinstance(raw, RawText):
        bundle = prepare_text.texts(raw, dataset, task=task, tokenizer=tokenizer, **opts)
    elif isinstance(raw, RawCorpus):
        bundle = prepare_text.corpus(
            raw,
            dataset,
            tokenizer=tokenizer,
            block_size=block_size,
            pack=pack,
            memory_cap_mb=memory_cap_mb,
            cache_dir=cache_dir,
            split=split,
            seed=opts["seed"],
        )
    elif isinstance(raw, RawPairs):
        if max_words is not None:
            raw = prepare_text.short_pairs(raw, max_words)
        bundle = prepare_text.pairs(raw, dataset, tokenizer=tokenizer, **opts)
    else:
        bundle = prepare.table(
            raw,
            dataset,
            task,
            label,
            features,
            columns or {},
            missing,
            fill_value,
            normalize,
            **opts,
        )
    bundle.augment = augment
    bundle.raw = raw
    if redact_pii:
        pii_scan.record(bundle, redacted, pii["kinds"], pii["patterns"])
    return bundle
