"""The pre-flight estimate: will this run fit, and how long will it take?

Measured on the real model and real batches, not guessed from formulas. On a deep copy of the
model (the run's weights, buffers and RNG streams stay untouched; every RNG state is restored
afterwards, so training is bit-identical with or without the estimate):
  - activations: one forward + backward on the largest batch the data can produce (the
    `batch_size` longest texts), summing the tensors autograd saves for backward through
    `torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded). That
    is the activation memory a step holds at its peak, exact and cheap, on any device;
  - gradients and optimizer state: the bytes of the `.grad` tensors and of the optimizer's
    state after its first step (Adam/AdamW: 2 × the trainable weights, SGD with momentum: 1 ×);
  - time: one warm-up step (discarded: allocation, library start-up), then real steps —
    data loading included — until about `budget_s` seconds have passed (at least 3, at most
    `max_timed`); their mean is the time per step (the throughput training will see, stalls
    included). Evaluation: timed forward passes on a validation batch.
Memory available is free RAM plus the model already loaded (CUDA: free GPU memory), or
`train.memory_limit_gb`. `check_fits` stops a run that will not fit with settings that would.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import psutil
import torch
from torch import nn

from danlu.data.loader import Batch
from danlu.device import autocast, resolve_device, resolve_precision
from danlu.errors import ConfigError, DanluError
from danlu.train.checkpoint import rng_state, set_rng_state
from danlu.train.estimate_report import Estimate, gb, parts, suggestions, summary
from danlu.train.optim import build_optimizer
from danlu.train.steps import train_step

log = logging.getLogger("danlu")


def estimate_training(
    model: nn.Module,
    objective: Any,
    bundle: Any,
    train: dict[str, Any],
    *,
    seed: int = 0,
    budget_s: float = 0.2,
    max_timed: int = 50,
    processes: int = 1,
    local_processes: int | None = None,
    sharded: bool = False,
) -> Estimate:
    """Measure what training `model` with the `train` section (as a dict) on `bundle` needs.
    With `processes` > 1 (torchrun), memory is also given per process (`sharded`: FSDP) and
    for the `local_processes` that share this machine; the time is one process's."""
    dev = resolve_device(train["device"])
    prec = resolve_precision(train["precision"], dev)
    bs, accum = train["batch_size"], train["grad_accum"]
    loader = bundle.loader(
        "train", bs, order="shuffle", seed=seed, train=True, device=str(dev),
        group_by_length=train["group_by_length"],
    )  # fmt: skip
    has_val = "val" in bundle.splits and len(bundle.splits["val"]) > 0
    val = (
        bundle.loader("val", train["eval_batch_size"] or 2 * bs, device=str(dev))
        if has_val
        else None
    )
    per_epoch = math.ceil(len(loader) / accum)
    steps = train["max_steps"] or (train["epochs"] or 1) * per_epoch
    weights, trainable, total = _parameters(model)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = _optimizer_state_bytes(train["optimizer"], grads)
    free, available, source = _memory(dev, weights, train.get("memory_limit_gb"))
    pad = bundle.spec.text["pad_id"] if bundle.spec.input == "text" and bundle.spec.text else None
    est = Estimate(
        parameters=total, trainable=trainable, weights_bytes=weights, gradients_bytes=grads,
        optimizer_bytes=state, batch_size=bs, grad_accum=accum, device=str(dev), precision=prec,
        optimizer=train["optimizer"]["name"], steps=steps, steps_per_epoch=per_epoch,
        available_bytes=available, available_from=source,
        process_rss_bytes=psutil.Process().memory_info().rss, processes=processes,
        local_processes=local_processes or processes, sharded=sharded and processes > 1,
        unit_bytes=largest_unit_bytes(model) if sharded and processes > 1 else 0,
    )  # fmt: skip
    if trainable == 0:  # nothing to train: fit() says so
        return est
    if weights + grads + state > free:  # no room for a copy to measure on
        log.info("estimate: the model is too large to measure on a copy; memory from its size")
        return est
    saved_rng = rng_state()
    try:
        timing = (budget_s, max_timed)
        _measure(est, model, objective, loader, val, train, dev, pad, free, timing)
    except DanluError:
        raise
    except Exception as e:  # advisory: a model the copy or the hooks cannot handle still trains
        log.warning("estimate: not measured (%s: %s)", type(e).__name__, str(e).split("\n")[0])
    finally:
        set_rng_state(saved_rng)
    return est


def check_fits(est: Estimate, model_cfg: dict[str, Any], train: dict[str, Any]) -> None:
    """Stop with a ConfigError naming settings that fit when the run needs more memory than
    there is."""
    if est.fits:
        return
    raise ConfigError(
        f"this run needs ~{gb(est.needed_bytes)} ({parts(est)}) but {gb(est.available_bytes)} "
        f"is available ({est.available_from})",
        fix="try "
        + "; or ".join(suggestions(est, model_cfg, train))
        + " (train.estimate: false skips this check)",
    )


def preflight(
    model: nn.Module,
    objective: Any,
    bundle: Any,
    train: dict[str, Any],
    *,
    seed: int,
    model_cfg: dict[str, Any],
    **parallel: Any,  # processes, local_processes, sharded (estimate_training)
) -> Estimate:
    """What `danlu train` runs first: the estimate, logged in two lines, and the memory check."""
    est = estimate_training(model, objective, bundle, train, seed=seed, **parallel)
    log.info("%s", summary(est))
    check_fits(est, model_cfg, train)
    return est


# ----------------------------------------------------------------------- measurements


def _measure(
    est: Estimate,
    model: nn.Module,
    objective: Any,
    loader: Any,
    val: Any,
    train: dict[str, Any],
    dev: torch.device,
    pad: int | None,
    free: int,
    timing: tuple[float, int],
) -> None:
    """Fill in the measured parts of `est` from steps on a copy of `model`."""
    twin = copy.deepcopy(model).to(dev).train()
    largest = _largest_batch(loader)
    est.length = int(largest.x.shape[1]) if pad is not None and largest.x.dim() == 2 else None
    if not _measure_memory(est, twin, objective, largest, dev, free) or not est.fits:
        return  # the run will not fit: no time to measure (activations may be extrapolated)
    opt = build_optimizer(twin, **train["optimizer"])
    batches = _micro_batches(loader)
    args = (dev, est.precision, train["grad_clip"], train["l1"])
    train_step(twin, objective, [next(batches) for _ in range(est.grad_accum)], opt, *args)
    est.optimizer_bytes = sum(
        v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    budget_s, max_timed = timing
    times: list[float] = []
    samples, tokens = 0, 0
    while len(times) < 3 or (sum(times) < budget_s and len(times) < max_timed):
        t0 = time.perf_counter()
        group = [next(batches) for _ in range(est.grad_accum)]
        train_step(twin, objective, group, opt, *args)
        times.append(time.perf_counter() - t0)
        samples += sum(len(b) for b in group)
        tokens += sum(_tokens(b, pad) for b in group) if pad is not None else 0
    est.measured_steps = len(times)
    est.step_seconds = statistics.fmean(times)  # a throughput: stalls count, as in training
    est.samples_per_s = samples / len(times) / est.step_seconds
    est.tokens_per_s = tokens / len(times) / est.step_seconds if pad is not None else None
    if val is not None:
        seconds = _eval_batch_seconds(twin, objective, val, dev, est.precision)
        est.evaluations = _evaluations(train, est.steps, est.steps_per_epoch)
        est.eval_seconds = est.evaluations * len(val) * seconds


def _measure_memory(
    est: Estimate, twin: nn.Module, objective: Any, largest: Batch, dev: torch.device, free: int
) -> bool:
    """Activations and gradients from the largest batch — once probes on 2 and 4 of its
    examples show that the whole batch fits in what is free (else the activations are the
    probes' line extended to the batch size, and the answer is False)."""
    n = len(largest)
    if n > 4:
        two, four = (
            activation_bytes(twin, objective, _head(largest, k), dev, est.precision) for k in (2, 4)
        )
        per_example = (four - two) / 2  # what is per batch (weight casts) counts once
        est.activations_bytes = int(two + per_example * (n - 2))
        est.activations_measured_on = 4
        static = est.weights_bytes + est.gradients_bytes + est.optimizer_bytes  # of the copy
        if static + 1.2 * est.activations_bytes > free:
            return False
    est.activations_bytes = activation_bytes(twin, objective, largest, dev, est.precision)
    est.activations_measured_on = len(largest)
    est.gradients_bytes = sum(p.grad.nbytes for p in twin.parameters() if p.grad is not None)
    return True


def activation_bytes(
    model: nn.Module, objective: Any, batch: Batch, dev: torch.device, precision: str
) -> int:
    """Bytes autograd keeps for backward in one forward pass of `batch` (then runs backward,
    so the model holds gradients afterwards). Each storage counts once; parameters do not
    count (their casts under autocast do: those are real extra memory), nor do tensor
    subclasses without a storage of their own (quantized weights)."""
    params = {_storage(p)[0] for p in model.parameters() if _storage(p)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        found = _storage(t)
        if found and found[0] not in params and found[0] != 0:
            seen[found[0]] = found[1]
        return t

    model.zero_grad(set_to_none=True)
    b = Batch(batch.x.to(dev), batch.y.to(dev), batch.rows)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(dev, precision):
        loss, _, _ = objective(model, b)
    loss.backward()
    return sum(seen.values())


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of a tensor's storage; None for wrappers that have none."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _parameters(model: nn.Module) -> tuple[int, int, int]:
    """(weights bytes, trainable count, total count)."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    return (
        weights,
        sum(p.numel() for p in params if p.requires_grad),
        sum(p.numel() for p in params),
    )


def _optimizer_state_bytes(optimizer: dict[str, Any], gradient_bytes: int) -> int:
    """Before measuring: Adam/AdamW keep two moments per trainable weight, SGD with momentum
    one buffer, plain SGD nothing."""
    if optimizer["name"] in ("adam", "adamw"):
        return 2 * gradient_bytes
    return gradient_bytes if optimizer.get("momentum") else 0


def largest_unit_bytes(model: nn.Module) -> int:
    """FSDP gathers one unit at a time (train/distributed.py `layers`, then the rest): the
    parameter bytes of the largest."""
    from danlu.train.distributed import layers

    units = layers(model)
    inside = {id(p) for unit in units for p in unit.parameters()}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    sizes = [sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in units]
    return max([rest, *sizes])


def _memory(dev: torch.device, weights: int, limit_gb: float | None) -> tuple[int, int, str]:
    """(free now, available to the run, where that number comes from)."""
    if dev.type == "cuda":
        free = int(torch.cuda.mem_get_info(dev)[0])
        available, source = free, "free GPU memory"
    else:
        free = int(psutil.virtual_memory().available)
        available, source = free + weights, "free memory plus the model already loaded"
    if limit_gb is not None:
        available, source = int(limit_gb * 1e9), "train.memory_limit_gb"
    return free, available, source


def _head(batch: Batch, k: int) -> Batch:
    """The first k examples (text keeps the batch's padded length)."""
    return Batch(batch.x[:k], batch.y[:k], batch.rows[:k])


def _largest_batch(loader: Any) -> Batch:
    """The batch that needs the most memory: the `batch_size` longest rows of padded text,
    else the first batch (every batch is as large)."""
    lengths = getattr(loader, "lengths", None)
    if lengths is not None:
        rows = lengths.argsort(descending=True, stable=True)[: loader.batch_size]
        return loader.make(rows.sort().values)
    return next(iter(loader.epoch(0)))


def _micro_batches(loader: Any) -> Iterator[Batch]:
    """The training batches in order, epoch after epoch (small data has few batches)."""
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def _tokens(batch: Batch, pad: int) -> int:
    x = batch.x
    return int((x != pad).sum()) if not x.is_floating_point() else x.numel()


def _evaluations(train: dict[str, Any], steps: int, per_epoch: int) -> int:
    """How often the loop scores the validation split: every eval_every steps (and at the
    end), or once per epoch."""
    every = train["eval_every"]
    if every:
        return steps // every + (1 if steps % every else 0)
    return math.ceil(steps / max(per_epoch, 1))


@torch.no_grad()
def _eval_batch_seconds(
    model: nn.Module, objective: Any, val: Any, dev: torch.device, precision: str
) -> float:
    """Seconds for one validation batch (the second of two timed passes)."""
    model.eval()
    b = next(iter(val.epoch(0)))
    b = Batch(b.x.to(dev), b.y.to(dev), b.rows)
    seconds = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        with autocast(dev, precision):
            objective(model, b)
        seconds = time.perf_counter() - t0
    model.train()
    return seconds
