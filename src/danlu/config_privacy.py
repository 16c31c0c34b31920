"""Privacy keys of the schema: differential privacy in training (`train.privacy`) and PII
handling in the data (`data.redact_pii`, `data.pii`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from danlu.config_models import Section

PII_KINDS = ("email", "phone", "card", "iban", "ip")


class PrivacyConfig(Section):
    """DP-SGD through Opacus: Poisson sampling, per-sample clipping, Gaussian noise."""

    target_epsilon: float | None = Field(
        None, gt=0, le=100, description="privacy budget ε spent by the end of training"
    )
    noise_multiplier: float | None = Field(
        None, gt=0, le=100, description="instead of target_epsilon: the noise σ (ε is reported)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ: keep it below 1 / training examples")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient clipping norm")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="how ε is computed")

    @model_validator(mode="after")
    def _one_budget(self) -> PrivacyConfig:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "train.privacy needs exactly one of target_epsilon (e.g. 3.0) or noise_multiplier"
            )
        return self


class PIIConfig(Section):
    kinds: list[Literal["email", "phone", "card", "iban", "ip"]] = Field(
        list(PII_KINDS), description="built-in detectors to run"
    )
    patterns: dict[str, str] = Field(
        default_factory=dict, description="custom detectors: name → regular expression"
    )
    columns: list[str] | None = Field(None, description="columns to scan (default: all text)")
