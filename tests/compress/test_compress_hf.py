"""`danlu compress` on a Hugging Face classifier (a tiny 2-layer BERT with MiniLM's tokenizer):
the int8, bf16, head-pruned and ONNX variants load through the run and keep its predictions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import danlu
from danlu.api_compress import compress
from tiny_hf import classify, tiny_bert, topics_csv  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hf_classifier_variants_keep_its_predictions(tiny_bert: Path, tmp_path: Path):
    checkpoint = shutil.copytree(tiny_bert, tmp_path / "checkpoint")
    cfg = classify(checkpoint, topics_csv(tmp_path / "t.csv"))
    parent = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False).run
    shutil.rmtree(checkpoint)  # variants need only the run
    variants = [
        {"name": "dyn", "method": "dynamic_int8"},
        {"name": "half", "method": "bf16"},
        {"name": "heads", "method": "heads", "amount": 0.5},
        {"name": "onnx", "method": "onnx"},
    ]
    result = compress(parent, {"variants": variants}, measure=False)
    rows = {r["name"]: r for r in result.table["rows"]}
    assert rows["parent"]["metric"] >= 0.9
    texts = ["goal match team", "bread soup cheese", "bank price market"]
    for name in ("dyn", "half", "heads", "onnx"):
        assert rows[name]["metric"] >= rows["parent"]["metric"] - 0.1, name
        assert list(danlu.predict(result.variants[name], texts)["label"]) == [
            "sport",
            "food",
            "money",
        ]
    assert rows["heads"]["parameters"] < rows["parent"]["parameters"]
    assert result.variants["onnx"].read("compression.json")["parity"]["max_abs_diff"] < 1e-4
