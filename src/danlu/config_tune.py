"""The `tune:` section: the search space and budgets of `danlu tune CONFIG`.

    tune:
      metric: val_accuracy     # default: train.monitor; minimized when lower is better (loss)
      trials: 20               # finished + pruned trials, counted across resumed invocations
      timeout_minutes: 30      # time budget of one invocation (null = none)
      sampler: tpe             # tpe | random, seeded with tune.seed (default: the config's seed)
      pruner: median           # median | successive_halving | none
      space:
        train.optimizer.lr: {type: log_uniform, low: 1.0e-4, high: 1.0e-1}
        train.batch_size: {type: choice, values: [16, 32, 64]}
        model.dropout: {type: uniform, low: 0.0, high: 0.5}
        train.epochs: {type: int, low: 2, high: 8}       # step: optional

A key of `space` is any dotted config key (what `danlu train CONFIG key=value` takes); a bare
list is short for a choice. This module checks each range on its own (known type and keys,
low < high, log ranges above 0, a choice with values), one message per problem naming the
key. Whether a key exists in the schema, and whether its extreme values are valid there, is
checked by danlu.tune.search against the whole Config: this module sits below config.py.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from danlu.config_models import Section

# the keys each range type takes (after `type`), the required ones first
KINDS: dict[str, tuple[str, ...]] = {
    "uniform": ("low", "high", "step"),
    "log_uniform": ("low", "high"),
    "int": ("low", "high", "step", "log"),
    "choice": ("values",),
}
REQUIRED = {"uniform": 2, "log_uniform": 2, "int": 2, "choice": 1}
EXAMPLE = "train.optimizer.lr: {type: log_uniform, low: 1.0e-4, high: 1.0e-1}"


class ParamSpec(Section):
    """One searched key: a float range (uniform / log_uniform), an int range or a choice."""

    type: Literal["uniform", "log_uniform", "int", "choice"]
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = Field(None, gt=0, description="uniform / int: grid spacing")
    log: bool = Field(False, description="int: sample on a log scale")
    values: list[Any] | None = Field(None, description="choice: the candidates (any YAML)")

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, raw: Any) -> Any:
        if isinstance(raw, list):
            raw = {"type": "choice", "values": raw}
        if not isinstance(raw, dict):
            raise ValueError("a search range is a mapping like {type: uniform, low: 0, high: 1}")
        kind = raw.get("type")
        if kind is None:
            raise ValueError(f"a search range needs a type: one of {', '.join(KINDS)}")
        if kind not in KINDS:
            close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"type {kind!r} is not a search type; {hint}use one of {', '.join(KINDS)}"
            )
        keys = KINDS[kind]
        for key, value in raw.items():
            if key != "type" and key not in keys and value is not None:
                close = difflib.get_close_matches(str(key), keys, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"'{key}' is not a key of a {kind} range; {hint}it takes "
                                 f"{', '.join(keys)}")  # fmt: skip
        missing = [k for k in keys[: REQUIRED[kind]] if raw.get(k) is None]
        if missing:
            raise ValueError(f"a {kind} range needs {' and '.join(missing)}")
        return raw

    @model_serializer(mode="wrap")
    def _compact(self, handler: Any) -> dict[str, Any]:
        """Only the keys of the range's type, as written (what config.yaml records)."""
        data = handler(self)
        keys = ("type", *KINDS[self.type])
        return {k: v for k, v in data.items() if k in keys and v is not None and v is not False}

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs at least one value (values: [] is empty)")
            return self
        low, high = self.low, self.high
        assert low is not None and high is not None  # _shape requires both
        if not low < high:
            raise ValueError(f"low must be below high (got low={low}, high={high})")
        if self.type == "log_uniform" and low <= 0:
            raise ValueError(f"log_uniform needs low > 0 (got low={low}); use uniform for 0")
        if self.type == "int":
            if not (float(low).is_integer() and float(high).is_integer()):
                raise ValueError(f"an int range needs whole bounds (got low={low}, high={high})")
            if self.step is not None and not float(self.step).is_integer():
                raise ValueError(f"an int range needs a whole step (got step={self.step})")
            if self.log and (low < 1 or (self.step or 1) != 1):
                raise ValueError(f"a log int range needs low >= 1 and no step (got low={low})")
        return self


class TuneConfig(Section):
    metric: str | None = Field(
        None, pattern=r"^val_\w+$", description="validation metric to optimize (train.monitor)"
    )
    trials: int = Field(20, ge=1, description="budget: finished + pruned trials of the study")
    timeout_minutes: float | None = Field(
        None, gt=0, description="time budget of one invocation (the running trial finishes)"
    )
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "successive_halving", "none"] = "median"
    seed: int | None = Field(None, description="sampler seed (default: the config's seed)")
    startup_trials: int | None = Field(
        None,
        ge=0,
        description="trials sampled at random before TPE models the results, and finished "
        "before the median pruner compares (default: trials // 4, within 2..10)",
    )
    warmup_evaluations: int = Field(
        1, ge=0, description="evaluations every trial runs before it may be pruned"
    )
    space: dict[str, ParamSpec] = Field(description="dotted config key → range or choice")

    @field_validator("space")
    @classmethod
    def _keys(cls, space: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not space:
            raise ValueError(f"the search space is empty; add a key such as {EXAMPLE}")
        for key in space:
            parts = key.split(".")
            if not all(parts):
                raise ValueError(f"'{key}' is not a dotted config key (like {EXAMPLE[:18]})")
            if parts[0] == "tune":
                raise ValueError(f"'{key}': the search cannot change the tune section itself")
            outer = next((k for k in space if key.startswith(k + ".")), None)
            if outer:
                raise ValueError(f"'{key}' lies inside '{outer}', which is searched as a whole; "
                                 "search one of them")  # fmt: skip
        return space

    def startup(self) -> int:
        """Trials before the sampler and the median pruner learn from the results."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(2, min(10, self.trials // 4))
