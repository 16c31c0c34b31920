"""Accuracy at ε = 1, 3, 8 and without differential privacy, on one task, with the same
config and training length: the cost of DP-SGD (train.privacy) measured, not assumed.
Each run is then audited (loss-threshold membership inference) so leakage sits next to ε.

    python benchmarks/dp_accuracy.py fashion      # Fashion-MNIST CNN without batch norm
    python benchmarks/dp_accuracy.py r8           # Reuters R8 with a bidirectional LSTM

Runs go to runs/dp-<task>-eps<ε>/ (runs/dp-<task>-nodp/); `--epochs` sets the length.
"""

from __future__ import annotations

import argparse
import json
import time

import danlu

TASKS = {
    # batch norm mixes the examples of a batch, which per-example clipping cannot allow
    "fashion": ("fashion_cnn", ["model.batch_norm=false", "train.batch_size=256"]),
    # per-example clipping replaces train.grad_clip under DP
    "r8": ("lstm_textcls_r8", ["data.tokenizer.max_length=128", "train.grad_clip=null"]),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--epsilons", default="none,1,3,8")
    a = p.parse_args()
    config, overrides = TASKS[a.task]
    rows = []
    for eps in a.epsilons.split(","):
        extra = [f"train.epochs={a.epochs}", "train.tensorboard=false", "train.precision=fp32"]
        if eps != "none":
            extra += [f"train.privacy={{target_epsilon: {eps}, delta: 1.0e-5}}"]
        name = f"dp-{a.task}-" + ("nodp" if eps == "none" else f"eps{eps}")
        start = time.perf_counter()
        run = danlu.train(config, [*overrides, *extra], run_dir=f"runs/{name}").run
        seconds = time.perf_counter() - start
        metrics = danlu.evaluate(run)
        leak = danlu.audit(run, samples=2000)
        spent = run.read("lineage.json").get("privacy", {})
        rows.append({"run": name, "target_epsilon": eps, "epsilon": spent.get("epsilon"),
                     "noise_multiplier": spent.get("noise_multiplier"),
                     "accuracy": metrics["accuracy"], "attack_auc": leak["loss"]["auc"],
                     "train_seconds": round(seconds, 1)})  # fmt: skip
    print(f"{'run':22} {'ε spent':>8} {'σ':>6} {'accuracy':>9} {'attack AUC':>11} {'time':>7}")
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        print(f"{r['run']:22} {eps:>8} {sigma:>6} {r['accuracy']:>9.4f} "
              f"{r['attack_auc']:>11.3f} {r['train_seconds']:>6.0f}s")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
