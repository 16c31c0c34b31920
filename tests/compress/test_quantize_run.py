"""Quantized variants through `danlu compress` on tiny runs: the variant loads fast from its
own state (no calibration), predicts, and its file is smaller."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import danlu
from conftest import make_images, tiny_config, tiny_gpt_config
from danlu.api_compress import compress
from danlu.models.quantized import QuantizedLinear
from danlu.serve.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_cnn_run_quantized_statically_and_to_bf16_keeps_its_accuracy(idx_folder, tmp_path):
    cfg = tiny_config(
        str(idx_folder),
        data={"split": {"val": 0.2, "test": "official"}},
        model={"type": "cnn", "channels": [16, 32], "head_sizes": [64]},
        train={"epochs": 4},
    )
    del cfg["model"]["hidden_sizes"]
    parent = danlu.train(cfg, run_dir="runs/cnn", show_progress=False).run
    variants = [{"name": "static", "method": "static_int8"}, {"name": "half", "method": "bf16"}]
    result = compress(parent, {"variants": variants, "calibration_batches": 2}, measure=False)
    rows = {r["name"]: r for r in result.table["rows"]}
    for name in ("static", "half"):
        assert rows[name]["file_bytes"] < 0.6 * rows["parent"]["file_bytes"]
        assert abs(rows[name]["delta"]) <= 10.0  # 30 test images: one image is 3.3 points
    meta = result.variants["static"].read("compression.json")
    assert meta["format"] == "quantized" and meta["calibration_batches"] == 2
    x, _ = make_images(6, seed=1)
    for i, img in enumerate(x[:, 0]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    parent_labels = Predictor.load(parent).predict(str(tmp_path))["label"].tolist()
    for name in ("static", "half"):
        labels = Predictor.load(result.variants[name]).predict(str(tmp_path))["label"].tolist()
        assert (
            len(labels) == 6
            and sum(a == b for a, b in zip(labels, parent_labels, strict=True)) >= 5
        )


def test_a_language_model_in_int4_generates_and_scores(tmp_path: Path):
    cfg = tiny_gpt_config(tmp_path, 30, dim=32)
    parent = danlu.train(cfg, run_dir="runs/lm", show_progress=False).run
    variants = [
        {"name": "w4", "method": "int4_weight", "group_size": 32},
        {"name": "w8", "method": "int8_weight"},
        {"name": "dyn", "method": "dynamic_int8"},
    ]
    result = compress(parent, {"variants": variants}, measure=False)
    rows = {r["name"]: r for r in result.table["rows"]}
    assert result.table["metric"] == "perplexity"
    for name in ("w4", "w8", "dyn"):
        assert rows[name]["metric"] < 1.1 * rows["parent"]["metric"]  # within 10% perplexity
        assert danlu.generate(result.variants[name], ["the "], max_new_tokens=4, temperature=0)
    model = Predictor.load(result.variants["w4"]).model
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert rows["w4"]["file_bytes"] < rows["w8"]["file_bytes"] < rows["parent"]["file_bytes"]


def test_quantizing_a_model_without_supported_layers_is_one_line(idx_folder: Path):
    cfg = tiny_config(str(idx_folder), model={"type": "cnn", "channels": [4], "head_sizes": []})
    del cfg["model"]["hidden_sizes"]
    parent = danlu.train(cfg, run_dir="runs/c", show_progress=False).run
    with pytest.raises(danlu.errors.ConfigError) as err:
        compress(parent, {"variants": [{"name": "w4", "method": "int4_weight"}]}, measure=False)
    assert "compress.variants.w4" in str(err.value) and "\n" not in str(err.value)
