"""The one training loop. Fine-tuning, distillation and every task go through `fit`.

    result = fit(model, objective, train_loader, val_loader, RunDir("runs/x"),
                 epochs=3, optimizer={"name": "adamw", "lr": 1e-3})

Per optimizer step: `grad_accum` micro-batches forward/backward (autocast in the chosen
precision), an optional L1 penalty, gradient clipping, the optimizer step and the learning
rate for the next step. Every `eval_every` steps (default: each epoch) the validation split is
scored; the best weights by `monitor` become model.safetensors; early stopping counts
evaluations without improvement. Checkpoints hold everything needed to continue exactly
(model, optimizer, schedule, RNG, data position), so `resume=True` after a crash ends with the
same weights as an uninterrupted run. SIGINT/SIGTERM finish the step, checkpoint and stop.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from danlu.data.loader import Batch, BatchLoader
from danlu.device import autocast, resolve_device, resolve_precision
from danlu.errors import ConfigError
from danlu.evaluate.metrics import lower_is_better, scalars
from danlu.rundir import RunDir
from danlu.train import checkpoint
from danlu.train.optim import Schedule, build_optimizer
from danlu.train.progress import RunLog, trim_history


@dataclass
class FitResult:
    step: int
    epoch: int
    monitor: str
    best_value: float | None
    best_step: int | None
    stopped_early: bool
    seconds: float
    device: str
    precision: str
    resumed_from: int | None


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, run: RunDir, step: int) -> None:
        self.run, self.step = run, step
        super().__init__(f"training stopped at step {step}; checkpoint saved in {run.checkpoints}")


def fit(
    model: nn.Module,
    objective: Any,
    train_loader: BatchLoader,
    val_loader: BatchLoader | None,
    run: RunDir,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    optimizer: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
    l1: float = 0.0,
    grad_clip: float | None = None,
    grad_accum: int = 1,
    precision: str = "auto",
    device: str = "auto",
    eval_every: int | None = None,
    log_every: int = 50,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    monitor: str = "val_loss",
    early_stopping: dict[str, Any] | None = None,
    tensorboard: bool = True,
    resume: bool = False,
    metric_names: list[str] | None = None,
    show_progress: bool | None = None,
) -> FitResult:
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model.to(dev)
    has_val = val_loader is not None and len(val_loader.split) > 0
    monitor = _check_monitor(monitor, has_val, metric_names)
    stop_metric = _check_monitor(
        (early_stopping or {}).get("metric") or monitor,
        has_val,
        metric_names,
        key="train.early_stopping.metric",
    )
    n_batches = len(train_loader)
    per_epoch = math.ceil(n_batches / grad_accum)
    total = max_steps or (epochs or 1) * per_epoch
    opt = build_optimizer(model, **(optimizer or {"name": "adamw", "lr": 1e-3}))
    sched = Schedule(
        opt, total_steps=total, lower_is_better=lower_is_better(monitor), **(schedule or {})
    )
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best_value": None,
        "best_step": None,
        "bad_evals": 0,
        "stopped_early": False,
        "elapsed": 0.0,
        "last_eval": -1,
        "last_ckpt": -1,
    }
    resumed_from = None
    if resume and (path := checkpoint.latest(run)) is not None:
        state.update(checkpoint.load(path, model=model, optimizer=opt))
        sched.load_state_dict(state.pop("schedule"))
        resumed_from = state["step"]
        trim_history(run, state["step"])
    sched.apply(state["step"])

    def save_checkpoint() -> None:
        state["last_ckpt"] = state["step"]
        checkpoint.save(
            run,
            state["step"],
            model=model,
            optimizer=opt,
            state={**state, "schedule": sched.state_dict()},
            keep=keep_checkpoints,
            protect=state["best_step"],
        )

    def evaluate(log: RunLog) -> bool:
        """Score the validation split; returns True when training should stop early."""
        state["last_eval"] = state["step"]
        metrics = validate(model, objective, val_loader, dev, prec)
        value = metrics[monitor]
        best = state["best_value"] is None or _better(value, state["best_value"], monitor, 0.0)
        if best:
            state["best_value"], state["best_step"] = value, state["step"]
            checkpoint.save_weights(run, model, step=state["step"], **{monitor: value})
        log.evaluation(state["step"], state["epoch"], metrics, best)
        if sched.observe(metrics[monitor]):
            sched.apply(state["step"])
            log.note(
                f"plateau: {monitor} stopped improving; learning rate lowered to {sched.lr:.2e}"
            )
        if early_stopping is None:
            return False
        ref = state.get("stop_best")
        if ref is None or _better(
            metrics[stop_metric], ref, stop_metric, early_stopping.get("min_delta", 0.0)
        ):
            state["stop_best"], state["bad_evals"] = metrics[stop_metric], 0
            return False
        state["bad_evals"] += 1
        return state["bad_evals"] >= early_stopping.get("patience", 5)

    t_start = time.perf_counter()
    with (
        RunLog(
            run,
            total_steps=total,
            start_step=state["step"],
            tensorboard=tensorboard,
            show=show_progress,
        ) as log,
        _StopSignals() as signals,
    ):
        if resumed_from is not None:
            log.note(
                f"resumed from step {resumed_from} (epoch {state['epoch']}, batch {state['batch']})"
            )
        log.note(
            f"training {total} steps on {dev} in {prec} "
            f"({n_batches} batches per epoch, {per_epoch} steps per epoch)"
        )
        model.train()
        window_loss, window_samples, window_t = 0.0, 0, time.perf_counter()
        done = state["step"] >= total or state["stopped_early"]
        while not done:
            micro: list[Batch] = []
            for batch in train_loader.epoch(state["epoch"], start=state["batch"]):
                micro.append(batch)
                if len(micro) < grad_accum and state["batch"] + len(micro) < n_batches:
                    continue
                loss = train_step(model, objective, micro, opt, dev, prec, grad_clip, l1)
                state["batch"] += len(micro)
                state["step"] += 1
                sched.apply(state["step"])
                window_loss += loss * sum(len(b) for b in micro)
                window_samples += sum(len(b) for b in micro)
                micro = []
                step = state["step"]
                if step % log_every == 0 or step == total:
                    now = time.perf_counter()
                    log.train(
                        step,
                        state["epoch"],
                        window_loss / window_samples,
                        sched.lr,
                        window_samples / max(now - window_t, 1e-9),
                    )
                    window_loss, window_samples, window_t = 0.0, 0, now
                else:
                    log.step(step)
                epoch_end = state["batch"] == n_batches
                if has_val and (step % eval_every == 0 if eval_every else epoch_end):
                    state["stopped_early"] = evaluate(log)
                if (
                    step % checkpoint_every == 0
                    if checkpoint_every
                    else (state["last_eval"] == step or (not has_val and epoch_end))
                ):
                    save_checkpoint()
                if signals.received:
                    save_checkpoint()
                    raise TrainingInterrupted(run, step)
                if step >= total or state["stopped_early"]:
                    done = True
                    break
            else:
                state["epoch"] += 1
                state["batch"] = 0
        if has_val and state["last_eval"] != state["step"]:
            evaluate(log)
        if state["stopped_early"]:
            log.note(
                f"early stopping at step {state['step']}: {stop_metric} did not improve "
                f"for {state['bad_evals']} evaluations"
            )
        if not has_val:
            checkpoint.save_weights(run, model, step=state["step"])
        if state["last_ckpt"] != state["step"]:
            save_checkpoint()
    state["elapsed"] += time.perf_counter() - t_start
    return FitResult(
        state["step"],
        state["epoch"],
        monitor,
        state["best_value"],
        state["best_step"],
        state["stopped_early"],
        state["elapsed"],
        str(dev),
        prec,
        resumed_from,
    )


def train_step(
    model: nn.Module,
    objective: Any,
    batches: list[Batch],
    opt: torch.optim.Optimizer,
    dev: torch.device,
    prec: str,
    grad_clip: float | None,
    l1: float,
) -> float:
    """One optimizer step over micro-batches; returns the mean loss per example."""
    opt.zero_grad(set_to_none=True)
    n = sum(len(b) for b in batches)
    total = 0.0
    for b in batches:
        b = _to(b, dev)
        with autocast(dev, prec):
            loss, _ = objective(model, b)
        (loss * (len(b) / n)).backward()
        total += float(loss.detach()) * len(b) / n
    if l1:
        penalty = sum(p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim >= 2)
        (l1 * penalty).backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return total


@torch.no_grad()
def validate(
    model: nn.Module,
    objective: Any,
    loader: BatchLoader,
    dev: torch.device,
    prec: str,
    prefix: str = "val_",
) -> dict[str, float]:
    """Loss and task metrics on a split, as {prefix + name: value}."""
    was_training = model.training
    model.eval()
    acc = objective.metrics()
    loss_sum, n = 0.0, 0
    for b in loader.epoch(0):
        b = _to(b, dev)
        with autocast(dev, prec):
            loss, outputs = objective(model, b)
        loss_sum += float(loss) * len(b)
        n += len(b)
        acc.update(outputs, b.y)
    model.train(was_training)
    return {
        f"{prefix}loss": loss_sum / max(n, 1),
        **{f"{prefix}{k}": v for k, v in scalars(acc.compute()).items()},
    }


def _to(batch: Batch, dev: torch.device) -> Batch:
    if batch.x.device == dev:
        return batch
    return Batch(batch.x.to(dev), batch.y.to(dev), batch.rows)


def _better(value: float, ref: float, metric: str, min_delta: float) -> bool:
    if value is None or math.isnan(value):
        return False
    return value < ref - min_delta if lower_is_better(metric) else value > ref + min_delta


def _check_monitor(
    metric: str, has_val: bool, names: list[str] | None, key: str = "train.monitor"
) -> str:
    if not has_val:
        return metric
    if not metric.startswith("val_"):
        raise ConfigError(f"{key}: '{metric}' must be a validation metric (val_...)")
    if names is not None and metric.removeprefix("val_") not in ["loss", *names]:
        raise ConfigError(
            f"{key}: '{metric}' is not a metric of this task",
            fix="use one of " + ", ".join(f"val_{m}" for m in ["loss", *names]),
        )
    return metric


class _StopSignals:
    """SIGINT / SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))  # a second one kills

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
