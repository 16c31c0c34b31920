"""The variants `danlu compress` makes, one function per kind of method. Each writes the
variant's run directory at `job.target`: post-training variants (quantized, exported, pruned
without recovery, tied) are built in a temporary folder renamed into place when complete;
variants that train (pruning with recovery, tying with recovery, distillation) go through
`danlu.train` (passed in as `job.train`, the one training path) into the target folder and are
complete once compression.json is written (see models/compressed.py for how they load).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import models
from danlu.config import Config
from danlu.config_compress import VariantConfig, kind_of
from danlu.errors import ConfigError
from danlu.evaluate.run import load_model
from danlu.models import compressed
from danlu.rundir import (
    RunDir,
    atomic_write_text,
    now,
    save_safetensors,
    sha256_file,
    staged,
    start_lineage,
    update_lineage,
)

COPIED = ("preprocess.json", "data_card.json", "tokenizer.json")
FOLDERS = ("hf", "chat")
GENERATING = ("language_modeling", "chat", "seq2seq")


@dataclass
class Job:
    """One variant to make: the parent run, its config, the variant and where it goes."""

    parent: RunDir
    cfg: Config
    v: VariantConfig
    target: Path
    calibration: list[torch.Tensor]
    example: torch.Tensor
    train: Callable[..., Any]  # danlu.train: recovery fine-tunes and students go through it

    @property
    def key(self) -> str:
        return f"compress.variants.{self.v.name}"


def _variant_config(job: Job, model: dict | None = None, train: dict | None = None) -> Config:
    from danlu.config import validate

    raw = job.cfg.to_dict()
    raw["name"], raw["compress"] = job.v.name, None
    if model is not None:
        raw["model"] = model
    if train is not None:
        raw["train"] = {**raw["train"], **train}
    return validate(raw)


def _lineage_fields(job: Job) -> dict[str, Any]:
    recorded = job.parent.read("lineage.json") if job.parent.lineage.is_file() else {}
    parent = {
        "run": str(job.parent.path),
        "config_hash": recorded.get("config_hash"),
        "weights_sha256": sha256_file(job.parent.weights),
    }
    return {
        "run": job.target.name,
        "kind": "compressed",
        "parent": parent,
        "variant": job.v.model_dump(exclude_defaults=True),
    }


def _finish(run: RunDir, job: Job, meta: dict[str, Any]) -> None:
    """compression.json last: its presence marks the variant complete."""
    run.write(compressed.META, {"method": job.v.method, "kind": kind_of(job.v.method), **meta})


def _post_training(job: Job, meta: dict, write: Callable[[Path], None], model_cfg=None) -> None:
    """A variant made without training: parent files, weights (`write`), lineage, meta; built
    in a temporary folder that is renamed into place when complete."""
    vcfg = _variant_config(job, model=model_cfg)
    recorded = job.parent.read("lineage.json") if job.parent.lineage.is_file() else {}
    with staged(job.target) as tmp:
        for name in COPIED:
            if (job.parent.path / name).is_file():
                shutil.copy2(job.parent.path / name, tmp / name)
        for folder in FOLDERS:
            if (job.parent.path / folder).is_dir():
                shutil.copytree(job.parent.path / folder, tmp / folder)
        atomic_write_text(tmp / "config.yaml", vcfg.to_yaml())
        write(tmp)
        run = RunDir(tmp)
        start_lineage(
            run, vcfg, data_hash=recorded.get("data_hash", ""), extra=_lineage_fields(job)
        )
        update_lineage(run, status="completed", ended=now())
        _finish(run, job, meta)


def _trained(job: Job, meta: dict, *, model_cfg=None, recovery: bool, **train_kwargs: Any) -> None:
    """A variant trained through danlu.train: a recovery fine-tune (a tenth of the parent's lr,
    one epoch unless told) or a student (the parent's training unless told)."""
    t = job.v.train.model_dump() if job.v.train else {}
    base = job.cfg.train
    lr = t.pop("lr") or base.optimizer.lr / (10 if recovery else 1)
    train: dict[str, Any] = {k: val for k, val in t.items() if val is not None}
    if recovery and not train.get("max_steps"):
        train.setdefault("epochs", 1)
    if train.get("max_steps"):
        train["epochs"] = None
    train["optimizer"] = {**base.optimizer.model_dump(), "lr": lr}
    warmup = 0 if recovery else base.schedule.warmup_steps
    train["schedule"] = {**base.schedule.model_dump(), "warmup_steps": warmup}
    train["early_stopping"] = None
    vcfg = _variant_config(job, model=model_cfg, train=train)
    run = job.train(vcfg, run_dir=job.target, **train_kwargs).run
    run.write("lineage.json", {**run.read("lineage.json"), **_lineage_fields(job)})
    _finish(run, job, meta)


def _save(model: torch.nn.Module, folder: Path) -> None:
    save_safetensors(folder / "model.safetensors", models.state_for_saving(model))


def _quantize(job: Job) -> None:
    from danlu.compress.quantize import quantize

    model = load_model(job.parent)[0]
    v = job.v
    if v.method == "bf16":
        state = {k: t.to(torch.bfloat16) if t.is_floating_point() else t
                 for k, t in models.state_for_saving(model).items()}  # fmt: skip
        note = "bf16 weights and matmuls" + ("" if _native_bf16() else "; this CPU emulates bf16")
        meta = {"format": "bf16", "notes": [note]}
        _post_training(job, meta, lambda tmp: save_safetensors(tmp / "model.safetensors", state))
        return
    state, meta = quantize(
        model, v.method, calibration=job.calibration, group_size=v.group_size, skip=v.skip,
        key=job.key,
    )  # fmt: skip
    write = lambda tmp: save_safetensors(tmp / "model.safetensors", state)  # noqa: E731
    meta = {"format": "quantized", **meta, "parameters_after": models.count_parameters(model)}
    _post_training(job, meta, write)


def _native_bf16() -> bool:
    from danlu.device import cpu_bf16_native

    return torch.cuda.is_available() or cpu_bf16_native()


def _prune(job: Job) -> None:
    from danlu.compress.prune import prune

    model = load_model(job.parent)[0]
    before = models.count_parameters(model)
    model, meta = prune(model, job.v.method, amount=job.v.amount, scope=job.v.scope, key=job.key)
    meta = {"format": "pruned" if meta["shrinks"] else "plain", **meta}
    after = models.count_parameters(model)
    meta |= {"parameters_before": before, "parameters_after": after}
    if meta["shrinks"]:
        note = f"{1 - after / before:.0%} of the parameters removed"
    else:
        note = f"{meta['sparsity']:.0%} of the pruned weights are zero; the file stays dense"
    recovery = " (before recovery)" if job.v.train is not None else ""
    meta["notes"] = [note + recovery]
    if job.v.train is None:
        _post_training(job, meta, lambda tmp: _save(model, tmp))
    else:
        _trained(job, meta, model=model, recovery=True)


def _distill(job: Job) -> None:
    from danlu.compress.distill import Distill, check_smaller, student_config

    teacher, _, spec, _ = load_model(job.parent)
    model_cfg = student_config(job.cfg.model.model_dump(), job.v.student or {}, job.key)
    _variant_config(job, model=model_cfg)  # the student's keys are checked before building
    student = models.build_for(model_cfg, spec)
    s, t = check_smaller(student, teacher, job.key)
    v = job.v
    meta = {
        "format": "plain", "parameters_before": t, "parameters_after": s,
        "temperature": v.temperature, "alpha": v.alpha,
        "notes": [f"student {s:,} parameters, teacher {t:,} ({s / t:.0%})"],
    }  # fmt: skip

    def wrap(base: Any) -> Distill:
        return Distill(base, teacher, temperature=v.temperature, alpha=v.alpha, key=job.key)

    _trained(job, meta, model_cfg=model_cfg, recovery=False, wrap_objective=wrap)


def _tie(job: Job) -> None:
    model_cfg = job.cfg.model.model_dump()
    if "tie_weights" not in model_cfg:
        raise ConfigError(
            f"{job.key}: model.type {model_cfg['type']} has no output layer to tie to its "
            "embedding",
            fix="tie_weights applies to gpt, bert and rnn language models",
        )
    if model_cfg["tie_weights"]:
        raise ConfigError(
            f"{job.key}: run '{job.parent.path}' already ties its output layer to its embedding",
            fix="remove this variant",
        )
    untied, _, spec, _ = load_model(job.parent)
    model_cfg["tie_weights"] = True
    tied = models.build_for(model_cfg, spec)
    weights, seen, keep = untied.state_dict(), set(), {}
    for name, tensor in tied.state_dict().items():  # the output layer keeps the embedding's
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            keep[name] = weights[name]
    tied.load_state_dict(keep, strict=False)
    before, after = models.count_parameters(untied), models.count_parameters(tied)
    if after >= before:
        raise ConfigError(
            f"{job.key}: this {model_cfg['type']} model's output layer does not share the "
            "embedding's shape (a classifier head has no vocabulary to tie)",
            fix="tie_weights applies to language models",
        )
    meta = {
        "format": "plain", "parameters_before": before, "parameters_after": after,
        "notes": [f"{before - after:,} parameters shared ({1 - after / before:.1%})"],
    }  # fmt: skip
    if job.v.train is None:
        _post_training(job, meta, lambda tmp: _save(tied, tmp), model_cfg)
    else:
        _trained(job, meta, model_cfg=model_cfg, recovery=True, model=tied)


def _export(job: Job) -> None:
    from danlu.compress.export import export
    from danlu.compress.onnx_check import parity, quantize_onnx

    if job.cfg.data.task in GENERATING:
        raise ConfigError(
            f"{job.key}: ONNX variants serve classifiers and regressors; run "
            f"'{job.parent.path}' generates text",
            fix="use int8_weight or int4_weight for language models",
        )
    model = load_model(job.parent)[0]
    held_out = [job.example[:3], job.example]
    meta: dict[str, Any] = {"format": "onnx", "parameters_after": models.count_parameters(model)}

    def write(tmp: Path) -> None:
        path = export(model, "onnx", tmp, job.example[:2])
        meta["parity"] = parity(model, path, held_out, tolerance=job.v.tolerance)
        if job.v.method == "onnx_int8":  # quantized from the checked fp32 export
            fp32 = tmp / "fp32.onnx"
            path.rename(fp32)
            quantize_onnx(fp32, path)
            fp32.unlink()
            meta["parity"] = parity(model, path, held_out, tolerance=float("inf"))
            meta["notes"] = [f"max |Δ| vs torch fp32: {meta['parity']['max_abs_diff']:.2e}"]

    _post_training(job, meta, write)


MAKERS: dict[str, Callable[[Job], None]] = {
    "quantize": _quantize,
    "prune": _prune,
    "distill": _distill,
    "share": _tie,
    "export": _export,
}
