"""Distributed training on PyTorch's own engine (torchrun): DDP, FSDP, sharding, a watchdog.

`danlu train CONFIG --nproc N` re-runs itself under `python -m torch.distributed.run
--standalone --nproc_per_node N -m danlu train CONFIG`; plain `torchrun ... -m danlu train` works
the same. When torchrun's RANK / WORLD_SIZE / LOCAL_RANK are set, `setup` joins the process
group (gloo on CPU, nccl on cuda:LOCAL_RANK) and `current()` answers the rank questions for the
rest of the code; without them it is a one-process `Parallel` whose methods do nothing.

- Model: DDP by default, FSDP2 (`fully_shard` per repeated layer, then the root) with
  `train.strategy: fsdp`. Checkpoints and model.safetensors always hold the full state, in the
  one-process layout (train/sharded.py gathers it on every rank; rank 0 writes); under FSDP
  every rank runs validation, since each forward all-gathers the layers.
- Data: `train.batch_size` is the GLOBAL batch. Every rank reads the same global batch b of
  epoch e (the order is a function of seed and epoch) and keeps its slice; the data position is
  counted in global batches, so it does not depend on the process count. A shard of n_r of the
  batch's N rows scales its loss by n_r·W/N, so after DDP's mean over W ranks the gradient is
  the global batch mean even when the last batch does not split evenly.
- Only rank 0 writes. `main_only` / `main_first` run a step on rank 0 first and broadcast
  its result, or its failure (JSON over a tensor, no pickle), so the others never hang on it.
- Watchdog: each rank marks (sequence number, step, phase) as it enters compute and collective
  phases; a daemon thread pushes the mark to the process group's store and, when the rank has
  sat in one collective longer than `train.collective_timeout_s`, reads everyone's marks,
  prints which rank is behind and where, and ends the process (os._exit(3): the main thread
  may be stuck in C++), so torchrun tears the group down.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from danlu.data.loader import Batch, BatchLoader
from danlu.errors import ConfigError
from danlu.train.watchdog import EXIT_CODE, Watchdog

HANG_RANK_ENV, HANG_STEP_ENV = "DANLU_TEST_HANG_RANK", "DANLU_TEST_HANG_STEP"  # tests only
GRACE_S = 5.0  # the backend's own timeout fires this long after the watchdog (a backstop)


class PeerFailed(SystemExit):
    """Rank 0 failed in a step the others waited for; rank 0 reports the error itself."""

    def __init__(self) -> None:
        super().__init__(2)


@dataclass
class ShardBatch(Batch):
    """A rank's slice of a global batch; `weight` = n_r·W/N scales its loss (module doc)."""

    weight: float = 1.0


@dataclass
class Parallel:
    """Where this process stands in the group; the one-process default does nothing."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"  # none | ddp | fsdp
    watchdog: Watchdog | None = None
    store: Any = None  # the process group's store (under a danlu prefix)
    _published: int = 0  # values `publish` has sent: the next store key

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def gathers(self) -> bool:
        """FSDP: full states and validation need every rank (train/sharded.py)."""
        return self.active and self.strategy == "fsdp"

    # ---------------------------------------------------------------- collectives
    def mark(self, step: int | None, phase: str, collective: bool = False) -> None:
        if self.watchdog is not None:
            self.watchdog.mark(step, phase, collective)
            _test_hang(self.rank, self.watchdog.record["step"], phase)

    def agree(self, flag: bool, step: int) -> bool:
        """True on every rank when any rank's flag is set (a stop signal, one all-reduce)."""
        if not self.active:
            return flag
        self.mark(step, "stop-signal all-reduce", collective=True)
        t = torch.tensor([int(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        self.mark(step, "bookkeeping")
        return bool(t.item())

    def all_sum(self, values: list[float], step: int) -> list[float]:
        if not self.active:
            return values
        self.mark(step, "loss all-reduce", collective=True)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        self.mark(step, "bookkeeping")
        return t.tolist()

    def publish(self, obj: Any, what: str) -> Any:
        """Rank 0's JSON-able `obj` on every rank, through the store (no collective, so no
        backend timeout while rank 0 works for long, e.g. prepares the data; no pickle)."""
        if not self.active:
            return obj
        key = f"main/{self._published}"
        self._published += 1
        if self.is_main:
            self.store.set(key, json.dumps(obj))
            return obj
        self.mark(None, f"waiting for rank 0 ({what})")  # not a collective: not timed
        self.store.wait([key], timedelta(days=7))
        return json.loads(self.store.get(key))

    def main_only(
        self,
        fn: Callable[[], Any],
        what: str,
        share: Callable[[Any], Any] = lambda value: None,
        receive: Callable[[Any], Any] = lambda shared: None,
    ) -> Any:
        """Run `fn` on rank 0 only; the others get `receive(share(result))`, or exit quietly
        (PeerFailed) when rank 0 failed."""
        if not self.active:
            return fn()
        if self.is_main:
            self.mark(None, what)
            try:
                value = fn()
            except BaseException:
                self.publish({"ok": False}, what)
                raise
            self.publish({"ok": True, "value": share(value)}, what)
            return value
        got = self.publish(None, what)
        if not got["ok"]:
            raise PeerFailed()
        return receive(got["value"])

    def main_first(self, fn: Callable[[], Any], what: str) -> Any:
        """Run `fn` on rank 0, then (if it worked) on the others: caches, renames, clean-ups
        that rank 0 makes are in place before anyone else looks."""
        value = self.main_only(fn, what)
        return value if self.is_main else fn()

    # -------------------------------------------------------------- model and data
    def check(self, batch_size: int, privacy: Any) -> None:
        if not self.active:
            return
        if privacy is not None:
            raise ConfigError(
                "train.privacy (DP-SGD) does not run on several processes",
                fix="train with one process (no --nproc) when train.privacy is set",
            )
        if batch_size % self.world:
            raise ConfigError(
                f"train.batch_size: {batch_size} (the global batch) is not divisible by the "
                f"{self.world} processes",
                fix=f"use a multiple of {self.world}, e.g. {batch_size // self.world * self.world or self.world}",
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train through: DDP, FSDP2 (in place) or the model itself."""
        if not self.active:
            return model
        self.mark(None, f"{self.strategy} start-up")  # imports, then a broadcast: not timed
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in layers(model):  # each repeated layer gathers on its own, then the rest
                fully_shard(layer)
            wrapped = fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(model, device_ids=ids)
            wrapped.register_comm_hook(self, _marked_allreduce)
        self.mark(None, "after start-up")
        return wrapped

    def shard(self, loader: BatchLoader) -> Any:
        return ShardedLoader(loader, self.rank, self.world) if self.active else loader

    def weighted(self, objective: Any) -> Any:
        return _Weighted(objective) if self.active else objective

    def failed(self) -> None:
        """After an exception: if the watchdog of another rank fired (its message is out),
        end quietly instead of adding this rank's "connection reset" traceback."""
        if self.watchdog is not None and self.watchdog.aborted():
            os._exit(EXIT_CODE)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def layers(model: nn.Module) -> list[nn.Module]:
    """FSDP's units: the elements of the outermost nn.ModuleLists (Transformer blocks, LSTM
    layers) whose parameters appear nowhere else; a tied weight stays with the root's unit."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            params = list(child.parameters())
            if isinstance(module, nn.ModuleList) and params:
                if all(counts[id(p)] == 1 for p in params):
                    found.append(child)
            else:
                visit(child)

    visit(model)
    return found


def _marked_allreduce(par: Parallel, bucket: Any) -> torch.futures.Future:
    """DDP's own mean all-reduce, marked for the watchdog."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    par.mark(None, "backward all-reduce", collective=True)
    return allreduce_hook(None, bucket)


_marked_allreduce.__annotations__ = {  # DDP checks them as objects, not strings
    "par": Parallel,
    "bucket": torch.distributed.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


class ShardedLoader:
    """A BatchLoader seen by one rank: the same global batches, each cut to the rank's rows."""

    def __init__(self, loader: BatchLoader, rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        for batch in self.loader.epoch(epoch, start):
            yield self.cut(batch)

    def cut(self, batch: Batch) -> ShardBatch:
        n = len(batch)
        idx = torch.tensor_split(torch.arange(n), self.world)[self.rank]
        weight = len(idx) * self.world / max(n, 1)
        if len(idx) == 0:  # fewer rows than ranks: one row that counts for nothing
            idx = torch.arange(1)
        on = idx.to(batch.x.device)
        return ShardBatch(batch.x[on], batch.y[on], batch.rows[idx.to(batch.rows.device)], weight)


class _Weighted:
    """The objective with each shard's loss scaled by its weight (module doc)."""

    def __init__(self, objective: Any) -> None:
        self.objective = objective

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)

    def __call__(self, model: nn.Module, batch: Batch) -> Any:
        loss, outputs, targets = self.objective(model, batch)
        weight = getattr(batch, "weight", 1.0)
        return (loss if weight == 1.0 else loss * weight), outputs, targets


class QuietLog:
    """What ranks other than 0 log: nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def __enter__(self) -> QuietLog:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_current = Parallel()


def current() -> Parallel:
    return _current


def local_world(world: int) -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE; all of them without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup(
    strategy: str = "auto",
    timeout_s: float = 300.0,
    device: str = "auto",
    threads: int | None = None,
) -> Parallel:
    """Join torchrun's process group when its env is set (once per process); else one process."""
    global _current
    from danlu.device import resolve_device

    if _current.active:
        return _current
    dev = resolve_device(device)
    if not under_torchrun():
        if strategy != "auto":
            logging.getLogger("danlu").info(
                "train.strategy: %s takes effect with several processes (--nproc N); "
                "this run trains in one",
                strategy,
            )
        _current = Parallel(device=dev)
        return _current
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif not threads:
        per_node = local_world(world)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    torch.distributed.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s + GRACE_S)
    )
    from torch.distributed.distributed_c10d import _get_default_store

    store = torch.distributed.PrefixStore("danlu/", _get_default_store())
    watchdog = Watchdog(torch.distributed.PrefixStore("watchdog/", store), rank, world, timeout_s)
    kind = "fsdp" if strategy == "fsdp" else "ddp"
    _current = Parallel(rank, world, local, dev, kind, watchdog, store)
    if rank != 0:
        logging.getLogger("danlu").setLevel(logging.WARNING)
    return _current


def shutdown() -> None:
    global _current
    _current.close()  # the rank stays known (only rank 0 prints the summary)
    _current = Parallel(rank=_current.rank, device=_current.device)


def limit(device: str = "auto") -> tuple[int, str]:
    """How many processes this machine runs: GPUs when training on CUDA, else CPU cores."""
    if device != "cpu" and not device.startswith("mps") and torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA GPUs"
    return os.cpu_count() or 1, "CPU cores"


def check_nproc(nproc: int, device: str = "auto") -> None:
    """--nproc must be between 1 and what the machine has (`limit`)."""
    most, what = limit(device)
    if nproc < 1 or nproc > most:
        raise ConfigError(
            f"--nproc {nproc} is more than this machine allows ({most} {what})"
            if nproc > most
            else f"--nproc {nproc} must be at least 1",
            fix=f"use --nproc between 1 and {most}",
        )


def launch(nproc: int, argv: list[str]) -> int:
    """Run `danlu ARGV` (without --nproc) in `nproc` processes under torch.distributed.run
    (`torchrun --standalone --nproc_per_node N -m danlu ...`); returns its exit status."""
    code = "from danlu.train.distributed import torchrun; torchrun()"
    cmd = [sys.executable, "-c", code, "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "danlu", *without_nproc(argv)]
    env = {
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
        "LOGLEVEL": "CRITICAL",  # the launcher's own logging; the ranks report their errors
        **os.environ,
    }
    return subprocess.run(cmd, env=env, check=False).returncode


def torchrun() -> None:
    """torch.distributed.run's main, ending with the failed rank's exit status and one line
    instead of the launcher's traceback (the rank printed its own error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        main(sys.argv[1:])
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda item: item[1].timestamp)
        print(f"rank {rank} failed (exit status {failure.exitcode})", file=sys.stderr)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _test_hang(rank: int, step: int, phase: str) -> None:
    """Tests only: DANLU_TEST_HANG_RANK / _STEP make one rank stall before a step's forward."""
    if phase != "forward/backward" or HANG_RANK_ENV not in os.environ:
        return
    if int(os.environ[HANG_RANK_ENV]) == rank and int(os.environ[HANG_STEP_ENV]) == step:
        time.sleep(3600)
