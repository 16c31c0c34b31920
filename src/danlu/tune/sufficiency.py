"""Do we have enough data? Learning curves on nested fractions of the training split.

For each seed, the training split is put in a random class-interleaved order and the model is
trained on growing prefixes of it (`fractions`), so every larger subset contains the smaller
ones and keeps the class proportions. Each fit is scored on the whole validation split with
the headline metric (accuracy; RMSE for regression). `curve.project` fits a saturating power
law to the means and projects it to multiples of the current training size.

    result = estimate(bundle, fractions=[0.1, 0.2, 0.4, 0.8], seeds=3, project_to=[1, 2, 4])
    result["verdict"]["text"]  # "more data is likely to add about 1.3 points (1× → 2×; ...)"

`model: baseline` fits the quick scikit-learn baseline (data/baseline.py); `model: configured`
trains the configured danlu model with the one `fit` loop, for `max_steps` steps per fit (or
the configured training length, which then scales with the fraction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from danlu.data import baseline
from danlu.data.check_rows import split_texts
from danlu.errors import DataError
from danlu.tune.curve import project

Scorer = Callable[[np.ndarray, int], float]  # (training positions, seed) → validation metric


def nested_subsets(y: np.ndarray | None, n: int, fractions: list[float], seed: int) -> list:
    """Sorted training positions for each fraction (in the order given); each subset of a
    larger fraction contains every smaller one. With labels, every prefix of the underlying
    order holds each class in proportion (± 1 example)."""
    rng = np.random.default_rng(seed)
    if y is None:
        order = rng.permutation(n)
    else:
        key = np.empty(n)
        for c in np.unique(y):
            idx = np.nonzero(y == c)[0]
            rank = rng.permutation(len(idx))
            key[idx] = (rank + rng.random(len(idx))) / len(idx)
        order = np.argsort(key, kind="stable")
    sizes = [min(n, max(2, round(f * n))) for f in fractions]
    return [np.sort(order[:k]) for k in sizes]


def baseline_scorer(bundle: Any, seed: int = 0) -> Scorer:
    """Fit the scikit-learn baseline on training positions, score it on the validation split."""
    texts = split_texts(bundle)
    kind = "text" if texts is not None else bundle.spec.input
    task = bundle.spec.task

    def inputs(split: str) -> Any:
        return baseline.baseline_inputs(
            texts[split] if texts is not None else bundle.splits[split].x, kind
        )

    tx, ty = inputs("train"), bundle.splits["train"].y.numpy()
    vx, vy = inputs("val"), bundle.splits["val"].y.numpy()

    def score(rows: np.ndarray, s: int) -> float:
        return baseline.fit_score(kind, task, tx[rows], ty[rows], vx, vy, seed=s)

    return score


def configured_scorer(
    bundle: Any, model: dict[str, Any], train: dict[str, Any], max_steps: int | None
) -> Scorer:
    """Train the configured model with `fit` (in a temporary run folder) and score the last
    weights on the validation split: the same loss, optimizer and schedule as `danlu train`."""
    import torch

    from danlu import models
    from danlu.device import resolve_device, resolve_precision
    from danlu.evaluate.metrics import headline
    from danlu.rundir import RunDir
    from danlu.train import loop
    from danlu.train.objectives import Supervised, class_weights, make_loss, sample_weights
    from danlu.train.steps import validate

    spec = bundle.spec
    kind = models.output_kind(spec.task, model.get("output", "auto"))
    device = resolve_device(train["device"])
    precision = resolve_precision(train["precision"], device)
    eval_batch = train["eval_batch_size"] or 2 * train["batch_size"]
    metric = "val_" + headline(spec.task)

    def score(rows: np.ndarray, s: int) -> float:
        torch.manual_seed(s)
        net = models.build(
            model, input_shape=spec.input_shape, task=spec.task, num_classes=spec.num_classes
        )
        sub = bundle.splits["train"].take(rows)
        weights = None
        if spec.task == "classification":
            weights = class_weights(sub.y, spec.num_classes, train["class_weights"])
        loss = make_loss(
            train["loss"], kind, label_smoothing=train["label_smoothing"], class_weights=weights
        )
        objective = Supervised(loss, spec.task, kind, spec.class_names)
        data = dataclasses.replace(bundle, splits={**bundle.splits, "train": sub})
        weighted = train["sampler"] == "weighted" and spec.task == "classification"
        loader = data.loader(
            "train",
            train["batch_size"],
            order="shuffle"
            if train["sampler"] == "weighted" and not weighted
            else train["sampler"],
            seed=s,
            train=True,
            device=str(device),
            weights=sample_weights(sub.y, spec.num_classes) if weighted else None,
        )
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
            loop.fit(
                net,
                objective,
                loader,
                None,  # no validation during fit: the last weights are scored below
                RunDir(tmp),
                epochs=train["epochs"],
                max_steps=max_steps or train["max_steps"],
                optimizer=train["optimizer"],
                schedule=train["schedule"],
                l1=train["l1"],
                grad_clip=train["grad_clip"],
                grad_accum=train["grad_accum"],
                precision=precision,
                device=str(device),
                log_every=10**9,
                checkpoint_every=10**9,  # one checkpoint at the end; the folder is dropped
                keep_checkpoints=1,
                tensorboard=False,
                show_progress=False,
            )
        val = bundle.loader("val", eval_batch, device=str(device))
        return float(validate(net, objective, val, device, precision)[metric])

    return score


def learning_curve(
    n: int,
    y: np.ndarray | None,
    fractions: list[float],
    seeds: int,
    score: Scorer,
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[int], np.ndarray]:
    """Scores (seeds × fractions) of `score` on nested subsets; sizes per fraction."""
    fractions = sorted(fractions)
    scores = np.full((seeds, len(fractions)), np.nan)
    sizes: list[int] = []
    for i in range(seeds):
        subsets = nested_subsets(y, n, fractions, seed + i)
        sizes = [len(s) for s in subsets]
        for j, rows in enumerate(subsets):
            t = time.perf_counter()
            scores[i, j] = score(rows, seed + i)
            if progress:
                progress(
                    f"seed {i + 1}/{seeds} · {fractions[j]:.0%} ({len(rows):,} examples): "
                    f"{scores[i, j]:.4f} ({time.perf_counter() - t:.1f}s)"
                )
    return sizes, scores


def estimate(
    bundle: Any,
    *,
    fractions: list[float],
    seeds: int = 3,
    project_to: list[float] = (1.0, 2.0, 4.0),
    model: str = "baseline",
    max_steps: int | None = None,
    model_config: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The learning curve, its power-law fit, projections with bands, and a verdict."""
    task = bundle.spec.task
    if task not in ("classification", "regression"):
        raise DataError(
            f"the sufficiency estimate supports classification and regression, not {task}"
        )
    if len(bundle.splits.get("val", [])) == 0:
        raise DataError(
            "the sufficiency estimate scores on the validation split, which is empty",
            fix="set data.split.val to a fraction such as 0.1",
        )
    t0 = time.perf_counter()
    if model == "baseline":
        score = baseline_scorer(bundle, seed)
    elif model_config is None or train_config is None:
        raise ValueError("model: configured needs model_config and train_config")
    else:
        score = configured_scorer(bundle, model_config, train_config, max_steps)
    y = bundle.splits["train"].y.numpy() if task == "classification" else None
    n = len(bundle.splits["train"])
    sizes, scores = learning_curve(
        n, y, list(fractions), seeds, score, seed=seed, progress=progress
    )
    higher = task == "classification"
    result = project(
        sizes,
        scores,
        list(project_to),
        n,
        higher_is_better=higher,
        ceiling=1.0 if higher else 0.0,
        metric="accuracy" if higher else "rmse",
        seed=seed,
    )
    return {
        "model": model,
        "metric": "accuracy" if higher else "rmse",
        "split": "val",
        "fractions": sorted(fractions),
        "seeds": seeds,
        "scores": scores.tolist(),
        **result,
        "sizes": sizes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
