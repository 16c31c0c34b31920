"""How well do the label-noise thresholds find flipped labels? (data check's label_noise)

Flips a known share of training labels to another class at random, runs the same 5-fold
cross-validated baseline as `danlu data check`, and reports precision (flagged rows that were
really flipped) and recall (flipped rows flagged) for several threshold pairs.

    .venv/bin/python benchmarks/label_noise_thresholds.py --dataset digits --noise 0.05
    .venv/bin/python benchmarks/label_noise_thresholds.py --dataset fashion-mnist --rows 20000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from danlu import data
from danlu.data import baseline

PAIRS = [(0.5, 0.2), (0.7, 0.1), (0.8, 0.1), (0.9, 0.05), (0.95, 0.02), (0.99, 0.01)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--noise", type=float, default=0.05, help="share of labels flipped")
    ap.add_argument("--rows", type=int, default=20_000, help="training rows checked")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bundle = data.build(dataset=args.dataset, seed=args.seed)
    train = bundle.splits["train"]
    rng = np.random.default_rng(args.seed)
    rows = np.arange(len(train))
    if len(rows) > args.rows:
        rows = np.sort(rng.choice(rows, args.rows, replace=False))
    kind = bundle.spec.input
    x = baseline.baseline_inputs(train.x, kind)[rows]
    y = train.y.numpy()[rows].copy()
    c = len(bundle.spec.class_names)
    flipped = rng.random(len(y)) < args.noise
    y[flipped] = (y[flipped] + rng.integers(1, c, flipped.sum())) % c  # another class
    t = time.perf_counter()
    proba = baseline.cross_val_proba(kind, x, y, seed=args.seed)
    print(
        f"{args.dataset}: {len(y)} training rows, {flipped.sum()} labels flipped "
        f"({args.noise:.0%}); 5-fold baseline in {time.perf_counter() - t:.1f}s"
    )
    clean = (proba.argmax(1) == train.y.numpy()[rows]).mean()
    print(f"out-of-fold accuracy against the true labels: {clean:.3f}")
    print("p_other  p_given  flagged  precision  recall  (flagged among clean rows)")
    for p_other, p_given in PAIRS:
        found = baseline.confident_mistakes(proba, y, p_other=p_other, p_given=p_given)
        hit = flipped[found].sum()
        prec = hit / len(found) if len(found) else float("nan")
        print(
            f"{p_other:7.2f}  {p_given:7.2f}  {len(found):7d}  {prec:9.3f}  "
            f"{hit / max(flipped.sum(), 1):6.3f}  ({len(found) - hit})"
        )


if __name__ == "__main__":
    main()
