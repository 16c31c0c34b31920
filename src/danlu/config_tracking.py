"""Tracking keys of the schema: `train.mlflow` (experiment tracking with MLflow).

TensorBoard (`train.tensorboard`) needs no section; MLflow is opt-in. Writing the section
turns it on (`enabled: false` keeps the settings but turns it off):

    train:
      mlflow: {tracking_uri: null, experiment: null}   # sqlite:///<runs_dir>/mlflow.db, name
"""

from __future__ import annotations

from pydantic import Field

from danlu.config_models import Section


class MLflowConfig(Section):
    """Where and under which experiment a run is logged (see danlu.train.tracking)."""

    enabled: bool = Field(True, description="log params, metrics, artifacts and lineage")
    tracking_uri: str | None = Field(
        None,
        description="an MLflow tracking URI (http://…, sqlite:///…); default: a SQLite store "
        "at <runs_dir>/mlflow.db",
    )
    experiment: str | None = Field(None, description="experiment name (default: the config's name)")
