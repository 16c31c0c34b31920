"""Metrics equal scikit-learn's on the same predictions; streaming equals one shot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from danlu.evaluate.metrics import (
    from_confusion,
    headline,
    lower_is_better,
    metric_names,
    probabilities,
    regression_from_sums,
    scalars,
)
from danlu.evaluate.streaming import ClassificationMetrics, RegressionMetrics, accumulator

NAMES = ["a", "b", "c", "d", "e"]


def _labels(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """5 classes: 'c' (2) is never predicted, 'd' (3) never true, 'e' (4) absent from both."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 1, 2, 2], size=200)
    y_pred = rng.choice([0, 1, 3], size=200)
    agree = rng.random(200) < 0.5
    y_pred = np.where(agree & (y_true != 2), y_true, y_pred)
    return y_true, y_pred


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, c: int = 5) -> np.ndarray:
    return skm.confusion_matrix(y_true, y_pred, labels=list(range(c)))


def test_from_confusion_equals_scikit_learn():
    y_true, y_pred = _labels()
    assert 2 not in y_pred and 3 not in y_true and 4 not in y_true and 4 not in y_pred
    m = from_confusion(_confusion(y_true, y_pred), NAMES)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y_true, y_pred, average=avg, zero_division=0
        )
        assert m[f"precision_{avg}"] == pytest.approx(p)
        assert m[f"recall_{avg}"] == pytest.approx(r)
        assert m[f"f1_{avg}"] == pytest.approx(f)
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(5)), average=None, zero_division=0
    )
    for i, name in enumerate(NAMES):
        pc = m["per_class"][name]
        assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert pc["support"] == s[i]
    assert m["per_class"]["c"]["precision"] == 0.0  # never predicted
    assert m["per_class"]["d"]["recall"] == 0.0 and m["per_class"]["d"]["support"] == 0
    assert m["confusion_matrix"] == _confusion(y_true, y_pred).tolist()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_from_confusion_equals_scikit_learn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    m = from_confusion(_confusion(y_true, y_pred, 4), NAMES[:4])
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted"))
    assert m["recall_macro"] == pytest.approx(skm.recall_score(y_true, y_pred, average="macro"))


def test_from_confusion_of_nothing():
    m = from_confusion(np.zeros((3, 3), np.int64), ["x", "y", "z"])
    assert m["accuracy"] == 0.0 and m["f1_macro"] == 0.0 and m["f1_weighted"] == 0.0


def _outputs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


def test_classification_streamed_equals_one_shot():
    out, y = _outputs(103, 4, 0)
    streamed = ClassificationMetrics(NAMES[:4])
    for lo in range(0, 103, 16):
        streamed.update(out[lo : lo + 16], y[lo : lo + 16])
    once = ClassificationMetrics(NAMES[:4])
    once.update(out, y)
    a, b = streamed.compute(), once.compute()
    assert a.pop("log_loss") == pytest.approx(b.pop("log_loss"), rel=1e-6)
    assert a == b
    assert a["count"] == 103
    pred = out.argmax(1).numpy()
    assert a["accuracy"] == pytest.approx(skm.accuracy_score(y.numpy(), pred))
    assert a["f1_macro"] == pytest.approx(skm.f1_score(y.numpy(), pred, average="macro"))


def test_softmax_log_loss_equals_scikit_learn():
    out, y = _outputs(60, 3, 1)
    acc = ClassificationMetrics(NAMES[:3])
    acc.update(out, y)
    proba = torch.softmax(out, 1).numpy()
    ref = skm.log_loss(y.numpy(), proba, labels=[0, 1, 2])
    m = acc.compute()
    assert m["log_loss"] == pytest.approx(ref, rel=1e-5)
    ovr = skm.roc_auc_score(y.numpy(), proba, multi_class="ovr", average="macro")
    assert m["roc_auc"] == pytest.approx(ovr)


def test_binary_roc_auc_and_log_loss_equal_scikit_learn():
    out, y = _outputs(80, 2, 2)
    acc = ClassificationMetrics(["neg", "pos"])
    acc.update(out[:30], y[:30])
    acc.update(out[30:], y[30:])
    m = acc.compute()
    proba = torch.softmax(out, 1)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y.numpy(), proba[:, 1].numpy()))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y.numpy(), proba.numpy()), rel=1e-5)


def test_sigmoid_single_logit():
    g = torch.Generator().manual_seed(3)
    logit, y = torch.randn(40, 1, generator=g), torch.randint(0, 2, (40,), generator=g)
    p = probabilities(logit, "sigmoid")
    assert p.shape == (40, 2)
    assert torch.allclose(p[:, 1], torch.sigmoid(logit[:, 0]))
    assert torch.allclose(p.sum(1), torch.ones(40))
    acc = ClassificationMetrics(["no", "yes"], kind="sigmoid")
    acc.update(logit, y)
    m = acc.compute()
    pred = (logit[:, 0] > 0).long().numpy()
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y.numpy(), pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y.numpy(), logit[:, 0].numpy()))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y.numpy(), p[:, 1].numpy()), rel=1e-5)


def test_sigmoid_one_logit_per_class_is_not_normalised():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    assert torch.allclose(probabilities(logits, "sigmoid"), torch.sigmoid(logits))
    assert torch.allclose(probabilities(logits, "softmax"), torch.softmax(logits, 1))


def test_roc_auc_with_one_class_is_none():
    acc = ClassificationMetrics(["n", "p"])
    acc.update(torch.randn(4, 2), torch.ones(4, dtype=torch.long))
    assert "roc_auc" not in acc.compute()


def test_confident_wrong_predictions_give_a_finite_log_loss():
    acc = ClassificationMetrics(["a", "b"])
    acc.update(torch.tensor([[200.0, -200.0]]), torch.tensor([1]))
    assert math.isfinite(acc.compute()["log_loss"])


def test_regression_equals_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.normal(10, 3, 97)
    pred = y + rng.normal(0, 1, 97)
    streamed = RegressionMetrics()
    for lo in range(0, 97, 20):
        streamed.update(
            torch.from_numpy(pred[lo : lo + 20, None]).float(),
            torch.from_numpy(y[lo : lo + 20]).float(),
        )
    m = streamed.compute()
    y32, p32 = y.astype(np.float32).astype(np.float64), pred.astype(np.float32).astype(np.float64)
    assert m["count"] == 97
    assert m["mse"] == pytest.approx(skm.mean_squared_error(y32, p32), rel=1e-9)
    assert m["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y32, p32)), rel=1e-9)
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y32, p32), rel=1e-9)
    assert m["r2"] == pytest.approx(skm.r2_score(y32, p32), rel=1e-9)


def test_regression_edge_cases():
    assert RegressionMetrics().compute() == {"count": 0}
    constant = regression_from_sums(3, sse=3.0, sae=3.0, sy=6.0, syy=12.0)  # y = 2, 2, 2
    assert constant["r2"] == 0.0 and constant["mse"] == 1.0


@pytest.mark.parametrize(
    ("metric", "lower"),
    [
        ("val_loss", True),
        ("train_loss", True),
        ("test_rmse", True),
        ("mse", True),
        ("val_mae", True),
        ("val_log_loss", True),
        ("val_accuracy", False),
        ("val_f1_macro", False),
        ("val_r2", False),
        ("val_roc_auc", False),
        ("precision_weighted", False),
        ("fpr", True),
        ("tpr", False),
    ],
)
def test_lower_is_better(metric, lower):
    assert lower_is_better(metric) is lower


def test_metric_names_match_what_the_accumulators_report():
    assert metric_names("regression", None) == ["mse", "rmse", "mae", "r2", "mape"]
    three = metric_names("classification", 3)
    assert {"accuracy", "f1_macro", "f1_micro", "log_loss", "ece", "roc_auc", "pr_auc"} <= set(
        three
    )
    assert metric_names("classification", 2) == three

    out, y = _outputs(30, 2, 4)
    acc = accumulator("classification", ["a", "b"], "softmax")
    acc.update(out, y)
    assert sorted(scalars(acc.compute())) == sorted(metric_names("classification", 2))
    out, y = _outputs(30, 3, 5)
    acc = accumulator("classification", ["a", "b", "c"], "softmax")
    acc.update(out, y)
    assert sorted(scalars(acc.compute())) == sorted(three)
    reg = accumulator("regression", None, "linear")
    reg.update(torch.randn(5, 1), torch.randn(5))
    assert sorted(scalars(reg.compute())) == sorted(metric_names("regression", None))
    assert headline("classification") == "accuracy" and headline("regression") == "rmse"
