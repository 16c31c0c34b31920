"""train.privacy: DP-SGD through Opacus inside the one fit loop (Poisson batches, per-example
clipping, noise, ε in the history and lineage) for MLP, CNN, LSTM and LoRA Transformers."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import danlu
from conftest import tiny_config
from danlu import config as config_mod
from danlu import models
from danlu.cli import app
from danlu.data.loader import Batch, BatchLoader, Split
from danlu.errors import ConfigError
from danlu.train import privacy
from danlu.train.objectives import Supervised, make_loss
from tiny_hf import classify, tiny_bert, topics_csv  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(path: Path, **train) -> dict:
    return tiny_config(str(path), data={"label": "kind"}, train={"threads": 1, **train})


def history(run) -> list[dict]:
    return [json.loads(line) for line in run.history.read_text().splitlines()]


# ---------------------------------------------------------------------------------- MLP


def test_mlp_reaches_its_target_epsilon_and_still_learns(
    blobs_csv: Path, caplog: pytest.LogCaptureFixture
):
    cfg = blobs(blobs_csv, epochs=10, precision="bf16", privacy={"target_epsilon": 3.0})
    result = danlu.train(cfg, run_dir="runs/dp", show_progress=False)
    assert "train.privacy: training in fp32" in caplog.text
    dp = result.run.read("lineage.json")["privacy"]
    assert 2.5 < dp["epsilon"] <= 3.0 + 0.01
    assert dp["steps"] == result.fit.step == 60  # 84 training rows: 6 batches × 10 epochs
    assert dp["delta"] == 1e-5 and dp["max_grad_norm"] == 1.0 and dp["accountant"] == "rdp"
    assert dp["sample_rate"] == pytest.approx(16 / 84) and dp["noise_multiplier"] > 1
    assert result.fit.precision == "fp32"
    eps = [r["epsilon"] for r in history(result.run) if r["split"] == "train"]
    assert eps == sorted(eps) and 0 < eps[0] < eps[-1] == pytest.approx(dp["epsilon"], abs=1e-3)
    assert danlu.evaluate(result.run)["accuracy"] > 0.6  # 3 classes: chance is 0.33


def test_noise_multiplier_reports_epsilon_and_resume_is_exact(blobs_csv: Path):
    settings = {"noise_multiplier": 1.0, "accountant": "prv"}
    a = danlu.train(
        blobs(blobs_csv, max_steps=12, epochs=None, checkpoint_every=6, privacy=settings),
        run_dir="runs/a", show_progress=False,
    )  # fmt: skip
    dp = a.run.read("lineage.json")["privacy"]
    assert dp["noise_multiplier"] == 1.0 and dp["target_epsilon"] is None
    expected = privacy.PrivateTraining(1e-5, 1.0, "prv", dp["sample_rate"], 16, None, 1.0)
    assert dp["epsilon"] == pytest.approx(expected.epsilon(12), abs=1e-3) and dp["epsilon"] > 0
    b_cfg = blobs(blobs_csv, max_steps=6, epochs=None, checkpoint_every=6, privacy=settings)
    b = danlu.train(b_cfg, run_dir="runs/b", show_progress=False)
    b = danlu.train(None, ["train.max_steps=12"], resume=b.run, show_progress=False)
    wa = load_file(str(a.run.checkpoints / "step-12" / "model.safetensors"))
    wb = load_file(str(b.run.checkpoints / "step-12" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same Poisson batches, same noise
    assert b.run.read("lineage.json")["privacy"]["epsilon"] == dp["epsilon"]


def test_poisson_batches_are_seeded_and_sized_by_the_sample_rate():
    split = Split(torch.zeros(1000, 2), torch.zeros(1000, dtype=torch.long), torch.arange(1000))
    loader = BatchLoader(split, 50, order="poisson", seed=3, drop_last="single")
    sizes = [len(b) for b in loader.epoch(0)]
    assert len(sizes) == len(loader) == 20 and 35 < sum(sizes) / 20 < 65 and len(set(sizes)) > 3
    again = list(loader.epoch(0, start=7))  # resuming at batch 7 draws the same rows
    assert torch.equal(again[0].rows, list(loader.epoch(0))[7].rows)
    assert not torch.equal(loader.poisson_rows(0, 0), loader.poisson_rows(1, 0))


# --------------------------------------------------------------- clipping, by hand


TEXT = {"vocab_size": 20, "pad_id": 0, "special_ids": {"cls": 1, "mask": 2}}
ROWS_OF_MANY_LENGTHS = [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 1, 0, 0, 0], [3, 3, 3, 3, 0]]
ROWS_AS_LONG_AS_THE_BATCH = [[3, 4, 5, 6], [7, 8, 9, 3], [4, 4, 5, 5], [9, 8, 7, 6]]
CASES = {  # (model, ids): what each case takes apart
    "packed lstm": (  # rows of different lengths run in length-sorted order inside the DPLSTM
        {"type": "rnn", "num_layers": 1, "dim": 6, "hidden_size": 6, "dropout": 0.0},
        ROWS_OF_MANY_LENGTHS,
    ),
    "packed 2-layer bidirectional gru": (
        {
            "type": "rnn",
            "cell": "gru",
            "num_layers": 2,
            "bidirectional": True,
            "dim": 4,
            "hidden_size": 4,
            "dropout": 0.0,
        },
        ROWS_OF_MANY_LENGTHS,
    ),
    "shared positions": (  # pos_emb(arange(T)) with T = B: one lookup shared by the batch
        {"type": "bert", "num_layers": 1, "num_heads": 2, "dim": 8, "dropout": 0.0},
        ROWS_AS_LONG_AS_THE_BATCH,
    ),
}


def flat(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    state = models.state_for_saving(model)
    return torch.cat([state[n].flatten() for n in names])


@pytest.mark.parametrize("case", list(CASES))
def test_each_example_is_clipped_on_its_own_gradient(case: str):
    """The noise-free update equals Σ_i g_i · min(1, C/‖g_i‖) / B, with g_i each example's own
    gradient (computed alone): row i of every per-example gradient must be example i."""
    model_cfg, ids = CASES[case]
    torch.manual_seed(0)
    plain = models.build(model_cfg, input_shape=[5], task="classification", num_classes=3,
                         text=TEXT)  # fmt: skip
    names = [n for n, _ in plain.named_parameters()]
    x, y = torch.tensor(ids), torch.tensor([0, 1, 2, 1])
    grads = []
    for i in range(4):
        plain.zero_grad()
        F.cross_entropy(plain(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in plain.parameters()]))
    norms = torch.stack([g.norm() for g in grads])
    clip = float(norms.median())  # some examples clipped, some not
    expected = (
        sum(g * min(1.0, clip / (float(n) + 1e-6)) for g, n in zip(grads, norms, strict=True)) / 4
    )

    model = copy.deepcopy(plain)
    assert privacy.swap_recurrent(model) == (["rnn"] if model_cfg["type"] == "rnn" else [])
    assert {type(m).__name__ for m in model.modules()} & {"LSTM", "GRU"} == set()
    assert set(models.state_for_saving(model)) == set(models.state_for_saving(plain))
    dp = privacy.PrivateTraining(1e-5, clip, "rdp", 0.5, 4, None, 0.0)  # σ = 0: no noise
    opt = dp.attach(model, torch.optim.SGD(model.parameters(), lr=1.0))
    model.train()
    objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", None)
    cpu = torch.device("cpu")
    dp.step(model, objective, [Batch(x, y, torch.arange(4))], opt, cpu, "fp32", None, 0.0)
    update = flat(plain, names) - flat(model, names)
    assert torch.allclose(update, expected, atol=1e-5)
    assert float(update.norm()) <= clip * 4 / 4 + 1e-5  # ≤ C · examples / B

    empty = Batch(x[:0], y[:0], torch.arange(0))  # an empty Poisson batch: a noise-only step
    opt.noise_multiplier = 1.0
    before = flat(model, names)
    dp.step(model, objective, [empty], opt, cpu, "fp32", None, 0.0)
    noise = flat(model, names) - before
    assert float(noise.std()) == pytest.approx(clip / 4, rel=0.15)  # N(0, (σC)²) / B


# --------------------------------------------------------------------------- CNN, LSTM


def test_cnn_with_batch_norm_is_refused_by_name_and_trains_without(idx_folder: Path):
    cfg = tiny_config(
        str(idx_folder),
        model={"type": "cnn", "channels": [4], "batch_norm": True},
        train={"epochs": 2, "threads": 1, "privacy": {"noise_multiplier": 0.5}},
    )
    del cfg["model"]["hidden_sizes"]
    with pytest.raises(ConfigError) as e:
        danlu.train(cfg, run_dir="runs/bn", show_progress=False)
    assert str(e.value) == (
        "train.privacy: layer 'features.0.1' is BatchNorm2d, which mixes the examples of a "
        "batch and cannot be trained with differential privacy. set model.batch_norm: false"
    )
    assert not Path("runs/bn").exists()
    cfg["model"]["batch_norm"] = False
    result = danlu.train(cfg, run_dir="runs/gn", show_progress=False)
    assert result.run.read("lineage.json")["privacy"]["epsilon"] > 0
    assert danlu.evaluate(result.run)["count"] == 30


def test_dp_lstm_classifier_resumes_and_saves_plain_lstm_weights(tmp_path: Path):
    rng = random.Random(0)
    words = {"x": ["alpha", "beta", "gamma"], "y": ["delta", "omega", "sigma"]}
    rows = ["text,label"]
    for i in range(120):
        label = "xy"[i % 2]
        rows.append(
            f"{' '.join(rng.choice(words[label]) for _ in range(rng.randint(2, 7)))},{label}"
        )
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(
        str(tmp_path / "t.csv"),
        data={"text": "text", "label": "label",
              "tokenizer": {"type": "wordpiece", "vocab_size": 40, "min_frequency": 1}},
        model={"type": "rnn", "hidden_size": 16, "num_layers": 1, "dim": 16, "dropout": 0.0},
        train={"epochs": 4, "threads": 1, "optimizer": {"name": "adam", "lr": 0.03},
               "privacy": {"noise_multiplier": 0.7, "max_grad_norm": 1.0}},
    )  # fmt: skip
    del cfg["model"]["hidden_sizes"]
    first = danlu.train(cfg, run_dir="runs/lstm", show_progress=False)
    half = first.run.read("lineage.json")["privacy"]["epsilon"]
    # the checkpoint (plain LSTM names) restores into the DPLSTM of the resumed run
    result = danlu.train(None, ["train.epochs=8"], resume=first.run, show_progress=False)
    assert result.fit.resumed_from == first.fit.step and result.fit.step == 2 * first.fit.step
    saved = load_file(str(result.run.weights))
    assert {k for k in saved if k.startswith("rnn.")} == {
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"
    }  # fmt: skip
    dp = result.run.read("lineage.json")["privacy"]
    assert dp["steps"] == result.fit.step and dp["epsilon"] > half > 0
    metrics = danlu.evaluate(result.run)  # the plain nn.LSTM model built from config.yaml
    assert metrics["accuracy"] > 0.7
    preds = danlu.predict(result.run, ["alpha beta gamma alpha", "omega sigma delta"])
    assert list(preds["label"]) == ["x", "y"]


# ----------------------------------------------------------------------------- LoRA


def test_lora_on_a_tiny_bert_keeps_the_base_and_reports_epsilon(
    tiny_bert: Path,  # noqa: F811  (the fixture imported from tiny_hf)
    tmp_path: Path,
):
    cfg = classify(tiny_bert, topics_csv(tmp_path / "t.csv"),
                   lora={"rank": 4, "target": ["query", "value"]})  # fmt: skip
    cfg["train"] |= {"epochs": 2, "privacy": {"noise_multiplier": 0.8}}
    result = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False)
    after = load_file(str(result.run.weights))
    base = load_file(str(tiny_bert / "model.safetensors"))
    prefix = "base_model.model.net.bert."
    for key in ("encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        saved = after[prefix + key.replace("query.", "query.base_layer.")]
        assert torch.equal(saved, base[key]), key  # the frozen base is untouched
    assert all(not torch.all(v == 0) for k, v in after.items() if "lora_B" in k)  # B starts at 0
    dp = result.run.read("lineage.json")["privacy"]
    assert dp["epsilon"] > 0 and dp["steps"] == result.fit.step


def test_full_fine_tuning_of_a_pretrained_model_is_allowed_with_a_warning(
    tiny_bert: Path,  # noqa: F811  (the fixture imported from tiny_hf)
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    cfg = classify(tiny_bert, topics_csv(tmp_path / "t.csv"))
    cfg["train"] |= {"epochs": 1, "privacy": {"noise_multiplier": 1.0}}
    result = danlu.train(cfg, run_dir=tmp_path / "run", show_progress=False)
    assert "train.privacy: full fine-tuning of 999,171 parameters" in caplog.text
    assert result.run.read("lineage.json")["privacy"]["steps"] == 3


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("privacy_cfg", "message"),
    [
        ({"target_epsilon": 0}, "train.privacy.target_epsilon: Input should be greater than 0"),
        ({"target_epsilon": 3, "delta": 1.5}, "train.privacy.delta: Input should be less than 1"),
        ({"noise_multiplier": -1}, "train.privacy.noise_multiplier: Input should be greater"),
        ({"target_epsilon": 3, "max_grad_norm": 0}, "train.privacy.max_grad_norm: Input should"),
        ({}, "train.privacy needs exactly one of target_epsilon (e.g. 3.0) or noise_multiplier"),
    ],
)
def test_out_of_range_settings_name_their_key(privacy_cfg: dict, message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_mod.validate(tiny_config("x.csv", train={"privacy": privacy_cfg}))


def test_cli_prints_the_key_and_exits_2(blobs_csv: Path):
    Path("c.yaml").write_text(json.dumps(blobs(blobs_csv, privacy={"target_epsilon": 3})))
    r = CliRunner().invoke(app, ["train", "c.yaml", "train.privacy.delta=0.5", "--run-dir", "r"])
    assert r.exit_code == 2 and "train.privacy.delta" in r.output
    r = CliRunner().invoke(app, ["train", "c.yaml", "train.privacy.delta=0.05", "--run-dir", "r"])
    assert r.exit_code == 2
    assert "train.privacy.delta: 0.05 must be below 1 / N = 0.0119 for 84 training" in r.output
    assert not Path("r").exists()


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"grad_accum": 2}, "train.grad_accum: 2 does not combine with train.privacy"),
        ({"grad_clip": 1.0}, "train.grad_clip: 1.0 does not combine with train.privacy"),
        ({"sampler": "weighted"}, "train.sampler: weighted does not combine with train.privacy"),
        ({"l1": 0.01}, "train.l1: 0.01 does not combine with train.privacy"),
        ({"nonfinite": {"policy": "skip"}}, "train.nonfinite.policy: skip does not combine"),
    ],
)
def test_settings_dp_cannot_honour_are_refused(blobs_csv: Path, train: dict, message: str):
    cfg = blobs(blobs_csv, privacy={"target_epsilon": 3}, **train)
    with pytest.raises(ConfigError, match=message):
        danlu.train(cfg, run_dir="runs/x", show_progress=False)


def test_a_layer_opacus_cannot_handle_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 1))
    with pytest.raises(ConfigError) as e:
        privacy.check_layers(model, {"type": "custom"})
    assert str(e.value).startswith(
        "train.privacy: Opacus cannot compute per-example gradients for layer '1' "
        "(MultiheadAttention). freeze that layer (model.freeze)"
    )
    privacy.check_layers(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)), {"type": "custom"})


def test_mlp_batch_norm_is_refused_with_the_mlp_fix(blobs_csv: Path):
    cfg = blobs(blobs_csv, privacy={"target_epsilon": 3})
    cfg["model"]["norm"] = "batch"
    with pytest.raises(ConfigError, match=r"layer 'body.1' is BatchNorm1d.*set model.norm: layer"):
        danlu.train(cfg, run_dir="runs/x", show_progress=False)
