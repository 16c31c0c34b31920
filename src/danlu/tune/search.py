"""Hyperparameter search: `danlu tune CONFIG` runs an Optuna study whose trials are danlu runs.

    result = run_study("configs/tune_wine.yaml", train=danlu.api.train, trials=20)
    result.summary["best"]      # number, value, params, overrides, run of the best trial

Design. The `tune:` section (config_tune.py) declares ranges over dotted config keys. Each key
is checked before any training by validating the config with the range's extreme values as
`key=value` overrides (the machinery of `danlu train CONFIG key=value`), so a typo is one
ConfigError with a did-you-mean. A trial samples one value per key, turns them into override
strings and trains a normal run in STUDY_DIR/trial-NNNN through the injected `train` (the
public danlu.api.train: this floor sits below the API). Its `on_evaluate` hook reports the
metric at each validation to the pruner (step = evaluation number, so trials with other batch
sizes compare at the same point) and raises TrialPruned when told to. A trial's value is the
metric at the evaluation whose weights the run keeps (its best by train.monitor).

The study lives in STUDY_DIR/study.db (SQLite) under the config's name; study.json holds the
hash of the config without tune.trials and tune.timeout_minutes. Running the same command
again continues until `trials` trials are finished, pruned or failed (interrupted ones do not
count and are run again); a changed config is refused unless `force`. The sampler is seeded
with seed + trials so far, so a continued study does not repeat its samples. Trials run in a
worker thread while the main thread waits: a first Ctrl-C (or SIGTERM) lets the current trial
finish and then stops; a second stops at once. Each trial's console output goes to
STUDY_DIR/logs/trial-NNNN.log. danlu.tune.search_report writes the summary files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from danlu.config import Config, load, read_yaml, validate
from danlu.config_tune import TuneConfig
from danlu.errors import CheckpointError, ConfigError, DanluError
from danlu.evaluate.metrics import lower_is_better
from danlu.signals import StopSignals
from danlu.train.steps import TrainingDiverged
from danlu.tune import search_report, space
from danlu.tune import study_dir as store
from danlu.tune.space import Param

TRIAL = "trial-{:04d}"


class TrainFn(Protocol):
    """danlu.api.train, as a trial calls it."""

    def __call__(
        self,
        config: Any,
        overrides: list[str],
        *,
        run_dir: Path,
        show_progress: bool,
        on_evaluate: Callable[[int, dict[str, float]], None],
    ) -> Any: ...


@dataclass
class StudyResult:
    study_dir: Path
    metric: str
    direction: str  # minimize | maximize
    budget: int
    counted: int  # trials that count toward the budget
    ran: int  # trials started by this call
    stopped: str | None  # "timeout" | "interrupted" | None (budget reached or ran out)
    summary: dict[str, Any]  # what STUDY_DIR/tune_summary.json holds


class _TrialFailed(Exception):
    """A trial that cannot give a value (invalid combination, diverged): recorded, counted."""


def run_study(
    config: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    train: TrainFn,
    trials: int | None = None,
    timeout_minutes: float | None = None,
    study_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    say: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run (or continue) the study of a config with a `tune:` section; see the module doc.

    `trials` / `timeout_minutes` override tune.trials / tune.timeout_minutes; `resume`
    requires the study to exist (`config` may then be omitted: the study's own is used);
    `say` receives the progress lines (default: the "danlu" logger)."""
    import optuna

    say = say or logging.getLogger("danlu").info
    cfg = _load(config, overrides, study_dir, resume)
    tune = _budgets(cfg.tune, trials, timeout_minutes)
    base = {k: v for k, v in cfg.to_dict().items() if k != "tune"}
    params = space.check(base, tune.space)
    metric = tune.metric or cfg.train.monitor
    space.check_metric(metric)
    direction = "minimize" if lower_is_better(metric) else "maximize"
    if cfg.data.split.val == 0:
        raise ConfigError(
            "danlu tune scores trials on the validation split, and data.split.val is 0",
            fix="set data.split.val: 0.15 (or another fraction)",
        )
    folder = Path(study_dir) if study_dir else Path(cfg.runs_dir) / f"{cfg.name}-tune"
    with store.lock(folder), _quiet(optuna):
        study = store.open_study(
            optuna, folder, cfg, tune, direction, _seed(cfg), resume=resume, force=force, say=say
        )
        counted = sum(map(store.counts, study.trials))
        remaining = tune.trials - counted
        stopper, ran, timeout = _Stopper(say), 0, tune.timeout_minutes
        if remaining > 0:
            say(f"study {folder}: {counted} of {tune.trials} trials done; running up to "
                f"{remaining}" + (f" within {timeout:g} min" if timeout else ""))  # fmt: skip
            objective = _Objective(optuna, train, base, params, metric, folder, say)
            before = len(study.trials)
            with stopper:
                try:
                    study.optimize(
                        objective,
                        n_trials=remaining,
                        timeout=timeout * 60 if timeout else None,
                        catch=(_TrialFailed,),
                        callbacks=[_after(tune.trials, metric, say, stopper)],
                        gc_after_trial=False,
                    )
                except KeyboardInterrupt:
                    stopper.requested = True
            ran = len(study.trials) - before
        else:
            say(f"study {folder}: all {tune.trials} trials are done; --trials N runs more")
        counted = sum(map(store.counts, study.trials))
        stopped = _why_stopped(stopper, counted, tune.trials, ran, remaining)
        summary = search_report.write(
            study, params, base, folder, metric=metric, budget=tune.trials,
            seed=_seed(cfg), stopped=stopped,
        )  # fmt: skip
    return StudyResult(folder, metric, direction, tune.trials, counted, ran, stopped, summary)


# ------------------------------------------------------------------------- set-up


def _load(config: Any, overrides: Any, study_dir: Any, resume: bool) -> Config:
    if config is None:
        if not (resume and study_dir):
            raise ConfigError("no config given", fix="run `danlu tune configs/tune_wine.yaml`")
        saved = Path(study_dir) / store.CONFIG
        if not saved.is_file():
            raise CheckpointError(f"'{study_dir}' holds no study (no {saved.name})",
                                  fix="pass the config, or the folder a `danlu tune` wrote")  # fmt: skip
        cfg = validate(read_yaml(saved), str(saved))
        cfg = load(cfg.to_dict(), overrides) if overrides else cfg
    else:
        cfg = load(config, overrides)
    if cfg.tune is None:
        raise ConfigError(
            f"{config or study_dir}: no tune: section, so there is nothing to search",
            fix="add tune: {space: {train.optimizer.lr: {type: log_uniform, low: 1.0e-4, "
            "high: 1.0e-1}}} (see configs/tune_wine.yaml)",
        )
    return cfg


def _budgets(tune: TuneConfig, trials: int | None, minutes: float | None) -> TuneConfig:
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1 (got {trials})")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--timeout must be a positive number of minutes (got {minutes})")
    update = {"trials": trials, "timeout_minutes": minutes}
    return tune.model_copy(update={k: v for k, v in update.items() if v is not None})


def _seed(cfg: Config) -> int:
    assert cfg.tune is not None
    return cfg.seed if cfg.tune.seed is None else cfg.tune.seed


@contextlib.contextmanager
def _quiet(optuna: Any) -> Iterator[None]:
    """Optuna's own INFO/WARNING lines repeat ours; keep its errors."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


# ------------------------------------------------------------------------- trials


class _Reporter:
    """The on_evaluate hook: the metric at each validation → the pruner (may raise)."""

    def __init__(self, optuna: Any, trial: Any, metric: str) -> None:
        self.optuna, self.trial, self.metric = optuna, trial, metric
        self.values: dict[int, float] = {}  # training step → metric

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ConfigError(f"tune.metric: '{self.metric}' is not a validation metric of this "
                              f"run", fix="use one of " + ", ".join(metrics))  # fmt: skip
        value = float(metrics[self.metric])
        self.values[step] = value
        evaluation = len(self.values)
        self.trial.report(value, evaluation)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", {"evaluation": evaluation, "step": step})
            raise self.optuna.TrialPruned(f"pruned at evaluation {evaluation} (step {step})")


class _Objective:
    def __init__(
        self, optuna: Any, train: TrainFn, base: dict[str, Any], params: dict[str, Param],
        metric: str, folder: Path, say: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.optuna, self.train, self.base, self.params = optuna, train, base, params
        self.metric, self.folder, self.say = metric, folder, say

    def __call__(self, trial: Any) -> float:
        values = {key: p.suggest(trial) for key, p in self.params.items()}
        overrides = [f"{key}={space.yaml_text(v)}" for key, v in values.items()]
        name = TRIAL.format(trial.number)
        trial.set_user_attr("run", name)
        trial.set_user_attr("overrides", overrides)
        names = space.short_keys(list(values))
        shown = "  ".join(f"{names[k]}={space.show(v)}" for k, v in values.items())
        self.say(f"trial {trial.number}: {shown}")
        hook, t0 = _Reporter(self.optuna, trial, self.metric), time.perf_counter()
        try:
            result = self._train(name, overrides, hook)
        except self.optuna.TrialPruned:
            store.mark_run(self.folder / name, trial.number, "pruned", None, values)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except DanluError as e:
            trial.set_user_attr("error", e.message)
            first = not any(map(store.counts, trial.study.get_trials(deepcopy=False)))
            if first and not isinstance(e, TrainingDiverged):
                trial.set_user_attr("aborted", True)  # the study's set-up is wrong: stop
                raise
            trial.set_user_attr("counted", True)  # this trial's values are wrong: go on
            store.mark_run(self.folder / name, trial.number, "failed", None, values)
            raise _TrialFailed(e.message) from None
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        best_step = result.fit.best_step
        value = hook.values.get(best_step, math.nan) if best_step is not None else math.nan
        if math.isnan(value):
            why = "is NaN at every evaluation (diverged)" if hook.values else "was never scored"
            trial.set_user_attr("error", f"{self.metric} {why}")
            trial.set_user_attr("counted", True)
            store.mark_run(self.folder / name, trial.number, "failed", None, values)
            raise _TrialFailed(trial.user_attrs["error"])
        store.mark_run(self.folder / name, trial.number, "complete", value, values)
        return value

    def _train(self, name: str, overrides: list[str], hook: _Reporter) -> Any:
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (
            open(logs / f"{name}.log", "w", encoding="utf-8") as out,
            contextlib.redirect_stderr(out),
        ):
            return _in_worker(
                lambda: self.train(
                    self.base,
                    overrides,
                    run_dir=self.folder / name,
                    show_progress=False,
                    on_evaluate=hook,
                )
            )


def _in_worker(fn: Callable[[], Any]) -> Any:
    """Run `fn` in a worker thread, so that the main thread keeps the signals (the training
    loop takes SIGINT only in the main thread) and a first Ctrl-C lets the trial finish."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    worker = threading.Thread(target=work, name="danlu-tune-trial", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Stopper(StopSignals):
    """First SIGINT/SIGTERM: finish the current trial, then stop. Second: stop now."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self.say, self.requested = say, False

    def on_signal(self, signum: int) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("stopping after the current trial (Ctrl-C again to stop now)")


def _after(budget: int, metric: str, say: Callable[[str], None], stopper: _Stopper):
    """The per-trial callback: one line on the trial, and the stop a first Ctrl-C asked for."""

    def callback(study: Any, trial: Any) -> None:
        say(
            search_report.trial_line(
                study, trial, metric, budget, sum(map(store.counts, study.trials))
            )
        )
        if stopper.requested:
            study.stop()

    return callback


def _why_stopped(
    stopper: _Stopper, counted: int, budget: int, ran: int, remaining: int
) -> str | None:
    if stopper.requested:
        return "interrupted"
    if counted < budget and ran < remaining:
        return "timeout"
    return None
