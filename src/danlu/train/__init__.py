"""Training: the one loop (`loop.fit`), optimizers and schedules, checkpoints, objectives.

The package is callable: `danlu.train(config)` runs `danlu.api.train`.
"""

from danlu import _api_package

_api_package(__name__)
