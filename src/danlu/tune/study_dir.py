"""The study folder: Optuna's study.db (SQLite) opened or continued, and the files around it.

    STUDY_DIR/study.json     study name, config hash, when it was created and last continued
    STUDY_DIR/config.yaml    the resolved config of the study (`danlu tune --resume` reads it)
    STUDY_DIR/.lock          held (flock) while one `danlu tune` works on the folder
    STUDY_DIR/trial-NNNN/    each trial's run; its lineage.json gains a "tune" record, and a
                             pruned run's status becomes "pruned"

The config hash covers the whole resolved config except tune.trials and tune.timeout_minutes,
the budgets a continued study may change. Once a trial counts, a study continues only with the
same hash (or `force`); the message names the keys that differ. `open_study` builds the
seeded sampler and the pruner; a trial counts toward the budget when it finished, was pruned,
or failed for a reason of its own (`counts`); trials a killed process left running become
failed + interrupted and run again.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from danlu.config import Config, diff
from danlu.config_tune import TuneConfig
from danlu.errors import CheckpointError, ConfigError
from danlu.manifest import update_manifest
from danlu.rundir import RunDir, atomic_write_json, atomic_write_text, now, read_json
from danlu.rundir import update_lineage as _update_lineage

DB, STUDY, CONFIG, LOCK = "study.db", "study.json", "config.yaml", ".lock"
BUDGETS = ("trials", "timeout_minutes")  # tune keys a continued study may change


def hashed(cfg: Config) -> dict[str, Any]:
    """The part of a config its study hash covers."""
    raw = cfg.to_dict()
    raw["tune"] = {k: v for k, v in (raw.get("tune") or {}).items() if k not in BUDGETS}
    return raw


def config_hash(cfg: Config) -> str:
    text = yaml.safe_dump(hashed(cfg), sort_keys=True, allow_unicode=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_config(folder: Path, cfg: Config, started: bool, force: bool) -> None:
    """Refuse to continue a started study with another config, unless `force`."""
    path = folder / STUDY
    if not path.is_file() or not started or force:
        return
    recorded = read_json(path)
    if recorded.get("config_hash") == config_hash(cfg):
        return
    old = folder / CONFIG
    changed = []
    if old.is_file():
        before = yaml.safe_load(old.read_text(encoding="utf-8")) or {}
        before["tune"] = {k: v for k, v in (before.get("tune") or {}).items() if k not in BUDGETS}
        changed = diff(before, hashed(cfg))
    shown = "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in changed[:4]) or "its hash differs"
    raise ConfigError(
        f"'{folder}' holds a study of another config ({shown})",
        fix="run the study's own config (tune.trials and --timeout may change), pass another "
        "--study-dir for a new study, or --force to continue it anyway",
    )


def record_config(folder: Path, cfg: Config) -> None:
    """Write config.yaml and study.json (created once, updated on each continuation)."""
    path = folder / STUDY
    previous = read_json(path) if path.is_file() else {}
    atomic_write_text(folder / CONFIG, cfg.to_yaml())
    atomic_write_json(
        path,
        {
            "study": cfg.name,
            "config_hash": config_hash(cfg),
            "created": previous.get("created") or now(),
            "continued": now() if previous else None,
        },
    )


def check_folder(folder: Path) -> None:
    """A study goes into a new or empty folder, or continues in one it made."""
    if (folder / DB).is_file() or not folder.is_dir():
        return
    if any(p.name != LOCK for p in folder.iterdir()):
        raise ConfigError(
            f"--study-dir '{folder}' holds other files and no study ({DB})",
            fix="pass a new or empty folder (default: <runs_dir>/<name>-tune)",
        )


@contextlib.contextmanager
def lock(folder: Path) -> Iterator[None]:
    """Hold STUDY_DIR/.lock while working on the study: a second `danlu tune` on the same
    folder is refused (the lock goes with the process, so a killed run leaves none)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / LOCK, "w", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another `danlu tune` is working on '{folder}'",
                fix="wait for it to finish, or pass another --study-dir",
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mark_run(
    path: Path, number: int, state: str, value: float | None, params: dict[str, Any]
) -> None:
    """Record the trial in its run's lineage.json (status "pruned" for a pruned run)."""
    if not (path / "lineage.json").is_file():
        return  # the trial stopped before its run folder was made
    fields: dict[str, Any] = {
        "tune": {"study": path.parent.name, "trial": number, "state": state, "value": value,
                 "params": params},
    }  # fmt: skip
    if state == "pruned":
        fields["status"] = "pruned"
    _update_lineage(RunDir(path), **fields)
    if (path / "manifest.json").is_file():
        update_manifest(path, ["lineage.json"])


def counts(trial: Any) -> bool:
    """Whether a trial counts toward the budget: finished, pruned, or failed for a reason of
    its own (not interrupted, nor the first-trial error that stopped the study)."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (
        state == "FAIL" and bool(trial.user_attrs.get("counted"))
    )


def open_study(
    optuna: Any, folder: Path, cfg: Config, tune: TuneConfig, direction: str, seed: int, *,
    resume: bool, force: bool, say: Callable[[str], None],
) -> Any:  # fmt: skip
    """The study in `folder`: created, or continued once its config checks out."""
    existing = (folder / DB).is_file()
    if resume and not existing:
        raise CheckpointError(f"no study to resume in '{folder}' (no {DB})",
                              fix="drop --resume to start one, or pass its --study-dir")  # fmt: skip
    check_folder(folder)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(folder / DB).resolve()}")
    so_far = 0
    if existing:
        names = optuna.get_all_study_names(storage)
        if cfg.name not in names:
            raise ConfigError(f"'{folder}' holds the study {', '.join(names)}, not {cfg.name}",
                              fix="pass another --study-dir")  # fmt: skip
        old = optuna.load_study(study_name=cfg.name, storage=storage)
        check_config(folder, cfg, any(map(counts, old.trials)), force)
        _close_stale(optuna, storage, old, say)
        so_far = len(old.trials)
    record_config(folder, cfg)
    seed, startup = seed + so_far, tune.startup()  # a new seed for each continuation
    if tune.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    warm = tune.warmup_evaluations + 1  # evaluations are numbered from 1
    if tune.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warm)
    elif tune.pruner == "successive_halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=warm, reduction_factor=3)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=cfg.name, storage=storage, sampler=sampler, pruner=pruner,
        direction=direction, load_if_exists=True,
    )  # fmt: skip
    made = study.direction.name.lower()
    if made != direction:
        raise ConfigError(
            f"the study in '{folder}' was made to {made} and tune.metric '{tune.metric}' needs "
            f"to {direction}", fix="pass another --study-dir for a study of this metric")  # fmt: skip
    return study


def _close_stale(optuna: Any, storage: Any, study: Any, say: Callable[[str], None]) -> None:
    """Trials left running by a killed process: failed, interrupted (they do not count)."""
    running = optuna.trial.TrialState.RUNNING
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(running,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL)
        say(f"trial {t.number} was left running by a stopped process; it will be run again")
