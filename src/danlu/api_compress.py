"""`danlu compress RUN`: make the variants a `compress:` section lists, evaluate each on the
parent's split, time it, and write the trade-off table (compress_report.html / .json).

    result = danlu.compress("runs/fashion_cnn")          # the family's default variants
    result.table["recommended"], result.variants["int8"].path

Each variant is a run directory of its own (<parent>/compressed/<name>/ unless `out` is
given) whose lineage names the parent and whose compression.json says how its weights load
(see models/compressed.py), so it evaluates, reports, predicts and serves like any run.
Post-training variants are built in a temporary folder and renamed into place when complete;
variants that train (pruning with recovery, tie_weights, distill) go through `danlu.train`
and are complete once compression.json is written. Re-running keeps complete variants.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import models
from danlu.compress.variants import GENERATING, MAKERS, Job
from danlu.config import Config, read_yaml
from danlu.config_compress import CompressConfig, VariantConfig, kind_of
from danlu.errors import ConfigError
from danlu.evaluate.metrics import headline, lower_is_better
from danlu.evaluate.run import build_data, evaluate_run, load_model
from danlu.manifest import update_manifest, write_manifest
from danlu.models import compressed
from danlu.rundir import RunDir, now

log = logging.getLogger("danlu")


@dataclass
class CompressResult:
    run: RunDir  # the parent
    variants: dict[str, RunDir]
    table: dict[str, Any]
    report: Path


def default_variants(family: str, task: str) -> list[dict[str, Any]]:
    """What `danlu compress` makes when the config has no compress: section."""
    if family == "cnn":
        return [
            {"name": "static-int8", "method": "static_int8"},
            {"name": "channels-50", "method": "channels", "amount": 0.5, "train": {"epochs": 1}},
            {"name": "onnx", "method": "onnx"},
        ]
    if family == "mlp":
        return [
            {"name": "dynamic-int8", "method": "dynamic_int8"},
            {"name": "neurons-50", "method": "neurons", "amount": 0.5, "train": {"epochs": 1}},
            {"name": "sparse-50", "method": "magnitude", "amount": 0.5},
        ]
    out = [{"name": "bf16", "method": "bf16"}, {"name": "dynamic-int8", "method": "dynamic_int8"}]
    if family != "rnn":
        out += [
            {"name": "int8-weight", "method": "int8_weight"},
            {"name": "int4-weight", "method": "int4_weight", "group_size": 32},
        ]
    if task not in GENERATING:
        out += [{"name": "onnx", "method": "onnx"}, {"name": "onnx-int8", "method": "onnx_int8"}]
    return out


def compress(
    run: str | Path | RunDir,
    config: str | Path | dict[str, Any] | CompressConfig | None = None,
    *,
    only: list[str] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    measure: bool = True,
) -> CompressResult:
    parent = run if isinstance(run, RunDir) else RunDir.open(run)
    parent.require_weights()
    cfg = parent.load_config()
    _check_parent(parent, cfg)
    settings = _settings(config, cfg)
    variants = _select(settings.variants, only)
    split = settings.split or cfg.evaluate.split
    root = Path(out) if out is not None else parent.path / "compressed"
    teacher, _, spec, _ = load_model(parent)
    metric = settings.metric or headline(spec.task)
    bundle = build_data(cfg, parent)
    example = next(bundle.loader(split, 32).epoch(0)).x
    train = bundle.loader("train", cfg.train.batch_size, order="shuffle", seed=cfg.seed)
    calibration = [b.x for b in itertools.islice(train.epoch(0), settings.calibration_batches)]
    timing = {"split": split, "metric": metric, "example": example, "threads": settings.threads}
    timing["measure"] = measure
    parent_row = _row(parent, "parent", "parent", teacher, **timing)
    rows, made = [], {}
    for v in variants:
        target = root / v.name
        if (target / compressed.META).is_file() and not overwrite:
            log.info("variant %s: kept (already made; --overwrite makes it again)", v.name)
        else:
            if target.exists():  # an interrupted variant that trains: start it again
                shutil.rmtree(target)
            log.info("variant %s: %s", v.name, v.method)
            from danlu import api

            job = Job(parent, cfg, v, target, calibration, example, train=api.train)
            MAKERS[kind_of(v.method)](job)
            write_manifest(target)
        made[v.name] = RunDir.open(target)
        row = _row(made[v.name], v.name, v.method, load_model(made[v.name])[0], **timing)
        if row["kind"] in ("quantize", "export") and not row["parameters"]:
            row["parameters"] = parent_row["parameters"]  # int8 / ONNX: the same weights
        rows.append(row)
    from danlu.compress.report import tradeoff, write_report

    scale = 100.0 if 0 <= (parent_row["metric"] or 0) <= 1 else 1.0
    table = tradeoff(
        parent_row,
        rows,
        metric=metric,
        higher_is_better=not lower_is_better(metric),
        budget=settings.budget,
        scale=scale,
    )
    table |= {"split": split, "parent": str(parent.path), "created": now()}
    report, html = write_report(table, parent.path, title=f"Compression of {cfg.name}")
    inside = root.resolve().is_relative_to(parent.path.resolve())
    update_manifest(parent.path, [report, html, *([root] if inside else [])])
    return CompressResult(parent, made, table, html)


# ----------------------------------------------------------------------------- settings


def _check_parent(parent: RunDir, cfg: Config) -> None:
    if (parent.path / compressed.META).is_file():
        raise ConfigError(
            f"run '{parent.path}' is itself a compressed variant",
            fix="compress the run it was made from (its lineage.json names the parent)",
        )
    if cfg.model.type == "ensemble":
        raise ConfigError(
            f"run '{parent.path}' is an ensemble", fix="compress each member run instead"
        )
    if getattr(cfg.model, "lora", None) is not None:
        raise ConfigError(
            f"run '{parent.path}' holds LoRA adapters over a base model",
            fix=f"merge them first (`danlu merge {parent.path}`), then compress the merged run",
        )


def _settings(config: Any, cfg: Config) -> CompressConfig:
    if isinstance(config, CompressConfig):
        return config
    if config is None:
        if cfg.compress is not None:
            return cfg.compress
        return CompressConfig(variants=default_variants(cfg.model.type, cfg.data.task))
    raw = config if isinstance(config, dict) else read_yaml(Path(config))
    raw = raw.get("compress", raw) if isinstance(raw, dict) else raw
    from danlu.config import validate

    # validated as the compress: section of the run's config, so messages name its keys
    return validate({**cfg.to_dict(), "compress": raw}, str(config)).compress


def _select(variants: list[VariantConfig], only: list[str] | None) -> list[VariantConfig]:
    if not only:
        return variants
    names = [v.name for v in variants]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(
            f"--only names {', '.join(unknown)}, which the compress: section does not list",
            fix=f"choose among {', '.join(names)}",
        )
    return [v for v in variants if v.name in only]


def _metrics(run: RunDir, split: str) -> dict[str, Any]:
    """The run's metrics on `split`: recorded ones if they are newer than its weights."""
    weights = compressed.weights_file(run.path, _meta(run))
    if run.metrics.is_file() and run.metrics.stat().st_mtime >= weights.stat().st_mtime:
        recorded = run.read("metrics.json")
        if split in recorded:
            return recorded[split]
    return evaluate_run(run, split)


def _meta(run: RunDir) -> dict[str, Any] | None:
    path = run.path / compressed.META
    return run.read(compressed.META) if path.is_file() else None


def _row(
    run: RunDir, name: str, method: str, model: torch.nn.Module, *, split: str, metric: str,
    example: torch.Tensor, threads: int | None, measure: bool,
) -> dict[str, Any]:  # fmt: skip
    """One line of the trade-off table: size, parameters, speed and the metric on `split`."""
    from danlu.compress.bench import measure as time_it
    from danlu.compress.bench import weights_bytes

    meta = _meta(run) or {}
    timing = time_it(model, example, threads=threads) if measure else {}
    return {
        "name": name,
        "kind": "parent" if method == "parent" else kind_of(method),
        "method": method,
        "run": str(run.path),
        "file_bytes": weights_bytes(run.path),
        "parameters": meta.get("parameters_after") or models.count_parameters(model),
        "latency_ms": timing.get("latency_ms", {}),
        "latency_ms_p90": timing.get("latency_ms_p90", {}),
        "threads": timing.get("threads"),
        "throughput": timing.get("throughput", {}),
        "metric": _metrics(run, split).get(metric),
        "notes": meta.get("notes", []),
    }


# -------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    path: Path
    parity: dict[str, float]


def export(
    run: str | Path | RunDir, fmt: str = "onnx", out: str | Path | None = None, *,
    tolerance: float = 1e-3,
) -> ExportResult:  # fmt: skip
    """Write the run's model as ONNX, TorchScript or plain safetensors into `out` (default:
    RUN/export/) and check the file against the model on held-out test inputs (ONNX through
    ONNX Runtime): an export that differs by more than `tolerance` fails."""
    from danlu.compress.export import FORMATS
    from danlu.compress.export import export as write
    from danlu.compress.onnx_check import parity

    if fmt not in FORMATS:
        raise ConfigError(
            f"--format {fmt!r} is not an export format", fix=f"use {', '.join(FORMATS)}"
        )
    source = run if isinstance(run, RunDir) else RunDir.open(run)
    cfg = source.load_config()
    model, _, spec, _ = load_model(source)
    if fmt != "safetensors" and spec.task in GENERATING:
        raise ConfigError(
            f"run '{source.path}' generates text, which needs its generation loop around the "
            f"model; --format {fmt} exports classifiers and regressors",
            fix="export it with --format safetensors, or serve the run itself",
        )
    bundle = build_data(cfg, source)
    split = "test" if len(bundle.splits.get("test", [])) else "val"
    example = next(bundle.loader(split, 32).epoch(0)).x
    folder = Path(out) if out is not None else source.path / "export"
    folder.mkdir(parents=True, exist_ok=True)
    path = write(model, fmt, folder, example[:2])
    if folder.resolve().is_relative_to(source.path.resolve()):
        update_manifest(source.path, [folder])
    checked = {} if fmt == "safetensors" else parity(model, path, [example[:3], example], tolerance=tolerance)  # fmt: skip
    return ExportResult(path, checked)
