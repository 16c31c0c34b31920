"""Is the "do we have enough data?" projection right? Fit on ≤ 40 %, predict 100 %, measure.

The learning curve is measured on nested fractions of the training split up to 40 %, the
saturating power law is fitted and projected to 100 % (2.5× the largest fraction), and then
the model is trained on 100 % of the training split with the same seeds and scored on the
same validation split. Printed: projected value with its 80 % band, measured value, the
error, and two naive predictions for comparison (no gain beyond 40 %; a straight line in
log n through the last two fractions).

    # the scikit-learn baseline on Fashion-MNIST (logistic regression on 14×14 pixels)
    .venv/bin/python benchmarks/sufficiency_validation.py fashion_cnn
    # the configured CNN, 300 steps per fit
    .venv/bin/python benchmarks/sufficiency_validation.py fashion_cnn --model configured --max-steps 300
    # R8 news topics, TF-IDF + logistic regression
    .venv/bin/python benchmarks/sufficiency_validation.py r8
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np

from danlu import config as config_mod
from danlu import data
from danlu.errors import ConfigError
from danlu.tune.curve import project
from danlu.tune.sufficiency import baseline_scorer, configured_scorer, learning_curve


def load_bundle(source: str, overrides: list[str]) -> tuple[Any, Any]:
    """A config file / bundled example, or a bare dataset name (baseline only)."""
    try:
        cfg = config_mod.load(source, overrides)
    except ConfigError:  # a dataset name: wrap it in a minimal config
        raw = {"name": source, "data": {"dataset": source}, "model": {"type": "mlp"}}
        cfg = config_mod.load(raw, overrides)
    return cfg, data.build(**cfg.data.model_dump(), seed=cfg.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("source", help="config file / bundled example, or a dataset name")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--model", choices=["baseline", "configured"], default="baseline")
    ap.add_argument("--max-steps", type=int, default=None, help="configured: steps per fit")
    ap.add_argument("--fractions", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    cfg, bundle = load_bundle(args.source, args.overrides)
    n = len(bundle.splits["train"])
    task = bundle.spec.task
    y = bundle.splits["train"].y.numpy() if task == "classification" else None
    if args.model == "baseline":
        score = baseline_scorer(bundle, cfg.seed)
    else:
        score = configured_scorer(
            bundle, cfg.model.model_dump(), cfg.train.model_dump(), args.max_steps
        )
    what = (
        "baseline"
        if args.model == "baseline"
        else f"{cfg.model.type} ({args.max_steps or 'configured'} steps)"
    )
    print(
        f"{cfg.data.dataset}: {n:,} training, {len(bundle.splits['val']):,} validation examples; {what}"
    )
    t0 = time.perf_counter()
    sizes, scores = learning_curve(
        n, y, fractions, args.seeds, score, seed=cfg.seed, progress=print
    )
    higher = task == "classification"
    res = project(sizes, scores, [1.0], n, higher_is_better=higher, ceiling=1.0 if higher else 0.0)
    _, full = learning_curve(n, y, [1.0], args.seeds, score, seed=cfg.seed, progress=print)
    measured = float(np.mean(full))
    p = res["projections"][0]
    means = res["means"]
    flat = means[-1]
    slope = (means[-1] - means[-2]) / math.log(sizes[-1] / sizes[-2])
    loglin = means[-1] + slope * math.log(n / sizes[-1])
    scale, unit = (100, "points") if higher else (1, "")
    print(
        f"\nfit on {', '.join(f'{f:g}' for f in fractions)} ({', '.join(f'{s:,}' for s in sizes)} examples): "
        f"{res['fit']['formula']}, a={res['fit']['a']:.4f}, b={res['fit']['b']:.4f}, c={res['fit']['c']:.3f}"
    )
    print(f"verdict: {res['verdict']['text']}")
    inside = p["low"] is not None and p["low"] <= measured <= p["high"]
    print(
        f"projected at 100 % ({n:,}): {p['value']:.4f}  80 % band [{p['low']:.4f}, {p['high']:.4f}]"
    )
    print(f"measured  at 100 % ({n:,}): {measured:.4f} ± {np.std(full):.4f} ({args.seeds} seeds)")
    print(
        f"error (projected − measured): {scale * (p['value'] - measured):+.2f} {unit}; "
        f"measured inside the band: {'yes' if inside else 'no'}"
    )
    print(
        f"naive: no gain after 40 % → error {scale * (flat - measured):+.2f} {unit}; "
        f"log-linear through the last two → {scale * (loglin - measured):+.2f} {unit}"
    )
    print(
        f"gain 40 % → 100 %: projected {scale * (p['value'] - flat):+.2f}, measured "
        f"{scale * (measured - flat):+.2f} {unit}  ({time.perf_counter() - t0:.0f}s)"
    )


if __name__ == "__main__":
    main()
