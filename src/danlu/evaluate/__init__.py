"""Evaluation: metrics as pure functions and streaming accumulators; scoring a run.

The package is callable: `danlu.evaluate(run)` runs `danlu.api.evaluate`.
"""

from danlu import _api_package

_api_package(__name__)
