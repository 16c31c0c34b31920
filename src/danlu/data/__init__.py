"""Data: sources (tables, IDX, CIFAR, image folders, built-ins), splits, preprocessing, batches.

`build(**cfg.data.model_dump(), seed=cfg.seed)` returns a DataBundle: the splits in memory, the
DataSpec saved with the run as preprocess.json, and the data card.
"""

from danlu.data.build import DataBundle, build
from danlu.data.builtin import CATALOG
from danlu.data.loader import Batch, BatchLoader, Split
from danlu.data.spec import DataSpec

__all__ = ["CATALOG", "Batch", "BatchLoader", "DataBundle", "DataSpec", "Split", "build"]
