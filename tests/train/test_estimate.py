"""The pre-flight estimate: exact counts and memory parts, no effect on training, a time per
step that matches what training then measures, and a clear stop with settings that fit."""

from __future__ import annotations

import json
import logging
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import tiny_config, tiny_gpt_config
from danlu import api, models
from danlu.cli import app
from danlu.cli_estimate import estimate_config
from danlu.config import load
from danlu.errors import ConfigError
from danlu.evaluate.run import build_data
from danlu.train.estimate import check_fits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def table_csv(tmp_path: Path) -> Path:
    """800 rows, 3 separable classes, 4 numeric features."""
    rng = np.random.default_rng(0)
    y = np.arange(800) % 3
    x = rng.normal(0, 0.5, size=(800, 4)) + y[:, None]
    rows = [
        "a,b,c,d,kind",
        *(",".join(f"{v:.4f}" for v in r) + f",k{c}" for r, c in zip(x, y, strict=True)),
    ]
    path = tmp_path / "table.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(csv: Path, **train: Any) -> dict[str, Any]:
    return tiny_config(
        str(csv),
        data={"label": "kind", "split": {"val": 0.1, "test": 0.1}},
        model={"hidden_sizes": [256, 256]},
        train={"epochs": None, "max_steps": 80, "batch_size": 32, "log_every": 10,
               "eval_every": 80, **train},
    )  # fmt: skip


def test_counts_and_memory_parts_are_exact(table_csv: Path) -> None:
    est, _, _ = estimate_config(_config(table_csv))
    cfg = load(_config(table_csv))
    model = models.build_for(cfg.model.model_dump(), build_data(cfg).spec)
    params = sum(p.numel() for p in model.parameters())
    assert params == 4 * 256 + 256 + 256 * 256 + 256 + 256 * 3 + 3
    assert est.parameters == est.trainable == params
    assert est.weights_bytes == params * 4  # fp32
    assert est.gradients_bytes == params * 4
    tensors = len(list(model.parameters()))
    assert 2 * params * 4 <= est.optimizer_bytes <= 2 * params * 4 + 8 * tensors  # Adam: m, v
    assert est.activations_bytes > 0
    assert est.needed_bytes == 2 * params * 4 + est.optimizer_bytes + est.activations_bytes
    assert est.steps == 80 and est.measured_steps >= 3 and est.step_seconds > 0
    assert est.evaluations == 1 and est.eval_seconds > 0
    assert est.samples_per_s > 0 and est.tokens_per_s is None and est.length is None
    assert est.activations_measured_on == 32

    sgd, _, _ = estimate_config(_config(table_csv), ["train.optimizer={name: sgd, momentum: 0.9}"])
    assert sgd.optimizer_bytes == params * 4  # one momentum buffer
    half, _, _ = estimate_config(_config(table_csv, batch_size=16))
    assert half.activations_bytes == pytest.approx(est.activations_bytes / 2, rel=0.05)


def test_activations_of_a_batch_too_large_to_run_are_extrapolated_from_probes(
    table_csv: Path,
) -> None:
    from danlu.train import estimate as module

    est, _, _ = estimate_config(_config(table_csv, batch_size=64))
    cfg = load(_config(table_csv, batch_size=64))
    bundle = build_data(cfg)
    model = models.build_for(cfg.model.model_dump(), bundle.spec)
    largest = module._largest_batch(bundle.loader("train", 64, train=True))
    dev = torch.device("cpu")
    assert not module._measure_memory(est, model, _objective(cfg, bundle, model), largest, dev, 0)
    assert est.activations_measured_on == 4
    full = module.activation_bytes(model, _objective(cfg, bundle, model), largest, dev, "fp32")
    assert est.activations_bytes == pytest.approx(full, rel=0.02)


def test_the_estimate_leaves_the_model_rng_and_training_unchanged(
    tmp_path: Path, table_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from danlu.train.estimate import estimate_training

    cfg = load(_config(table_csv, max_steps=20))
    bundle = build_data(cfg)
    model = models.build_for(cfg.model.model_dump(), bundle.spec)
    objective = _objective(cfg, bundle, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    estimate_training(model, objective, bundle, cfg.train.model_dump(), seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    with caplog.at_level(logging.INFO, logger="danlu"):
        on = api.train(_config(table_csv, max_steps=20), run_dir=tmp_path / "on")
    assert "estimate: 67,843 parameters" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="danlu"):
        off = api.train(_config(table_csv, max_steps=20, estimate=False), run_dir=tmp_path / "off")
    assert "estimate:" not in caplog.text
    a, b = load_file(on.run.weights), load_file(off.run.weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_estimated_step_time_matches_what_training_measures(
    tmp_path: Path, table_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within a factor of 3 (a ratio, not a time: the machine may be shared)."""
    from danlu.train import estimate as module

    seen = []
    real = module.preflight
    monkeypatch.setattr(module, "preflight", lambda *a, **k: seen.append(real(*a, **k)))
    result = api.train(_config(table_csv), run_dir=tmp_path / "run", show_progress=False)
    (est,) = seen
    lines = [json.loads(line) for line in result.run.history.read_text().splitlines()]
    rates = [r["samples_per_s"] for r in lines if r["split"] == "train"][1:]  # after warm-up
    measured = 32 / statistics.median(rates)
    assert 1 / 3 < est.step_seconds / measured < 3, (est.step_seconds, measured)
    assert est.parameters == json.loads(result.run.lineage.read_text())["parameters"]


def test_a_run_that_will_not_fit_stops_with_settings_that_fit(
    tmp_path: Path, table_csv: Path
) -> None:
    est, _, _ = estimate_config(_config(table_csv, batch_size=64))
    static = est.weights_bytes + est.gradients_bytes + est.optimizer_bytes
    limit = (static + est.activations_bytes / 3) / 1e9  # room for about a third of the batch
    cfg = _config(table_csv, batch_size=64, memory_limit_gb=limit)
    with pytest.raises(ConfigError) as caught:
        api.train(cfg, run_dir=tmp_path / "run", show_progress=False)
    error = str(caught.value)
    assert "this run needs ~" in error and "train.memory_limit_gb" in error
    assert not (tmp_path / "run").exists()  # stopped before the run directory
    found = re.search(r"train\.batch_size=(\d+) train\.grad_accum=(\d+)", error)
    assert found, error
    batch, accum = int(found.group(1)), int(found.group(2))
    assert batch < 64 and batch * accum >= 64
    smaller, _, _ = estimate_config(cfg, [f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    assert smaller.fits


def test_a_text_estimate_measures_the_longest_batch_and_tokens(tmp_path: Path) -> None:
    cfg = tiny_gpt_config(tmp_path, steps=30)
    est, _, _ = estimate_config(cfg)
    assert est.length == 16  # data.block_size
    assert est.tokens_per_s == pytest.approx(est.samples_per_s * 16, rel=0.01)
    recompute, _, _ = estimate_config(cfg, ["train.gradient_checkpointing=true"])
    assert recompute.activations_bytes < est.activations_bytes / 2  # layers keep only inputs
    tight = {**cfg, "train": {**cfg["train"], "memory_limit_gb": 1e-6}}
    with pytest.raises(ConfigError, match=r"model\.lora.*gradient_checkpointing"):
        api.train(tight, run_dir=tmp_path / "run", show_progress=False)

    rows = ["text,label"] + [f"{'word ' * (3 + i % 5)}end,{i % 2}" for i in range(60)]
    rows[7] = f"{'long ' * 40}end,1"  # one long text: the largest batch holds it
    (tmp_path / "texts.csv").write_text("\n".join(rows) + "\n")
    texts = tiny_config(
        str(tmp_path / "texts.csv"),
        data={"text": "text", "label": "label", "split": {"val": 0.2, "test": 0.0},
              "tokenizer": {"type": "wordpiece", "vocab_size": 60, "max_length": 64}},
        model={"type": "rnn"},
        train={"batch_size": 8},
    )  # fmt: skip
    del texts["model"]["hidden_sizes"]
    est, _, _ = estimate_config(texts)
    pad = build_data(load(texts)).spec.text["pad_id"]
    train_x = build_data(load(texts)).splits["train"].x
    assert est.length == int((train_x != pad).sum(1).max())
    assert est.tokens_per_s > 0


def test_danlu_estimate_prints_a_table_or_json(tmp_path: Path, table_csv: Path) -> None:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(table_csv)))
    runner = CliRunner()
    table = runner.invoke(app, ["estimate", str(path)])
    assert table.exit_code == 0, table.output
    assert "pre-flight estimate" in table.stdout and "67,843" in table.stdout
    as_json = runner.invoke(app, ["estimate", str(path), "train.batch_size=16", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["parameters"] == 67_843 and data["batch_size"] == 16 and data["fits"] is True
    assert data["weights_bytes"] == 4 * 67_843
    tight = runner.invoke(app, ["estimate", str(path), "train.memory_limit_gb=0.000001"])
    assert tight.exit_code == 2
    assert "this run needs" in tight.stderr and "pre-flight estimate" in tight.stdout
    assert not (tmp_path / "runs").exists()


def test_with_several_processes_memory_is_per_process_and_fsdp_shards_it(
    tmp_path: Path,
) -> None:
    cfg = tiny_gpt_config(tmp_path, steps=10, num_layers=4, dim=64)
    one, _, _ = estimate_config(cfg)
    ddp, _, _ = estimate_config(cfg, nproc=2)
    fsdp, _, _ = estimate_config(cfg, ["train.strategy=fsdp"], nproc=2)
    static = one.weights_bytes + one.gradients_bytes + one.optimizer_bytes
    assert one.per_process_bytes == one.needed_bytes == static + one.activations_bytes
    # DDP: a whole copy per process, half the batch each; both processes share this RAM
    assert ddp.weights_bytes == one.weights_bytes and not ddp.sharded
    assert ddp.per_process_bytes == int(static + ddp.activations_bytes / 2)
    assert ddp.needed_bytes == 2 * ddp.per_process_bytes
    # FSDP: half of weights, gradients and Adam moments, plus the largest unit gathered whole
    model = models.build_for(load(cfg).model.model_dump(), build_data(load(cfg)).spec)
    blocks = [sum(p.numel() * 4 for p in b.parameters()) for b in model.blocks]
    rest = sum(p.numel() * 4 for p in model.parameters()) - sum(blocks)
    assert fsdp.sharded and fsdp.unit_bytes == max(rest, *blocks)
    assert fsdp.per_process_bytes == int(
        static / 2 + 2 * fsdp.unit_bytes + fsdp.activations_bytes / 2
    )
    assert fsdp.per_process_bytes < ddp.per_process_bytes
    # when DDP does not fit, sharding is the first thing the stop suggests
    tight = f"train.memory_limit_gb={ddp.needed_bytes * 0.9 / 1e9}"
    with pytest.raises(ConfigError, match=r"train\.strategy=fsdp \(each of the 2 processes"):
        check_fits(estimate_config(cfg, [tight], nproc=2)[0], {"type": "gpt"}, load(cfg).train
                   .model_dump())  # fmt: skip

    path = tmp_path / "gpt.yaml"
    path.write_text(json.dumps(cfg))
    runner = CliRunner()
    shown = runner.invoke(app, ["estimate", str(path), "train.strategy=fsdp", "--nproc", "2"])
    assert shown.exit_code == 0, shown.output
    assert "memory per process" in shown.stdout and "FSDP: 1/W of the model" in shown.stdout
    as_json = runner.invoke(app, ["estimate", str(path), "--nproc", "2", "--json"])
    data = json.loads(as_json.stdout)
    assert (data["processes"], data["sharded"]) == (2, False)
    assert data["needed_bytes"] == 2 * data["per_process_bytes"]
    too_many = runner.invoke(app, ["estimate", str(path), "--nproc", "4096"])
    assert too_many.exit_code == 2
    assert "--nproc 4096 is more than this machine allows" in too_many.stderr


def _objective(cfg: Any, bundle: Any, model: torch.nn.Module) -> Any:
    from danlu.train.objectives import build_objective

    kind = models.output_kind(bundle.spec.task, cfg.model.output)
    return build_objective(cfg.train.model_dump(), bundle.spec, "mlp", kind, bundle)
