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
from danlu.evaluate.tokens import generation_scores, objective_name, token_outputs
from danlu.rundir import RunDir, now

log = logging.getLogger("danlu")


def load_model(run: RunDir) -> tuple[torch.nn.Module, Any, DataSpec, str]:
    """Model with the run's best weights, its config, data spec and output kind."""
    cfg = run.load_config()
    spec = DataSpec.from_dict(run.read("preprocess.json"))
    model_cfg = cfg.model.model_dump()
    kind = models.output_kind(spec.task, model_cfg["output"])
    # LoRA over an int8 base keeps only what it trained: the base comes from the checkpoint
    quantized = (model_cfg.get("lora") or {}).get("quantize", "none") != "none"
    if model_cfg["type"] == "hf" and not quantized:  # the architecture saved in the run
        model_cfg["pretrained"] = str(run.hf_config)
    model = models.build(
        model_cfg,
        input_shape=spec.input_shape,
        task=spec.task,
        num_classes=spec.num_classes,
        text=spec.text,
        weights=quantized,
    )
    if quantized and model_cfg.get("init_from"):
        models.load_backbone(model, RunDir.open(model_cfg["init_from"]).weights, "the base run")
    model = models.adapt(model, model_cfg)
    models.load_weights(model, run.require_weights())
    return model.eval(), cfg, spec, kind


def build_data(cfg: Any, run: RunDir | None = None) -> data.DataBundle:
    """The data of a config; for a run that has a tokenizer.json, text is encoded with exactly
    that tokenizer (training some vocabularies again is not deterministic across processes)."""
    kwargs = cfg.data.model_dump()
    if run is not None and run.chat_tokenizer.is_dir():  # with its template and special tokens
        kwargs["tokenizer"] = {"type": "pretrained", "path": str(run.chat_tokenizer)}
    elif run is not None and run.tokenizer.is_file():
        kwargs["tokenizer"] = {
            **(kwargs["tokenizer"] or {}),
            "type": "file",
            "path": str(run.tokenizer),
            "lowercase": False,  # the saved tokenizer already normalizes as in training
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
    loader = bundle.loader(split, size, device=str(dev))
    objective = objective_name(cfg.train.objective, spec.task, models.family(model, cfg.model.type))
    for batch in loader.epoch(0):
        if objective == "supervised":
            acc.update(model(batch.x), batch.y)
        else:
            acc.update(
                *token_outputs(
                    model,
                    objective,
                    batch.x,
                    batch.y,
                    text=spec.text,
                    mlm_probability=cfg.train.mlm_probability,
                )
            )
    results = acc.compute()
    if spec.task == "seq2seq":
        results.update(_generated(model, bundle, split, size, cfg, spec, str(dev)))
    if spec.task == "chat" and bundle.conversations and bundle.conversations.get(split):
        from danlu.evaluate.chat import answer_scores

        convs = bundle.conversations[split][: cfg.evaluate.generate_samples or None]
        results.update(
            answer_scores(
                model,
                bundle.chat_tokenizer,
                convs,
                max_new_tokens=cfg.evaluate.max_new_tokens or 128,
                pad_id=spec.text["pad_id"],
            )
        )
    if cfg.evaluate.metrics:
        wanted = set(cfg.evaluate.metrics) | {"count"}
        results = {k: v for k, v in results.items() if k in wanted}
    results["split"] = split
    results["evaluated"] = now()
    run.update_metrics(split, results)
    return results


def _generated(
    model: torch.nn.Module,
    bundle: data.DataBundle,
    split: str,
    size: int,
    cfg: Any,
    spec: DataSpec,
    device: str,
) -> dict[str, Any]:
    """Exact match, sacreBLEU and chrF of generated targets on (the first N of) a split."""
    e = cfg.evaluate
    part = bundle.splits[split]
    if e.generate_samples and len(part) > e.generate_samples:
        part = part.take(torch.arange(e.generate_samples).numpy())
    sub = data.DataBundle({split: part}, spec, bundle.card, bundle.content_hash)
    return generation_scores(
        model,
        sub.loader(split, size, device=device).epoch(0),
        bundle.encoder,
        text=spec.text,
        max_new_tokens=min(e.max_new_tokens or spec.text["max_length"], model.context),
        num_beams=e.num_beams,
    )
