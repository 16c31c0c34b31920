"""Every example config gets a report: train it for a few steps on its real data, evaluate,
write report.html and check the page (slow: real datasets and checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_report import read_page

import danlu
from danlu.config import EXAMPLES_DIR
from danlu.evaluate.report import write_report

CONFIGS = sorted(p.stem for p in Path(EXAMPLES_DIR).glob("*.yaml"))
SHORT = ["train.max_steps=3", "train.eval_every=3", "train.tensorboard=false"]
EXTRA = {  # keep generation-heavy evaluations short
    "translate_en_es": ["evaluate.generate_samples=4", "evaluate.max_new_tokens=8"],
    "seq2seq_copy": ["evaluate.generate_samples=4"],
    "smollm2_lora_instruct": ["evaluate.generate_samples=2", "evaluate.max_new_tokens=8"],
}
SECTIONS = {  # what each kind of run must show beyond config, lineage and metrics
    "classification": {"confusion-matrix", "roc-pr", "calibration", "per-class"},
    "regression": {"regression"},
    "language_modeling": set(),  # generations: causal LMs only (checked below)
    "seq2seq": {"generations"},
    "chat": {"generations"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_each_example_config_gets_a_report(name: str, tmp_path: Path) -> None:
    assert len(CONFIGS) >= 15
    if name == "gpt_pretrain_then_classify":  # starts from the pretraining run it names
        danlu.train("gpt_bible_bpe", SHORT, run_dir="runs/gpt_bible_bpe", show_progress=False)
    result = danlu.train(
        name, [*SHORT, *EXTRA.get(name, [])], run_dir=tmp_path / name, show_progress=False
    )
    metrics = danlu.evaluate(result.run)
    page = read_page(write_report(result.run))
    task = result.run.read("preprocess.json")["task"]
    expected = {"config", "lineage", "data-card", "learning-curves", "metrics"} | SECTIONS[task]
    assert expected <= set(page.sections), (name, page.sections)
    assert page.images, "plots are embedded"
    assert metrics["headline"] in metrics or metrics["headline"] == "perplexity"
    if metrics.get("examples"):
        assert "generations" in page.sections
    if name == "xor_mlp":
        assert "decision-surface" in page.sections
