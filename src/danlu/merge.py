"""`danlu merge RUN`: fold a LoRA run's adapters into its base weights.

    result = merge("runs/minilm_r8_lora")      # → runs/minilm_r8_lora-merged
    result.max_difference                      # merged vs unmerged outputs on held-out inputs

The merge runs in full precision. Before anything is written, the merged model and the
adapter model are run on held-out inputs of the run's own data; if their outputs differ by
more than `tolerance` (1e-4) the merge is refused and nothing is saved. The merged run is a
complete run directory (config without `model.lora`, tokenizer, data spec, lineage naming
the source), written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import models
from danlu.errors import CheckpointError, ConfigError
from danlu.evaluate.run import build_data, load_model
from danlu.evaluate.tokens import objective_name, token_outputs
from danlu.models import finetune
from danlu.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    now,
    save_safetensors,
    staged,
)

TOLERANCE = 1e-4
COPIED = ("preprocess.json", "data_card.json", "tokenizer.json", "metrics.json")


@dataclass
class MergeResult:
    run: RunDir
    max_difference: float
    inputs: int  # held-out examples compared
    parameters: int


def merge(
    run: str | Path | RunDir,
    out: str | Path | None = None,
    *,
    tolerance: float = TOLERANCE,
    examples: int = 64,
    overwrite: bool = False,
) -> MergeResult:
    src = run if isinstance(run, RunDir) else RunDir.open(run)
    cfg = src.load_config()
    lora = cfg.model.model_dump().get("lora")
    if not lora:
        raise ConfigError(
            f"run '{src.path}' has no LoRA adapters to merge (its config has no model.lora)",
            fix="merge a run trained with model.lora; this run's weights are complete as they are",
        )
    if lora["quantize"] != "none":
        raise ConfigError(
            f"run '{src.path}' adapts an {lora['quantize']} base: merging into quantized weights "
            "is not full precision",
            fix="train with model.lora.quantize: none to merge, or serve the adapter run as is",
        )
    target = Path(out) if out is not None else src.path.with_name(f"{src.path.name}-merged")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"'{target}' already exists and is not empty",
            fix="pass another --out folder, or --overwrite",
        )
    model, _, spec, _ = load_model(src)
    inputs = _held_out(src, cfg, examples)
    family = models.family(model, cfg.model.type)
    objective = objective_name(cfg.train.objective, spec.task, family)
    with torch.no_grad():
        before = [_outputs(model, objective, batch, spec) for batch in inputs]
        merged = finetune.merge(model).eval()
        after = [_outputs(merged, objective, batch, spec) for batch in inputs]
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    count = sum(len(b.x) for b in inputs)
    if not diff <= tolerance:  # also refuses NaN
        raise CheckpointError(
            f"merged outputs differ from the adapter model's by {diff:.3g} on {count} held-out "
            f"examples (allowed: {tolerance:g}); nothing was saved",
            fix="keep serving the unmerged run, or report this with the run's config",
        )
    raw = cfg.to_dict()
    raw["model"].pop("lora")
    _write(src, target, merged, raw, diff, count)
    return MergeResult(RunDir.open(target), diff, count, models.count_parameters(merged))


def _held_out(run: RunDir, cfg: Any, examples: int) -> list[Any]:
    """Up to `examples` inputs from the validation split (the test split when it is empty)."""
    bundle = build_data(cfg, run)
    name = "val" if len(bundle.splits.get("val", [])) else "test"
    if not len(bundle.splits.get(name, [])):
        raise ConfigError(
            f"run '{run.path}' has no held-out examples to check the merge on",
            fix="train with a validation split (data.split.val)",
        )
    batches, count = [], 0
    for batch in bundle.loader(name, min(16, examples)).epoch(0):
        batches.append(batch)
        count += len(batch.x)
        if count >= examples:
            break
    return batches


def _outputs(model: torch.nn.Module, objective: str, batch: Any, spec: Any) -> torch.Tensor:
    if objective == "supervised":
        return model(batch.x).float()
    logits, _ = token_outputs(model, objective, batch.x, batch.y, text=spec.text or {})
    return logits.float()


def _write(
    src: RunDir, target: Path, model: torch.nn.Module, raw: dict, diff: float, count: int
) -> None:
    from danlu import config as config_mod

    with staged(target) as tmp:
        atomic_write_text(tmp / "config.yaml", config_mod.validate(raw).to_yaml())
        for name in COPIED:
            if (src.path / name).is_file():
                shutil.copy2(src.path / name, tmp / name)
        for folder in (src.hf_config, src.chat_tokenizer):
            if folder.is_dir():
                shutil.copytree(folder, tmp / folder.name)
        save_safetensors(
            tmp / "model.safetensors",
            models.state_for_saving(model),
            {"merged_from": str(src.path)},
        )
        lineage = src.read("lineage.json") if src.lineage.is_file() else {}
        lineage |= {
            "merged": {
                "from": str(src.path),
                "at": now(),
                "max_difference": diff,
                "held_out_examples": count,
            }
        }
        atomic_write_json(tmp / "lineage.json", lineage)
