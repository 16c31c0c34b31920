"""compress/bench.py and compress/report.py: timing a tiny model (keys, positive numbers,
thread count restored), counting weight files, the trade-off arithmetic and recommendation on
hand-made numbers, and a self-contained HTML page."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from danlu.compress.bench import measure, weight_files, weights_bytes
from danlu.compress.report import human_bytes, tradeoff, write_report
from danlu.errors import CheckpointError, ConfigError

# ---------------------------------------------------------------------------------- bench


def test_measure_tiny_linear_returns_positive_medians_and_restores_threads() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Linear(16, 3))
    model.train()
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    out = measure(model, torch.randn(1, 8), threads=target, warmup=1, repeats=5, min_seconds=0.0)

    assert torch.get_num_threads() == before
    assert model.training  # the mode is restored too
    assert set(seen) == {target}
    assert len(seen) == 2 * (1 + 5)  # warm-up + timed calls for each of the two sizes
    assert {k for k in out if k not in ("runs", "device")} == {
        "latency_ms",
        "latency_ms_p90",
        "throughput",
        "threads",
        "repeats",
    }
    assert out["threads"] == target and out["repeats"] == 5 and out["device"] == "cpu"
    for key in ("latency_ms", "latency_ms_p90", "throughput"):
        assert set(out[key]) == {"1", "32"}
        assert all(v > 0 for v in out[key].values())
    for b in ("1", "32"):
        assert out["latency_ms_p90"][b] >= out["latency_ms"][b]
        assert out["throughput"][b] == pytest.approx(int(b) / (out["latency_ms"][b] / 1e3))
    assert out["runs"] == {"1": 5, "32": 5}


def test_measure_slices_the_example_to_each_batch_size_and_bounds_the_repeats() -> None:
    shapes: list[tuple[int, ...]] = []
    model = nn.Linear(4, 2)
    model.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    out = measure(
        model, torch.randn(3, 4), batch_sizes=(2, 7), warmup=0, repeats=2, min_seconds=60.0
    )
    assert sorted(set(shapes)) == [(2, 4), (7, 4)]
    assert out["runs"] == {"2": 20, "7": 20}  # min_seconds not reached: capped at 10 × repeats


def test_measure_rejects_bad_arguments() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="at least one row"):
        measure(model, torch.randn(0, 4))
    with pytest.raises(ConfigError, match=r"batch sizes must be positive integers, got \[0\]"):
        measure(model, torch.randn(1, 4), batch_sizes=(0,))
    with pytest.raises(ConfigError, match="repeats=0"):
        measure(model, torch.randn(1, 4), repeats=0)


def test_weights_bytes_counts_weight_files_and_members_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"w" * 100)
    (run / "model.onnx").write_bytes(b"o" * 30)
    (run / "model.onnx.data").write_bytes(b"d" * 7)
    (run / "config.yaml").write_text("x" * 500)
    (run / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"c" * 1000)
    assert weights_bytes(run) == 137

    ens = tmp_path / "ens"
    for i, size in enumerate((11, 13)):
        (ens / "members" / str(i)).mkdir(parents=True)
        (ens / "members" / str(i) / "model.safetensors").write_bytes(b"m" * size)
    (ens / "members" / "0" / "adapter_model.safetensors").write_bytes(b"a" * 5)
    (ens / "model.torchscript.pt").write_bytes(b"t" * 2)
    assert weights_bytes(ens) == 31
    assert [p.relative_to(ens).as_posix() for p in weight_files(ens)] == [
        "model.torchscript.pt",
        "members/0/model.safetensors",
        "members/0/adapter_model.safetensors",
        "members/1/model.safetensors",
    ]


def test_weights_bytes_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        weights_bytes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no weights file"):
        weights_bytes(tmp_path / "empty")


# ------------------------------------------------------------------------------- tradeoff


def row(name: str, kind: str, metric: float | None, size: int, b1: float, b32: float) -> dict:
    return {
        "name": name,
        "kind": kind,
        "method": f"{kind} method",
        "run": f"runs/x/{name}",
        "file_bytes": size,
        "parameters": 1000,
        "latency_ms": {"1": b1, "32": b1 * 4},
        "throughput": {"1": 1e3 / b1, "32": b32},
        "metric": metric,
        "notes": [],
    }


PARENT = row("parent", "parent", 0.900, 4000, 2.0, 1000.0)


def by_name(table: dict) -> dict[str, dict]:
    return {r["name"]: r for r in table["rows"]}


def test_tradeoff_arithmetic_and_fastest_within_budget() -> None:
    variants = [
        row("int8", "quantize", 0.897, 1000, 1.0, 2500.0),  # -0.3 points, fastest in budget
        row("prune", "prune", 0.894, 2000, 0.5, 4000.0),  # -0.6 points: out of 0.5
        row("distill", "distill", 0.905, 1500, 1.6, 1200.0),  # +0.5 points
        row("edge", "share", 0.895, 3000, 1.0, 2000.0),  # exactly -0.5: in
    ]
    t = tradeoff(PARENT, variants, metric="accuracy", higher_is_better=True)
    assert [r["name"] for r in t["rows"]] == ["parent", "int8", "prune", "distill", "edge"]
    assert t["budget"] == 0.5 and t["scale"] == 100.0 and t["metric"] == "accuracy"
    rows = by_name(t)
    assert rows["int8"]["delta"] == pytest.approx(-0.3)
    assert rows["prune"]["delta"] == pytest.approx(-0.6)
    assert rows["distill"]["delta"] == pytest.approx(0.5)
    assert rows["int8"]["size_ratio"] == pytest.approx(0.25)
    assert rows["int8"]["speedup_b1"] == pytest.approx(2.0)
    assert rows["int8"]["speedup_b32"] == pytest.approx(2.5)
    assert rows["prune"]["speedup_b32"] == pytest.approx(4.0)
    assert [r["within_budget"] for r in t["rows"]] == [None, True, False, True, True]
    assert rows["parent"]["delta"] == 0.0 and rows["parent"]["size_ratio"] == 1.0
    assert t["recommended"] == "int8"
    assert "int8" in t["reason"] and "2.50×" in t["reason"] and "fastest of 3" in t["reason"]
    assert variants[0].get("delta") is None  # inputs untouched


def test_tradeoff_ties_go_to_the_smaller_file() -> None:
    a = row("a", "quantize", 0.9, 2000, 1.0, 3000.0)
    b = row("b", "prune", 0.9, 1800, 1.0, 3000.0)
    assert tradeoff(PARENT, [a, b], metric="accuracy", higher_is_better=True)["recommended"] == "b"


def test_tradeoff_lower_is_better_metric() -> None:
    parent = row("parent", "parent", 2.00, 4000, 2.0, 1000.0)
    variants = [
        row("worse", "quantize", 2.30, 1000, 1.0, 5000.0),  # rmse up 0.3: -0.3 points, in 0.5
        row("better", "distill", 1.90, 2000, 1.5, 1500.0),  # rmse down: +0.1
        row("bad", "prune", 2.80, 1000, 0.5, 9000.0),  # -0.8: out
    ]
    t = tradeoff(parent, variants, metric="rmse", higher_is_better=False, scale=1.0)
    rows = by_name(t)
    assert rows["worse"]["delta"] == pytest.approx(-0.3)
    assert rows["better"]["delta"] == pytest.approx(0.1)
    assert rows["bad"]["delta"] == pytest.approx(-0.8) and rows["bad"]["within_budget"] is False
    assert t["recommended"] == "worse"


def test_tradeoff_missing_metric_and_none_within_budget() -> None:
    variants = [
        row("nometric", "export", None, 1000, 1.0, 9000.0),
        row("far", "prune", 0.880, 1000, 1.0, 3000.0),  # -2.0
        row("near", "quantize", 0.893, 1000, 1.0, 2000.0),  # -0.7
    ]
    t = tradeoff(PARENT, variants, metric="accuracy", higher_is_better=True)
    rows = by_name(t)
    assert rows["nometric"]["delta"] is None and rows["nometric"]["within_budget"] is None
    assert rows["nometric"]["speedup_b32"] == pytest.approx(9.0)
    assert t["recommended"] is None
    assert "closest is near" in t["reason"] and "-0.70" in t["reason"]

    no_parent_metric = tradeoff(
        {**PARENT, "metric": None}, variants[1:], metric="accuracy", higher_is_better=True
    )
    assert no_parent_metric["recommended"] is None
    assert "parent run has no accuracy" in no_parent_metric["reason"]


def test_tradeoff_rejects_bad_budget_and_duplicate_names() -> None:
    with pytest.raises(ConfigError, match="budget=-1"):
        tradeoff(PARENT, [], metric="accuracy", higher_is_better=True, budget=-1)
    v = row("v", "prune", 0.9, 1, 1.0, 1.0)
    with pytest.raises(ConfigError, match="named 'v'"):
        tradeoff(PARENT, [v, v], metric="accuracy", higher_is_better=True)


# ----------------------------------------------------------------------------------- page


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_write_report_writes_json_and_self_contained_html(tmp_path: Path) -> None:
    variants = [
        row("int8_dynamic", "quantize", 0.897, 1000, 1.0, 2500.0),
        row("prune<50>", "prune", 0.894, 2000, 0.5, 4000.0),
        row("onnx", "export", None, 3000, 0.8, 3000.0),
    ]
    variants[1]["notes"] = ["structured, 50% of channels"]
    t = tradeoff(PARENT, variants, metric="accuracy", higher_is_better=True)
    json_path, html_path = write_report(t, tmp_path / "out", title="x · compression")

    assert json_path == tmp_path / "out" / "compress_report.json"
    assert html_path == tmp_path / "out" / "compress_report.html"
    assert json.loads(json_path.read_text())["recommended"] == "int8_dynamic"
    html = html_path.read_text()
    parsed = Page()
    parsed.feed(html)
    text = "".join(parsed.text)
    for name in ("parent", "int8_dynamic", "prune<50>", "onnx"):
        assert name in text
    assert "recommended" in text and t["reason"] in text
    assert "structured, 50% of channels" in text
    assert "3.9 KiB" in text and "0.25×" in text and "2.50×" in text
    assert "✓" in text and "✗" in text
    assert "prune&lt;50&gt;" in html  # escaped
    assert "script" not in parsed.tags and "<script" not in html.lower()
    assert not re.search(r"https?://", html)
    assert len(parsed.images) == 1 and parsed.images[0].startswith("data:image/png;base64,")
    assert "class='bad'>-0.60" in html and "class='good'>" in html


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * 1024**2, None)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.0 MiB",
        "–",
    ]
