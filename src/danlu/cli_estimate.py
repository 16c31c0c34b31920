"""`danlu estimate CONFIG [key=value ...]`: the pre-flight estimate without training
(registered on cli.app).

It builds what `danlu train` would (data, model with its freeze/LoRA settings, objective) and
measures it with danlu.train.estimate; no run directory is written. The table goes to stdout
(`--json`: one JSON object instead); a run that would not fit exits 2 after the table with the
settings that would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from danlu.cli import Debug, Overrides, app, command, out


@app.command()
@command
def estimate(
    config: Annotated[str, typer.Argument(help="config file or bundled example name")],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            help="estimate for `danlu train --nproc N` on this machine: memory per process "
            "(DDP, or FSDP with train.strategy=fsdp) and for all N",
        ),
    ] = 1,
    debug: Debug = False,
) -> None:
    """Parameters, memory (weights, gradients, optimizer state, activations), time per step
    and ETA of a training run, measured on its model and data before it starts."""
    from danlu.train.distributed import check_nproc
    from danlu.train.estimate import check_fits
    from danlu.train.estimate_report import table

    check_nproc(nproc)
    est, model_cfg, train = estimate_config(config, overrides or [], nproc=nproc)
    if as_json:
        sys.stdout.write(json.dumps(est.to_dict(), indent=2) + "\n")
    else:
        out.print(table(est))
    check_fits(est, model_cfg, train)


def estimate_config(
    config: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (), nproc: int = 1
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(Estimate, model section, train section) for a config, built as `danlu train` builds it
    (freeze, LoRA, gradient checkpointing; the pretrained weights are not loaded: they change
    neither memory nor speed)."""
    import torch

    from danlu import api, models
    from danlu.config import load
    from danlu.evaluate.run import build_data
    from danlu.train.estimate import estimate_training
    from danlu.train.objectives import build_objective

    cfg = api.with_model_sources(load(config, list(overrides)))
    api.seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bundle = build_data(cfg)
    spec = bundle.spec
    model_cfg, train = cfg.model.model_dump(), cfg.train.model_dump()
    model = models.build_for(model_cfg, spec, weights=False)
    family = models.family(model, model_cfg["type"])
    model = models.adapt(model, model_cfg)
    if train.get("gradient_checkpointing"):
        models.enable_gradient_checkpointing(model, model_cfg["type"])
    kind = models.output_kind(spec.task, model_cfg["output"])
    objective = build_objective(train, spec, family, kind, bundle)
    sharded = train["strategy"] == "fsdp"
    est = estimate_training(
        model, objective, bundle, train, seed=cfg.seed, processes=nproc, sharded=sharded
    )
    return est, model_cfg, train
