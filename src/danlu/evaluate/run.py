"""Evaluate a run directory on one of its splits; results go to metrics.json.

The split is rebuilt from the run's config (splits are deterministic); if the data's content
hash differs from the one recorded at training time the numbers would not be comparable, so
that is refused with an explanation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from danlu import data, models
from danlu.data.spec import DataSpec
from danlu.device import resolve_device
from danlu.errors import DataError
from danlu.evaluate.metrics import accumulator
from danlu.rundir import RunDir, now

log = logging.getLogger("danlu")


def load_model(run: RunDir) -> tuple[torch.nn.Module, Any, DataSpec, str]:
    """Model with the run's best weights, its config, data spec and output kind."""
    cfg = run.load_config()
    spec = DataSpec.from_dict(run.read("preprocess.json"))
    model_cfg = cfg.model.model_dump()
    kind = models.output_kind(spec.task, model_cfg["output"])
    model = models.build(
        model_cfg, input_shape=spec.input_shape, task=spec.task, num_classes=spec.num_classes
    )
    models.load_weights(model, run.require_weights())
    return model.eval(), cfg, spec, kind


def build_data(cfg: Any, run: RunDir | None = None) -> data.DataBundle:
    """The data of a config; for a run that has a tokenizer.json, text is encoded with exactly
    that tokenizer (training some vocabularies again is not deterministic across processes)."""
    kwargs = cfg.data.model_dump()
    if run is not None and run.tokenizer.is_file():
        kwargs["tokenizer"] = {
            **(kwargs["tokenizer"] or {}),
            "type": "file",
            "path": str(run.tokenizer),
        }
    return data.build(**kwargs, seed=cfg.seed)


@torch.no_grad()
def evaluate_run(
    run: RunDir, split: str | None = None, batch_size: int | None = None, device: str = "auto"
) -> dict[str, Any]:
    model, cfg, spec, kind = load_model(run)
    split = split or cfg.evaluate.split
    bundle = build_data(cfg, run)
    recorded = run.read("lineage.json").get("data_hash") if run.lineage.is_file() else None
    if recorded and recorded != bundle.content_hash:
        raise DataError(
            f"the data of '{cfg.data.dataset}' changed since run '{run.path}' was trained "
            f"(content hash {bundle.content_hash[:12]}, trained on {recorded[:12]})",
            fix="evaluate with the original data, or train a new run on the new data",
        )
    if len(bundle.splits.get(split, [])) == 0:
        raise DataError(
            f"run '{run.path}' has an empty '{split}' split",
            fix="choose another with --split (train, val or test)",
        )
    dev = resolve_device(device)
    model.to(dev)
    size = (
        batch_size
        or cfg.evaluate.batch_size
        or cfg.train.eval_batch_size
        or 2 * cfg.train.batch_size
    )
    acc = accumulator(spec.task, spec.class_names, kind)
    for batch in bundle.loader(split, size, device=str(dev)).epoch(0):
        acc.update(model(batch.x), batch.y)
    results = acc.compute()
    if cfg.evaluate.metrics:
        wanted = set(cfg.evaluate.metrics) | {"count"}
        results = {k: v for k, v in results.items() if k in wanted}
    results["split"] = split
    results["evaluated"] = now()
    run.update_metrics(split, results)
    return results
