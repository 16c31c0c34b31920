"""danlu (丹炉): carry a model through its whole life — data, training, evaluation, prediction.

    import danlu
    result = danlu.train("configs/fashion_cnn.yaml", ["train.epochs=1"])
    danlu.evaluate(result.run)
    danlu.predict(result.run, "shoe.png")

Heavy modules (torch, pandas) load on first use, so `import danlu` and `danlu --help` are fast.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

__version__ = "0.1.0"

# transformers imports torchao when it is installed; torchao then warns about CUDA kernels a
# CPU build cannot load, and torch about an API torchao still uses: noise, not news
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
__all__ = [
    "audit",
    "card",
    "compare",
    "compress",
    "data_check",
    "ensemble",
    "evaluate",
    "explain",
    "export",
    "generate",
    "load_config",
    "predict",
    "pretrain",
    "report",
    "train",
]


class _CallablePackage(types.ModuleType):
    """A stage package that is also its API verb: `danlu.train(cfg)` runs danlu.api.train while
    `danlu.train.fit` stays the loop. (A subpackage import rebinds `danlu.train` to the package,
    so the package itself must be callable.)"""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from danlu import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def _api_package(name: str) -> None:
    sys.modules[name].__class__ = _CallablePackage


def __getattr__(name: str) -> Any:
    if name in ("train", "evaluate", "ensemble", "compress"):
        import importlib

        return importlib.import_module(f"danlu.{name}")
    if name in ("predict", "data_check", "pretrain", "generate"):
        from danlu import api

        return getattr(api, name)
    if name in ("report", "compare"):
        from danlu.evaluate import report

        return {"report": report.write_report, "compare": report.write_comparison}[name]
    if name == "audit":
        from danlu.api_audit import audit

        return audit
    if name == "card":
        from danlu.evaluate.card import write_card

        return write_card
    if name == "export":
        from danlu.api_compress import export

        return export
    if name == "explain":
        from danlu.api_explain import explain

        return explain
    if name == "load_config":
        from danlu.config import load

        return load
    raise AttributeError(f"module 'danlu' has no attribute '{name}'")
