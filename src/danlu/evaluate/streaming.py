"""Accumulators: predictions reduced batch by batch, so a split of any size is evaluated in
bounded memory.

Classification keeps a confusion matrix, the log loss, calibration bins and, for ROC/PR
curves, each example's class probabilities while they fit in `memory_mb`; past that they are
folded into per-class histograms of the score's logit (4,096 bins) and the curves come from
those (ties within a bin, as scikit-learn treats ties: AUCs agree to ~1e-3). A Poisson
bootstrap (each example weighted by Poisson(1) draws, one per replicate) gives a confidence
interval of the headline metric without keeping the examples, and a top-k heap keeps the
worst errors (highest loss) with their positions in the split.

    acc = ClassificationMetrics(["cat", "dog"], bootstrap=200, worst=10)
    for batch in loader.epoch(0):
        acc.update(model(batch.x), batch.y, batch.rows)
    acc.compute()  # {"accuracy": ..., "ci": {...}, "curves": {...}, "worst": [...], ...}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from danlu.evaluate import metrics as M

LOGIT_RANGE = 16.0  # histogram bins span logit(p) in [-16, 16]


class _Extras:
    """The Poisson bootstrap and the worst-k heap shared by every accumulator."""

    def __init__(self, bootstrap: int, worst: int, seed: int) -> None:
        self.replicates, self.k = bootstrap, worst
        self.gen = torch.Generator().manual_seed(seed)
        self.boot = torch.zeros(bootstrap, 2, dtype=torch.float64)  # (sum, weight) per replicate
        self.top: dict[str, torch.Tensor] | None = None
        self.seen = 0

    def weights(self, n: int) -> torch.Tensor:
        return torch.poisson(torch.ones(self.replicates, n), generator=self.gen).double()

    def add_boot(self, values: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """values (n,): each example's contribution to the metric's numerator; counts (n,)
        its weight in the denominator (1 per example unless given)."""
        if not self.replicates:
            return
        w = self.weights(len(values))
        counts = torch.ones_like(values) if counts is None else counts
        self.boot[:, 0] += w @ values.double()
        self.boot[:, 1] += w @ counts.double()

    def ci(self, metric: str, value: float, transform: Any = None) -> dict[str, Any] | None:
        if not self.replicates or not self.seen:
            return None
        s, n = self.boot[:, 0], self.boot[:, 1].clamp_min(1e-12)
        reps = (s / n).numpy()
        reps = np.array([transform(v) for v in reps]) if transform else reps
        low, high = np.percentile(reps, [2.5, 97.5])
        return {"metric": metric, "value": value, "low": float(low), "high": float(high),
                "level": 0.95, "replicates": self.replicates}  # fmt: skip

    def add_worst(self, loss: torch.Tensor, rows: torch.Tensor | None, **cols: torch.Tensor):
        n = len(loss)
        if rows is None:
            rows = torch.arange(self.seen, self.seen + n)
        self.seen += n
        if not self.k:
            return
        new = {
            "loss": loss.float(),
            "rows": rows.long().cpu(),
            **{k: v.cpu() for k, v in cols.items()},
        }
        if self.top is not None:
            new = {k: torch.cat([self.top[k], v]) for k, v in new.items()}
        keep = torch.topk(new["loss"], min(self.k, len(new["loss"]))).indices
        self.top = {k: v[keep] for k, v in new.items()}

    def worst(self, describe: Any) -> list[dict[str, Any]]:
        if self.top is None:
            return []
        order = torch.argsort(self.top["loss"], descending=True)
        return [describe({k: v[i].item() for k, v in self.top.items()}) for i in order.tolist()]


def _worst(w: dict[str, Any], true: Any, predicted: Any, confidence: Any) -> dict[str, Any]:
    return {"position": int(w["rows"]), "true": true, "predicted": predicted,
            "confidence": confidence, "loss": float(w["loss"])}  # fmt: skip


class ClassificationMetrics:
    """Streams (outputs, targets[, rows]) into a confusion matrix, log loss, calibration,
    ranking curves, a bootstrap interval of accuracy and the worst errors."""

    def __init__(
        self,
        class_names: list[str],
        kind: str = "softmax",
        *,
        memory_mb: float = 256.0,
        bootstrap: int = 0,
        worst: int = 0,
        seed: int = 0,
        calibration_bins: int = 15,
    ) -> None:
        self.class_names, self.kind = class_names, kind
        c = len(class_names)
        self.cm = np.zeros((c, c), np.int64)
        self.nll, self.n = 0.0, 0
        self.cal = np.zeros((3, calibration_bins))  # confidence sum, correct sum, count
        self.cap = int(memory_mb * 2**20)
        self.scores: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        self.stored = 0
        self.bins = max(256, min(4096, 2**21 // max(c, 1)))
        self.hist: np.ndarray | None = None  # (2, C, bins): positives / rest of each class
        self.extras = _Extras(bootstrap, worst, seed)

    def update(
        self, outputs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        proba = M.probabilities(outputs.detach(), self.kind).cpu()
        y = targets.detach().cpu().long()
        conf, pred = proba.max(dim=1)
        c = len(self.class_names)
        self.cm += torch.bincount(y * c + pred, minlength=c * c).view(c, c).numpy()
        p_true = proba.gather(1, y[:, None]).squeeze(1).clamp_min(1e-15)
        loss = -p_true.log()
        self.nll += float(loss.sum())
        self.n += len(y)
        correct = (pred == y).double()
        nb = self.cal.shape[1]
        b = (conf.double() * nb).long().clamp(0, nb - 1).numpy()
        self.cal[0] += np.bincount(b, conf.double().numpy(), nb)
        self.cal[1] += np.bincount(b, correct.numpy(), nb)
        self.cal[2] += np.bincount(b, minlength=nb)
        self._keep_scores(proba.numpy().astype(np.float32), y.numpy())
        self.extras.add_boot(correct)
        self.extras.add_worst(loss, rows, true=y, pred=pred, conf=conf)

    def _keep_scores(self, proba: np.ndarray, y: np.ndarray) -> None:
        if self.hist is None:
            self.scores.append(proba)
            self.truth.append(y.astype(np.int32))
            self.stored += proba.nbytes + y.size * 4
            if self.stored <= self.cap:
                return
            c = len(self.class_names)
            self.hist = np.zeros((2, c, self.bins), np.int64)
            proba, y = np.concatenate(self.scores), np.concatenate(self.truth)
            self.scores, self.truth, self.stored = [], [], 0
        c, nb = len(self.class_names), self.bins
        p = np.clip(proba.astype(np.float64), 1e-300, 1.0)
        logit = np.log(p) - np.log1p(-np.minimum(p, 1 - 1e-16))
        b = ((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * nb).astype(np.int64).clip(0, nb - 1)
        positive = (y[:, None] == np.arange(c)[None, :]).astype(np.int64)  # (n, C)
        idx = (1 - positive) * c * nb + np.arange(c)[None, :] * nb + b
        self.hist += np.bincount(idx.ravel(), minlength=2 * c * nb).reshape(2, c, nb)

    def _rankings(self) -> list[dict[str, Any] | None]:
        c = len(self.class_names)
        if self.hist is not None:
            return [M.ranking_from_histograms(self.hist[0, k], self.hist[1, k]) for k in range(c)]
        if not self.scores:
            return [None] * c
        proba, y = np.concatenate(self.scores), np.concatenate(self.truth)
        if c == 2:  # the positive class only: the negative one mirrors it
            return [None, M.ranking(y == 1, proba[:, 1])]
        return [M.ranking(y == k, proba[:, k]) for k in range(c)]

    def compute(self) -> dict[str, Any]:
        names = self.class_names
        out = M.from_confusion(self.cm, names)
        out["log_loss"] = self.nll / self.n if self.n else float("nan")
        cal = M.calibration(*self.cal)
        out["ece"] = cal["ece"]
        curves: dict[str, Any] = {"roc": {}, "pr": {}, "calibration": cal}
        ranks = self._rankings()
        if len(names) == 2:
            ranks = [None, ranks[1]]
        for name, r in zip(names, ranks, strict=True):
            if r is None:
                continue
            out["per_class"][name].update(roc_auc=r["roc_auc"], pr_auc=r["pr_auc"])
            if len(curves["roc"]) < 20:
                curves["roc"][name] = {**r["roc"], "auc": r["roc_auc"]}
                curves["pr"][name] = {**r["pr"], "ap": r["pr_auc"]}
        present = [r for r in ranks if r is not None]
        if present:  # binary: the positive class; otherwise the macro one-vs-rest mean
            out["roc_auc"] = float(np.mean([r["roc_auc"] for r in present]))
            out["pr_auc"] = float(np.mean([r["pr_auc"] for r in present]))
        out["curves"] = curves
        out["class_names"] = list(names)
        out["headline"] = "accuracy"
        ci = self.extras.ci("accuracy", out["accuracy"])
        if ci:
            out["ci"] = ci
        worst = self.extras.worst(
            lambda w: _worst(w, names[int(w["true"])], names[int(w["pred"])], float(w["conf"]))
        )
        worst = [w for w in worst if w["true"] != w["predicted"]]  # errors only
        if worst:
            out["worst"] = worst
        out["count"] = self.n
        return out


class RegressionMetrics:
    """Streams (outputs, targets[, rows]) into sums for MSE, RMSE, MAE, R² and MAPE (float64),
    a bootstrap interval of RMSE, the worst errors and a uniform sample for a scatter plot."""

    def __init__(
        self, *, bootstrap: int = 0, worst: int = 0, seed: int = 0, sample: int = 0
    ) -> None:
        self.n, self.sse, self.sae, self.sy, self.syy = 0, 0.0, 0.0, 0.0, 0.0
        self.ape, self.ape_n = 0.0, 0
        self.extras = _Extras(bootstrap, worst, seed)
        self.sample_size = sample
        self.sample: torch.Tensor | None = None  # (k, 3): random key, true, predicted

    def update(
        self, outputs: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None
    ) -> None:
        pred = outputs.detach().double().reshape(-1).cpu()
        y = targets.detach().double().reshape(-1).cpu()
        err = pred - y
        self.n += len(y)
        self.sse += float((err * err).sum())
        self.sae += float(err.abs().sum())
        self.sy += float(y.sum())
        self.syy += float((y * y).sum())
        nonzero = y != 0
        self.ape += float((err[nonzero] / y[nonzero]).abs().sum())
        self.ape_n += int(nonzero.sum())
        self.extras.add_boot(err * err)
        self.extras.add_worst(err * err, rows, true=y, pred=pred)
        if self.sample_size:
            keys = torch.rand(len(y), generator=self.extras.gen, dtype=torch.float64)
            new = torch.stack([keys, y, pred], dim=1)
            if self.sample is not None:
                new = torch.cat([self.sample, new])
            keep = torch.topk(new[:, 0], min(self.sample_size, len(new)), largest=False).indices
            self.sample = new[keep]

    def compute(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        out: dict[str, Any] = M.regression_from_sums(self.n, self.sse, self.sae, self.sy, self.syy)
        if self.ape_n:
            out["mape"] = self.ape / self.ape_n
        out["headline"] = "rmse"
        ci = self.extras.ci("rmse", out["rmse"], transform=math.sqrt)
        if ci:
            out["ci"] = ci
        worst = self.extras.worst(lambda w: _worst(w, float(w["true"]), float(w["pred"]), None))
        if worst:
            out["worst"] = worst
        if self.sample is not None:
            order = torch.argsort(self.sample[:, 0])
            out["sample"] = {
                "true": self.sample[order, 1].tolist(),
                "predicted": self.sample[order, 2].tolist(),
            }
        out["count"] = self.n
        return out


class TokenMetrics:
    """Streams (logits (B, T, V), targets (B, T)) into loss per token (nats, no label
    smoothing), perplexity and next-token accuracy; targets of -100 are not counted. The
    bootstrap resamples sequences (rows), the unit examples are drawn in."""

    def __init__(self, *, bootstrap: int = 0, seed: int = 0) -> None:
        self.nll, self.correct, self.n = 0.0, 0, 0
        self.extras = _Extras(bootstrap, 0, seed)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, rows: Any = None) -> None:
        logits, targets = logits.detach(), targets.detach()
        valid = targets != -100
        if not bool(valid.any()):
            return
        flat_logits, flat_targets = logits.flatten(0, -2).float(), targets.flatten()
        nll = torch.nn.functional.cross_entropy(
            flat_logits, flat_targets, ignore_index=-100, reduction="none"
        )  # 0 where ignored
        self.nll += float(nll.sum())
        keep = flat_targets != -100
        self.correct += int((flat_logits[keep].argmax(-1) == flat_targets[keep]).sum())
        self.n += int(keep.sum())
        if self.extras.replicates:
            per_row = nll.view(targets.shape).reshape(targets.shape[0], -1).sum(1).cpu()
            self.extras.add_boot(per_row, valid.reshape(targets.shape[0], -1).sum(1).cpu())
        self.extras.seen += int(targets.shape[0])

    def compute(self) -> dict[str, Any]:
        if not self.n:
            return {"count": 0}
        loss = self.nll / self.n
        out: dict[str, Any] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": self.correct / self.n,
            "headline": "perplexity",
        }
        ci = self.extras.ci("perplexity", out["perplexity"], lambda v: math.exp(min(v, 700.0)))
        if ci:
            out["ci"] = ci
        out["count"] = self.n
        return out


def accumulator(task: str, class_names: list[str] | None, kind: str, **options: Any):
    """The accumulator of a task; `options` (bootstrap, worst, seed, memory_mb, sample) turn
    on what `danlu evaluate` adds to the plain validation metrics."""
    if task in M.TOKEN_TASKS:
        return TokenMetrics(**{k: v for k, v in options.items() if k in ("bootstrap", "seed")})
    if task == "classification":
        options.pop("sample", None)
        return ClassificationMetrics(class_names or [], kind, **options)
    options.pop("memory_mb", None)
    return RegressionMetrics(**options)


class SliceMetrics:
    """Per-group metrics of one column (fairness slices): a plain accumulator per value seen,
    then each group's numbers and the largest gaps between groups."""

    def __init__(self, column: str, task: str, class_names: list[str] | None, kind: str) -> None:
        self.column, self.task, self.names, self.kind = column, task, class_names, kind
        self.groups: dict[str, Any] = {}

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, groups: np.ndarray) -> None:
        keys = np.asarray(groups).astype(str)
        for value in np.unique(keys):
            mask = torch.from_numpy(keys == value).to(outputs.device)
            if value not in self.groups:
                self.groups[value] = accumulator(self.task, self.names, self.kind, memory_mb=8)
            self.groups[value].update(outputs[mask], targets[mask])

    def compute(self) -> dict[str, Any]:
        binary = self.task == "classification" and len(self.names or []) == 2
        groups = {}
        for value, acc in sorted(self.groups.items()):
            m = acc.compute()
            keep = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc")
            if self.task == "regression":
                keep = ("rmse", "mae", "r2")
            g: dict[str, Any] = {"count": m["count"], **{k: m[k] for k in keep if k in m}}
            if binary:  # class index 1 is the positive class
                cm = np.asarray(m["confusion_matrix"], dtype=np.float64)
                total, pos, neg = cm.sum(), cm[1].sum(), cm[0].sum()
                g["positive_rate"] = float(cm[:, 1].sum() / total) if total else None
                g["tpr"] = float(cm[1, 1] / pos) if pos else None
                g["fpr"] = float(cm[0, 1] / neg) if neg else None
            groups[value] = g
        return {"groups": groups, **M.group_gaps(groups, binary)}
