"""Experiment tracking with MLflow, next to TensorBoard (which RunLog writes itself).

    tracker = start(run, cfg)     # None unless train.mlflow is enabled
    fit(...)                      # RunLog.write calls forward(run, record): history → MLflow
    end(tracker, "FINISHED")      # artifacts, final lineage tags, status; stops forwarding

One danlu run is one MLflow run. Its id is kept in RUN/tracking.json, so a resumed danlu run
continues the same MLflow run; metrics MLflow already holds for a step are not logged twice
(the steps between the last checkpoint and a crash are trained again, with the same values).
Params are the flattened config (train.optimizer.lr), tags the lineage (data and config
hashes, git commit, danlu version). The default store is SQLite at <runs_dir>/mlflow.db (the
plain file store is refused by MLflow 3); artifacts go next to it in <runs_dir>/mlartifacts.
mlflow is imported only when tracking is enabled. A failure to log a metric during training
warns once and stops tracking rather than the training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu.config import Config
from danlu.errors import ConfigError
from danlu.rundir import RunDir, atomic_write_json, read_json

log = logging.getLogger("danlu")

TRACKING_FILE = "tracking.json"
ARTIFACTS = (
    "config.yaml",
    "lineage.json",
    "data_card.json",
    "metrics.json",
    "history.jsonl",
    "report.html",
    "MODEL_CARD.md",
    "manifest.json",
)
STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM = 6000  # MLflow's limit on a param value


@dataclass
class Tracker:
    """An open MLflow run that one danlu run logs to."""

    client: Any  # mlflow.tracking.MlflowClient
    run_id: str
    run: RunDir
    logged: dict[str, int] = field(default_factory=dict)  # metric → last step MLflow holds
    broken: bool = False

    def log_record(self, record: dict[str, Any]) -> None:
        """Log the numbers of one history.jsonl record as metrics at its step."""
        if self.broken or "step" not in record:
            return
        from mlflow.entities import Metric

        step, stamp = int(record["step"]), int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), stamp, step)
            for key, value in record.items()
            if key not in ("step", "epoch")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and step > self.logged.get(key, -1)
        ]
        if not metrics:
            return
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # tracking must not stop a training run
            self.broken = True
            log.warning("MLflow logging failed (%s); tracking stops, training goes on", e)
            return
        for m in metrics:
            self.logged[m.key] = step


_open: dict[str, Tracker] = {}  # run folder → its open tracker (what `forward` looks up)


def start(run: RunDir, cfg: Config) -> Tracker | None:
    """Open (or, for a resumed run, reopen) the MLflow run of `run`; None when disabled."""
    settings = cfg.train.mlflow
    if settings is None or not settings.enabled:
        return None
    client = _client(settings.tracking_uri or default_uri(cfg.runs_dir))
    uri = client.tracking_uri
    saved = _saved(run)
    if saved and saved.get("tracking_uri") == uri and _exists(client, saved["run_id"]):
        tracker = Tracker(client, saved["run_id"], run, logged=_last_steps(client, saved["run_id"]))
        client.update_run(tracker.run_id, status="RUNNING")
        _log_params(tracker, _flatten(cfg.to_dict()), resumed=True)
        _open[_key(run)] = tracker
        return tracker
    if saved:
        log.warning("MLflow run %s is not in %s: this run starts a new one", saved["run_id"], uri)
    experiment = _experiment(client, settings.experiment or cfg.name, uri, cfg.runs_dir)
    mlrun = client.create_run(experiment, run_name=run.path.name, tags=_lineage_tags(run))
    tracker = Tracker(client, mlrun.info.run_id, run)
    atomic_write_json(
        run.path / TRACKING_FILE,
        {"backend": "mlflow", "tracking_uri": uri, "experiment_id": experiment,
         "run_id": tracker.run_id},
    )  # fmt: skip
    _log_params(tracker, _flatten(cfg.to_dict()), resumed=False)
    for record in _history(run):  # tracking turned on when resuming: what came before, too
        tracker.log_record(record)
    _open[_key(run)] = tracker
    return tracker


def forward(run: RunDir, record: dict[str, Any]) -> None:
    """Called by RunLog.write for every history.jsonl record: logs it to the run's open
    tracker (a dictionary lookup and nothing else when the run is not tracked)."""
    tracker = _open.get(_key(run)) if _open else None
    if tracker is not None:
        tracker.log_record(record)


def end(tracker: Tracker | None, status: str) -> None:
    """Log the run's artifacts and final lineage, and close the MLflow run with `status`
    (FINISHED, FAILED, or KILLED for an interrupted run that can be resumed)."""
    if tracker is None:
        return
    assert status in STATUSES, status
    _open.pop(_key(tracker.run), None)
    from mlflow.entities import RunTag

    tags = _lineage_tags(tracker.run, final=True)
    for what, call in (
        ("log the artifacts of", lambda: log_artifacts(tracker)),
        ("tag", lambda: tracker.client.log_batch(
            tracker.run_id, tags=[RunTag(k, v) for k, v in tags.items()])),
        ("close", lambda: tracker.client.set_terminated(tracker.run_id, status=status)),
    ):  # fmt: skip
        try:
            call()
        except Exception as e:  # the run directory is complete either way
            log.warning("MLflow: could not %s run %s (%s)", what, tracker.run_id, e)


def log_artifacts(tracker: Tracker) -> list[str]:
    """Copy the run's record files (those that exist) into the MLflow run's artifacts."""
    logged = []
    for name in ARTIFACTS:
        path = tracker.run.path / name
        if path.is_file():
            tracker.client.log_artifact(tracker.run_id, str(path))
            logged.append(name)
    return logged


def log_evaluation(run: RunDir) -> bool:
    """After `danlu evaluate`: log metrics.json ({split}_{metric}, at the run's last step)
    and the report to the run's MLflow run. False when the run is not tracked."""
    saved = _saved(run)
    if saved is None:
        return False
    client = _client(saved["tracking_uri"])
    if not _exists(client, saved["run_id"]):
        log.warning("MLflow run %s is not in %s", saved["run_id"], saved["tracking_uri"])
        return False
    tracker = Tracker(client, saved["run_id"], run)
    step = int((read_json(run.lineage) if run.lineage.is_file() else {}).get("steps") or 0)
    metrics = read_json(run.metrics) if run.metrics.is_file() else {}
    for split, values in metrics.items():
        if isinstance(values, dict):
            tracker.log_record({"step": step, **{f"{split}_{k}": v for k, v in values.items()}})
    log_artifacts(tracker)
    return True


def default_uri(runs_dir: str | Path) -> str:
    root = Path(runs_dir).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


# ------------------------------------------------------------------------------ helpers


def _key(run: RunDir) -> str:
    return str(run.path.resolve())


def _client(uri: str) -> Any:
    try:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # local-first: opt in to it
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            "train.mlflow is enabled but mlflow is not installed",
            fix="pip install 'danlu[track]' (or pip install 'mlflow>=2.12'), or remove train.mlflow",
        ) from None
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # connects (and creates a SQLite store)
    except Exception as e:
        raise ConfigError(
            f"train.mlflow.tracking_uri: cannot open '{uri}' ({str(e).splitlines()[0]})",
            fix="use a sqlite:///path/mlflow.db or http(s):// tracking server URI "
            "(MLflow refuses plain folders unless MLFLOW_ALLOW_FILE_STORE=true)",
        ) from None
    return client


def _experiment(client: Any, name: str, uri: str, runs_dir: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"train.mlflow.experiment: '{name}' was deleted in {uri}",
                fix="restore it in MLflow, or choose another train.mlflow.experiment",
            )
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # a local store keeps its artifacts next to the database
        location = (Path(runs_dir).resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def _saved(run: RunDir) -> dict[str, Any] | None:
    path = run.path / TRACKING_FILE
    return read_json(path) if path.is_file() else None


def _exists(client: Any, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:
        return False


def _history(run: RunDir) -> list[dict[str, Any]]:
    if not run.history.is_file():
        return []
    records = []
    for line in run.history.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a torn last line
            records.append(json.loads(line))
    return records


def _last_steps(client: Any, run_id: str) -> dict[str, int]:
    """The last step MLflow holds for each metric of a run being resumed."""
    keys = client.get_run(run_id).data.metrics
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"optimizer": {"lr": 0.001}}} → {"train.optimizer.lr": "0.001"}."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:MAX_PARAM]
    return out


def _log_params(tracker: Tracker, params: dict[str, str], *, resumed: bool) -> None:
    """Params are immutable in MLflow: a resumed run adds new keys, and records a value the
    resume changed (train.max_steps, say) as the tag danlu.changed.<key>."""
    from mlflow.entities import Param, RunTag

    tags: list[Any] = []
    if resumed:
        old = tracker.client.get_run(tracker.run_id).data.params
        tags = [RunTag(f"danlu.changed.{k}", v) for k, v in params.items() if old.get(k, v) != v]
        params = {k: v for k, v in params.items() if k not in old}
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, max(len(items), len(tags)), 100):  # MLflow's batch limit: 100 params
        tracker.client.log_batch(tracker.run_id, params=items[i : i + 100], tags=tags[i : i + 100])


def _lineage_tags(run: RunDir, final: bool = False) -> dict[str, str]:
    """The lineage as tags: hashes, code version, danlu version; at the end also the outcome."""
    if not run.lineage.is_file():
        return {}
    lineage = read_json(run.lineage)
    code = lineage.get("code") or {}
    tags = {
        "danlu.run_dir": str(run.path.resolve()),
        "danlu.data_hash": lineage.get("data_hash"),
        "danlu.config_hash": lineage.get("config_hash"),
        "danlu.git_commit": code.get("git_commit"),
        "mlflow.source.git.commit": code.get("git_commit"),
        "danlu.git_dirty": code.get("git_dirty"),
        "danlu.version": (lineage.get("packages") or {}).get("danlu"),
        "danlu.seed": lineage.get("seed"),
    }
    if final:
        tags = {
            f"danlu.{k}": lineage.get(k)
            for k in ("status", "steps", "device", "precision", "train_seconds", "stopped_early")
        }
    return {k: str(v) for k, v in tags.items() if v is not None}
