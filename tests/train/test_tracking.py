"""MLflow tracking: params, metric history equal to history.jsonl, artifacts and lineage tags
in the SQLite store; a resumed run continues the same MLflow run; off means mlflow unimported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_config
from danlu import api
from danlu.errors import ConfigError
from danlu.train import tracking

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, made once (creating its tables takes seconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    _client(path.parents[1], path)
    return path


@pytest.fixture(autouse=True)
def _store(tmp_path: Path, empty_store: Path) -> None:
    """Each test starts with a copy of the empty store where the default URI points."""
    (tmp_path / "runs").mkdir()
    shutil.copy(empty_store, tmp_path / "runs" / "mlflow.db")


def _config(blobs_csv: Path, **train: Any) -> dict[str, Any]:
    return tiny_config(
        str(blobs_csv),
        data={"label": "kind"},
        train={"epochs": None, "max_steps": 12, "log_every": 2, "eval_every": 6,
               "mlflow": {}, "estimate": False, **train},
    )  # fmt: skip


def _client(root: Path, db: Path | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    db = db or root / "runs" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    client.search_experiments(max_results=1)  # creates the tables of a new store
    return client


def _history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _series(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _expected(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return sorted((r["step"], r[key]) for r in history if key in r)


def test_a_tracked_run_has_params_metrics_artifacts_and_lineage(
    tmp_path: Path, blobs_csv: Path
) -> None:
    result = api.train(_config(blobs_csv), show_progress=False)
    run = result.run.path
    saved = json.loads((run / "tracking.json").read_text())
    client = _client(tmp_path)
    mlrun = client.get_run(saved["run_id"])
    assert mlrun.info.status == "FINISHED"
    assert client.get_experiment(mlrun.info.experiment_id).name == "tiny"  # the config's name

    params = mlrun.data.params
    assert params["train.optimizer.lr"] == "0.01"
    assert params["train.batch_size"] == "16"
    assert params["model.hidden_sizes"] == "[16]"
    assert params["data.label"] == "kind"

    history = _history(run)
    for key in ("train_loss", "lr", "samples_per_s", "val_loss", "val_accuracy"):
        assert _series(client, saved["run_id"], key) == _expected(history, key), key
    assert [s for s, _ in _series(client, saved["run_id"], "train_loss")] == [2, 4, 6, 8, 10, 12]

    lineage = json.loads((run / "lineage.json").read_text())
    tags = mlrun.data.tags
    assert tags["danlu.data_hash"] == lineage["data_hash"]
    assert tags["danlu.config_hash"] == lineage["config_hash"]
    assert tags["danlu.version"] == lineage["packages"]["danlu"]
    if lineage["code"].get("git_commit"):
        assert tags["danlu.git_commit"] == tags["mlflow.source.git.commit"]
        assert tags["danlu.git_commit"] == lineage["code"]["git_commit"]
    assert tags["danlu.status"] == "completed" and tags["danlu.steps"] == "12"

    artifacts = {f.path for f in client.list_artifacts(saved["run_id"])}
    assert {"config.yaml", "lineage.json", "history.jsonl", "manifest.json"} <= artifacts
    local = Path(client.download_artifacts(saved["run_id"], "history.jsonl", str(tmp_path)))
    assert local.read_text() == (run / "history.jsonl").read_text()

    metrics = api.evaluate(result.run, "test")  # then logged by tracking.log_evaluation
    assert tracking.log_evaluation(result.run)
    logged = client.get_run(saved["run_id"]).data.metrics
    assert logged["test_accuracy"] == metrics["accuracy"]
    assert logged["test_f1_macro"] == metrics["f1_macro"]
    assert "metrics.json" in {f.path for f in client.list_artifacts(saved["run_id"])}


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path: Path, blobs_csv: Path) -> None:
    """SIGTERM at step 6 (KILLED), an error at step 9 (FAILED: the steps after the step-8
    checkpoint are logged twice by training, once to MLflow), then to the end (FINISHED)."""
    from danlu.train.loop import TrainingInterrupted

    cfg = _config(blobs_csv, eval_every=3, checkpoint_every=4)

    def sigterm(step: int, metrics: dict[str, float]) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop checkpoints step 6 and stops

    with pytest.raises(TrainingInterrupted):
        api.train(cfg, run_dir=tmp_path / "run", show_progress=False, on_evaluate=sigterm)
    run = tmp_path / "run"
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    client = _client(tmp_path)
    assert client.get_run(run_id).info.status == "KILLED"

    def crash(step: int, metrics: dict[str, float]) -> None:
        if step == 9:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        api.train(None, resume=run, show_progress=False, on_evaluate=crash)
    assert client.get_run(run_id).info.status == "FAILED"

    api.train(None, ["train.max_steps=15"], resume=run, show_progress=False)
    assert json.loads((run / "tracking.json").read_text())["run_id"] == run_id
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.max_steps"] == "12"  # params are immutable in MLflow
    assert mlrun.data.tags["danlu.changed.train.max_steps"] == "15"
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1

    history = _history(run)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert _series(client, run_id, key) == _expected(history, key), key
    assert [s for s, _ in _series(client, run_id, "val_loss")] == [3, 6, 9, 12, 15]


def _without_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on `import mlflow` (or any mlflow.x) raises ImportError in this process."""
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)


def test_mlflow_is_not_imported_when_tracking_is_off_and_can_be_turned_on_to_resume(
    tmp_path: Path, blobs_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_mlflow(monkeypatch)
    cfg = _config(blobs_csv)
    del cfg["train"]["mlflow"]
    result = api.train(cfg, show_progress=False)
    assert result.fit.step == 12
    assert "mlflow" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    assert not (result.run.path / "tracking.json").exists()

    # tracking turned on when resuming: the MLflow run gets the history from the start
    monkeypatch.delitem(sys.modules, "mlflow")
    api.train(None, ["train.max_steps=16", "train.mlflow={}"], resume=result.run)
    run_id = json.loads((result.run.path / "tracking.json").read_text())["run_id"]
    history = _history(result.run.path)
    for key in ("train_loss", "val_accuracy"):
        assert _series(_client(tmp_path), run_id, key) == _expected(history, key), key
    assert [s for s, _ in _series(_client(tmp_path), run_id, "val_loss")] == [6, 12, 16]


def test_tracking_without_mlflow_installed_says_what_to_install(
    tmp_path: Path, blobs_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_mlflow(monkeypatch)
    with pytest.raises(ConfigError, match=r"mlflow is not installed.*danlu\[track\]"):
        api.train(_config(blobs_csv), run_dir=tmp_path / "run", show_progress=False)
    lineage = json.loads((tmp_path / "run" / "lineage.json").read_text())
    assert lineage["status"] == "failed"


def test_an_unusable_tracking_uri_is_one_config_error(tmp_path: Path, blobs_csv: Path) -> None:
    cfg = _config(blobs_csv, mlflow={"tracking_uri": "nosuchscheme://somewhere"})
    with pytest.raises(ConfigError, match=r"train\.mlflow\.tracking_uri: cannot open"):
        api.train(cfg, run_dir=tmp_path / "run", show_progress=False)
