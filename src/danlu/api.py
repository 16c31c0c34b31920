"""The public Python API: the same functions the CLI and the server call.

import danlu
result = danlu.train("configs/fashion_cnn.yaml", ["train.epochs=1"])
danlu.evaluate(result.run)                       # → metrics dict, also in metrics.json
danlu.predict(result.run, "shoe.png")            # → DataFrame of labels and probabilities
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu import config as config_mod
from danlu import data, models
from danlu.api_data import DataCheckResult, data_check, pretraining_checks

__all__ = [
    "DataCheckResult",
    "TrainResult",
    "data_check",
    "evaluate",
    "generate",
    "predict",
    "pretrain",
    "train",
]
from danlu.config import Config
from danlu.device import resolve_precision
from danlu.errors import ConfigError, DataError
from danlu.evaluate.metrics import metric_names
from danlu.evaluate.run import build_data, evaluate_run
from danlu.manifest import write_manifest
from danlu.models import finetune
from danlu.rundir import RunDir, atomic_write_text, now, start_lineage, update_lineage
from danlu.serve.predictor import Predictor
from danlu.train import distributed, loop, privacy, tracking
from danlu.train.objectives import TokenObjective, build_objective, sample_weights

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
    "train.mlflow",
    "train.estimate",
    "train.memory_limit_gb",
    "train.strategy",  # DDP ↔ FSDP and the process count do not change the maths
    "train.collective_timeout_s",
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
    pretraining: bool = False,
    model: torch.nn.Module | None = None,
    wrap_objective: Callable[[Any], Any] | None = None,
    on_evaluate: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a model from a config (file, bundled example name, dict or Config) into a run dir.

    `resume` continues a run from its last checkpoint; the config may then only change the
    training length (and logging) unless `force` is set. `model` trains a given model (e.g. a
    pruned one) instead of building the config's; `wrap_objective` wraps the config's objective
    (distillation adds the teacher's term). `on_evaluate(step, val_metrics)` is called after
    each validation (danlu tune reports to its pruner there; an exception it raises stops
    the run)."""
    if resume is not None:
        run = resume if isinstance(resume, RunDir) else RunDir.open(resume)
        cfg = _resume_config(run, config, overrides, force)
    else:
        cfg = _as_config(config, overrides)
        if cfg.model.type == "ensemble":
            raise ConfigError(
                "model.type: ensemble is not trained: it averages runs that are",
                fix="train the members, then `danlu ensemble RUN RUN ... --out RUN`",
            )
        run = None  # created once data and model are known to work: no stray folders
        cfg = with_model_sources(cfg)
    seed_everything(cfg.seed)
    t = cfg.train  # under torchrun: join the group; only rank 0 writes (train/distributed.py)
    par = distributed.setup(t.strategy, t.collective_timeout_s, t.device, t.threads)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    bundle = par.main_first(lambda: build_data(cfg, run), "preparing the data")
    pretraining_checks(bundle, cfg)
    spec = bundle.spec
    if run is not None:
        _check_same_data(run, bundle.content_hash, force)
        if run.load_config() != cfg and par.is_main:  # a new length (or --force): record it
            atomic_write_text(run.config, cfg.to_yaml())

    model_cfg = cfg.model.model_dump()
    given = model
    if spec.input == "text" and model_cfg["type"] in ("mlp", "cnn"):
        raise ConfigError(
            f"model.type: {model_cfg['type']} reads numbers or pixels, not token ids",
            fix="text needs a sequence model: gpt, rnn or bert (labels, language modelling), "
            "seq2seq (pairs)",
        )
    kind = models.output_kind(spec.task, model_cfg["output"])
    model = models.build_for(model_cfg, spec)
    t = cfg.train
    if given is not None:
        model = given
    elif resume is None and model_cfg.get("init_from"):
        _start_from(model, model_cfg["init_from"], bundle)
    family = models.family(model, model_cfg["type"])
    model = models.adapt(model, model_cfg)
    if t.gradient_checkpointing:  # Transformers only (a clear error otherwise)
        models.enable_gradient_checkpointing(model, model_cfg["type"])
    objective = build_objective(t.model_dump(), spec, family, kind, bundle)
    if wrap_objective is not None:
        objective = wrap_objective(objective)
    if pretraining and not isinstance(objective, TokenObjective):
        raise ConfigError(
            f"danlu pretrain needs a language-modelling or seq2seq config; this one trains a "
            f"{spec.task} head on {cfg.data.dataset}",
            fix="set data.task: language_modeling (a corpus) or seq2seq (pairs), or use "
            "`danlu train` for labelled data",
        )
    train_y = getattr(bundle.splits["train"], "y", None)
    if t.sampler == "weighted" and spec.task != "classification":
        raise ConfigError("train.sampler: weighted needs a classification task")
    private = None
    if t.privacy is not None:  # DP-SGD: checked (and LSTMs swapped) before the run exists
        private = privacy.prepare(
            model, train=t.model_dump(), model_cfg=model_cfg, task=spec.task,
            examples=len(bundle.splits["train"]),
        )  # fmt: skip
    if t.estimate and resume is None and private is None:  # pre-flight estimate: may stop here
        from danlu.train.estimate import preflight

        par.main_only(
            lambda: preflight(
                model, objective, bundle, t.model_dump(), seed=cfg.seed, model_cfg=model_cfg,
                processes=par.world, local_processes=distributed.local_world(par.world),
                sharded=par.gathers,
            ),
            "pre-flight estimate",
        )  # fmt: skip
    if run is None:  # rank 0 creates it (a clash gets a suffix); the others open that one
        run = par.main_only(
            lambda: RunDir.create(cfg, run_dir), "creating the run", lambda r: str(r.path),
            RunDir.open,
        )  # fmt: skip
    if par.is_main:
        _write_inputs(run, bundle, model, model_cfg)
    trainable, total = finetune.trainable_summary(model)
    if trainable < total:
        log.info(
            "training %s of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}",
            100 * trainable / total,
        )  # fmt: skip
    device = str(par.device)  # cuda:LOCAL_RANK under torchrun
    train_loader = bundle.loader(
        "train",
        t.batch_size,
        order=t.sampler if private is None else "poisson",
        seed=cfg.seed,
        train=True,
        device=device,
        weights=sample_weights(train_y, spec.num_classes) if t.sampler == "weighted" else None,
        group_by_length=t.group_by_length,
    )
    val_loader = bundle.loader("val", t.eval_batch_size or 2 * t.batch_size, device=device)

    fresh = resume is None or not run.lineage.is_file()
    if par.is_main and fresh:  # rank 0 keeps the lineage
        start_lineage(
            run,
            cfg,
            data_hash=bundle.content_hash,
            extra={
                "parameters": total,
                "trainable_parameters": trainable,
                "data_sizes": bundle.card["sizes"],
                # what precision "auto" chose here, known before the first step
                "precision": "fp32" if private else resolve_precision(t.precision, par.device),
                **({"privacy": private.summary(private.planned_steps)} if private else {}),
                **({"distributed": {"processes": par.world, "strategy": par.strategy}}
                   if par.active else {}),
            },
        )  # fmt: skip
    elif par.is_main:
        lineage = run.read("lineage.json")
        update_lineage(run, status="running", resumes=[*lineage.get("resumes", []), now()])
        if private is not None and lineage.get("privacy"):  # keep the σ the run started with
            private.noise_multiplier = lineage["privacy"]["noise_multiplier"]
    tracker = None  # MLflow (train.mlflow): opened here, closed with the run's outcome
    try:
        tracker = tracking.start(run, cfg) if par.is_main else None
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
            nonfinite=t.nonfinite.model_dump(),  # NaN/Inf policy
            compile_model=t.compile,
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
            privacy=private,
            on_evaluate=on_evaluate,
        )
    except loop.TrainingInterrupted:
        if par.is_main:
            update_lineage(run, status="interrupted", ended=now())
        tracking.end(tracker, "KILLED")
        raise
    except BaseException:
        par.failed()  # another rank's watchdog fired: end quietly
        if par.is_main:
            update_lineage(run, status="failed", ended=now())
        tracking.end(tracker, "FAILED")
        raise
    if not par.is_main:  # the other ranks are done: rank 0 finishes the run directory
        distributed.shutdown()
        return TrainResult(run, cfg, result, None)
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
        **({"privacy": private.summary(result.step)} if private else {}),
    )
    write_manifest(run.path)  # every file of the finished run, with its SHA-256
    tracking.end(tracker, "FINISHED")
    distributed.shutdown()
    return TrainResult(run, cfg, result, linear_equation(run))


def pretrain(
    config: str | Path | dict[str, Any] | Config | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **kwargs: Any,
) -> TrainResult:
    """Pretrain from scratch (causal LM, masked LM or seq2seq on a corpus or on pairs): the
    same `train`, refusing configs whose objective is not a pretraining one. The run holds the
    tokenizer, weights and config that `model.init_from: runs/<name>` starts a fine-tune from."""
    return train(config, overrides, pretraining=True, **kwargs)


def generate(run: str | Path | RunDir, prompts: str | list[str], **options: Any) -> list[str]:
    """Continue prompts with a causal LM run (or translate them with a seq2seq run); see
    danlu.serve.generate.generate for the options (sampling, beams, stop strings, stream)."""
    from danlu.serve.generate import generate as run_generate

    return run_generate(run, prompts, **options)


def evaluate(run: str | Path | RunDir, split: str | None = None) -> dict[str, Any]:
    """Score a run on a split (default: the config's evaluate.split); writes metrics.json."""
    return evaluate_run(run if isinstance(run, RunDir) else RunDir.open(run), split)


def ensemble(runs: list[str | Path], out: str | Path, **options: Any) -> Any:
    """Average runs of one task into a new run (see danlu.ensemble); returns (run, metrics)."""
    from danlu.ensemble import ensemble as build

    return build(runs, out, **options)


def compress(run: str | Path | RunDir, config: Any = None, **options: Any) -> Any:
    """Make, evaluate and time the compressed variants of a run (see danlu.api_compress)."""
    from danlu.api_compress import compress as make

    return make(run, config, **options)


def predict(run: str | Path | RunDir, inputs: Any) -> pd.DataFrame:
    """Predict on raw inputs (see Predictor.predict for what inputs can be)."""
    return Predictor.load(run).predict(inputs)


def linear_equation(run: RunDir) -> str | None:
    """For a linear model on one numeric column: the fitted line in the data's own units."""
    cfg = run.load_config()
    if cfg.model.type != "mlp" or cfg.model.hidden_sizes or not run.weights.is_file():
        return None
    if (run.path / "compression.json").is_file():  # int8 / bf16 weights: no plain line
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


# ------------------------------------------------------------------------------ helpers


def _write_inputs(run: RunDir, bundle: Any, model: torch.nn.Module, model_cfg: dict) -> None:
    """The files later stages read besides the weights: data card, preprocessing, tokenizer."""
    run.write("data_card.json", bundle.card)
    run.write("preprocess.json", bundle.spec.to_dict())
    if bundle.encoder is not None and not run.tokenizer.is_file():
        bundle.encoder.save(run.tokenizer)
    if bundle.chat_tokenizer is not None and not run.chat_tokenizer.is_dir():
        from danlu.data.chat import save_chat_tokenizer

        save_chat_tokenizer(bundle.chat_tokenizer, run.chat_tokenizer)
    if model_cfg["type"] == "hf" and not run.hf_config.is_dir():
        models.hf.save_config(model, run.hf_config)


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
    changed = config_mod.diff(saved.to_dict(), cfg.to_dict())
    blocking = [c for c in changed if not c[0].startswith(RESUMABLE_CHANGES)]
    if blocking and not force:
        shown = "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in blocking[:5])
        raise ConfigError(
            f"the config differs from the one run '{run.path}' was trained with ({shown})",
            fix="resume with the original config, or pass --force to continue anyway",
        )
    return cfg


def _with_init_from(cfg: Config) -> Config:
    """A config whose model starts from a pretraining run: the run's architecture (the keys
    the user wrote win) and, unless data.tokenizer.type is given, the run's tokenizer."""
    source = cfg.model.init_from
    try:
        init = RunDir.open(source)
        init.require_weights()
    except Exception as e:
        raise ConfigError(
            f"model.init_from: {source} is not a finished danlu run ({e})",
            fix="point it at the folder of a pretraining run, e.g. runs/gpt_bible_char",
        ) from None
    saved = init.load_config()
    length = int(init.read("preprocess.json")["input_shape"][0])
    given = set(cfg.model.model_fields_set)
    raw = cfg.to_dict()
    raw["model"] = models.inherit_architecture(
        saved.model.model_dump(), length, cfg.model.model_dump(), given
    )
    tok = cfg.data.tokenizer
    given_tok = tok.model_fields_set if tok is not None else set()
    if init.tokenizer.is_file() and "type" not in given_tok:
        raw["data"]["tokenizer"] = {
            **(raw["data"]["tokenizer"] or {}),
            "type": "file",
            "path": str(init.tokenizer),
            "lowercase": False,  # the saved tokenizer already normalizes as in pretraining
        }
    context = raw["model"].get("context")
    if context and raw["data"]["tokenizer"] and "max_length" not in given_tok:
        # texts are cut to what the pretrained positions cover (a longer max_length, written
        # explicitly, gets the model's own error naming model.context)
        limit = raw["data"]["tokenizer"].get("max_length") or context
        raw["data"]["tokenizer"]["max_length"] = min(limit, context)
    return config_mod.validate(raw)


def with_model_sources(cfg: Config) -> Config:
    """The config a run records: the architecture and tokenizer of `model.init_from`, the
    tokenizer of an `hf` checkpoint, filled in."""
    if cfg.model.model_dump().get("init_from"):
        cfg = _with_init_from(cfg)
    if cfg.model.type == "hf":
        cfg = _with_pretrained(cfg)
    return cfg


def _with_pretrained(cfg: Config) -> Config:
    """A config on a Hugging Face checkpoint: unless data.tokenizer.type is given, texts are
    encoded with the checkpoint's own tokenizer, cut to the positions the model has."""
    raw = cfg.to_dict()
    tok = cfg.data.tokenizer
    given_tok = tok.model_fields_set if tok is not None else set()
    if "type" not in given_tok:
        raw["data"]["tokenizer"] = {
            **(raw["data"]["tokenizer"] or {}),
            "type": "pretrained",
            "path": models.hf.check_checkpoint(cfg.model.pretrained),
            "lowercase": False,  # the checkpoint's tokenizer normalizes as in pretraining
        }
    context = cfg.model.context
    if context and "max_length" not in given_tok:
        raw["data"]["tokenizer"]["max_length"] = context
    return config_mod.validate(raw)


def _start_from(model: torch.nn.Module, source: str, bundle: data.DataBundle) -> None:
    init = RunDir.open(source)
    recorded = init.read("preprocess.json").get("text") or {}
    encoder = bundle.encoder
    if encoder is not None and recorded.get("tokenizer_hash") not in (None, encoder.hash):
        raise ConfigError(
            f"model.init_from: {source} was trained with another vocabulary (tokenizer "
            f"{recorded['tokenizer_hash'][:12]}, this run's {encoder.hash[:12]})",
            fix="leave data.tokenizer.type unset so the run's own tokenizer.json is used",
        )
    new = models.load_backbone(model, init.weights, f"run '{source}'")
    log.info("started from %s (new: %s)", source, ", ".join(new) or "no new weights")


def _check_same_data(run: RunDir, digest: str, force: bool) -> None:
    recorded = run.read("lineage.json").get("data_hash") if run.lineage.is_file() else None
    if recorded and recorded != digest and not force:
        raise DataError(
            f"the data changed since run '{run.path}' started (content hash {digest[:12]}, "
            f"recorded {recorded[:12]})",
            fix="resume with the original data, or pass --force to continue on the new data",
        )
