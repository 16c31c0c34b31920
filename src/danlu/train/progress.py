"""What a run reports while it trains: history.jsonl, TensorBoard and the console.

On a terminal the console shows a progress bar with loss, throughput and ETA; when output is
redirected it becomes one plain line per logged step, which reads well in CI logs and files.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psutil

from danlu.rundir import RunDir, atomic_write_text
from danlu.train import tracking

SHOWN = ("loss", "accuracy", "f1_macro", "rmse", "mae", "r2")


def trim_history(run: RunDir, step: int) -> None:
    """Drop history lines after `step` (and any torn last line) before a resumed run appends."""
    if not run.history.is_file():
        return
    keep = []
    for line in run.history.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(run.history, "".join(line + "\n" for line in keep))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RunLog:
    def __init__(
        self,
        run: RunDir,
        *,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        show: bool | None = None,
        console: Any = None,
    ) -> None:
        self.run, self.total, self.start_step = run, total_steps, start_step
        self.history = open(run.history, "a", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tb), purge_step=start_step or None)
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.tty = self.console.is_terminal if show is None else show
        self.t0, self.process = time.perf_counter(), psutil.Process()
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def write(self, record: dict[str, Any]) -> None:
        self.history.write(json.dumps(record) + "\n")
        self.history.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace("_", "/", 1), value, record["step"])
        tracking.forward(self.run, record)  # to MLflow when the run is tracked

    def train(self, step: int, epoch: int, loss: float, lr: float, samples_per_s: float) -> None:
        elapsed = time.perf_counter() - self.t0
        rss = self.process.memory_info().rss / 2**20
        self.write(
            {
                "step": step,
                "epoch": epoch,
                "split": "train",
                "train_loss": loss,
                "lr": lr,
                "samples_per_s": samples_per_s,
                "elapsed_s": round(elapsed, 2),
                "rss_mb": round(rss, 1),
            }
        )
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        info = f"loss {loss:.4f} · lr {lr:.2e} · {samples_per_s:,.0f} samples/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            self.console.print(
                f"step {step}/{self.total} · epoch {epoch} · {info} · ETA {_duration(eta)}",
                highlight=False,
                soft_wrap=True,
            )

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def evaluation(self, step: int, epoch: int, metrics: dict[str, float], best: bool) -> None:
        self.write({"step": step, "epoch": epoch, "split": "val", **metrics})
        keys = [k for k in metrics if k.removeprefix("val_") in SHOWN] or list(metrics)[:4]
        shown = " · ".join(f"{k} {metrics[k]:.4f}" for k in keys)
        self.console.print(
            f"eval step {step}: {shown}{' (best)' if best else ''}", highlight=False, soft_wrap=True
        )

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()
        self.history.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
