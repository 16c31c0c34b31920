"""What the pre-flight estimate holds (`Estimate`, measured by danlu.train.estimate) and how
it reads: two log lines before training, a table for `danlu estimate`, and the settings
suggested when a run will not fit.

Suggestions are computed, not generic: the largest batch whose activations fit next to the
weights, gradients and optimizer state (with grad_accum keeping the effective batch), LoRA
for Transformer families (gradients and optimizer state shrink to the adapters), gradient
checkpointing and bf16 for activations, SGD for optimizer state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TRANSFORMERS = ("hf", "bert", "gpt", "seq2seq")


@dataclass
class Estimate:
    """What a training run needs, measured before it starts (bytes, seconds, counts)."""

    parameters: int
    trainable: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    batch_size: int
    grad_accum: int
    device: str
    precision: str
    optimizer: str
    steps: int  # optimizer steps the run will take
    steps_per_epoch: int
    available_bytes: int
    available_from: str
    process_rss_bytes: int  # this process before the estimate (data, libraries, model)
    # measured on a copy of the model (left at these values when no copy fits)
    activations_bytes: int | None = None
    activations_measured_on: int = 0  # examples: the batch, or 4 (extrapolated from probes)
    length: int | None = None  # tokens per example in the largest batch (text)
    step_seconds: float | None = None
    measured_steps: int = 0
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    evaluations: int = 0
    eval_seconds: float = 0.0  # all evaluations together
    # torchrun (--nproc): the parts above are the whole model at the global batch
    processes: int = 1  # the world size
    local_processes: int = 1  # processes sharing this machine's memory
    sharded: bool = False  # train.strategy: fsdp
    unit_bytes: int = 0  # FSDP: the largest unit's parameters, gathered whole while it runs

    @property
    def per_process_bytes(self) -> int:
        """One process: a slice of the global batch; under FSDP 1/W of the weights, gradients
        and optimizer state plus one unit's full weights and gradients while it runs."""
        static = self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
        if self.sharded:
            static = static / self.processes + 2 * self.unit_bytes
        return int(static + (self.activations_bytes or 0) / self.processes)

    @property
    def needed_bytes(self) -> int:
        """What `available_bytes` must hold: a GPU holds its one process, a CPU machine's RAM
        all of its processes."""
        return self.per_process_bytes * _sharing(self)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.available_bytes

    @property
    def train_seconds(self) -> float | None:
        return None if self.step_seconds is None else self.step_seconds * self.steps

    @property
    def total_seconds(self) -> float | None:
        train = self.train_seconds
        return None if train is None else train + self.eval_seconds

    @property
    def predicted_rss_bytes(self) -> int | None:
        """CPU: this process now plus what training adds (the weights are in it already)."""
        if self.device != "cpu" or self.processes > 1:
            return None
        return self.process_rss_bytes + self.needed_bytes - self.weights_bytes

    def to_dict(self) -> dict[str, Any]:
        extra = ("per_process_bytes", "needed_bytes", "fits", "train_seconds", "total_seconds",
                 "predicted_rss_bytes")  # fmt: skip
        return {**asdict(self), **{k: getattr(self, k) for k in extra}}


def gb(n: int | float) -> str:
    """Bytes for people: 1.2 GB, 35.0 MB, 4.1 kB (powers of 1000, as memory_limit_gb)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def parts(est: Estimate) -> str:
    act = "not measured" if est.activations_bytes is None else gb(est.activations_bytes)
    return (
        f"weights {gb(est.weights_bytes)}, gradients {gb(est.gradients_bytes)}, "
        f"optimizer state {gb(est.optimizer_bytes)}, activations {act} at batch "
        f"{est.batch_size}{f' × {est.length} tokens' if est.length else ''}"
    )


def summary(est: Estimate) -> str:
    """Two lines for the training log."""
    rate = f"{est.samples_per_s:,.0f} samples/s" if est.samples_per_s else "speed not measured"
    if est.tokens_per_s:
        rate += f", {est.tokens_per_s:,.0f} tokens/s"
    evals = f" + {duration(est.eval_seconds)} evaluating" if est.evaluations else ""
    return (
        f"estimate: {est.parameters:,} parameters ({est.trainable:,} trainable) · memory "
        f"{gb(est.needed_bytes)} of {gb(est.available_bytes)}{processes(est)} ({parts(est)})\n"
        f"estimate: {duration(est.step_seconds)} per step on {est.device} in {est.precision} "
        f"({rate}{', one process' if est.processes > 1 else ''}) · {est.steps:,} steps ≈ "
        f"{duration(est.train_seconds)}{evals}"
    )


def processes(est: Estimate) -> str:
    """ ", 2 processes × 1.2 GB (FSDP)": how the memory needed splits over processes."""
    if est.processes == 1:
        return ""
    how = "FSDP-sharded" if est.sharded else "DDP: each a whole copy"
    return (
        f" = {_sharing(est)} × {gb(est.per_process_bytes)} per process ({how}, "
        f"{est.processes} in all)"
    )


def _sharing(est: Estimate) -> int:
    """Processes whose memory `available_bytes` holds: all on a CPU machine, one per GPU."""
    return est.local_processes if est.device == "cpu" else 1


def rows(est: Estimate) -> list[tuple[str, str, str]]:
    """(quantity, value, how it was obtained) for the table."""
    length = f" × {est.length} tokens" if est.length else ""
    act = "–" if est.activations_bytes is None else gb(est.activations_bytes)
    timed = f"mean of {est.measured_steps} steps after 1 warm-up" if est.measured_steps else ""
    how = "saved for backward"
    if est.activations_measured_on and est.activations_measured_on < est.batch_size:
        how = f"extrapolated from {est.activations_measured_on} examples"
    out = [
        ("parameters", f"{est.parameters:,}", f"{est.trainable:,} trainable"),
        ("weights", gb(est.weights_bytes), "parameter bytes"),
        ("gradients", gb(est.gradients_bytes), "trainable parameters"),
        ("optimizer state", gb(est.optimizer_bytes), est.optimizer),
        ("activations", act, f"{how}, batch {est.batch_size}{length}"),
    ]
    if est.processes > 1:
        how = "FSDP: 1/W of the model + one unit" if est.sharded else "DDP: a whole copy"
        out.append(("memory per process", gb(est.per_process_bytes), f"{how}, batch / W"))
    out += [
        (
            "memory needed",
            gb(est.needed_bytes),
            "the four above"
            if est.processes == 1
            else f"{_sharing(est)} process(es) on this memory",
        ),
        ("memory available", gb(est.available_bytes), est.available_from),
    ]
    if est.predicted_rss_bytes:
        out.append(("process peak (RSS)", gb(est.predicted_rss_bytes), "compare rss_mb"))
    out += [
        ("time per step", duration(est.step_seconds), timed),
        ("samples/s", f"{est.samples_per_s:,.0f}" if est.samples_per_s else "–", ""),
    ]
    if est.tokens_per_s:
        out.append(("tokens/s", f"{est.tokens_per_s:,.0f}", "real tokens (no padding)"))
    accum = f", grad_accum {est.grad_accum}" if est.grad_accum > 1 else ""
    evals = f"{est.evaluations} validation passes" if est.evaluations else ""
    out += [
        ("steps", f"{est.steps:,}", f"{est.steps_per_epoch:,} per epoch{accum}"),
        ("training", duration(est.train_seconds), f"on {est.device} in {est.precision}"),
        ("evaluation", duration(est.eval_seconds if est.evaluations else None), evals),
        ("total", duration(est.total_seconds), "checkpoints not included"),
    ]
    return out


def table(est: Estimate) -> Any:
    from rich.table import Table

    t = Table(title="pre-flight estimate")
    t.add_column("")
    t.add_column("estimate", justify="right")
    t.add_column("from", style="dim")
    for name, value, note in rows(est):
        style = "bold" if name in ("memory needed", "total") else None
        t.add_row(name, value, note, style=style)
    return t


def suggestions(est: Estimate, model_cfg: dict[str, Any], train: dict[str, Any]) -> list[str]:
    """Settings that make the run fit, the likeliest first."""
    out = []
    static = est.weights_bytes + est.gradients_bytes + est.optimizer_bytes
    room = est.available_bytes - static
    act = est.activations_bytes or 0
    effective = est.batch_size * est.grad_accum
    fit = int(est.batch_size * 0.9 * room / act) if act and room > 0 else 0  # ∝ batch size
    if 1 <= fit < est.batch_size:
        smaller = 1 << (fit.bit_length() - 1)  # a power of two
        accum = -(-effective // smaller)
        out.append(
            f"train.batch_size={smaller} train.grad_accum={accum} (effective batch "
            f"{smaller * accum}, activations ~{gb(act * smaller / est.batch_size)})"
        )
    family = model_cfg.get("type")
    if family in TRANSFORMERS and not model_cfg.get("lora"):
        out.append(
            "model.lora={rank: 8} (trains ~1 % of the weights: gradients and optimizer "
            f"state shrink from {gb(est.gradients_bytes + est.optimizer_bytes)} to a few MB)"
        )
    if family in TRANSFORMERS and act and not train.get("gradient_checkpointing"):
        out.append("train.gradient_checkpointing=true (recomputes activations in backward)")
    if est.precision == "fp32" and act:
        out.append("train.precision=bf16 (activations in half the bytes)")
    if est.processes > 1 and not est.sharded:
        out.append(
            f"train.strategy=fsdp (each of the {est.processes} processes holds 1/{est.processes} "
            "of the weights, gradients and optimizer state instead of a whole copy)"
        )
    if train["optimizer"]["name"] in ("adam", "adamw") and est.optimizer_bytes > act:
        out.append(
            "train.optimizer.name=sgd train.optimizer.momentum=0.9 (optimizer state "
            f"{gb(est.optimizer_bytes / 2)})"
        )
    return out or ["a machine with more memory (the weights alone do not fit)"]
