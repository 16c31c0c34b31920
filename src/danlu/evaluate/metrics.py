"""Metrics: pure functions, and accumulators that reduce predictions batch by batch.

Classification metrics come from a confusion matrix accumulated per batch, so evaluating a
set of any size holds C×C counts rather than every prediction; ROC-AUC (binary) keeps one
score per example. The numbers equal scikit-learn's on the same predictions (tested).

    acc = ClassificationMetrics(["cat", "dog"], kind="softmax")
    for logits, y in batches:
        acc.update(logits, y)
    acc.compute()  # {"accuracy": ..., "f1_macro": ..., "confusion_matrix": [[...]], ...}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae", "log_loss", "error", "ece", "perplexity")


def lower_is_better(metric: str) -> bool:
    name = metric.removeprefix("val_").removeprefix("train_").removeprefix("test_")
    return any(name == m or name.endswith("_" + m) for m in LOWER_IS_BETTER)


def probabilities(outputs: torch.Tensor, kind: str) -> torch.Tensor:
    """Model outputs → class probabilities (N, C); a single sigmoid logit gives 2 columns."""
    outputs = outputs.float()
    if kind == "sigmoid":
        p = torch.sigmoid(outputs)
        return torch.cat([1 - p, p], dim=1) if p.shape[1] == 1 else p
    return torch.softmax(outputs, dim=1)


# ------------------------------------------------------------------------ pure functions


def from_confusion(cm: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (macro, weighted, per class) from a confusion matrix
    whose rows are true classes and columns predicted classes. Zero divisions count as 0."""
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

    def macro(v: np.ndarray) -> float:
        return float(v[labels].mean()) if labels.any() else 0.0

    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision_macro": macro(precision),
        "recall_macro": macro(recall),
        "f1_macro": macro(f1),
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Binary ROC-AUC (None when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < 2:
        return None
    return float(roc_auc_score(y_true, scores))


def regression_from_sums(n: int, sse: float, sae: float, sy: float, syy: float) -> dict[str, float]:
    mse = sse / n
    sst = syy - sy * sy / n
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": sae / n,
        "r2": 1 - sse / sst if sst > 0 else 0.0,
    }


# -------------------------------------------------------------------------- accumulators


class ClassificationMetrics:
    """Streams (outputs, targets) batches into a confusion matrix, log loss and AUC scores."""

    def __init__(self, class_names: list[str], kind: str = "softmax") -> None:
        self.class_names, self.kind = class_names, kind
        c = len(class_names)
        self.cm = np.zeros((c, c), np.int64)
        self.nll = 0.0
        self.n = 0
        self.scores: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        proba = probabilities(outputs.detach(), self.kind).cpu()
        y = targets.detach().cpu().long()
        pred = proba.argmax(dim=1)
        c = len(self.class_names)
        self.cm += torch.bincount(y * c + pred, minlength=c * c).view(c, c).numpy()
        p_true = proba.gather(1, y[:, None]).squeeze(1).clamp_min(1e-15)
        self.nll += float(-p_true.log().sum())
        self.n += len(y)
        if c == 2:
            self.scores.append(proba[:, 1].numpy().astype(np.float32))
            self.truth.append(y.numpy().astype(np.int8))

    def compute(self) -> dict[str, Any]:
        out = from_confusion(self.cm, self.class_names)
        out["log_loss"] = self.nll / self.n if self.n else float("nan")
        if self.scores:
            auc = roc_auc(np.concatenate(self.truth), np.concatenate(self.scores))
            if auc is not None:
                out["roc_auc"] = auc
        out["count"] = self.n
        return out


class RegressionMetrics:
    """Streams (outputs, targets) into sums for MSE, RMSE, MAE and R² (float64)."""

    def __init__(self) -> None:
        self.n, self.sse, self.sae, self.sy, self.syy = 0, 0.0, 0.0, 0.0, 0.0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        pred = outputs.detach().double().reshape(-1).cpu()
        y = targets.detach().double().reshape(-1).cpu()
        err = pred - y
        self.n += len(y)
        self.sse += float((err * err).sum())
        self.sae += float(err.abs().sum())
        self.sy += float(y.sum())
        self.syy += float((y * y).sum())

    def compute(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        return {
            **regression_from_sums(self.n, self.sse, self.sae, self.sy, self.syy),
            "count": self.n,
        }


class TokenMetrics:
    """Streams (logits (B, T, V), targets (B, T)) into loss per token (nats, no label
    smoothing), perplexity and next-token accuracy; targets of -100 are not counted."""

    def __init__(self) -> None:
        self.nll, self.correct, self.n = 0.0, 0, 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.detach().flatten(0, -2).float(), targets.detach().flatten()
        valid = targets != -100
        if not bool(valid.any()):
            return
        logits, targets = logits[valid], targets[valid]  # (N, V), (N,)
        self.nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        self.correct += int((logits.argmax(-1) == targets).sum())
        self.n += int(valid.sum())

    def compute(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        loss = self.nll / self.n
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": self.correct / self.n,
            "count": self.n,
        }


TOKEN_TASKS = ("language_modeling", "seq2seq", "chat")


def accumulator(task: str, class_names: list[str] | None, kind: str):
    if task in TOKEN_TASKS:
        return TokenMetrics()
    return (
        ClassificationMetrics(class_names or [], kind)
        if task == "classification"
        else RegressionMetrics()
    )


def metric_names(task: str, num_classes: int | None) -> list[str]:
    """The scalar metrics an accumulator reports for a task (before any prefix)."""
    if task == "regression":
        return ["mse", "rmse", "mae", "r2"]
    if task in TOKEN_TASKS:
        return ["loss", "perplexity", "accuracy"]
    names = [
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "log_loss",
    ]
    return [*names, "roc_auc"] if num_classes == 2 else names


def headline(task: str) -> str:
    return {"classification": "accuracy", "regression": "rmse"}.get(task, "perplexity")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict (for logs, history and TensorBoard)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "count"}
