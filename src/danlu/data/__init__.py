"""Data: sources (tables, images, texts, corpora, parallel pairs, built-ins), splits,
preprocessing, tokenizers, the token cache and batches.

`build(**cfg.data.model_dump(), seed=cfg.seed)` returns a DataBundle: the splits in memory (or
memory-mapped token splits for corpora), the DataSpec saved with the run as preprocess.json,
the fitted tokenizer for text, and the data card.
"""

from danlu.data.blocks import BlockLoader, TokenSplit
from danlu.data.build import DataBundle, build
from danlu.data.builtin import CATALOG
from danlu.data.loader import Batch, BatchLoader, Split
from danlu.data.spec import DataSpec
from danlu.data.tokenize import TextEncoder, build_tokenizer, load_tokenizer

__all__ = [
    "CATALOG",
    "Batch",
    "BatchLoader",
    "BlockLoader",
    "DataBundle",
    "DataSpec",
    "Split",
    "TextEncoder",
    "TokenSplit",
    "build",
    "build_tokenizer",
    "load_tokenizer",
]
