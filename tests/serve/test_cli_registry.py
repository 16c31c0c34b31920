"""`danlu registry ...` end to end: tables, exit codes, and one-line user errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import danlu
from conftest import tiny_config
from danlu.cli import app, out
from danlu.serve.predictor import Predictor
from danlu.serve.store import ModelStore

pytestmark = pytest.mark.usefixtures("one_thread")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DANLU_CACHE", str(root / "cache"))
        rng = np.random.default_rng(0)
        y = np.arange(90) % 3
        pts = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, size=(90, 2))
        frame = pd.DataFrame({"a": pts[:, 0], "b": pts[:, 1]})
        frame["kind"] = np.array(["ant", "bee", "cat"])[y]
        frame.to_csv(root / "blobs.csv", index=False)
        cfg = tiny_config(str(root / "blobs.csv"), data={"label": "kind"})
        path = danlu.train(cfg, run_dir=root / "blobs", show_progress=False).run.path
        danlu.evaluate(path, "test")
        yield path


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich tables at 200 columns, so no cell is folded; no debug tracebacks."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(out, "_width", 200)  # the console may exist before COLUMNS is set
    monkeypatch.delenv("DANLU_DEBUG", raising=False)
    monkeypatch.delenv("DANLU_REGISTRY", raising=False)


def cli(*args: object) -> tuple[int, str, str]:
    r = runner.invoke(app, ["registry", *map(str, args)])
    return r.exit_code, ANSI.sub("", r.stdout), ANSI.sub("", r.stderr)


def user_error(result: tuple[int, str, str], *expected: str) -> str:
    """Exit status 2 and one line 'error: ...' on stderr with every expected text."""
    code, stdout, stderr = result
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def rows(stdout: str) -> list[list[str]]:
    """The cells of a rich table's body rows."""
    return [
        [c.strip() for c in line.strip("│ ").split("│")]
        for line in stdout.splitlines()
        if line.startswith("│")
    ]


def test_add_list_show_promote_checkout_remove(run, tmp_path):
    code, out, err = cli("add", run, "--name", "blobs", "--root", "reg")
    assert code == 0, err
    store = ModelStore("reg")
    v = store.get("blobs:1")
    accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    assert rows(out)[0][:5] == ["blobs", "1", "dev", v.weights_sha256[:12], "classification"]
    assert rows(out)[0][5] == f"test accuracy {accuracy:.4f}"
    assert f"added blobs:1 (dev): {len(v.files)} files" in out
    code, out, _ = cli("add", run, "--name", "blobs", "--stage", "staging", "--root", "reg")
    assert code == 0 and "added blobs:2 (staging)" in out and "(0 B new)" in out

    code, out, _ = cli("list", "--root", "reg")
    assert code == 0
    assert [r[:3] for r in rows(out)] == [["blobs", "1", "dev"], ["blobs", "2", "staging"]]
    assert rows(out)[0][7] == str(run.resolve())

    assert cli("promote", "blobs", "1", "--stage", "prod", "--root", "reg")[1] == (
        "blobs:1 is now prod\n"
    )
    assert cli("promote", "blobs:staging", "--stage", "dev", "--root", "reg")[0] == 0
    assert [v.stage for v in store.versions("blobs")] == ["prod", "dev"]

    code, out, _ = cli("show", "blobs", "--root", "reg")
    assert code == 0
    assert "version: blobs:1 (prod)" in out
    assert f"weights: {v.weights_sha256}" in out
    assert f"accuracy {accuracy:.4f}" in out and "lineage.status: completed" in out
    assert "model.safetensors" in out and "checkpoints" not in out
    code, out, _ = cli("show", "blobs:2", "--json", "--root", "reg")
    record = json.loads(out)
    assert (record["version"], record["stage"], record["files"]) == (2, "dev", v.files)

    code, out, _ = cli("checkout", "blobs:prod", "--root", "reg", "--out", tmp_path / "copy")
    assert code == 0 and out.strip() == str(tmp_path / "copy")
    assert (Path("reg") / "checkouts" / "blobs" / "1" / "model.safetensors").is_file()
    pd.testing.assert_frame_equal(
        Predictor.load(tmp_path / "copy").predict({"a": 4.0, "b": 4.1}),
        Predictor.load(run).predict({"a": 4.0, "b": 4.1}),
    )

    assert cli("remove", "blobs", "2", "--root", "reg")[1] == "removed blobs:2\n"
    assert cli("remove", "blobs", "--root", "reg")[1] == "removed blobs:1\n"
    code, out, _ = cli("list", "--root", "reg")
    assert code == 0 and "no models" in out
    assert [p for p in (Path("reg") / "objects").rglob("*") if p.is_file()] == []


def test_the_root_comes_from_the_environment(run, monkeypatch):
    monkeypatch.setenv("DANLU_REGISTRY", "envreg")
    assert cli("add", run, "--name", "m")[0] == 0
    assert [v.ref for v in ModelStore("envreg").versions()] == ["m:1"]
    assert rows(cli("list", "m")[1])[0][:2] == ["m", "1"]


def test_user_errors_are_one_line_with_exit_status_2(run, tmp_path):
    user_error(cli("show", "../etc/passwd", "--root", "reg"), "registry reference", "not valid")
    user_error(cli("add", run, "--name", "a/../../b", "--root", "reg"), "model name", "not valid")
    user_error(cli("show", "nothing", "--root", "reg"), "no model 'nothing'", "registered models")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    user_error(cli("add", incomplete, "--name", "x", "--root", "reg"), "has no config.yaml")
    assert cli("add", run, "--name", "x", "--root", "reg")[0] == 0
    user_error(cli("show", "x:9", "--root", "reg"), "model 'x' has no version 9", "versions: 1")
    user_error(cli("promote", "x:1", "--stage", "live", "--root", "reg"), "stage 'live'")
    user_error(cli("promote", "x:1", "1", "--stage", "prod", "--root", "reg"), "not both")
    user_error(cli("remove", "x", "3", "--root", "reg"), "has no version 3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    user_error(
        cli("checkout", "x", "--out", tmp_path / "full", "--root", "reg"), "exists and is not empty"
    )
    assert cli("promote", "x:1")[0] == 2  # --stage is required (a usage error)
    assert [v.ref for v in ModelStore("reg").versions()] == ["x:1"]  # nothing else changed
