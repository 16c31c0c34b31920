"""Quick scikit-learn baselines: the yardstick `data check` and the sufficiency estimate use.

One linear model per input kind, seconds to fit on tens of thousands of rows:

- table: logistic regression (ridge for regression) on standardized features;
- image: the same on flattened pixels, average-pooled to at most 16×16 per channel;
- text: the same on TF-IDF of words (sublinear term frequency), fitted on the training rows.

    inputs = baseline_inputs(split.x, "image")           # once per split
    score = fit_score("image", "classification", tr_x, tr_y, val_x, val_y)
    proba = cross_val_proba("image", x, y, folds=5)       # out-of-fold class probabilities

OpenBLAS is limited to one thread while fitting: on a shared 2-core machine its thread pool
made a 5,000-row fit 20× slower (18 s instead of 0.8 s), and these matrices are small enough
that one thread is the fastest choice anyway.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

KINDS = ("table", "image", "text")
MAX_SIDE = 16  # images are average-pooled until both sides are at most this


def baseline_inputs(x: Any, kind: str) -> Any:
    """What the baseline reads: float features (tables, pooled pixels) or a text array."""
    if kind == "text":
        return np.asarray(list(x), dtype=object)
    a = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    if kind == "image":
        return pooled_pixels(a)
    return a.astype(np.float32).reshape(len(a), -1)


def pooled_pixels(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) uint8 → (N, C·h·w) float32 in [0, 1], average-pooled to sides ≤ MAX_SIDE."""
    n, c, h, w = x.shape
    k = max(1, math.ceil(max(h, w) / MAX_SIDE))
    h2, w2 = h // k, w // k
    a = x[:, :, : h2 * k, : w2 * k].astype(np.float32)
    a = a.reshape(n, c, h2, k, w2, k).mean(axis=(3, 5))  # (N, C, h2, w2)
    return a.reshape(n, -1) / 255.0


def make_model(kind: str, task: str, seed: int = 0) -> Any:
    """An unfitted scikit-learn pipeline for this input kind and task."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind not in KINDS:
        raise ValueError(f"baseline input kind must be one of {KINDS}, got {kind!r}")
    if kind == "text":
        first = TfidfVectorizer(sublinear_tf=True, min_df=1, dtype=np.float32)
        c = 10.0  # sparse TF-IDF rows have unit norm: weak regularization suits them
    else:
        first = StandardScaler()
        c = 0.1  # hundreds of correlated pixels / one-hot columns: regularize more
    if task == "regression":
        return make_pipeline(first, Ridge(alpha=1.0))
    return make_pipeline(first, LogisticRegression(C=c, max_iter=300, random_state=seed))


def fit(kind: str, task: str, x: Any, y: np.ndarray, seed: int = 0) -> Any:
    from threadpoolctl import threadpool_limits

    model = make_model(kind, task, seed)
    with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: 300 iterations is the budget
        model.fit(x, y)
    return model


def score(task: str, model: Any, x: Any, y: np.ndarray) -> float:
    """The headline metric: accuracy (classification) or RMSE (regression)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        pred = model.predict(x)
    if task == "regression":
        return float(np.sqrt(np.mean((pred.astype(np.float64) - y) ** 2)))
    return float(np.mean(pred == y))


def fit_score(
    kind: str,
    task: str,
    train_x: Any,
    train_y: np.ndarray,
    val_x: Any,
    val_y: np.ndarray,
    seed: int = 0,
) -> float:
    """Fit on the training rows, return the headline metric on the validation rows."""
    if task != "regression" and len(np.unique(train_y)) < 2:
        majority = np.bincount(train_y).argmax()  # one class: the best a model can do
        return float(np.mean(val_y == majority))
    return score(task, fit(kind, task, train_x, train_y, seed), val_x, val_y)


def cross_val_proba(
    kind: str, x: Any, y: np.ndarray, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold class probabilities (N, C) for labels 0..C-1 (C = y.max() + 1).

    Classes with fewer examples than folds still get a column (probability 0 where a fold
    never saw them)."""
    from sklearn.model_selection import KFold, StratifiedKFold
    from threadpoolctl import threadpool_limits

    n_classes = int(y.max()) + 1
    folds = max(2, min(folds, len(y)))
    # stratified unless no class has `folds` examples (then scikit-learn refuses to stratify)
    kind_of_split = StratifiedKFold if np.bincount(y).max() >= folds else KFold
    split = kind_of_split(folds, shuffle=True, random_state=seed)
    out = np.zeros((len(y), n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has only k members"
        pieces = list(split.split(np.zeros(len(y)), y))
    for train_idx, test_idx in pieces:
        ty = y[train_idx]
        if len(np.unique(ty)) < 2:
            out[test_idx, ty[0]] = 1.0
            continue
        model = fit(kind, "classification", x[train_idx], ty, seed)
        with threadpool_limits(1, user_api="blas"):
            proba = model.predict_proba(x[test_idx])
        out[np.ix_(test_idx, model.classes_)] = proba
    return out


def confident_mistakes(
    proba: np.ndarray, y: np.ndarray, *, p_other: float = 0.9, p_given: float = 0.05
) -> np.ndarray:
    """Rows whose out-of-fold prediction is another class with p ≥ p_other while the given
    label gets p ≤ p_given: label-noise candidates, most confident first."""
    given = proba[np.arange(len(y)), y]
    other = proba.copy()
    other[np.arange(len(y)), y] = -1.0
    best = other.max(axis=1)
    rows = np.nonzero((best >= p_other) & (given <= p_given))[0]
    return rows[np.argsort(-best[rows], kind="stable")]
