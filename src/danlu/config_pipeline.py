"""The `pipeline:` section: the stages `danlu pipeline CONFIG` runs, in order, on one run.

    pipeline:
      stages: [data_check, train, evaluate, compress, report, register, serve]
      data_check: {sufficiency: false}   # the learning curve is the slow part of a data check
      register: {name: null, stage: dev, variant: recommended, root: null}
      serve: {model: registered}

Stages keep the lifecycle's order (data_check → train|finetune → evaluate → compress → report
→ register → serve); any may be left out. `finetune` is `train` under the name a fine-tuning
config reads best with (the same api.train). An unknown name or a stage out of order is one
ConfigError naming the known stages in their order.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Literal

from pydantic import Field, field_validator

from danlu.config_models import Section
from danlu.errors import ConfigError

ORDER = ("data_check", "train", "evaluate", "compress", "report", "register", "serve")
ALIASES = {"finetune": "train"}  # another name for a stage: same function, same place
STAGE_NAMES = (*ORDER, *ALIASES)
REGISTRY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def rank(stage: str) -> int:
    """The place of a stage (or alias) in the lifecycle."""
    return ORDER.index(ALIASES.get(stage, stage))


def check_stages(stages: list[str], where: str = "") -> list[str]:
    """`stages` if every name is known, none repeats and they keep the lifecycle's order;
    else ValueError naming the problem (after `where`, e.g. "--only: ") and the known ones."""
    known = ", ".join(ORDER) + " (finetune = train)"
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"{where}unknown stage {', '.join(map(repr, unknown))}; known: {known}")
    ranks = [rank(s) for s in stages]
    if len(set(ranks)) < len(ranks):
        twice = sorted({s for s in stages if ranks.count(rank(s)) > 1})
        raise ValueError(f"{where}{', '.join(twice)}: a stage runs once (finetune is train)")
    for before, after in itertools.pairwise(stages):
        if rank(after) < rank(before):
            raise ValueError(f"{where}{after} cannot come after {before}; the order is {known}")
    return stages


def select_stages(
    configured: list[str], *, serve: bool, start: str | None, only: list[str] | None
) -> tuple[list[str], set[str]]:
    """The stages to go through and those forced to run even if done."""
    stages = [s for s in configured if serve or s != "serve"]
    for option, names in (("--from", [start] if start else []), ("--only", only or [])):
        try:
            check_stages(names, f"{option}: ")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        missing = [n for n in names if n not in stages]
        if missing:
            raise ConfigError(
                f"{option} names {', '.join(missing)}, which this pipeline does not run",
                fix=f"choose among {', '.join(stages)} (pipeline.stages"
                + ("" if serve else "; --no-serve leaves serve out")
                + ")",
            )
    if only:
        return [s for s in stages if s in only], set(only)
    if start:
        return stages, {s for s in stages if rank(s) >= rank(start)}
    return stages, set()


class DataCheckStage(Section):
    sufficiency: bool = Field(
        False, description="also estimate whether more data would help (a learning curve: slow)"
    )


class RegisterStage(Section):
    name: str | None = Field(
        None, pattern=REGISTRY_NAME, description="registry name (default: the config's name)"
    )
    stage: Literal["dev", "staging", "prod"] = "dev"
    variant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="register RUN/compressed/VARIANT instead of the run; 'recommended' = the "
        "variant the compress report recommends (the run itself when it recommends none)",
    )
    root: str | None = Field(None, description="registry root (default: DANLU_REGISTRY, else "
                             "./registry)")  # fmt: skip


class ServeStage(Section):
    model: Literal["registered", "run"] = Field(
        "registered",
        description="serve the version the register stage recorded (NAME:VERSION), or the run "
        "folder itself (the registered variant's, when register names one)",
    )


# `register` is also the name of ABCMeta.register on the class (never on an instance, where
# the field lives): pydantic's warning about it says nothing useful here.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class PipelineConfig(Section):
        stages: list[str] = Field(
            default_factory=lambda: list(ORDER), min_length=1, description="in lifecycle order"
        )
        data_check: DataCheckStage = DataCheckStage()
        register: RegisterStage = RegisterStage()
        serve: ServeStage = ServeStage()

        @field_validator("stages")
        @classmethod
        def _known_and_ordered(cls, stages: list[str]) -> list[str]:
            return check_stages(stages)
