"""Distributed training on CPU with gloo and 2 processes, through the real CLI.

One process with global batch 2b and two processes with b each end with the same weights; only
rank 0 writes; a run stopped under 2 processes resumes under 1; --nproc beyond the machine is
one error line; a rank that hangs is named by the watchdog within seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from danlu.data.loader import Batch
from danlu.train.distributed import ShardedLoader, without_nproc
from danlu.train.watchdog import diagnose

STEPS = 12
Runs = tuple[Path, tuple[int, str, str]]  # the runs' folder; the hung run's (status, out, err)


def danlu(
    cwd: Path, *args: str, env: dict[str, str] | None = None, command: str = "train"
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "danlu", command, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DANLU_DEBUG": "0", **(env or {})},
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


HANG = {"DANLU_TEST_HANG_RANK": "1", "DANLU_TEST_HANG_STEP": "3"}  # rank 1 stalls at step 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """A: one process; B: two processes; C: two processes for 6 steps, resumed by one; H: two
    processes, rank 1 hangs. All start together (the start-ups dominate; 2 cores)."""
    root = tmp_path_factory.mktemp("ddp")
    write_blobs(root)
    procs = {
        "A": danlu(root, "c.yaml", "--run-dir", "A"),
        "B": danlu(root, "c.yaml", "--nproc", "2", "--run-dir", "B"),
        "C": danlu(root, "c.yaml", "train.max_steps=6", "--nproc", "2", "--run-dir", "C"),
    }
    hang = ["c.yaml", "train.collective_timeout_s=3", "--nproc", "2", "--run-dir", "H"]
    hung = danlu(root, *hang, env=HANG)
    for name, proc in procs.items():
        code, _, err = finish(proc)
        assert code == 0, f"run {name}: {err[-2000:]}"
    resumed = danlu(root, "--resume", "C", f"train.max_steps={STEPS}")
    code, _, err = finish(resumed)
    assert code == 0, err[-2000:]
    return root, finish(hung)


def write_blobs(root: Path) -> None:
    """blobs.csv (3 classes in 2-D) and c.yaml, the MLP config every run here starts from."""
    rng = np.random.default_rng(0)
    n = 123  # 87 training rows: the last batch of 10 splits 4 / 3 (unequal shards)
    y = np.arange(n) % 3
    pts = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, size=(n, 2))
    rows = "".join(f"{p[0]:.4f},{p[1]:.4f},k{k}\n" for p, k in zip(pts, y, strict=True))
    (root / "blobs.csv").write_text("a,b,kind\n" + rows)
    config = {
        "name": "ddp",
        "seed": 0,
        "data": {"dataset": "blobs.csv", "label": "kind"},
        "model": {"type": "mlp", "hidden_sizes": [16], "dropout": 0.0},
        "train": {
            "max_steps": STEPS,
            "batch_size": 10,
            "log_every": 2,
            "eval_every": 4,
            "checkpoint_every": 4,
            "tensorboard": False,
            "precision": "fp32",
            "estimate": False,
            "optimizer": {"name": "adam", "lr": 0.01},
        },
    }
    (root / "c.yaml").write_text(yaml.safe_dump(config))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{STEPS}" / "model.safetensors"))


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_global_batch(
    runs: tuple[Path, tuple[int, str, str]],
) -> None:
    root = runs[0]
    a, b = weights(root / "A"), weights(root / "B")
    assert sorted(a) == sorted(b) == ["body.0.bias", "body.0.weight", "head.bias", "head.weight"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    losses_a = [r["train_loss"] for r in history(root / "A") if r["split"] == "train"]
    losses_b = [r["train_loss"] for r in history(root / "B") if r["split"] == "train"]
    assert len(losses_a) == STEPS // 2
    np.testing.assert_allclose(losses_b, losses_a, atol=1e-5)
    assert (root / "B" / "model.safetensors").is_file()


def test_only_rank_zero_writes(runs: Runs) -> None:
    root = runs[0]
    lines = history(root / "B")
    keys = [(r["step"], r["split"]) for r in lines]
    assert len(keys) == len(set(keys)) == len(history(root / "A"))
    assert sorted(p.name for p in (root / "B" / "checkpoints").iterdir()) == [
        "step-12",
        "step-8",
    ]
    lineage = json.loads((root / "B" / "lineage.json").read_text())
    assert lineage["distributed"] == {"processes": 2, "strategy": "ddp"}
    assert lineage["status"] == "completed"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["A", "B", "C", "H"]


def test_resume_across_a_change_of_process_count(runs: Runs) -> None:
    root = runs[0]
    a, c = weights(root / "A"), weights(root / "C")
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=1e-5, rtol=0)
    lineage = json.loads((root / "C" / "lineage.json").read_text())
    assert len(lineage["resumes"]) == 1 and lineage["steps"] == STEPS


def test_nproc_beyond_the_machine_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("data: {dataset: x.csv}\n")
    code, _, err = finish(danlu(tmp_path, "c.yaml", "--nproc", "4096"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--nproc 4096 is more than this machine allows" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_watchdog_names_the_rank_that_hangs(runs: Runs) -> None:
    code, _, err = runs[1]
    assert code == 3, err[-2000:]
    assert (
        "rank 1 has not reached backward all-reduce of step 3 (last: forward/backward of step 3"
        in err
    )
    assert "rank 0 is waiting in backward all-reduce of step 3" in err
    assert "Traceback" not in err


def test_shards_cover_the_global_batch_with_weights() -> None:
    class Global:
        def __len__(self) -> int:
            return 1

        def epoch(self, epoch: int = 0, start: int = 0):
            yield Batch(torch.arange(7.0)[:, None], torch.arange(7), torch.arange(7))

    shards = [next(ShardedLoader(Global(), r, 2).epoch()) for r in range(2)]  # type: ignore[arg-type]
    assert torch.cat([s.rows for s in shards]).tolist() == list(range(7))
    assert [s.weight for s in shards] == [8 / 7, 6 / 7]  # n_r · W / N
    tiny = [next(ShardedLoader(Global(), r, 8).epoch()) for r in range(8)]  # type: ignore[arg-type]
    assert [s.weight for s in tiny] == [8 / 7] * 7 + [0.0]  # 7 rows, 8 ranks: one counts 0


def test_diagnose_and_argv() -> None:
    records = {
        0: {"seq": 5, "step": 12, "phase": "backward all-reduce", "collective": True, "t": 58.0},
        1: {"seq": 4, "step": 11, "phase": "stop-signal all-reduce", "collective": True, "t": 18},
    }
    assert diagnose(records, 2, 60.0) == (
        "rank 1 has not reached backward all-reduce of step 12 (last: stop-signal all-reduce "
        "of step 11, 42 s ago); rank 0 is waiting in backward all-reduce of step 12 for 2 s"
    )
    assert "rank 1 reported nothing" in diagnose({0: records[0]}, 2, 60.0)
    assert without_nproc(["train", "c.yaml", "--nproc", "2", "--nproc=3", "a=1"]) == [
        "train",
        "c.yaml",
        "a=1",
    ]


# ------------------------------------------------------------------------------------- FSDP
FSDP = ["train.strategy=fsdp", "--nproc", "2"]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """On the MLP: A, one process; F, FSDP on 2; R, FSDP on 2 for 6 steps, resumed by one
    process; S, one process for 6 steps, resumed by FSDP on 2. `danlu pretrain` of a 2-layer
    GPT (each block its own FSDP unit, the tied embedding with the root): G1 on one process,
    G2 on 2 with FSDP."""
    root = tmp_path_factory.mktemp("fsdp")
    write_blobs(root)
    words = ["in", "the", "beginning", "god", "created", "heavens", "and", "earth", "."]
    rng = np.random.default_rng(1)
    (root / "corpus").mkdir()
    for d in range(6):
        (root / "corpus" / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 200)) + "\n")
    lm = {
        "name": "lm",
        "seed": 0,
        "data": {
            "dataset": "corpus",
            "task": "language_modeling",
            "tokenizer": {"type": "char", "vocab_size": 64},
            "block_size": 32,
            "split": {"val": 0.1, "test": 0.0},
        },
        "model": {"type": "gpt", "num_layers": 2, "dim": 32, "num_heads": 2},
        "train": {
            "max_steps": STEPS,
            "batch_size": 8,
            "log_every": 4,
            "eval_every": 4,
            "checkpoint_every": 4,
            "tensorboard": False,
            "precision": "fp32",
            "estimate": False,
            "grad_clip": 1.0,
            "optimizer": {"name": "adamw", "lr": 0.005},
        },
    }
    (root / "lm.yaml").write_text(yaml.safe_dump(lm))
    first = {
        "A": danlu(root, "c.yaml", "--run-dir", "A"),
        "F": danlu(root, "c.yaml", *FSDP, "--run-dir", "F"),
        "R": danlu(root, "c.yaml", "train.max_steps=6", *FSDP, "--run-dir", "R"),
        "S": danlu(root, "c.yaml", "train.max_steps=6", "--run-dir", "S"),
        "G1": danlu(root, "lm.yaml", "--run-dir", "G1", command="pretrain"),
        "G2": danlu(root, "lm.yaml", *FSDP, "--run-dir", "G2", command="pretrain"),
    }
    for name, proc in first.items():
        code, _, err = finish(proc)
        assert code == 0, f"run {name}: {err[-2000:]}"
    then = {
        "R": danlu(root, "--resume", "R", f"train.max_steps={STEPS}"),
        "S": danlu(root, "--resume", "S", f"train.max_steps={STEPS}", *FSDP),
    }
    for name, proc in then.items():
        code, _, err = finish(proc)
        assert code == 0, f"resuming {name}: {err[-2000:]}"
    return root


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float):
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0, msg=key)


def test_fsdp_matches_one_process_and_writes_full_states(fsdp: Path) -> None:
    assert_same_weights(weights(fsdp / "A"), weights(fsdp / "F"), 1e-5)
    # model.safetensors (best weights, saved after a validation) is the full model too
    best_a = load_file(str(fsdp / "A" / "model.safetensors"))
    assert_same_weights(best_a, load_file(str(fsdp / "F" / "model.safetensors")), 1e-5)
    # the optimizer state keeps torch's own layout: full moments, indexed like one process
    opt_a, opt_f = (
        torch.load(fsdp / r / "checkpoints" / f"step-{STEPS}" / "optimizer.pt", weights_only=True)
        for r in ("A", "F")
    )
    assert opt_f["param_groups"] == opt_a["param_groups"]
    for index, moments in opt_a["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(opt_f["state"][index][key], value, atol=1e-5, rtol=0)
    lineage = json.loads((fsdp / "F" / "lineage.json").read_text())
    assert lineage["distributed"] == {"processes": 2, "strategy": "fsdp"}
    evals = [r for r in history(fsdp / "F") if r["split"] == "val"]
    assert [r["step"] for r in evals] == [4, 8, 12]  # scored once per evaluation, by rank 0
    a_evals = [r for r in history(fsdp / "A") if r["split"] == "val"]
    np.testing.assert_allclose([r["val_loss"] for r in evals], [r["val_loss"] for r in a_evals],
                               atol=1e-5)  # fmt: skip


def test_fsdp_resumes_on_one_process_and_the_other_way_round(fsdp: Path) -> None:
    a = weights(fsdp / "A")
    assert_same_weights(a, weights(fsdp / "R"), 1e-5)  # FSDP checkpoint → one process
    assert_same_weights(a, weights(fsdp / "S"), 1e-5)  # one-process checkpoint → FSDP


def test_fsdp_pretrains_a_gpt_like_one_process(fsdp: Path) -> None:
    one, two = weights(fsdp / "G1"), weights(fsdp / "G2")
    assert "tok_emb.weight" in one and len(one) == 28  # the LM head is the tied embedding
    assert_same_weights(one, two, 1e-4)


def test_fsdp_units_are_the_repeated_layers() -> None:
    from danlu.models.gpt import GPT
    from danlu.train.distributed import layers

    gpt = GPT(50, 16, num_layers=3, dim=16, num_heads=2)
    assert layers(gpt) == list(gpt.blocks)
    gpt.blocks[1].attn.qkv.weight = gpt.blocks[0].attn.qkv.weight  # shared across two layers
    assert layers(gpt) == [gpt.blocks[2]]  # the sharing pair stays with the root's unit


def test_fsdp_on_one_process_says_it_trains_in_one(caplog: pytest.LogCaptureFixture) -> None:
    from danlu.train import distributed

    with caplog.at_level("INFO", logger="danlu"):
        par = distributed.setup("fsdp", device="cpu")
    assert (par.world, par.strategy, par.gathers) == (1, "none", False)
    assert "train.strategy: fsdp takes effect with several processes (--nproc N)" in caplog.text
