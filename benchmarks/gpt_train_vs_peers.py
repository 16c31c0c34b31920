"""GPT training throughput: danlu against Hugging Face Trainer and a plain PyTorch loop.

The same shapes everywhere: a GPT with 4 layers, 4 heads, width 256, context 128, batch 16,
AdamW, on blocks of the English Bible (characters, the token cache of gpt_bible_char).

- danlu      `danlu.pretrain` with its defaults (precision: auto), the model type gpt
- trainer    transformers.GPT2LMHeadModel (n_layer 4, n_head 4, n_embd 256) trained by
             transformers.Trainer with its defaults (fp32 on CPU, its own data loader)
- plain-bf16 danlu's GPT module in a bare loop: autocast bf16, AdamW, nothing else
- plain-fp32 the same bare loop in fp32

Each contestant runs in its own process, one after the other, `--repeats` times, best run
reported; imports happen before the timer. Tokens/s = steps × 16 × 128 / training seconds.
MFU = achieved FLOP/s (6 × parameters + 12 × layers × context × width per token, i.e. the
forward and backward matmuls and attention) / the measured matmul peak of this machine,
in bf16 and in fp32 (a 2048² matmul, best of several).

    python benchmarks/gpt_train_vs_peers.py [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 4, 4, 256, 128, 16


def blocks(steps: int):
    """(steps × BATCH, CONTEXT + 1) token blocks from the Bible char corpus, and the vocab."""
    import numpy as np
    import torch

    from danlu import data

    bundle = data.build(
        dataset="bible-en",
        task="language_modeling",
        tokenizer={"type": "char", "vocab_size": 256},
        block_size=CONTEXT,
        split={"val": 0.05, "test": 0.0},
    )
    tokens = np.asarray(bundle.splits["train"].tokens, dtype=np.int64)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(tokens) - CONTEXT - 1, steps * BATCH)
    x = np.stack([tokens[s : s + CONTEXT + 1] for s in starts])
    return torch.from_numpy(x), bundle.spec.text["vocab_size"]


def run_danlu(steps: int) -> dict:
    import danlu

    cfg = {
        "name": "bench",
        "data": {
            "dataset": "bible-en",
            "task": "language_modeling",
            "tokenizer": {"type": "char", "vocab_size": 256},
            "block_size": CONTEXT,
            "split": {"val": 0.0005, "test": 0.0},
        },
        "model": {"type": "gpt", "num_layers": LAYERS, "num_heads": HEADS, "dim": WIDTH},
        "train": {
            "max_steps": steps,
            "batch_size": BATCH,
            "eval_every": 10_000,
            "log_every": 10_000,
            "tensorboard": False,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        danlu.pretrain(cfg, run_dir=tmp, show_progress=False)  # warm: data cache, imports
        with tempfile.TemporaryDirectory() as tmp2:
            result = danlu.pretrain(cfg, run_dir=tmp2, show_progress=False)
    return {"seconds": result.fit.seconds, "precision": result.fit.precision}


def run_plain(steps: int, precision: str) -> dict:
    import torch
    import torch.nn.functional as F

    from danlu.models.gpt import build_gpt

    x, vocab = blocks(steps)
    torch.manual_seed(0)
    model = build_gpt([CONTEXT], None, vocab, 0, {}, num_layers=LAYERS, num_heads=HEADS, dim=WIDTH)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    for i in range(steps):
        batch = x[i * BATCH : (i + 1) * BATCH]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - t, "precision": precision, "vocab": vocab}


def run_trainer(steps: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    x, vocab = blocks(steps)

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": x[i, :-1], "labels": x[i, :-1]}  # the model shifts labels

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS
    )
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Blocks())
        out = trainer.train()
    return {"seconds": out.metrics["train_runtime"], "precision": "fp32"}


def peak(dtype_name: str) -> float:
    import torch

    dtype = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype_name])
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def flops_per_token(vocab: int) -> float:
    params = LAYERS * 12 * WIDTH**2 + vocab * WIDTH  # blocks + the (tied) output layer
    return 6 * params + 12 * LAYERS * CONTEXT * WIDTH


def child(name: str, steps: int) -> None:
    import torch  # noqa: F401  (import cost outside every timer)

    runners = {
        "danlu": lambda: run_danlu(steps),
        "trainer": lambda: run_trainer(steps),
        "plain-bf16": lambda: run_plain(steps, "bf16"),
        "plain-fp32": lambda: run_plain(steps, "fp32"),
    }
    print(json.dumps(runners[name]()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    names = ["danlu", "trainer", "plain-bf16", "plain-fp32"]
    best: dict[str, dict] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for _ in range(args.repeats):
        for name in names:
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    import torch

    fpt = flops_per_token(best["plain-fp32"]["vocab"])
    peaks = {p: peak(p) for p in ("bf16", "fp32")}
    tokens = args.steps * BATCH * CONTEXT
    print(
        f"GPT {LAYERS} layers × {HEADS} heads × {WIDTH} wide, context {CONTEXT}, batch {BATCH}, "
        f"{args.steps} steps, {torch.get_num_threads()} threads, best of {args.repeats}; "
        f"matmul peak bf16 {peaks['bf16'] / 1e9:.0f} / fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s"
    )
    print(
        "| contestant | precision | tokens/s | danlu speed-up | MFU vs bf16 peak | vs fp32 peak |"
    )
    print("|---|---|---:|---:|---:|---:|")
    ref = tokens / best["danlu"]["seconds"]
    for name in names:
        r = best[name]
        rate = tokens / r["seconds"]
        print(
            f"| {name} | {r['precision']} | {rate:,.0f} | ×{ref / rate:.2f} | "
            f"{rate * fpt / peaks['bf16']:.1%} | {rate * fpt / peaks['fp32']:.1%} |"
        )


if __name__ == "__main__":
    main()
