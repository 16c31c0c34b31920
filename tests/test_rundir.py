"""The run directory: atomic writes, naming on clashes, opening errors, metrics merging."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from danlu.config import validate
from danlu.errors import CheckpointError, ConfigError
from danlu.rundir import (
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    save_safetensors,
    start_lineage,
    update_lineage,
)


def _cfg(name: str = "exp", runs_dir: str = "runs"):
    return validate(
        {"name": name, "runs_dir": runs_dir, "data": {"dataset": "x.csv"}, "model": {"type": "mlp"}}
    )


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write_json(target, {"a": 1, "when": Path("x")})
    assert json.loads(target.read_text()) == {"a": 1, "when": "x"}
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    save_safetensors(tmp_path / "sub" / "w.safetensors", {"w": torch.ones(2)}, {"step": "3"})
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.json", "w.safetensors"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_write_never_shows_a_partial_file(tmp_path, monkeypatch):
    """The content is complete in the temporary file before the rename makes it visible."""
    target = tmp_path / "big.bin"
    atomic_write_bytes(target, b"a" * 10)
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).read_bytes(), Path(dst).read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(target, b"b" * 100_000)
    assert seen == [(b"b" * 100_000, b"a" * 10)]
    assert target.read_bytes() == b"b" * 100_000


def test_read_json_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "torn.json").write_text('{"a": ')
    with pytest.raises(CheckpointError, match="unreadable"):
        read_json(tmp_path / "torn.json")


def test_create_suffixes_on_clashes():
    cfg = _cfg()
    paths = [RunDir.create(cfg).path for _ in range(3)]
    assert paths == [Path("runs/exp"), Path("runs/exp-2"), Path("runs/exp-3")]
    for p in paths:
        assert validate(yaml.safe_load((p / "config.yaml").read_text())) == cfg
    assert RunDir.create(_cfg("other", "elsewhere")).path == Path("elsewhere/other")


def test_create_with_run_dir(tmp_path):
    cfg = _cfg()
    run = RunDir.create(cfg, tmp_path / "mine")
    assert run.path == tmp_path / "mine" and run.config.is_file()
    (tmp_path / "empty").mkdir()
    assert RunDir.create(cfg, tmp_path / "empty").config.is_file()
    with pytest.raises(ConfigError, match="already exists and is not empty") as e:
        RunDir.create(cfg, tmp_path / "mine")
    assert str(tmp_path / "mine") in str(e.value) and "--resume" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["config.yaml"]


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as e:
        RunDir.open(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.yaml") as e:
        RunDir.open(tmp_path / "plain")
    assert str(tmp_path / "plain") in str(e.value)
    run = RunDir.create(_cfg(), tmp_path / "ok")
    opened = RunDir.open(tmp_path / "ok")
    assert opened.path == run.path and opened.load_config() == _cfg()


def test_require_weights(tmp_path):
    run = RunDir.create(_cfg(), tmp_path / "r")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        run.require_weights()
    save_safetensors(run.weights, {"w": torch.zeros(1)})
    assert run.require_weights() == run.weights


def test_update_metrics_merges_splits(tmp_path):
    run = RunDir.create(_cfg(), tmp_path / "r")
    run.update_metrics("test", {"accuracy": 0.5})
    run.update_metrics("val", {"accuracy": 0.7})
    merged = run.update_metrics("test", {"accuracy": 0.6, "count": 3})
    assert merged == {"test": {"accuracy": 0.6, "count": 3}, "val": {"accuracy": 0.7}}
    assert run.read("metrics.json") == merged


def test_lineage_start_and_update(tmp_path):
    cfg = _cfg()
    run = RunDir.create(cfg, tmp_path / "r")
    lineage = start_lineage(run, cfg, data_hash="abc", extra={"parameters": 7})
    assert lineage["status"] == "running" and lineage["data_hash"] == "abc"
    assert lineage["parameters"] == 7 and lineage["seed"] == 0
    assert "torch" in lineage["packages"] and lineage["ended"] is None
    update_lineage(run, status="completed", steps=3)
    saved = run.read("lineage.json")
    assert saved["status"] == "completed" and saved["steps"] == 3 and saved["data_hash"] == "abc"
