"""The request log: rolling JSONL files, crash tolerance, and per-input summaries."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import danlu
from conftest import tiny_config
from danlu.data import DataSpec, build_tokenizer
from danlu.errors import ConfigError
from danlu.serve.predictor import Inputs, Predictor
from danlu.serve.requestlog import (
    MAX_IDS,
    RequestLog,
    record,
    summarize,
    text_summaries,
    token_bag,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def rec(i: int, t: float | None = None) -> dict:
    return {"t": float(i) if t is None else t, "i": i, "pad": "x" * 40}


# --------------------------------------------------------------------------- the files


def test_rotation_keeps_the_newest_files_and_reads_oldest_first(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "logs", max_bytes=300, keep_files=3)
    for i in range(40):
        log.append(rec(i))
    log.close()
    files, size = [[]], 0  # what rotation should do: a new file once one reaches 300 bytes
    for i in range(40):
        files[-1].append(i)
        size += len(json.dumps(rec(i), separators=(",", ":"))) + 1
        if size >= 300:
            files.append([])
            size = 0
    names = [f.name for f in log.files()]
    assert names == [f"requests-{n:06d}.jsonl" for n in range(len(files) - 2, len(files) + 1)]
    assert len(files) == 9  # 63-64 byte lines: 5 per file, 8 full files and an empty one
    got = [r["i"] for r in RequestLog(tmp_path / "logs").read()]
    assert got == [i for f in files[-3:] for i in f] == list(range(30, 40))
    for path in log.files()[:-1]:
        assert 300 <= path.stat().st_size < 300 + 64


def test_a_partial_last_line_is_skipped_and_sealed_off(tmp_path: Path) -> None:
    with RequestLog(tmp_path) as log:
        for i in range(3):
            log.append(rec(i))
    path = RequestLog(tmp_path).files()[-1]
    with path.open("ab") as f:
        f.write(b'{"t": 3.0, "i": 3, "pa')  # the server died mid-write
    assert [r["i"] for r in RequestLog(tmp_path).read()] == [0, 1, 2]
    with RequestLog(tmp_path) as log:  # a restarted server continues the same file
        log.append(rec(4))
    assert [r["i"] for r in RequestLog(tmp_path).read()] == [0, 1, 2, 4]
    assert path.read_bytes().count(b"\n") == 5  # the partial line kept alone on its own line


def test_since_and_limit(tmp_path: Path) -> None:
    with RequestLog(tmp_path) as log:
        for i in range(10):
            log.append(rec(i, t=1000.0 + i))
    log = RequestLog(tmp_path)
    assert [r["i"] for r in log.read(since=1006.0)] == [6, 7, 8, 9]
    assert [r["i"] for r in log.read(limit=3)] == [7, 8, 9]  # the newest, oldest first
    assert [r["i"] for r in log.read(since=1002.0, limit=2)] == [8, 9]
    assert list(RequestLog(tmp_path / "missing").read()) == []
    assert not (tmp_path / "missing").exists()  # reading creates nothing


def test_threads_append_whole_lines(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, max_bytes=4000, keep_files=100)

    def write(k: int) -> None:
        for i in range(50):
            log.append({"t": 1.0, "thread": k, "i": i, "text": "y" * (i % 7)})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = list(RequestLog(tmp_path).read())
    assert len(records) == 400
    for k in range(8):  # each thread's records in its order
        assert [r["i"] for r in records if r["thread"] == k] == list(range(50))
    assert len(log.files()) > 1


def test_bad_settings_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_bytes \(0\) and keep_files \(8\) must be"):
        RequestLog(tmp_path, max_bytes=0)


def test_record_keeps_the_schema_and_strict_json(tmp_path: Path) -> None:
    before = time.time()
    r = record(
        "m",
        "/v1/predict",
        {"kind": "table", "values": {"a": 1.0}},
        {"label": "ant", "confidence": 0.9, "probabilities": {"ant": 0.9, "bee": 0.1}},
        latency_ms=3.14159,
    )
    assert before - 0.01 <= r["t"] <= time.time() + 0.01
    assert {k: v for k, v in r.items() if k != "t"} == {
        "model": "m",
        "endpoint": "/v1/predict",
        "input": {"kind": "table", "values": {"a": 1.0}},
        "output": {"label": "ant", "confidence": 0.9},
        "latency_ms": 3.142,
    }
    with RequestLog(tmp_path) as log:
        log.append({"t": 1.0, "x": np.float32(0.5), "n": np.int64(3), "bad": float("nan")})
    line = RequestLog(tmp_path).files()[0].read_text()
    assert json.loads(line) == {"t": 1.0, "x": 0.5, "n": 3, "bad": None}
    assert "NaN" not in line


# ----------------------------------------------------------------------------- summaries


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "a": rng.normal(size=60).round(3),
            "zip": rng.integers(1, 4, size=60),
            "colour": rng.choice(["red", "blue"], size=60),
            "kind": np.array(["x", "y"])[np.arange(60) % 2],
        }
    )
    frame.to_csv(root / "t.csv", index=False)
    cfg = tiny_config(
        str(root / "t.csv"),
        data={"label": "kind", "columns": {"zip": "categorical"}, "missing": "mean"},
        train={"epochs": 1},
    )
    return danlu.train(cfg, run_dir=root / "run", show_progress=False).run.path


def test_table_rows_keep_the_feature_values(table_run: Path) -> None:
    p = Predictor.load(table_run)
    rows = pd.DataFrame(
        [
            {"a": 1.5, "zip": 2, "colour": "red", "note": "secret"},
            {"a": None, "zip": 3.0, "colour": "green", "note": "x"},
        ]
    )
    out = summarize(p, p.collect(rows))
    assert out == [
        {"kind": "table", "values": {"a": 1.5, "zip": 2.0, "colour": "red"}},
        {"kind": "table", "values": {"a": None, "zip": 3.0, "colour": "green"}},
    ]  # columns the model does not read (note) are not logged


def test_texts_keep_lengths_unknown_rate_and_a_bag_of_ids() -> None:
    texts = ["the cat sat on the mat"] * 20 + ["a dog ran"] * 20
    encoder = build_tokenizer(
        type="wordpiece", vocab_size=40, min_frequency=1, texts=texts, lowercase=True
    )
    predictor = SimpleNamespace(encoder=encoder, redacted=lambda raw: raw)
    raw = Inputs("texts", ["the cat sat", "the zebra sat", ""], ["1", "2", "3"])
    cat, zebra, empty = summarize(predictor, raw)
    ids = encoder.encode("the cat sat")
    assert cat == {"kind": "text", "chars": 11, "tokens": len(ids), "unk": 0.0,
                   "ids": sorted(set(ids))}  # fmt: skip
    zebra_ids = encoder.encode("the zebra sat")
    unknown = zebra_ids.count(encoder.unk_id)
    assert unknown >= 1  # 'z' is not in the vocabulary
    assert zebra["unk"] == round(unknown / len(zebra_ids), 4)
    assert encoder.unk_id in zebra["ids"]
    assert empty == {"kind": "text", "chars": 0, "tokens": 0, "unk": 0.0, "ids": []}


def test_a_long_text_keeps_a_consistent_sample_of_its_tokens() -> None:
    bag = token_bag(range(1000))
    assert len(bag) == MAX_IDS and bag == sorted(bag)
    assert token_bag(reversed(range(1000))) == bag  # the same ids whatever the order
    assert set(token_bag(range(500))) >= set(bag) & set(range(500))  # a sub-text keeps them
    assert token_bag([5, 3, 5, 3]) == [3, 5]
    encoder = SimpleNamespace(unk_id=None, encode_ids=lambda texts: [list(range(100))])
    (s,) = text_summaries(encoder, ["long"])
    assert s["tokens"] == 100 and len(s["ids"]) == MAX_IDS and s["unk"] == 0.0


def test_images_keep_size_and_pixel_statistics(tmp_path: Path) -> None:
    from PIL import Image

    spec = DataSpec("classification", "image", [1, 4, 4], ["a", "b"],
                    image={"channels": 1, "size": [4, 4], "mean": [0.5], "std": [0.2]})  # fmt: skip
    predictor = SimpleNamespace(spec=spec, redacted=lambda raw: raw)
    flat = np.full((4, 4), 100, dtype=np.uint8)
    halves = np.zeros((8, 8, 3), dtype=np.uint8)
    halves[:, 4:] = 200  # RGB, 8×8: resized and made grey by the spec
    Image.fromarray(halves).save(tmp_path / "h.png")
    raw = Inputs("images", [flat, halves, tmp_path / "h.png"], ["a", "b", "c"])
    first, second, third = summarize(predictor, raw)
    assert first == {"kind": "image", "height": 4, "width": 4, "channels": 1,
                     "mean": 100.0, "std": 0.0}  # fmt: skip
    assert (second["height"], second["width"], second["channels"]) == (8, 8, 3)
    pixels = spec.image_pixels([halves]).numpy().astype(float)  # what the model sees
    assert second["mean"] == pytest.approx(pixels.mean(), abs=1e-4)
    assert second["std"] == pytest.approx(pixels.std(), abs=1e-4)
    assert {k: third[k] for k in ("height", "width", "channels", "mean")} == {
        "height": 8, "width": 8, "channels": 3, "mean": second["mean"]
    }  # fmt: skip
