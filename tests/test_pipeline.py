"""`danlu pipeline` and `danlu quickstart`: stages in order, pipeline.json, skipping what is done,
resuming an interrupted training, redoing stages whose inputs changed, failures, registry and
serve. Tiny table data (blobs.csv) and an MLP; the real quickstart is marked slow."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_config
from danlu.cli import app

ANSI = re.compile(r"\x1b\[[0-9;]*m")
runner = CliRunner()
ALL = ["data_check", "train", "evaluate", "compress", "report", "register"]


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, ANSI.sub("", stdout), ANSI.sub("", stderr)


def cli(*args: object) -> Result:
    r = runner.invoke(app, [str(a) for a in args])
    return Result(r.exit_code, r.stdout, r.stderr)


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DANLU_DEBUG", raising=False)
    monkeypatch.delenv("DANLU_REGISTRY", raising=False)


@pytest.fixture(autouse=True)
def _no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compress stage's speed measurement (≥ 1 s per model and batch size) is not what
    these tests check: fixed figures instead."""
    import danlu.compress.bench

    def measure(model: Any, example: Any, **kwargs: Any) -> dict[str, Any]:
        return {"latency_ms": {"1": 1.0, "32": 8.0}, "latency_ms_p90": {},
                "throughput": {"1": 1000.0, "32": 4000.0}, "threads": 1}  # fmt: skip

    monkeypatch.setattr(danlu.compress.bench, "measure", measure)


def write_config(folder: Path, blobs: Path, stages: list[str], **pipeline: Any) -> Path:
    cfg = tiny_config(
        blobs.name,
        data={"label": "kind"},
        train={"epochs": None, "max_steps": 20, "eval_every": 5, "checkpoint_every": 5,
               "keep_checkpoints": 10, "threads": 1},
    )  # fmt: skip
    cfg["name"] = "tiny"
    cfg["compress"] = {"budget": 100.0, "threads": 1,
                       "variants": [{"name": "dynamic-int8", "method": "dynamic_int8"}]}  # fmt: skip
    cfg["serve"] = {"port": 0}
    register = {"root": str(folder / "registry"), **pipeline.pop("register", {})}
    cfg["pipeline"] = {"stages": stages, "register": register, **pipeline}
    path = folder / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def state(run: Path) -> dict[str, Any]:
    return json.loads((run / "pipeline.json").read_text())


def started(stdout: str) -> list[str]:
    return [line.split(":")[0] for line in stdout.splitlines() if line.endswith(": started")]


@pytest.fixture
def done_run(tmp_path: Path, blobs_csv: Path) -> tuple[Path, Path, Result]:
    """Every stage but serve, run once: (config, run dir, CLI result)."""
    config = write_config(tmp_path, blobs_csv, ALL, register={"variant": "recommended"})
    run = tmp_path / "run"
    return config, run, cli("pipeline", config, "--run-dir", run)


def test_stages_run_in_order_and_record_pipeline_json(done_run) -> None:
    config, run, r = done_run
    assert r.code == 0, r.stderr
    assert started(r.stdout) == ALL
    s = state(run)
    assert list(s["stages"]) == ALL
    for name, record in s["stages"].items():
        assert record["status"] == "done", name
        assert record["started"] <= record["ended"]
        assert record["seconds"] >= 0
    weights = s["stages"]["evaluate"]["inputs"]["weights"]
    assert len(weights) == 64
    assert s["stages"]["compress"]["inputs"]["weights"] == weights
    assert s["stages"]["data_check"]["summary"]["blockers"] == 0
    assert (run / "data_check" / "data_card.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert s["stages"]["evaluate"]["summary"]["value"] == metrics["accuracy"]
    assert (run / "report.html").is_file()
    assert (run / "compressed" / "dynamic-int8" / "compression.json").is_file()
    # the recommended variant is registered (budget 100 points: it is within it)
    reg = s["stages"]["register"]["summary"]
    assert (reg["name"], reg["version"], reg["stage"], reg["ref"]) == ("tiny", 1, "dev", "tiny:1")
    from danlu.serve.store import ModelStore

    [version] = ModelStore(config.parent / "registry").versions("tiny")
    assert version.version == 1 and version.variant == "dynamic_int8"
    assert Path(version.source).resolve() == (run / "compressed" / "dynamic-int8").resolve()
    # the summary table and the closing lines
    assert "test accuracy:" in r.stdout
    assert f"run directory: {run}" in r.stdout
    assert "registry: tiny:1 (stage dev)" in r.stdout
    assert "danlu serve tiny:dev" in r.stdout
    # the run still verifies: pipeline.json and data_check/ are pinned in its manifest
    from danlu.manifest import verify

    verify(run)


def test_rerun_skips_done_stages(done_run, monkeypatch: pytest.MonkeyPatch) -> None:
    config, run, first = done_run
    assert first.code == 0, first.stderr
    before = state(run)
    mtimes = {p: (run / p).stat().st_mtime_ns for p in ("metrics.json", "report.html")}

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a done stage ran again")

    import danlu.api
    import danlu.api_compress
    import danlu.api_data
    import danlu.evaluate.report

    for module, name in [(danlu.api, "train"), (danlu.api, "evaluate"), (danlu.api_data,
                         "data_check"), (danlu.api_compress, "compress"),
                         (danlu.evaluate.report, "write_report")]:  # fmt: skip
        monkeypatch.setattr(module, name, never)
    r = cli("pipeline", config, "--run-dir", run)
    assert r.code == 0, r.stderr
    assert started(r.stdout) == []
    skipped = [line for line in r.stdout.splitlines() if "; skipped" in line]
    assert [line.split(":")[0] for line in skipped] == ALL
    assert "evaluate: done already (test accuracy" in r.stdout
    assert state(run)["stages"] == before["stages"]
    assert {p: (run / p).stat().st_mtime_ns for p in mtimes} == mtimes
    from danlu.serve.store import ModelStore

    assert len(ModelStore(config.parent / "registry").versions("tiny")) == 1


def test_from_runs_a_stage_and_the_later_ones_again(done_run) -> None:
    config, run, first = done_run
    assert first.code == 0, first.stderr
    r = cli("pipeline", config, "--run-dir", run, "--from", "report")
    assert r.code == 0, r.stderr
    assert started(r.stdout) == ["report", "register"]
    assert state(run)["stages"]["register"]["summary"]["ref"] == "tiny:2"


def test_new_weights_redo_the_later_stages(done_run) -> None:
    config, run, first = done_run
    assert first.code == 0, first.stderr
    old = state(run)["stages"]
    # a longer training is a resumable change: it continues from the last checkpoint
    r = cli("pipeline", config, "train.max_steps=30", "--run-dir", run, "--only",
            "train,evaluate,compress,report,register")  # fmt: skip
    assert r.code == 0, r.stderr
    assert started(r.stdout) == ["train", "evaluate", "compress", "report", "register"]
    new = state(run)["stages"]
    assert new["train"]["summary"]["steps"] == 30
    assert new["train"]["summary"]["resumed_from"] == 20
    assert new["evaluate"]["inputs"]["weights"] != old["evaluate"]["inputs"]["weights"]
    assert new["register"]["summary"]["version"] == 2
    # without --only: the stages whose inputs are unchanged are skipped, data_check included
    r = cli("pipeline", config, "train.max_steps=30", "--run-dir", run)
    assert r.code == 0, r.stderr
    assert started(r.stdout) == []


def test_interrupted_training_resumes(tmp_path: Path, blobs_csv: Path) -> None:
    config = write_config(tmp_path, blobs_csv, ["train", "evaluate"])
    run = tmp_path / "run"
    assert cli("pipeline", config, "--run-dir", run).code == 0
    # make it a run stopped at step 10: later checkpoints gone, lineage and pipeline say so
    for step in (15, 20):
        shutil.rmtree(run / "checkpoints" / f"step-{step}")
    lineage = json.loads((run / "lineage.json").read_text())
    (run / "lineage.json").write_text(json.dumps({**lineage, "status": "interrupted"}))
    s = state(run)
    s["stages"]["train"]["status"] = "started"
    (run / "pipeline.json").write_text(json.dumps(s))
    r = cli("pipeline", config, "--run-dir", run)
    assert r.code == 0, r.stderr
    assert started(r.stdout)[0] == "train"
    assert "(resumed from step 10)" in r.stdout
    # evaluate ran on the weights the resumed training wrote (the same tensors, but safetensors
    # writes its metadata in no fixed order, so the file's SHA-256 may differ: then it reran)
    from danlu.rundir import sha256_file

    assert state(run)["stages"]["evaluate"]["inputs"]["weights"] == sha256_file(
        run / "model.safetensors"
    )
    summary = state(run)["stages"]["train"]["summary"]
    assert (summary["steps"], summary["resumed_from"]) == (20, 10)
    assert json.loads((run / "lineage.json").read_text())["status"] == "completed"


def test_training_interrupted_by_a_signal_exits_130(
    tmp_path: Path, blobs_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import danlu.api
    from danlu.rundir import RunDir
    from danlu.train.loop import TrainingInterrupted

    def stopped(config: Any, **kwargs: Any) -> None:
        raise TrainingInterrupted(RunDir(kwargs["resume"].path), 7)

    monkeypatch.setattr(danlu.api, "train", stopped)
    config = write_config(tmp_path, blobs_csv, ["train", "evaluate"])
    r = cli("pipeline", config, "--run-dir", tmp_path / "run")
    assert r.code == 130
    assert "training stopped at step 7" in r.stderr
    assert "Run the same command again to resume it" in r.stderr
    record = state(tmp_path / "run")["stages"]["train"]
    assert record["status"] == "failed"
    assert record["error"].startswith("TrainingInterrupted: training stopped at step 7")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("data", "stage evaluate failed: the test split is empty"),
        ("bug", "stage evaluate failed: RuntimeError: tensor mismatch"),
    ],
)
def test_failing_stage_is_recorded_and_exits_2(
    tmp_path: Path, blobs_csv: Path, monkeypatch: pytest.MonkeyPatch, error: str, expected: str
) -> None:
    import danlu.api
    from danlu.errors import DataError

    def broken(*args: Any, **kwargs: Any) -> None:
        if error == "data":
            raise DataError("the test split is empty", fix="choose another")
        raise RuntimeError("tensor mismatch\nmore detail")

    monkeypatch.setattr(danlu.api, "evaluate", broken)
    config = write_config(tmp_path, blobs_csv, ["train", "evaluate", "report"])
    run = tmp_path / "run"
    r = cli("pipeline", config, "--run-dir", run)
    assert r.code == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    s = state(run)["stages"]
    assert s["train"]["status"] == "done"
    assert s["evaluate"]["status"] == "failed"
    assert expected.split("failed: ")[1] in s["evaluate"]["error"]
    assert "report" not in s
    assert not (run / "report.html").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pipeline.stages=[train,deploy]"], "unknown stage 'deploy'; known: data_check, train"),
        (["pipeline.stages=[evaluate,train]"], "train cannot come after evaluate"),
        (["pipeline.stages=[train,finetune]"], "a stage runs once"),
        (["--only", "train,evaluat"], "--only: unknown stage 'evaluat'"),
        (["--from", "compress"], "--from names compress, which this pipeline does not run"),
        (["--only", "serve", "--no-serve"], "--no-serve leaves serve out"),
    ],
)
def test_stage_names_and_order_are_checked(
    tmp_path: Path, blobs_csv: Path, args: list[str], expected: str
) -> None:
    config = write_config(tmp_path, blobs_csv, ["train", "evaluate", "serve"])
    r = cli("pipeline", config, *args, "--run-dir", tmp_path / "run")
    assert r.code == 2
    assert expected in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()  # nothing made before the stages are known


def test_register_then_serve_the_registry_reference(
    tmp_path: Path, blobs_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import danlu.serve.server

    calls: list[tuple[list[str], Any]] = []
    monkeypatch.setattr(
        danlu.serve.server, "serve", lambda refs, settings, **kw: calls.append((refs, settings))
    )
    config = write_config(tmp_path, blobs_csv, ["train", "register", "serve"],
                          register={"name": "blobs", "stage": "staging"})  # fmt: skip
    run = tmp_path / "run"
    r = cli("pipeline", config, "--run-dir", run)
    assert r.code == 0, r.stderr
    [(refs, settings)] = calls
    assert refs == ["blobs:1"]
    assert Path(settings.registry) == tmp_path / "registry"
    from danlu.serve.store import resolve

    name, served = resolve(refs[0], root=settings.registry)
    assert name == "blobs" and (served.path / "model.safetensors").is_file()
    # the summary comes before the (blocking) server
    assert r.stdout.index("registry: blobs:1 (stage staging)") < r.stdout.index("serve: started")
    assert "playground: (a free port: the server prints it)" in r.stdout
    assert state(run)["stages"]["serve"]["summary"]["ref"] == "blobs:1"

    # serve is a service, not a result: it runs again on every run, and Ctrl-C (which uvicorn
    # raises again once it has drained) ends it normally; --no-serve leaves it out
    def interrupted(refs: list[str], settings: Any, **kw: Any) -> None:
        calls.append((refs, settings))
        raise KeyboardInterrupt

    monkeypatch.setattr(danlu.serve.server, "serve", interrupted)
    r = cli("pipeline", config, "--run-dir", run)
    assert r.code == 0 and len(calls) == 2
    assert "serve: stopped" in r.stdout
    assert state(run)["stages"]["serve"]["status"] == "done"
    r = cli("pipeline", config, "--run-dir", run, "--no-serve")
    assert r.code == 0 and len(calls) == 2
    assert "serve it: danlu serve blobs:staging" in r.stdout


def test_serve_model_run_serves_the_folder(
    tmp_path: Path, blobs_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import danlu.serve.server

    calls: list[list[str]] = []
    monkeypatch.setattr(
        danlu.serve.server, "serve", lambda refs, settings, **kw: calls.append(refs)
    )
    config = write_config(tmp_path, blobs_csv, ["train", "serve"], serve={"model": "run"})
    assert cli("pipeline", config, "--run-dir", tmp_path / "run").code == 0
    assert calls == [[str(tmp_path / "run")]]


def test_a_busy_port_is_one_error(tmp_path: Path, blobs_csv: Path) -> None:
    import socket

    config = write_config(tmp_path, blobs_csv, ["train", "serve"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("pipeline", config, f"serve.port={port}", "--run-dir", tmp_path / "run")
    assert r.code == 2
    assert f"stage serve failed: cannot listen on 127.0.0.1:{port}" in r.stderr
    assert state(tmp_path / "run")["stages"]["serve"]["status"] == "failed"


def test_register_variant_needs_the_compress_report(tmp_path: Path, blobs_csv: Path) -> None:
    config = write_config(tmp_path, blobs_csv, ["train", "register"],
                          register={"variant": "recommended"})  # fmt: skip
    r = cli("pipeline", config, "--run-dir", tmp_path / "run")
    assert r.code == 2
    assert "pipeline.register.variant: recommended needs the compress report" in r.stderr
    assert state(tmp_path / "run")["stages"]["register"]["status"] == "failed"


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path, blobs_csv: Path) -> None:
    config = write_config(tmp_path, blobs_csv, ["train"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = cli("pipeline", config, "--run-dir", tmp_path / "other")
    assert r.code == 2
    assert "is not a danlu run (no config.yaml)" in r.stderr
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_quickstart_runs_the_bundled_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    import danlu.pipeline
    from danlu.config import load

    cfg = load("quickstart_r8")
    assert cfg.pipeline.stages[-1] == "serve" and cfg.model.type == "hf"
    assert cfg.data.dataset == "r8" and cfg.data.tokenizer.max_length == 128
    calls: list[tuple[Any, ...]] = []

    class Stop(Exception):
        pass

    def fake(config: Any, overrides: Any, **kwargs: Any) -> None:
        calls.append((config, overrides, kwargs["serve"], kwargs["run_dir"]))
        raise Stop

    monkeypatch.setattr(danlu.pipeline, "run_pipeline", fake)
    runner.invoke(app, ["quickstart", "--no-serve", "--port", "0", "train.max_steps=10"])
    assert calls == [("quickstart_r8", ["train.max_steps=10", "serve.port=0"], False, None)]


@pytest.mark.slow
def test_real_quickstart(tmp_path: Path) -> None:
    """The whole tour on Reuters R8 with MiniLM (minutes): ≥ 0.9 test accuracy, registered."""
    r = cli("quickstart", "--no-serve")
    assert r.code == 0, r.stderr
    s = state(Path("runs/quickstart_r8"))["stages"]
    assert all(s[n]["status"] == "done" for n in ALL)
    assert s["evaluate"]["summary"]["count"] == 2189
    assert s["evaluate"]["summary"]["value"] >= 0.9
    assert s["register"]["summary"]["ref"] == "quickstart-r8:1"
    assert "danlu serve quickstart-r8:dev" in r.stdout
