"""Compression: quantization (quantize.py), pruning (prune.py), distillation (distill.py),
export (export.py), timing (bench.py) and the trade-off table (report.py). `variants.py` turns a
`compress:` entry into a variant run directory; `danlu.api_compress` runs them all. How each
variant loads is in models/compressed.py (models/quantized.py, pruned.py, onnx_runtime.py)."""

from danlu import _api_package

_api_package(__name__)  # `danlu.compress(run)` calls danlu.api.compress
