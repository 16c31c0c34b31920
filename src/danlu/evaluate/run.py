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
from danlu.data.check_rows import split_column
from danlu.data.spec import DataSpec
from danlu.device import resolve_device
from danlu.errors import ConfigError, DataError
from danlu.evaluate import artifacts
from danlu.evaluate.metrics import check_metrics, scalars
from danlu.evaluate.streaming import SliceMetrics, accumulator
from danlu.evaluate.tokens import generation_scores, objective_name, token_outputs
from danlu.manifest import update_manifest
from danlu.models import compressed
from danlu.models.compressed import place
from danlu.rundir import RunDir, now

log = logging.getLogger("danlu")


def load_model(run: RunDir) -> tuple[torch.nn.Module, Any, DataSpec, str]:
    """Model with the run's best weights, its config, data spec and output kind."""
    cfg = run.load_config()
    spec = DataSpec.from_dict(run.read("preprocess.json"))
    model_cfg = cfg.model.model_dump()
    if model_cfg["type"] == "ensemble":  # members are runs inside the run: load each
        from danlu.models.ensemble import Ensemble

        members = [load_model(RunDir.open(run.path / m)) for m in model_cfg["members"]]
        model = Ensemble(
            [(m[0], m[3]) for m in members], task=spec.task, weights=model_cfg["weights"]
        )
        return model.eval(), cfg, spec, model.output_kind
    kind = models.output_kind(spec.task, model_cfg["output"])
    # LoRA over an int8 base keeps only what it trained: the base comes from the checkpoint
    quantized = (model_cfg.get("lora") or {}).get("quantize", "none") != "none"
    if model_cfg["type"] == "hf" and not quantized:  # the architecture saved in the run
        model_cfg["pretrained"] = str(run.hf_config)
    model = models.build_for(model_cfg, spec, weights=quantized)
    if quantized and model_cfg.get("init_from"):
        models.load_backbone(model, RunDir.open(model_cfg["init_from"]).weights, "the base run")
    model = models.adapt(model, model_cfg)
    if (run.path / compressed.META).is_file():  # a variant made by `danlu compress`
        model = compressed.load(model, run.path, run.read(compressed.META))
        return model.eval(), cfg, spec, kind
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
    run: RunDir,
    split: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    memory_mb: float | None = None,
) -> dict[str, Any]:
    model, cfg, spec, kind = load_model(run)
    e = cfg.evaluate
    split = split or e.split
    check_metrics(e.metrics, spec.task, spec.num_classes)
    if e.slices and spec.task not in ("classification", "regression"):
        raise ConfigError(
            f"evaluate.slices: slices compare groups of examples of a classifier or regressor, "
            f"and run '{run.path}' is a {spec.task} model",
            fix="remove evaluate.slices from the config",
        )
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
    slices = {
        c: (SliceMetrics(c, spec.task, spec.class_names, kind), split_column(bundle, split, c))
        for c in e.slices or []
    }
    dev = place(model, resolve_device(device))
    size = batch_size or e.batch_size or cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    acc = accumulator(
        spec.task,
        spec.class_names,
        kind,
        bootstrap=e.bootstrap,
        worst=e.worst,
        seed=cfg.seed,
        memory_mb=memory_mb or e.memory_mb,
        sample=2000,
    )
    loader = bundle.loader(split, size, device=str(dev))
    objective = objective_name(cfg.train.objective, spec.task, models.family(model, cfg.model.type))
    for batch in loader.epoch(0):
        if objective == "supervised":
            outputs = model(batch.x)
            acc.update(outputs, batch.y, batch.rows)
            rows = batch.rows.cpu().numpy()
            for sliced, values in slices.values():
                sliced.update(outputs, batch.y, values[rows])
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
    results.update(_extras(model, bundle, split, size, cfg, spec, kind, str(dev), objective))
    results["worst"] = artifacts.worst_inputs(bundle, split, results.get("worst", []))
    if not results["worst"]:
        del results["worst"]
    if slices:
        results["slices"] = {c: sliced.compute() for c, (sliced, _) in slices.items()}
    if cfg.model.type == "ensemble":  # each member on the same split: the gain over it
        results["members"] = _members(run, cfg, split, results.get("headline"), device)
    if e.metrics:  # the scalars asked for; the tables and curves stay for the report
        wanted = set(e.metrics)
        results = {k: v for k, v in results.items() if k not in scalars(results) or k in wanted}
    results["split"] = split
    results["evaluated"] = now()
    run.update_metrics(split, results)
    update_manifest(run.path, [run.metrics])
    return results


def _members(run: RunDir, cfg: Any, split: str, metric: str | None, device: str) -> list:
    out = []
    sources = cfg.model.sources or cfg.model.members
    for member, source in zip(cfg.model.members, sources, strict=True):
        m = evaluate_run(RunDir.open(run.path / member), split, device=device)
        out.append({"run": source, "metric": metric, "value": m.get(metric)})
    return out


def _extras(
    model: torch.nn.Module,
    bundle: data.DataBundle,
    split: str,
    size: int,
    cfg: Any,
    spec: DataSpec,
    kind: str,
    device: str,
    objective: str,
) -> dict[str, Any]:
    """Generation scores (seq2seq, chat), LM samples and the 2-feature decision surface."""
    part = bundle.splits[split]
    if spec.task == "seq2seq":
        return _generated(model, bundle, split, size, cfg, spec, device)
    if spec.task == "chat" and bundle.conversations and bundle.conversations.get(split):
        from danlu.evaluate.chat import answer_scores

        convs = bundle.conversations[split][: cfg.evaluate.generate_samples or None]
        return answer_scores(
            model,
            bundle.chat_tokenizer,
            convs,
            max_new_tokens=cfg.evaluate.max_new_tokens or 128,
            pad_id=spec.text["pad_id"],
        )
    if objective == "causal_lm":
        loader = bundle.loader(split, 4, device=device)
        samples = artifacts.lm_samples(model, loader, bundle.encoder, seed=cfg.seed)
        return {"examples": samples} if samples else {}
    if objective == "supervised" and spec.input == "table":
        surface = artifacts.decision_surface(model, part.x.to(device), part.y, spec, kind, device)
        return {"decision_surface": surface} if surface else {}
    return {}


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
