"""Text sources: labelled documents, corpora for language modelling, and parallel pairs.

Readers return one of three raw shapes, which `prepare` turns into splits of token ids:

- RawText: one document per example with a label (classification / regression), e.g. a CSV
  with text and label columns, the Orange .tab tables (R8, R52, 20 Newsgroups, tweets), the
  fortune files labelled by language or category;
- RawCorpus: documents for language modelling, re-iterable so a corpus larger than memory
  streams (plain-text files, folders, globs, the Bible as prose);
- RawPairs: aligned source/target texts for seq2seq (the English–Spanish verses).

Undecodable bytes are a DataError naming the file and byte offset unless
`data.encoding_errors: replace`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class RawText:
    """Labelled documents; `test_*` hold the dataset's official test split, if it has one."""

    texts: list[str]
    labels: np.ndarray  # raw label values (str or numbers), one per text
    origin: str  # file / folder / built-in description, for messages
    text_name: str = "text"  # the column (or field) the texts came from
    label_name: str = "label"
    task: str | None = None  # a built-in's own task
    test_texts: list[str] | None = None
    test_labels: np.ndarray | None = None


@dataclass
class RawCorpus:
    """Documents for language modelling, produced on demand (a corpus may exceed memory)."""

    documents: Callable[[], Iterator[str]]  # a fresh iterator over the documents each call
    origin: str
    content_hash: str  # SHA-256 of the source bytes (the token cache key starts here)
    size_bytes: int


@dataclass
class RawPairs:
    """Aligned (source, target) texts for seq2seq; `keys` say where each pair came from."""

    sources: list[str]
    targets: list[str]
    origin: str
    keys: list[str] | None = None  # e.g. "Gen.1.1"
