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
`privacy` (a train.privacy.PrivateTraining) makes each step DP-SGD: per-example clipping and
noise in the optimizer, ε in the history lines.
A NaN/Inf loss or gradient is never applied (steps.NonFiniteGuard, `nonfinite`:
stop with a diagnostic, or skip); fp16 runs carry a grad scaler; `compile_model` compiles the
model in place; resume falls back past an unreadable checkpoint (checkpoint.restore_latest).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from danlu.data.loader import Batch, BatchLoader
from danlu.device import grad_scaler, resolve_device, resolve_precision
from danlu.errors import ConfigError
from danlu.evaluate.metrics import lower_is_better
from danlu.rundir import RunDir
from danlu.signals import StopSignals
from danlu.train import checkpoint, distributed, sharded
from danlu.train.optim import Schedule, build_optimizer
from danlu.train.progress import RunLog, trim_history
from danlu.train.steps import NonFiniteGuard, train_step, validate


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
    skipped_steps: int = 0  # steps whose non-finite loss/gradients were not applied


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was written."""

    def __init__(self, run: RunDir, step: int) -> None:
        self.run, self.step = run, step
        super().__init__(f"training stopped at step {step}; checkpoint saved in {run.checkpoints}")


@dataclass
class _State:
    """What a checkpoint restores besides weights, optimizer and RNG (saved as state.json)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of the current epoch already consumed
    best_value: float | None = None
    best_step: int | None = None
    stop_best: float | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0
    last_eval: int = -1
    last_ckpt: int = -1
    window_loss: float = 0.0  # loss × samples since the last train log line
    window_samples: int = 0


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
    nonfinite: dict[str, Any] | None = None,  # {policy: stop|skip, max_consecutive}
    compile_model: bool = False,  # torch.compile the model (in place) for training
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
    privacy: Any = None,
    on_evaluate: Callable[[int, dict[str, float]], None] | None = None,  # hook (danlu tune)
) -> FitResult:
    dev = resolve_device(device)
    prec = "fp32" if privacy is not None else resolve_precision(precision, dev)
    has_val = val_loader is not None and len(val_loader.split) > 0
    monitor = _check_monitor(monitor, has_val, metric_names)
    stop_metric = _check_monitor(
        (early_stopping or {}).get("metric") or monitor,
        has_val,
        metric_names,
        key="train.early_stopping.metric",
    )
    model.to(dev)
    if compile_model:  # in place: state_dict keeps its names (no "_orig_mod." prefix)
        model.compile()
    scaler, guard = grad_scaler(dev, prec), NonFiniteGuard(run, **(nonfinite or {}))
    per_epoch = math.ceil(len(train_loader) / grad_accum)
    total = max_steps or (epochs or 1) * per_epoch
    par = distributed.current()  # torchrun: rank, DDP/FSDP, sharding (one process: no-ops)
    par.check(train_loader.batch_size, privacy)
    net = par.wrap(model)  # what trains; `model` (unwrapped) is what checkpoints hold
    train_loader, train_objective = par.shard(train_loader), par.weighted(objective)
    opt = build_optimizer(model, **(optimizer or {"name": "adamw", "lr": 1e-3}))
    if privacy is not None:
        opt = privacy.attach(model, opt)
    sched = Schedule(
        opt, total_steps=total, lower_is_better=lower_is_better(monitor), **(schedule or {})
    )
    state, resumed_from, restored = _State(), None, None
    if resume:  # the newest checkpoint that restores; unreadable ones are set aside
        extras = functools.partial(_restore, sched=sched, guard=guard, scaler=scaler)
        restored = par.main_first(  # rank 0 sets unreadable ones aside before the others look
            lambda: checkpoint.restore_latest(run, model=model, optimizer=opt, apply=extras),
            "restoring the checkpoint",
        )
    if restored is not None:
        state = restored.applied
        resumed_from = state.step
        if par.is_main:
            trim_history(run, state.step)
    sched.apply(state.step)
    logger = RunLog if privacy is None else privacy.run_log
    log = (logger if par.is_main else distributed.QuietLog)(
        run, total_steps=total, start_step=state.step, tensorboard=tensorboard, show=show_progress
    )
    loop = _Loop(
        model,
        objective,
        val_loader if has_val else None,
        run,
        opt,
        sched,
        log,
        state,
        dev=dev,
        prec=prec,
        total=total,
        monitor=monitor,
        stop_metric=stop_metric,
        early_stopping=early_stopping,
        eval_every=eval_every,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        keep=keep_checkpoints,
        batches_per_epoch=len(train_loader),
        on_evaluate=on_evaluate,
        guard=guard,
        scaler=scaler,
    )
    with log, _StopSignals() as signals:
        for line in restored.notes if restored is not None else []:
            log.note(line)
        if resumed_from is not None:
            log.note(f"resumed from step {state.step} (epoch {state.epoch}, batch {state.batch})")
        log.note(
            f"training {total} steps on {dev} in {prec} "
            f"({len(train_loader)} batches per epoch, {per_epoch} steps per epoch)"
        )
        model.train()
        step = (
            functools.partial(train_step, scaler=scaler, guard=guard)
            if privacy is None
            else functools.partial(privacy.step, guard=guard)
        )
        while not loop.done:
            for micro in _groups(train_loader, state, grad_accum):
                par.mark(state.step + 1, "forward/backward")
                loss = step(net, train_objective, micro, opt, dev, prec, grad_clip, l1)
                # skipped: not applied (NaN/Inf); raises TrainingDiverged if the policy says stop
                skipped = guard.settle(loss, micro, state.step + 1, state.epoch, state.batch, log)
                loop.after_step(micro, loss, skipped)
                if par.agree(signals.received is not None, state.step):
                    loop.checkpoint()
                    raise TrainingInterrupted(run, state.step)
                if loop.done:
                    break
        loop.finish()
        if privacy is not None:
            log.note(privacy.describe(state.step))
    return FitResult(
        state.step,
        state.epoch,
        monitor,
        state.best_value,
        state.best_step,
        state.stopped_early,
        state.elapsed,
        str(dev),
        prec,
        resumed_from,
        guard.skipped,
    )


def _restore(saved: dict[str, Any], sched: Schedule, guard: NonFiniteGuard, scaler: Any) -> _State:
    """The trainer state of a checkpoint, with its schedule, guard and grad-scaler states."""
    sched.load_state_dict(saved.pop("schedule"))
    guard.load_state_dict(saved.pop("nonfinite", {"skipped": 0, "consecutive": 0}))
    scaler_state = saved.pop("scaler", None)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    return _State(**{k: v for k, v in saved.items() if k in _State.__dataclass_fields__})


def _groups(loader: BatchLoader, state: _State, grad_accum: int) -> Iterator[list[Batch]]:
    """Micro-batch groups (one per optimizer step) from the saved data position onward."""
    while True:
        group: list[Batch] = []
        for batch in loader.epoch(state.epoch, start=state.batch):
            group.append(batch)
            if len(group) == grad_accum or state.batch + len(group) == len(loader):
                yield group
                group = []
        state.epoch, state.batch = state.epoch + 1, 0


class _Loop:
    """The bookkeeping of one fit() call: logging, evaluation, best weights, early stopping
    and checkpoints after each optimizer step. `fit` above reads as the loop itself."""

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        val_loader: BatchLoader | None,
        run: RunDir,
        opt: torch.optim.Optimizer,
        sched: Schedule,
        log: RunLog,
        state: _State,
        *,
        dev: torch.device,
        prec: str,
        total: int,
        monitor: str,
        stop_metric: str,
        early_stopping: dict[str, Any] | None,
        eval_every: int | None,
        log_every: int,
        checkpoint_every: int | None,
        keep: int,
        batches_per_epoch: int,
        on_evaluate: Callable[[int, dict[str, float]], None] | None = None,
        guard: NonFiniteGuard | None = None,
        scaler: Any = None,
    ) -> None:
        self.model, self.objective, self.val_loader, self.run = model, objective, val_loader, run
        self.opt, self.sched, self.log, self.state = opt, sched, log, state
        self.dev, self.prec, self.total, self.monitor = dev, prec, total, monitor
        self.stop_metric, self.early_stopping = stop_metric, early_stopping
        self.eval_every, self.log_every, self.checkpoint_every = (
            eval_every,
            log_every,
            checkpoint_every,
        )
        self.keep, self.batches_per_epoch = keep, batches_per_epoch
        self.on_evaluate = on_evaluate  # called after each logged evaluation; may raise to stop
        self.guard, self.scaler = guard, scaler  # checkpointed with the trainer state
        self.par = distributed.current()  # only rank 0 validates and writes
        self.t0, self.elapsed0 = time.perf_counter(), state.elapsed
        self.window_t, self.window_seen = time.perf_counter(), 0  # throughput of this process

    @property
    def done(self) -> bool:
        return self.state.step >= self.total or self.state.stopped_early

    def after_step(self, micro: list[Batch], loss: float, skipped: bool = False) -> None:
        s = self.state
        samples = sum(len(b) for b in micro)
        s.batch, s.step = s.batch + len(micro), s.step + 1
        self.sched.apply(s.step)
        if not skipped:  # a skipped step's loss is not finite: kept out of the logged mean
            s.window_loss += loss * samples
            s.window_samples += samples
        self.window_seen += samples
        logged = s.step % self.log_every == 0 or s.step == self.total
        if logged and self.par.active:  # the whole global batch's loss and throughput
            s.window_loss, s.window_samples, self.window_seen = self.par.all_sum(
                [s.window_loss, s.window_samples, self.window_seen], s.step
            )
        if logged and s.window_samples:
            now = time.perf_counter()
            self.log.train(
                s.step,
                s.epoch,
                s.window_loss / s.window_samples,
                self.sched.lr,
                self.window_seen / max(now - self.window_t, 1e-9),
            )
            s.window_loss, s.window_samples = 0.0, 0
            self.window_t, self.window_seen = now, 0
        else:
            self.log.step(s.step)
        epoch_end = s.batch == self.batches_per_epoch
        # the last step is always scored before its checkpoint, so that checkpoint holds the
        # final best value (and resuming a finished run does not score it twice)
        due = s.step % self.eval_every == 0 if self.eval_every else epoch_end
        if self.val_loader is not None and (due or s.step >= self.total):
            self.evaluate()
        if (
            s.step % self.checkpoint_every == 0
            if self.checkpoint_every
            else s.last_eval == s.step or (self.val_loader is None and epoch_end)
        ):
            self.checkpoint()

    def evaluate(self) -> None:
        s = self.state
        s.last_eval = s.step
        score = functools.partial(
            validate, self.model, self.objective, self.val_loader, self.dev, self.prec
        )
        if self.par.gathers:  # FSDP: every forward all-gathers, so every rank scores
            self.par.mark(s.step, "validation")
            metrics = score()
        else:  # rank 0 scores, every rank gets the numbers
            metrics = self.par.main_only(
                score, f"validation at step {s.step}", share=lambda m: m, receive=lambda m: m
            )
        value = metrics.get(self.monitor, math.nan)  # e.g. roc_auc on a one-class split
        best = s.best_value is None or _better(value, s.best_value, self.monitor, 0.0)
        if best and not math.isnan(value):
            weights = self._weights()
            if self.par.is_main:
                s.best_value, s.best_step = value, s.step
                checkpoint.save_weights(self.run, weights, step=s.step, **{self.monitor: value})
        self.log.evaluation(s.step, s.epoch, metrics, best)
        if self.on_evaluate is not None:  # danlu tune: report to the pruner (may raise)
            self.on_evaluate(s.step, metrics)
        if self.sched.observe(value):
            self.sched.apply(s.step)
            self.log.note(
                f"plateau: {self.monitor} stopped improving; "
                f"learning rate lowered to {self.sched.lr:.2e}"
            )
        if self.early_stopping is None:
            return
        current = metrics.get(self.stop_metric, math.nan)
        if s.stop_best is None or _better(
            current, s.stop_best, self.stop_metric, self.early_stopping.get("min_delta", 0.0)
        ):
            s.stop_best, s.bad_evals = current, 0
            return
        s.bad_evals += 1
        s.stopped_early = s.bad_evals >= self.early_stopping.get("patience", 5)

    def checkpoint(self) -> None:
        s = self.state
        if s.last_ckpt == s.step:
            return
        s.last_ckpt = s.step
        s.elapsed = self.elapsed0 + time.perf_counter() - self.t0
        weights = self._weights()
        optimizer_state = self._gathered(lambda: sharded.full_optimizer_state(self.opt))
        if not self.par.is_main:
            return
        checkpoint.save(
            self.run,
            s.step,
            weights=weights,
            optimizer_state=optimizer_state,
            state={**asdict(s), "schedule": self.sched.state_dict(), **self._extra_state()},
            keep=self.keep,
            protect=s.best_step,
        )

    def _weights(self) -> dict[str, torch.Tensor] | None:
        return self._gathered(lambda: sharded.full_model_state(self.model))

    def _gathered(self, fn: Callable[[], Any]) -> Any:
        """A full state on rank 0 (None on the others); under FSDP every rank gathers."""
        if not self.par.gathers:
            return fn() if self.par.is_main else None
        self.par.mark(self.state.step, "gathering the full state", collective=True)
        value = fn()
        self.par.mark(self.state.step, "bookkeeping")
        return value if self.par.is_main else None

    def _extra_state(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.guard is not None:
            extra["nonfinite"] = self.guard.state_dict()
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        return extra

    def finish(self) -> None:
        s = self.state
        if self.guard is not None and self.guard.skipped:
            self.log.note(f"{self.guard.skipped} steps skipped (non-finite loss or gradients)")
        if self.val_loader is not None and s.last_eval != s.step:
            self.evaluate()
        if s.stopped_early:
            self.log.note(
                f"early stopping at step {s.step}: {self.stop_metric} did not "
                f"improve for {s.bad_evals} evaluations"
            )
        if self.val_loader is None:
            weights = self._weights()
            if self.par.is_main:
                checkpoint.save_weights(self.run, weights, step=s.step)
        self.checkpoint()
        s.elapsed = self.elapsed0 + time.perf_counter() - self.t0


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


class _StopSignals(StopSignals):
    """SIGINT / SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None

    def on_signal(self, signum: int) -> None:
        self.received = signum
        self.restore(signum)  # a second one kills
