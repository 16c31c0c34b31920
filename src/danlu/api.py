"""The public Python API: the same functions the CLI and the server call.

import danlu
result = danlu.train("configs/fashion_cnn.yaml", ["train.epochs=1"])
danlu.evaluate(result.run)                       # → metrics dict, also in metrics.json
danlu.predict(result.run, "shoe.png")            # → DataFrame of labels and probabilities
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu import config as config_mod
from danlu import data, models
from danlu.config import Config
from danlu.errors import ConfigError, DataError
from danlu.evaluate.metrics import metric_names
from danlu.evaluate.run import build_data, evaluate_run
from danlu.rundir import RunDir, atomic_write_text, now, start_lineage, update_lineage
from danlu.serve.predictor import Predictor
from danlu.train import loop
from danlu.train.objectives import Supervised, class_weights, make_loss, sample_weights

log = logging.getLogger("danlu")

# Keys a resumed run may change without --force: they do not alter what was already trained.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.device",
    "train.threads",
    "train.tensorboard",
    "train.keep_checkpoints",
    "evaluate.",
)


@dataclass
class TrainResult:
    run: RunDir
    config: Config
    fit: loop.FitResult
    equation: str | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():  # CPU kernels are deterministic already; the switch costs ~2 s
        torch.use_deterministic_algorithms(True, warn_only=True)


def train(
    config: str | Path | dict[str, Any] | Config | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | RunDir | None = None,
    force: bool = False,
    show_progress: bool | None = None,
) -> TrainResult:
    """Train a model from a config (file, bundled example name, dict or Config) into a run dir.

    `resume` continues a run from its last checkpoint; the config may then only change the
    training length (and logging) unless `force` is set."""
    if resume is not None:
        run = resume if isinstance(resume, RunDir) else RunDir.open(resume)
        cfg = _resume_config(run, config, overrides, force)
    else:
        cfg = _as_config(config, overrides)
        run = None  # created once data and model are known to work: no stray folders
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bundle = build_data(cfg, run)
    _pretraining_checks(bundle, cfg)
    spec = bundle.spec
    if run is not None:
        _check_same_data(run, bundle.content_hash, force)
        if run.load_config() != cfg:  # a new length (or --force): record it before training
            atomic_write_text(run.config, cfg.to_yaml())

    model_cfg = cfg.model.model_dump()
    if spec.input == "text" and model_cfg["type"] in ("mlp", "cnn"):
        raise ConfigError(
            f"model.type: {model_cfg['type']} reads numbers or pixels, not token ids",
            fix="text needs a sequence model (rnn, gpt, bert); `danlu data check` works on "
            "text already",
        )
    kind = models.output_kind(spec.task, model_cfg["output"])
    model = models.build(
        model_cfg, input_shape=spec.input_shape, task=spec.task, num_classes=spec.num_classes
    )
    t = cfg.train
    train_y = bundle.splits["train"].y
    weights = None
    if spec.task == "classification":
        weights = class_weights(train_y, spec.num_classes, t.class_weights)
    elif t.class_weights != "none" or t.sampler == "weighted":
        raise ConfigError(
            "train.class_weights and train.sampler: weighted need a classification task"
        )
    objective = Supervised(
        make_loss(t.loss, kind, label_smoothing=t.label_smoothing, class_weights=weights),
        spec.task,
        kind,
        spec.class_names,
    )
    if run is None:
        run = RunDir.create(cfg, run_dir)
    run.write("data_card.json", bundle.card)
    run.write("preprocess.json", spec.to_dict())
    if bundle.encoder is not None and not run.tokenizer.is_file():
        bundle.encoder.save(run.tokenizer)
    from danlu.device import resolve_device

    device = str(resolve_device(t.device))
    train_loader = bundle.loader(
        "train",
        t.batch_size,
        order=t.sampler,
        seed=cfg.seed,
        train=True,
        device=device,
        weights=sample_weights(train_y, spec.num_classes) if t.sampler == "weighted" else None,
    )
    val_loader = bundle.loader("val", t.eval_batch_size or 2 * t.batch_size, device=device)

    if resume is None or not run.lineage.is_file():
        start_lineage(
            run,
            cfg,
            data_hash=bundle.content_hash,
            extra={
                "parameters": models.count_parameters(model),
                "data_sizes": bundle.card["sizes"],
            },
        )
    else:
        lineage = run.read("lineage.json")
        update_lineage(run, status="running", resumes=[*lineage.get("resumes", []), now()])
    try:
        result = loop.fit(
            model,
            objective,
            train_loader,
            val_loader,
            run,
            epochs=t.epochs,
            max_steps=t.max_steps,
            optimizer=t.optimizer.model_dump(),
            schedule=t.schedule.model_dump(),
            l1=t.l1,
            grad_clip=t.grad_clip,
            grad_accum=t.grad_accum,
            precision=t.precision,
            device=device,
            eval_every=t.eval_every,
            log_every=t.log_every,
            checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints,
            monitor=t.monitor,
            early_stopping=t.early_stopping.model_dump() if t.early_stopping else None,
            tensorboard=t.tensorboard,
            resume=resume is not None,
            metric_names=metric_names(spec.task, spec.num_classes),
            show_progress=show_progress,
        )
    except loop.TrainingInterrupted:
        update_lineage(run, status="interrupted", ended=now())
        raise
    except BaseException:
        update_lineage(run, status="failed", ended=now())
        raise
    update_lineage(
        run,
        status="completed",
        ended=now(),
        steps=result.step,
        device=result.device,
        precision=result.precision,
        train_seconds=round(result.seconds, 2),
        best={"metric": result.monitor, "value": result.best_value, "step": result.best_step},
        stopped_early=result.stopped_early,
    )
    return TrainResult(run, cfg, result, linear_equation(run))


def evaluate(run: str | Path | RunDir, split: str | None = None) -> dict[str, Any]:
    """Score a run on a split (default: the config's evaluate.split); writes metrics.json."""
    return evaluate_run(run if isinstance(run, RunDir) else RunDir.open(run), split)


def predict(run: str | Path | RunDir, inputs: Any) -> pd.DataFrame:
    """Predict on raw inputs (see Predictor.predict for what inputs can be)."""
    return Predictor.load(run).predict(inputs)


def linear_equation(run: RunDir) -> str | None:
    """For a linear model on one numeric column: the fitted line in the data's own units."""
    cfg = run.load_config()
    if cfg.model.type != "mlp" or cfg.model.hidden_sizes or not run.weights.is_file():
        return None
    spec = data.DataSpec.from_dict(run.read("preprocess.json"))
    if spec.task != "regression" or spec.table is None or spec.input_shape != [1]:
        return None
    from safetensors.torch import load_file

    w = load_file(str(run.weights))
    col = spec.table["columns"][0]
    slope, bias = float(w["head.weight"][0, 0]), float(w["head.bias"][0])
    if spec.table["normalize"]:
        slope, bias = slope / col["std"], bias - slope * col["mean"] / col["std"]
    return f"{spec.label} = {slope:.4f} * {col['name']} + {bias:.4f}"


# ---------------------------------------------------------------------------- data check


@dataclass
class DataCheckResult:
    out: Path  # the folder holding data_card.json and data_check.html
    card: dict[str, Any]  # the data card with findings, `check` stats and `sufficiency`

    @property
    def findings(self) -> list[dict[str, str]]:
        return self.card["findings"]

    @property
    def blockers(self) -> list[dict[str, str]]:
        return [f for f in self.findings if f["level"] == "blocker"]

    @property
    def sufficiency(self) -> dict[str, Any] | None:
        return self.card.get("sufficiency")


def data_check(
    config: str | Path | dict[str, Any] | Config,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    sufficiency: bool = True,
    out: str | Path | None = None,
) -> DataCheckResult:
    """Build the data, run every check (label noise too, if data.check.label_noise) and, with
    `sufficiency`, the learning-curve estimate; write data_card.json and data_check.html into
    `out` (default runs/<name>-check/). Blockers are reported, not raised."""
    import json

    from danlu.data.check import run_checks
    from danlu.data.check_report import render

    cfg = _as_config(config, overrides)
    seed_everything(cfg.seed)
    bundle = data.build(**cfg.data.model_dump(), seed=cfg.seed)
    d = cfg.data
    report = run_checks(
        bundle,
        max_length=d.tokenizer.max_length if d.tokenizer else None,
        label_noise=d.check.label_noise,
        max_rows=d.check.max_rows,
        seed=cfg.seed,
    )
    card = {**bundle.card, "findings": report.findings, "check": report.stats}
    if sufficiency:
        from danlu.tune.sufficiency import estimate

        s = d.sufficiency
        card["sufficiency"] = estimate(
            bundle,
            fractions=s.fractions,
            seeds=s.seeds,
            project_to=s.project_to,
            model=s.model,
            max_steps=s.max_steps,
            model_config=cfg.model.model_dump(),
            train_config=cfg.train.model_dump(),
            seed=cfg.seed,
            progress=lambda line: log.info("learning curve: %s", line),
        )
    folder = Path(out) if out is not None else Path(cfg.runs_dir) / f"{cfg.name}-check"
    atomic_write_text(folder / "data_card.json", json.dumps(card, indent=2, default=str) + "\n")
    atomic_write_text(folder / "data_check.html", render(card))
    return DataCheckResult(folder, card)


def _pretraining_checks(bundle: data.DataBundle, cfg: Config) -> None:
    """The cheap data checks (no label noise, no learning curve) before any training: their
    findings go into the run's data card; blockers stop training (on_blockers: stop)."""
    from danlu.data.check import run_checks

    tok = cfg.data.tokenizer
    report = run_checks(bundle, max_length=tok.max_length if tok else None, seed=cfg.seed)
    bundle.card["findings"] = report.findings
    bundle.card["check"] = report.stats
    blockers = report.blockers
    if not blockers:
        return
    if cfg.data.check.on_blockers == "stop":
        listed = "; ".join(f"{f['message']} ({f['action']})" for f in blockers)
        raise DataError(
            f"the data check found {len(blockers)} blocker(s): {listed}",
            fix="fix the data (`danlu data check CONFIG` writes the full report), or set "
            "data.check.on_blockers: warn to train anyway",
        )
    for f in blockers:
        log.warning("data check blocker: %s. %s", f["message"], f["action"])


# ------------------------------------------------------------------------------ helpers


def _as_config(config: Any, overrides: list[str] | tuple[str, ...]) -> Config:
    if isinstance(config, Config):
        return config_mod.validate(config_mod.apply_overrides(config.to_dict(), list(overrides)))
    if config is None:
        raise ConfigError(
            "no config given", fix="pass a config file, e.g. configs/fashion_cnn.yaml"
        )
    return config_mod.load(config, overrides)


def _resume_config(run: RunDir, config: Any, overrides: Any, force: bool) -> Config:
    saved = run.load_config()
    cfg = _as_config(config if config is not None else saved, overrides)
    changed = _diff(saved.to_dict(), cfg.to_dict())
    blocking = [c for c in changed if not c[0].startswith(RESUMABLE_CHANGES)]
    if blocking and not force:
        shown = "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in blocking[:5])
        raise ConfigError(
            f"the config differs from the one run '{run.path}' was trained with ({shown})",
            fix="resume with the original config, or pass --force to continue anyway",
        )
    return cfg


def _check_same_data(run: RunDir, digest: str, force: bool) -> None:
    recorded = run.read("lineage.json").get("data_hash") if run.lineage.is_file() else None
    if recorded and recorded != digest and not force:
        raise DataError(
            f"the data changed since run '{run.path}' started (content hash {digest[:12]}, "
            f"recorded {recorded[:12]})",
            fix="resume with the original data, or pass --force to continue on the new data",
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]
