"""The search space of `danlu tune`: ranges checked against the schema, sampled by a trial and
written back as the `key=value` overrides `danlu train` takes.

    params = check(base_config_dict, cfg.tune.space)   # ConfigError naming a bad key or value
    value = params["train.optimizer.lr"].suggest(trial)
    override = f"train.optimizer.lr={yaml_text(value)}"  # "train.optimizer.lr=0.00123"

A key is checked by validating the whole config with each extreme of its range (low and high,
every choice) applied as an override, so an unknown key gets the schema's did-you-mean and a
value the key refuses (dropout 1.5) is named before any training. Optuna's categorical
parameters hold only scalars: a choice among lists or mappings ([64], [128, 64]) is stored
under the YAML text of each value and decoded back here. `yaml_text` writes a value so that
YAML reads back the same value (1e-05 becomes 1.0e-05, which YAML reads as a float; strings are
quoted, so "yes" stays a string).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from danlu.config import apply_overrides, validate
from danlu.config_tune import ParamSpec
from danlu.errors import ConfigError
from danlu.evaluate import metrics

SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Param:
    key: str
    spec: ParamSpec

    @property
    def labels(self) -> list[Any]:
        """Choice: what Optuna stores for each value (the value itself, or its YAML text)."""
        values = self.spec.values or []
        if all(isinstance(v, SCALARS) for v in values):
            return list(values)
        return [yaml_text(v) for v in values]

    def suggest(self, trial: Any) -> Any:
        s = self.spec
        if s.type == "choice":
            return self.decode(trial.suggest_categorical(self.key, self.labels))
        low, high = s.low, s.high
        assert low is not None and high is not None  # ParamSpec requires both
        if s.type == "int":
            step = int(s.step or 1)
            return trial.suggest_int(self.key, int(low), int(high), step=step, log=s.log)
        return trial.suggest_float(self.key, low, high, log=s.type == "log_uniform", step=s.step)

    def decode(self, label: Any) -> Any:
        """The config value of a stored parameter."""
        if self.spec.type != "choice":
            return label
        return (self.spec.values or [])[self.labels.index(label)]

    def extremes(self) -> list[Any]:
        """The values checked before the study starts: the bounds, or every choice."""
        s = self.spec
        if s.type == "choice":
            return list(s.values or [])
        if s.type == "int":
            return [int(s.low or 0), int(s.high or 0)]
        return [s.low, s.high]


def check(base: dict[str, Any], space: dict[str, ParamSpec]) -> dict[str, Param]:
    """Each key of the space as a Param, once the config validates with each of its extreme
    values; else one ConfigError naming the key and the value (and a did-you-mean)."""
    params = {}
    for key, spec in space.items():
        param = Param(key, spec)
        for value in param.extremes():
            text = yaml_text(value)
            if yaml.safe_load(text) != value:  # e.g. a date: its text reads back differently
                raise ConfigError(f"tune.space: {key}: cannot search the value {value!r}")
            try:
                validate(apply_overrides(base, [f"{key}={text}"]), f"tune.space ({key}={text})")
            except ConfigError as e:
                text = e.message if e.message.startswith("tune.space") else f"tune.space: {e}"
                raise ConfigError(text) from None
        params[key] = param
    return params


def show(value: Any) -> str:
    """A value for a progress line or table cell: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else yaml_text(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (model.dropout → dropout), or the whole key where two
    would read alike."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: n if last.count(n) == 1 else k for k, n in zip(keys, last, strict=True)}


def check_metric(metric: str) -> None:
    """`tune.metric` must name a validation metric some task reports (the task itself is known
    only once the data is read; a metric the run lacks stops the first trial)."""
    known = ["loss", *metrics.CLASSIFICATION, *metrics.REGRESSION, *metrics.TOKENS]
    name = metric.removeprefix("val_")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean 'val_{close[0]}'? " if close else ""
        raise ConfigError(f"tune.metric: '{metric}' is not a validation metric; {hint}use "
                          "val_loss, val_accuracy, val_f1_macro, val_rmse, ...")  # fmt: skip


def yaml_text(value: Any) -> str:
    """A value as override text that YAML reads back as the same value."""
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))}: {yaml_text(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, SCALARS):
        return json.dumps(value)  # true / null / 3 / "text" (quoted: "yes" stays a string)
    return repr(value)  # not YAML: check() refuses it
