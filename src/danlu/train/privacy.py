"""Differential privacy inside the one training loop: DP-SGD through Opacus.

With `train.privacy` set, `fit` stays the same loop; three pieces change underneath it:

- batches: the train loader draws Poisson batches (data.loader order "poisson"): every
  example joins a step's batch independently with probability q = batch_size / N, seeded by
  (seed, epoch, batch), so a resumed run draws exactly the batches it would have drawn;
- gradients: Opacus' grad-sample hooks attach to the model in place (no wrapper module, so
  state-dict names, checkpoints and model.safetensors stay those of the plain model). nn.LSTM
  and nn.GRU are swapped for Opacus' DPLSTM / DPGRU, whose state dicts use the same names;
  their per-example gradients come out in packed (length-sorted) order and are put back in
  batch order before clipping;
- the optimizer: Opacus' DPOptimizer clips each example's gradient to max_grad_norm, adds
  Gaussian noise of σ · max_grad_norm and averages over the expected batch size.

ε is a pure function of (σ, q, steps) given δ, computed by Opacus' accountant (rdp or prv) at
any step, so a resumed run needs no accountant state. With a target ε, σ is solved for the
planned number of steps before training starts.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from danlu.data.loader import Batch
from danlu.errors import ConfigError
from danlu.train.progress import RunLog
from danlu.train.steps import train_step

log = logging.getLogger("danlu")

TASKS = ("classification", "regression")
RECURRENT = (nn.LSTM, nn.GRU)  # swapped for DPLSTM / DPGRU


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise ConfigError(
            "train.privacy needs Opacus, which is not installed",
            fix="pip install 'danlu[privacy]' (or pip install opacus)",
        ) from None
    return opacus


# ----------------------------------------------------------------------- checks, before training


def prepare(
    model: nn.Module,
    *,
    train: dict[str, Any],
    model_cfg: dict[str, Any],
    task: str,
    examples: int,
) -> PrivateTraining:
    """Check that a run can train privately (one clear ConfigError otherwise), swap recurrent
    layers for Opacus' DP versions in place and return the resolved DP settings. `train` is
    the train section as a dict; nothing is trained yet."""
    _opacus()
    dp = train["privacy"]
    _check_settings(train, task, examples)
    if train["precision"] == "bf16":
        log.warning("train.privacy: training in fp32 (bf16 is not used with per-example gradients)")
    swap_recurrent(model)
    check_layers(model, model_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if model_cfg["type"] == "hf" and not model_cfg.get("lora"):
        log.warning(
            "train.privacy: full fine-tuning of %s parameters; per-example gradients need about "
            "%.1f GB per batch (model.lora makes only the adapters private and trainable)",
            f"{trainable:,}", train["batch_size"] * trainable * 4 / 2**30,
        )  # fmt: skip
    q = min(1.0, train["batch_size"] / examples)
    steps = train["max_steps"] or (train["epochs"] or 1) * math.ceil(examples / train["batch_size"])
    private = PrivateTraining(
        delta=dp["delta"],
        max_grad_norm=dp["max_grad_norm"],
        accountant=dp["accountant"],
        sample_rate=q,
        expected_batch_size=train["batch_size"],
        target_epsilon=dp["target_epsilon"],
        noise_multiplier=dp["noise_multiplier"],
        planned_steps=steps,
    )
    private.solve_noise()
    return private


def _check_settings(train: dict[str, Any], task: str, examples: int) -> None:
    delta = train["privacy"]["delta"]
    if task not in TASKS:
        raise ConfigError(
            f"train.privacy supports classification and regression, not data.task: {task}",
            fix="remove train.privacy, or train a classifier or regressor",
        )
    if delta >= 1 / examples:
        raise ConfigError(
            f"train.privacy.delta: {delta:g} must be below 1 / N = {1 / examples:.3g} for "
            f"{examples} training examples (δ ≥ 1/N allows leaking an example outright)",
            fix=f"set train.privacy.delta: {_below(examples):g} or smaller",
        )
    refused = [  # (key, refused?, why, fix)
        ("grad_accum", train["grad_accum"] > 1, "each private step is one Poisson batch",
         "set train.grad_accum: 1 and raise train.batch_size (the expected batch size)"),
        ("sampler", train["sampler"] != "shuffle", "private batches are Poisson samples",
         "remove train.sampler"),
        ("grad_clip", train["grad_clip"] is not None,
         "each example's gradient is clipped to train.privacy.max_grad_norm instead",
         "remove train.grad_clip (set train.privacy.max_grad_norm)"),
        ("l1", train["l1"] > 0, "its gradient would bypass per-example clipping",
         "remove train.l1 (use train.optimizer.weight_decay)"),
    ]  # fmt: skip
    for key, bad, why, fix in refused:
        if bad:
            raise ConfigError(
                f"train.{key}: {train[key]} does not combine with train.privacy ({why})", fix=fix
            )
    if (train.get("nonfinite") or {}).get("policy") == "skip":
        raise ConfigError(
            "train.nonfinite.policy: skip does not combine with train.privacy (a step skipped "
            "because of its batch is a data-dependent choice the privacy analysis does not "
            "count)",
            fix="set train.nonfinite.policy: stop (a non-finite step stops the run unapplied)",
        )


def _below(examples: int) -> float:
    """A δ well below 1/N: the power of ten under 1 / (10 N)."""
    return 10.0 ** math.floor(math.log10(1 / (10 * examples)))


def swap_recurrent(model: nn.Module) -> list[str]:
    """Replace nn.LSTM / nn.GRU by Opacus' DPLSTM / DPGRU in place (same weights, same
    state-dict names, so model.safetensors loads into the plain model). Returns their names."""
    from opacus.validators import ModuleValidator

    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) in RECURRENT and any(p.requires_grad for p in module.parameters()):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            replacement = ModuleValidator.FIXERS[type(module)](module)
            replacement.to(next(module.parameters()).device)
            setattr(parent, attr, replacement)
            swapped.append(name)
    return swapped


def check_layers(model: nn.Module, model_cfg: dict[str, Any]) -> None:
    """A ConfigError naming the first layer Opacus cannot train privately."""
    from opacus.grad_sample import GradSampleHooks
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"train.privacy: layer '{name}' is {type(module).__name__}, which mixes the "
                "examples of a batch and cannot be trained with differential privacy",
                fix=_norm_fix(model_cfg["type"]),
            )
    was_training = model.training
    model.train()  # Opacus validates a model in training mode
    try:
        for name, module in trainable_modules(model):
            validator = ModuleValidator.VALIDATORS.get(type(module))
            buffers = GradSampleHooks.validate(module, strict=False)
            if (validator is not None and validator(module)) or buffers:
                raise ConfigError(
                    f"train.privacy: Opacus cannot compute per-example gradients for layer "
                    f"'{name}' ({type(module).__name__})",
                    fix="freeze that layer (model.freeze), or build the model from layers "
                    "Opacus supports (Linear, Conv, Embedding, LayerNorm, GroupNorm, LSTM, GRU)",
                )
    finally:
        model.train(was_training)


def _norm_fix(model_type: str) -> str:
    return {
        "cnn": "set model.batch_norm: false",
        "mlp": "set model.norm: layer (or none)",
    }.get(model_type, "replace BatchNorm by GroupNorm or LayerNorm")


# ----------------------------------------------------------------------------- training


@dataclass
class PrivateTraining:
    """DP-SGD settings of one run and the accounting of what it spent."""

    delta: float
    max_grad_norm: float
    accountant: str
    sample_rate: float
    expected_batch_size: int
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    planned_steps: int = 0
    spent: dict[int, float] = field(default_factory=dict, repr=False, compare=False)
    _examples: _PerExample | None = field(default=None, init=False, repr=False, compare=False)

    def solve_noise(self) -> None:
        """σ for the target ε over the planned steps (kept when already known)."""
        if self.noise_multiplier is not None:
            return
        from opacus.accountants.utils import get_noise_multiplier

        try:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.target_epsilon,
                target_delta=self.delta,
                sample_rate=self.sample_rate,
                steps=max(self.planned_steps, 1),
                accountant=self.accountant,
            )
        except ValueError as e:
            raise ConfigError(
                f"train.privacy.target_epsilon: {self.target_epsilon} cannot be reached in "
                f"{self.planned_steps} steps ({e})",
                fix="raise target_epsilon, train fewer steps or use a smaller batch_size",
            ) from None

    def epsilon(self, steps: int) -> float:
        """ε spent after `steps` private steps (at this run's δ)."""
        if steps <= 0:
            return 0.0
        if steps not in self.spent:  # rdp: ~25 ms, prv: 0.1-1 s
            from opacus.accountants.utils import create_accountant

            accountant = create_accountant(self.accountant)
            accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
            with warnings.catch_warnings():  # "optimal order is the largest alpha": a bound
                warnings.simplefilter("ignore", UserWarning)
                self.spent[steps] = float(accountant.get_epsilon(delta=self.delta))
        return self.spent[steps]

    def describe(self, steps: int) -> str:
        """One line for the console at the end of training."""
        eps = self.epsilon(steps)
        text = f"privacy: ε = {eps:.3f} at δ = {self.delta:g} after {steps} steps"
        if self.target_epsilon is not None and eps > self.target_epsilon + 0.01:
            text += (
                f", above train.privacy.target_epsilon: {self.target_epsilon:g} (σ was solved "
                f"for {self.planned_steps} steps; the run went on longer)"
            )
        return text

    def summary(self, steps: int) -> dict[str, Any]:
        """What lineage.json records under "privacy"."""
        return {
            "epsilon": round(self.epsilon(steps), 4),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
        }

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Install the per-example gradient hooks on `model` (in place) and wrap `optimizer`."""
        from opacus.grad_sample import GradSampleHooks

        GradSampleHooks(model, loss_reduction="mean")
        self._examples = _PerExample(model)
        return _dp_optimizer(
            optimizer,
            self._examples,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
        )

    def step(
        self,
        model: nn.Module,
        objective: Any,
        batches: list[Batch],
        opt: torch.optim.Optimizer,
        dev: torch.device,
        prec: str,
        grad_clip: float | None,
        l1: float,
        *,
        guard: Any = None,
    ) -> float:
        """One private step (steps.train_step's signature). An empty Poisson batch still
        takes a step: the update is noise only, as the privacy analysis assumes. With a
        `guard` (train.nonfinite: stop), a non-finite loss or gradient is never applied."""
        self._examples.rows = sum(len(b) for b in batches)
        if self._examples.rows == 0:
            opt.zero_grad(set_to_none=True)
            opt.step()
            return 0.0
        with warnings.catch_warnings():  # the first layer's inputs are token ids or data
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return train_step(model, objective, batches, opt, dev, prec, None, 0.0, guard=guard)

    def run_log(self, run: Any, **kwargs: Any) -> RunLog:
        """The run's log, whose train lines also carry the ε spent so far."""
        return PrivateRunLog(run, epsilon=self.epsilon, **kwargs)


class PrivateRunLog(RunLog):
    """RunLog that adds "epsilon" to every train line of history.jsonl (and TensorBoard)."""

    def __init__(self, run: Any, *, epsilon: Any, **kwargs: Any) -> None:
        super().__init__(run, **kwargs)
        self.epsilon = epsilon

    def write(self, record: dict[str, Any]) -> None:
        if record.get("split") == "train":
            record = {**record, "epsilon": round(self.epsilon(record["step"]), 4)}
        super().write(record)


class _PerExample:
    """What Opacus' hooks leave to the caller, so that row i of every per-example gradient is
    example i of the batch:
    - a DP RNN on a packed sequence computes its rows in length-sorted order: they are put
      back in batch order;
    - an embedding looked up with ids shared by the batch (positions (T,) or (1, T)) gets
      them repeated per example, so its gradient is split by example rather than by position;
    - a parameter the batch did not reach (all, for an empty batch) gets zero rows.
    Any other batch size among the rows raises instead of clipping the wrong thing."""

    def __init__(self, model: nn.Module) -> None:
        from opacus.layers.dp_rnn import DPRNNBase

        self.rows = 0  # examples in the current batch
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.recurrent = [m for m in model.modules() if isinstance(m, DPRNNBase)]
        for m in self.recurrent:
            m.register_forward_pre_hook(_remember_packing)
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.weight.requires_grad:
                m.register_forward_pre_hook(self._repeat_shared_ids)

    def _repeat_shared_ids(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        ids = args[0]
        shared = ids.dim() == 1 or (ids.shape[0] == 1 and self.rows > 1)  # (T,) or (1, T)
        if not (shared and self.rows and module.training and torch.is_grad_enabled()):
            return None
        ids = ids[None] if ids.dim() == 1 else ids  # (1, T)
        return (ids.expand(self.rows, *ids.shape[1:]), *args[1:])  # (B, T)

    def complete(self, params: list[nn.Parameter]) -> None:
        """Per-example gradients in batch order, one row per example, before clipping."""
        for m in self.recurrent:
            order = getattr(m, "_danlu_unsort", None)
            for p in m.parameters() if order is not None else ():
                if isinstance(p.grad_sample, torch.Tensor):
                    p.grad_sample = p.grad_sample[order.to(p.grad_sample.device)]
            m._danlu_unsort = None
        for p in params:
            name = self.names.get(id(p), "a weight")
            if p.grad_sample is None and p.grad is not None:
                raise RuntimeError(f"no per-example gradient for {name}")
            if p.grad_sample is None:
                p.grad_sample = p.new_zeros((self.rows, *p.shape))
            if isinstance(p.grad_sample, torch.Tensor) and len(p.grad_sample) != self.rows:
                raise ConfigError(
                    f"train.privacy: weight '{name}' gets {len(p.grad_sample)} gradient rows "
                    f"for a batch of {self.rows} examples: its layer does not see one input "
                    "per example, so its gradient cannot be clipped per example",
                    fix="freeze that layer (model.freeze) or fine-tune with model.lora",
                )


def _remember_packing(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a DP RNN: the permutation back from packed (length-sorted) order."""
    from torch.nn.utils.rnn import PackedSequence

    packed = args[0] if args else None
    module._danlu_unsort = packed.unsorted_indices if isinstance(packed, PackedSequence) else None


def _dp_optimizer(
    optimizer: torch.optim.Optimizer, examples: _PerExample, **kwargs: Any
) -> torch.optim.Optimizer:
    from opacus.optimizers import DPOptimizer

    class Optimizer(DPOptimizer):
        """Opacus' DPOptimizer, given complete per-example gradients in batch order."""

        def pre_step(self, closure: Any = None) -> bool | None:
            examples.complete(self.params)
            return super().pre_step(closure)

    return Optimizer(optimizer, loss_reduction="mean", **kwargs)
