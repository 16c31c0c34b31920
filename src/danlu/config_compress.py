"""The `compress:` section: the variants `danlu compress RUN` makes of a trained run.

Each variant is one method applied to the parent run's model; it becomes a run directory of its
own (under <parent>/compressed/<name>/ by default), evaluated on the parent's split and measured
for size and speed, so the trade-off table compares like with like.

    compress:
      budget: 0.5                 # points of the task metric a variant may lose
      variants:
        - {name: int8, method: dynamic_int8}
        - {name: pruned, method: neurons, amount: 0.5, train: {max_steps: 300}}
        - {name: student, method: distill, student: {num_layers: 2}, temperature: 2}
        - {name: onnx-int8, method: onnx_int8}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from danlu.config_models import Section

QUANTIZE = ("bf16", "dynamic_int8", "static_int8", "int8_weight", "int4_weight")
PRUNE = ("magnitude", "neurons", "channels", "heads")
EXPORT = ("onnx", "onnx_int8")
METHODS = (*QUANTIZE, *PRUNE, "distill", "tie_weights", *EXPORT)
Method = Literal[
    "bf16", "dynamic_int8", "static_int8", "int8_weight", "int4_weight",
    "magnitude", "neurons", "channels", "heads",
    "distill", "tie_weights", "onnx", "onnx_int8",
]  # fmt: skip
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def kind_of(method: str) -> str:
    """quantize | prune | distill | share | export: the family a method belongs to."""
    if method in QUANTIZE:
        return "quantize"
    if method in PRUNE:
        return "prune"
    if method in EXPORT:
        return "export"
    return "share" if method == "tie_weights" else "distill"


class VariantTrain(Section):
    """Training after the method: recovery for pruning and tying, the student's for distill."""

    epochs: int | None = Field(None, ge=1, description="default: 1 (recovery), parent's (distill)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; wins over epochs")
    lr: float | None = Field(
        None, gt=0, description="default: the parent's lr (distill) or a tenth of it (recovery)"
    )
    batch_size: int | None = Field(None, ge=1, description="default: the parent's")


class VariantConfig(Section):
    name: str = Field(pattern=NAME, description="the variant's folder name")
    method: Method
    group_size: int = Field(
        128, ge=8, description="int4_weight: inputs per scale (32, 64, 128, 256 use fast kernels)"
    )
    skip: list[str] = Field(
        [], description="quantize: modules kept in fp32 (names, containers, suffixes, globs)"
    )
    amount: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="pruning: the fraction of weights (magnitude) or units removed",
    )
    scope: Literal["global", "layer"] = Field(
        "global", description="magnitude: one threshold or one per layer"
    )
    train: VariantTrain | None = Field(
        None, description="pruning / tie_weights: a recovery fine-tune; distill: the student's"
    )
    student: dict[str, Any] | None = Field(
        None, description="distill: model keys that differ from the teacher (e.g. num_layers: 2)"
    )
    temperature: float = Field(2.0, gt=0, description="distill: softmax temperature")
    alpha: float = Field(
        0.5, ge=0, le=1, description="distill: weight of the teacher's soft targets"
    )
    tolerance: float = Field(1e-3, gt=0, description="onnx: largest output difference accepted")

    @model_validator(mode="after")
    def _fits_method(self) -> VariantConfig:
        if self.method in PRUNE and self.amount is None:
            raise ValueError(
                f"variant '{self.name}': {self.method} pruning needs amount (a fraction in (0, 1), "
                "e.g. amount: 0.5)"
            )
        if self.amount is not None and self.method not in PRUNE:
            raise ValueError(f"variant '{self.name}': amount applies to pruning, not {self.method}")
        if self.method == "distill" and not self.student:
            raise ValueError(
                f"variant '{self.name}': distill needs student (the model keys that make it "
                "smaller, e.g. student: {num_layers: 2} or {hidden_sizes: [64]})"
            )
        if self.student is not None and self.method != "distill":
            raise ValueError(
                f"variant '{self.name}': student applies to distill, not {self.method}"
            )
        if self.train is not None and kind_of(self.method) in ("quantize", "export"):
            raise ValueError(
                f"variant '{self.name}': {self.method} is post-training; train applies to pruning, "
                "tie_weights and distill"
            )
        return self


class CompressConfig(Section):
    variants: list[VariantConfig] = Field(min_length=1)
    split: Literal["val", "test"] | None = Field(None, description="default: evaluate.split")
    metric: str | None = Field(None, description="default: the task's headline metric")
    budget: float = Field(0.5, ge=0, description="points of the metric a variant may lose")
    threads: int | None = Field(None, ge=1, description="CPU threads when timing (default: all)")
    calibration_batches: int = Field(8, ge=1, le=1000, description="static_int8: batches observed")

    @model_validator(mode="after")
    def _unique_names(self) -> CompressConfig:
        names = [v.name for v in self.variants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(twice)}")
        return self
