"""The metrics `danlu evaluate` adds: each equals scikit-learn / sacreBLEU / rouge-score or a
hand-computed value on tiny inputs, and streaming under a memory cap equals in-memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from sklearn import metrics as skm

from danlu.errors import ConfigError
from danlu.evaluate.metrics import (
    calibration,
    check_metrics,
    generation_metrics,
    group_gaps,
    ranking,
    ranking_from_histograms,
)
from danlu.evaluate.streaming import (
    ClassificationMetrics,
    RegressionMetrics,
    SliceMetrics,
    TokenMetrics,
)


def _outputs(n: int, c: int, seed: int, signal: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    out = torch.randn(n, c, generator=g) * 1.5
    out[torch.arange(n), y] += signal  # better than chance, so the curves mean something
    return out, y


def _stream(acc, out, y, size=64):
    for lo in range(0, len(y), size):
        acc.update(out[lo : lo + size], y[lo : lo + size])
    return acc.compute()


def test_micro_averages_equal_scikit_learn():
    out, y = _outputs(300, 4, 0)
    m = _stream(ClassificationMetrics(list("abcd")), out, y)
    pred = out.argmax(1).numpy()
    for name in ("precision", "recall", "f1"):
        ref = getattr(skm, f"{name}_score" if name != "f1" else "f1_score")(
            y.numpy(), pred, average="micro"
        )
        assert m[f"{name}_micro"] == pytest.approx(ref)


def test_multiclass_roc_and_pr_auc_equal_scikit_learn_one_vs_rest():
    out, y = _outputs(400, 3, 1)
    m = _stream(ClassificationMetrics(list("abc")), out, y)
    proba = torch.softmax(out, 1).numpy()
    assert m["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y.numpy(), proba, multi_class="ovr", average="macro")
    )
    onehot = np.eye(3)[y.numpy()]
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(onehot, proba, average="macro"))
    for k, name in enumerate("abc"):
        assert m["per_class"][name]["roc_auc"] == pytest.approx(
            skm.roc_auc_score(y.numpy() == k, proba[:, k])
        )
    roc = m["curves"]["roc"]["b"]
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0 and len(roc["fpr"]) <= 200
    assert roc["auc"] == m["per_class"]["b"]["roc_auc"]


def test_binary_pr_auc_is_average_precision_of_the_positive_class():
    out, y = _outputs(250, 2, 2, signal=1.0)
    m = _stream(ClassificationMetrics(["neg", "pos"]), out, y)
    p = torch.softmax(out, 1)[:, 1].numpy()
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y.numpy(), p))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y.numpy(), p))
    assert list(m["curves"]["roc"]) == ["pos"]  # one curve: the positive class


def test_expected_calibration_error_by_hand():
    # confidences 0.95 (bin 14) and 0.9 (bin 13) right; 0.6 and 0.62 (bin 9) one right
    conf = np.zeros(15)
    correct = np.zeros(15)
    count = np.zeros(15)
    for c, ok in [(0.95, 1), (0.9, 1), (0.6, 1), (0.62, 0)]:
        b = min(int(c * 15), 14)
        conf[b] += c
        correct[b] += ok
        count[b] += 1
    cal = calibration(conf, correct, count)
    # bins: {0.95}: |1-0.95|; {0.9}: |1-0.9|; {0.6, 0.62}: |0.5-0.61|, weight 2
    expected = (0.05 + 0.1 + 2 * 0.11) / 4
    assert cal["ece"] == pytest.approx(expected)
    assert sum(b["count"] for b in cal["bins"]) == 4


def test_accumulated_ece_matches_a_direct_computation():
    out, y = _outputs(500, 5, 3)
    m = _stream(ClassificationMetrics(list("abcde")), out, y)
    proba = torch.softmax(out, 1)
    conf, pred = proba.max(1)
    bins = (conf * 15).long().clamp(max=14)
    ece = 0.0
    for b in range(15):
        sel = bins == b
        if sel.any():
            ece += sel.float().mean() * abs((pred[sel] == y[sel]).float().mean() - conf[sel].mean())
    assert m["ece"] == pytest.approx(float(ece), abs=1e-6)


def test_streaming_under_a_memory_cap_equals_in_memory():
    """A set far larger than the cap (stored scores would take ~1.9 MB; the cap is 64 KB) gives
    the same numbers as the in-memory computation: exact for everything counted, AUCs within
    1e-3 (histogram ties)."""
    out, y = _outputs(40_000, 6, 4)
    capped = ClassificationMetrics(list("abcdef"), memory_mb=0.0625)
    full = ClassificationMetrics(list("abcdef"), memory_mb=1024)
    a, b = _stream(capped, out, y, 512), _stream(full, out, y, 512)
    assert capped.hist is not None and not capped.scores  # folded into histograms
    assert full.hist is None
    for key in ("accuracy", "f1_macro", "f1_weighted", "precision_micro", "confusion_matrix"):
        assert a[key] == b[key]
    assert a["log_loss"] == pytest.approx(b["log_loss"], rel=1e-9)
    assert a["ece"] == pytest.approx(b["ece"], rel=1e-9)
    assert a["roc_auc"] == pytest.approx(b["roc_auc"], abs=1e-3)
    assert a["pr_auc"] == pytest.approx(b["pr_auc"], abs=1e-3)
    for name in "abcdef":
        assert a["per_class"][name]["roc_auc"] == pytest.approx(
            b["per_class"][name]["roc_auc"], abs=1e-3
        )


def test_histogram_ranking_equals_scikit_learn_on_binned_scores():
    rng = np.random.default_rng(5)
    bins = rng.integers(0, 50, 300)
    truth = rng.random(300) < (bins / 60)
    pos = np.bincount(bins[truth], minlength=50)
    neg = np.bincount(bins[~truth], minlength=50)
    r = ranking_from_histograms(pos, neg)
    ref = ranking(truth, bins.astype(float))
    assert r["roc_auc"] == pytest.approx(ref["roc_auc"])
    assert r["pr_auc"] == pytest.approx(ref["pr_auc"])
    assert ranking_from_histograms(pos, np.zeros(50)) is None


def test_bootstrap_interval_covers_the_value_with_binomial_width():
    out, y = _outputs(2_000, 3, 6, signal=1.0)
    m = _stream(ClassificationMetrics(list("abc"), bootstrap=300, seed=1), out, y, 256)
    ci = m["ci"]
    assert ci["metric"] == "accuracy" and ci["replicates"] == 300 and ci["level"] == 0.95
    assert ci["low"] < m["accuracy"] < ci["high"]
    p = m["accuracy"]
    binomial = 2 * 1.96 * math.sqrt(p * (1 - p) / 2_000)
    assert ci["high"] - ci["low"] == pytest.approx(binomial, rel=0.25)
    again = _stream(ClassificationMetrics(list("abc"), bootstrap=300, seed=1), out, y, 256)
    assert again["ci"] == ci  # seeded


def test_worst_errors_are_the_highest_losses_with_their_positions():
    out, y = _outputs(300, 4, 7)
    m = _stream(ClassificationMetrics(list("abcd"), worst=5), out, y, 32)
    loss = -torch.log_softmax(out, 1)[torch.arange(300), y]
    top = torch.topk(loss, 5).indices.tolist()
    assert [w["position"] for w in m["worst"]] == top
    first = m["worst"][0]
    assert first["true"] == "abcd"[int(y[top[0]])]
    assert first["predicted"] == "abcd"[int(out[top[0]].argmax())]
    assert first["loss"] == pytest.approx(float(loss[top[0]]), rel=1e-5)


def test_regression_mape_ci_worst_and_sample():
    rng = np.random.default_rng(8)
    y = rng.uniform(1, 10, 500)
    pred = y + rng.normal(0, 0.5, 500)
    acc = RegressionMetrics(bootstrap=200, worst=3, sample=100, seed=0)
    for lo in range(0, 500, 64):
        acc.update(torch.from_numpy(pred[lo : lo + 64]), torch.from_numpy(y[lo : lo + 64]))
    m = acc.compute()
    assert m["mape"] == pytest.approx(skm.mean_absolute_percentage_error(y, pred))
    assert m["ci"]["metric"] == "rmse" and m["ci"]["low"] < m["rmse"] < m["ci"]["high"]
    err = (pred - y) ** 2
    assert [w["position"] for w in m["worst"]] == list(np.argsort(-err)[:3])
    assert len(m["sample"]["true"]) == 100
    idx = [int(np.flatnonzero(y == t)[0]) for t in m["sample"]["true"]]
    assert m["sample"]["predicted"] == pytest.approx(pred[idx].tolist())


def test_regression_mape_skips_zero_targets():
    acc = RegressionMetrics()
    acc.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 4.0, 2.0]))
    assert acc.compute()["mape"] == pytest.approx((0.5 + 0.5) / 2)


def test_token_metrics_bootstrap_of_perplexity():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(64, 12, 30, generator=g)
    targets = torch.randint(0, 30, (64, 12), generator=g)
    targets[:, -3:] = -100
    acc = TokenMetrics(bootstrap=100)
    acc.update(logits[:32], targets[:32])
    acc.update(logits[32:], targets[32:])
    m = acc.compute()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert m["loss"] == pytest.approx(float(ref), rel=1e-5)
    assert m["ci"]["low"] < m["perplexity"] < m["ci"]["high"]


def test_generation_metrics_equal_the_libraries():
    hyps = ["the cat sat on the mat", "a dog  barks", "Hello world"]
    refs = ["the cat sat on a mat", "a dog barks", "hello world"]
    m = generation_metrics(hyps, refs)
    norm = [" ".join(h.split()) for h in hyps]
    assert m["exact_match"] == pytest.approx(1 / 3)  # whitespace-normalised, case kept
    assert generation_metrics(hyps, refs, casefold=True)["exact_match"] == pytest.approx(2 / 3)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(norm, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(norm, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(r, h) for h, r in zip(norm, refs, strict=True)]
    for key, name in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rouge_l")):
        assert m[name] == pytest.approx(np.mean([s[key].fmeasure for s in scores]))
    # by hand: "the cat sat on the mat" vs "the cat sat on a mat": 5 of 6 unigrams shared
    assert scores[0]["rouge1"].fmeasure == pytest.approx(5 / 6)


def test_slices_report_groups_gaps_and_fairness_differences():
    # group a: y=[1,1,0,0] pred=[1,0,1,0]; group b: y=[1,0,0,0] pred=[1,1,1,0]
    y = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0])
    pred = torch.tensor([1, 0, 1, 0, 1, 1, 1, 0])
    logits = torch.nn.functional.one_hot(pred, 2).float() * 4
    groups = np.array(list("aaaabbbb"))
    s = SliceMetrics("group", "classification", ["no", "yes"], "softmax")
    s.update(logits[:5], y[:5], groups[:5])
    s.update(logits[5:], y[5:], groups[5:])
    m = s.compute()
    a, b = m["groups"]["a"], m["groups"]["b"]
    assert (a["count"], b["count"]) == (4, 4)
    assert a["accuracy"] == 0.5 and b["accuracy"] == 0.5
    assert (a["positive_rate"], b["positive_rate"]) == (0.5, 0.75)
    assert (a["tpr"], a["fpr"]) == (0.5, 0.5) and (b["tpr"], b["fpr"]) == (1.0, 2 / 3)
    assert m["demographic_parity_difference"] == pytest.approx(0.25)
    assert m["equalized_odds_difference"] == pytest.approx(0.5)  # max(|0.5-1|, |0.5-2/3|)
    assert m["gaps"]["accuracy"] == 0.0


def test_group_gaps_of_one_group_are_empty():
    assert group_gaps({"x": {"accuracy": 0.9, "count": 3}}, binary=False) == {"gaps": {}}


def test_metrics_that_do_not_fit_the_task_are_one_clear_error():
    check_metrics(["accuracy", "roc_auc"], "classification", 3)
    check_metrics(["bleu", "perplexity"], "seq2seq")
    with pytest.raises(ConfigError, match=r"'bleu' scores generated text.*classification run"):
        check_metrics(["accuracy", "bleu"], "classification", 3)
    with pytest.raises(ConfigError, match="'rmse' is not a classification metric"):
        check_metrics(["rmse"], "classification", 2)
    with pytest.raises(ConfigError, match="'acuracy' is not a metric danlu knows") as e:
        check_metrics(["acuracy"], "classification", 2)
    assert "accuracy, precision_macro" in str(e.value)
    with pytest.raises(ConfigError, match=r"'rouge_l'.*language_modeling"):
        check_metrics(["rouge_l"], "language_modeling")
