"""Metrics as pure functions, on top of scikit-learn, sacreBLEU and rouge-score.

Everything here takes predictions already reduced to what the metric needs (a confusion
matrix, score histograms, sums, strings) and returns numbers; the accumulators that reduce a
split batch by batch live in `danlu.evaluate.streaming`.

    from_confusion(cm, ["cat", "dog"])["f1_macro"]
    generation_metrics(["the cat sat"], ["the cat sat down"])["bleu"]
    check_metrics(["bleu"], "classification", 3)   # ConfigError: a generation metric ...
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from danlu.errors import ConfigError
from danlu.models.ensemble import probabilities

__all__ = ["probabilities"]  # re-exported: where evaluation code looks for it

LOWER_IS_BETTER = (
    "loss", "mse", "rmse", "mae", "mape", "log_loss", "error", "ece", "perplexity", "fpr",
)  # fmt: skip


def lower_is_better(metric: str) -> bool:
    name = metric.removeprefix("val_").removeprefix("train_").removeprefix("test_")
    return any(name == m or name.endswith("_" + m) for m in LOWER_IS_BETTER)


# ------------------------------------------------------------------------ classification


def from_confusion(cm: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (macro, micro, weighted, per class) from a confusion
    matrix whose rows are true classes and columns predicted ones. Zero divisions count as 0."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    # macro averages run over the classes present in the truth or the predictions
    labels = (support > 0) | (predicted > 0)
    weights = support / total if total else support
    accuracy = float(tp.sum() / total) if total else 0.0

    def macro(v: np.ndarray) -> float:
        return float(v[labels].mean()) if labels.any() else 0.0

    return {
        "accuracy": accuracy,
        "precision_macro": macro(precision),
        "recall_macro": macro(recall),
        "f1_macro": macro(f1),
        # single-label: every error is one false positive and one false negative
        "precision_micro": accuracy,
        "recall_micro": accuracy,
        "f1_micro": accuracy,
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


def ranking(y_true: np.ndarray, scores: np.ndarray, points: int = 200) -> dict[str, Any] | None:
    """ROC-AUC, average precision (PR-AUC) and both curves (at most `points` each) of one
    class scored one-vs-rest; None when the class is absent or everything is that class."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    if y_true.all() or not y_true.any():
        return None
    fpr, tpr, _ = roc_curve(y_true, scores)
    precision, recall, _ = precision_recall_curve(y_true, scores)
    return {
        "roc_auc": float(np.trapezoid(tpr, fpr)),
        "pr_auc": float(average_precision_score(y_true, scores)),
        "roc": _thin(fpr, tpr, points, "fpr", "tpr"),
        "pr": _thin(recall[::-1], precision[::-1], points, "recall", "precision"),
    }


def ranking_from_histograms(pos: np.ndarray, neg: np.ndarray, points: int = 200):
    """`ranking` from histograms of one class's scores (bins in ascending score order) for the
    positives and for the rest: examples in one bin count as tied scores, exactly as
    scikit-learn treats ties, so the result equals `ranking` on scores rounded to the bins."""
    p_total, n_total = float(pos.sum()), float(neg.sum())
    if p_total == 0 or n_total == 0:
        return None
    tp = np.concatenate([[0.0], np.cumsum(pos[::-1], dtype=np.float64)])  # thresholds high→low
    fp = np.concatenate([[0.0], np.cumsum(neg[::-1], dtype=np.float64)])
    keep = np.concatenate([[True], (pos[::-1] + neg[::-1]) > 0])  # skip empty bins
    tp, fp = tp[keep], fp[keep]
    tpr, fpr = tp / p_total, fp / n_total
    recall = tpr[1:]
    precision = tp[1:] / (tp[1:] + fp[1:])
    ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    return {
        "roc_auc": float(np.trapezoid(tpr, fpr)),
        "pr_auc": ap,
        "roc": _thin(fpr, tpr, points, "fpr", "tpr"),
        "pr": _thin(np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision]),
                    points, "recall", "precision"),
    }  # fmt: skip


def _thin(x: np.ndarray, y: np.ndarray, points: int, xs: str, ys: str) -> dict[str, list]:
    if len(x) > points:
        idx = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
        x, y = x[idx], y[idx]
    return {xs: [round(float(v), 5) for v in x], ys: [round(float(v), 5) for v in y]}


def calibration(conf: np.ndarray, correct: np.ndarray, count: np.ndarray) -> dict[str, Any]:
    """Expected calibration error and a reliability table from per-bin sums of the top-label
    confidence and of correct predictions over equal-width bins on [0, 1]."""
    total = count.sum()
    edges = np.linspace(0.0, 1.0, len(count) + 1)
    bins, ece = [], 0.0
    for i, n in enumerate(count):
        if n == 0:
            continue
        c, a = conf[i] / n, correct[i] / n
        ece += n / total * abs(a - c)
        bins.append({"low": float(edges[i]), "high": float(edges[i + 1]),
                     "confidence": float(c), "accuracy": float(a), "count": int(n)})  # fmt: skip
    return {"ece": float(ece) if total else float("nan"), "bins": bins}


def group_gaps(groups: dict[str, dict[str, Any]], binary: bool) -> dict[str, Any]:
    """Largest difference between groups for each metric; for binary tasks also demographic
    parity difference (positive prediction rates) and equalized odds difference (the larger
    of the TPR and FPR gaps)."""

    def gap(key: str) -> float | None:
        values = [g[key] for g in groups.values() if g.get(key) is not None]
        return float(max(values) - min(values)) if len(values) >= 2 else None

    keys = [k for k, v in next(iter(groups.values()), {}).items() if isinstance(v, float)]
    out: dict[str, Any] = {"gaps": {k: gap(k) for k in keys if gap(k) is not None}}
    if binary:
        dpd, tpr, fpr = gap("positive_rate"), gap("tpr"), gap("fpr")
        if dpd is not None:
            out["demographic_parity_difference"] = dpd
        if tpr is not None or fpr is not None:
            out["equalized_odds_difference"] = max(v for v in (tpr, fpr) if v is not None)
    return out


# ---------------------------------------------------------------------------- regression


def regression_from_sums(n: int, sse: float, sae: float, sy: float, syy: float) -> dict[str, float]:
    mse = sse / n
    sst = syy - sy * sy / n
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": sae / n,
        "r2": 1 - sse / sst if sst > 0 else 0.0,
    }


# ---------------------------------------------------------------------------- generation


def _norm(text: str, casefold: bool) -> str:
    text = " ".join(text.split())
    return text.casefold() if casefold else text


def generation_metrics(
    hypotheses: list[str], references: list[str], *, casefold: bool = False
) -> dict[str, float]:
    """Exact match (whitespace-normalised, optionally case-insensitive), corpus sacreBLEU and
    chrF, and mean ROUGE-1/2/L F1 of generated texts against their references."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        return {}
    hyps = [_norm(h, False) for h in hypotheses]
    refs = [_norm(r, False) for r in references]
    exact = sum(_norm(h, casefold) == _norm(r, casefold) for h, r in zip(hyps, refs, strict=True))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rouge = np.zeros(3)
    for h, r in zip(hyps, refs, strict=True):
        s = scorer.score(r, h)
        rouge += [s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure]
    rouge /= len(refs)
    return {
        "exact_match": exact / len(refs),
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
        "rouge1": float(rouge[0]),
        "rouge2": float(rouge[1]),
        "rouge_l": float(rouge[2]),
    }


GENERATION = ["exact_match", "bleu", "chrf", "rouge1", "rouge2", "rouge_l"]


# ------------------------------------------------------------------------ names per task

TOKEN_TASKS = ("language_modeling", "seq2seq", "chat")
CLASSIFICATION = [
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "log_loss",
    "ece",
    "roc_auc",
    "pr_auc",
]
REGRESSION = ["mse", "rmse", "mae", "r2", "mape"]
TOKENS = ["loss", "perplexity", "accuracy"]


def metric_names(task: str, num_classes: int | None = None) -> list[str]:
    """The scalar metrics the accumulator of a task reports (before any prefix)."""
    if task == "regression":
        return list(REGRESSION)
    if task in TOKEN_TASKS:
        return list(TOKENS)
    return list(CLASSIFICATION)


def available(task: str, num_classes: int | None = None) -> list[str]:
    """Every metric `danlu evaluate` can report for a task (generation metrics included)."""
    names = metric_names(task, num_classes)
    return [*names, *GENERATION] if task in ("seq2seq", "chat") else names


def check_metrics(names: list[str] | None, task: str, num_classes: int | None = None) -> None:
    """`evaluate.metrics` must name metrics the task has: one line saying which do not."""
    if not names:
        return
    valid = available(task, num_classes)
    wrong = [n for n in names if n not in valid]
    if not wrong:
        return
    name = wrong[0]
    if name in GENERATION:
        why = (
            f"'{name}' scores generated text against reference texts, and a {task} run "
            "generates none (generation metrics need a seq2seq or chat task with targets)"
        )
    elif name in CLASSIFICATION + REGRESSION + TOKENS:
        why = f"'{name}' is not a {task} metric"
    else:
        why = f"'{name}' is not a metric danlu knows"
    raise ConfigError(
        f"evaluate.metrics: {why}",
        fix=f"a {task} run reports: {', '.join(valid)}",
    )


def headline(task: str) -> str:
    return {"classification": "accuracy", "regression": "rmse"}.get(task, "perplexity")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (for logs, history and TensorBoard)."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "count"
    }
