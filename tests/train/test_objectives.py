"""Losses, class weights and sampling weights against torch / scikit-learn references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from danlu.data.loader import Batch
from danlu.errors import ConfigError
from danlu.evaluate.streaming import ClassificationMetrics, RegressionMetrics
from danlu.models.mlp import MLP
from danlu.train.objectives import (
    Supervised,
    TokenObjective,
    build_objective,
    class_weights,
    make_loss,
    sample_weights,
)


@pytest.fixture
def logits_and_labels():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 4, generator=g), torch.randint(0, 4, (12,), generator=g)


def test_auto_picks_the_loss_of_the_head(logits_and_labels):
    out, y = logits_and_labels
    assert torch.allclose(make_loss("auto", "softmax")(out, y), F.cross_entropy(out, y))
    target = F.one_hot(y, 4).float()
    assert torch.allclose(
        make_loss("auto", "sigmoid")(out, y), F.binary_cross_entropy_with_logits(out, target)
    )
    pred, t = torch.randn(7, 1), torch.randn(7)
    assert torch.allclose(make_loss("auto", "linear")(pred, t), ((pred[:, 0] - t) ** 2).mean())


def test_cross_entropy_with_label_smoothing_and_class_weights(logits_and_labels):
    out, y = logits_and_labels
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    loss = make_loss("cross_entropy", "softmax", label_smoothing=0.1, class_weights=w)
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(out, y)
    assert torch.allclose(loss(out, y), ref)
    # without options: the plain mean negative log-likelihood
    manual = -torch.log_softmax(out, 1)[torch.arange(12), y].mean()
    assert torch.allclose(make_loss("cross_entropy", "softmax")(out, y), manual)


def test_bce_binary_single_logit():
    g = torch.Generator().manual_seed(1)
    out, y = torch.randn(10, 1, generator=g), torch.randint(0, 2, (10,), generator=g)
    p = torch.sigmoid(out[:, 0])
    manual = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert torch.allclose(make_loss("bce", "sigmoid")(out, y), manual, atol=1e-6)
    # class weights scale each example by the weight of its class
    w = torch.tensor([1.0, 4.0])
    weighted = -(w[y] * (y * p.log() + (1 - y) * (1 - p).log())).mean()
    assert torch.allclose(make_loss("bce", "sigmoid", class_weights=w)(out, y), weighted, atol=1e-6)


def test_bce_multi_class_one_hot_with_smoothing(logits_and_labels):
    out, y = logits_and_labels
    target = F.one_hot(y, 4).float() * 0.8 + 0.1  # smoothing 0.2 pulls targets towards 0.5
    p = torch.sigmoid(out)
    manual = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    loss = make_loss("bce", "sigmoid", label_smoothing=0.2)(out, y)
    assert torch.allclose(loss, manual, atol=1e-6)


def test_hinge_binary_uses_labels_plus_minus_one():
    out = torch.tensor([[2.0], [0.3], [-0.5], [-2.0], [0.0]])
    y = torch.tensor([1, 1, 1, 0, 0])
    # sign s = +1 for class 1, -1 for class 0; loss = mean(max(0, 1 - s * out))
    manual = torch.tensor([0.0, 0.7, 1.5, 0.0, 1.0]).mean()
    assert torch.allclose(make_loss("hinge", "sigmoid")(out, y), manual)
    w = torch.tensor([2.0, 1.0])
    weighted = torch.tensor([0.0, 0.7, 1.5, 0.0, 2.0]).mean()
    assert torch.allclose(make_loss("hinge", "sigmoid", class_weights=w)(out, y), weighted)


def test_hinge_multi_class_is_the_multi_margin_loss(logits_and_labels):
    out, y = logits_and_labels
    n, c = out.shape
    margins = (1 - out[torch.arange(n), y][:, None] + out).clamp_min(0)
    margins[torch.arange(n), y] = 0
    manual = (margins.sum(1) / c).mean()
    assert torch.allclose(make_loss("hinge", "softmax")(out, y), manual)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    weighted = (w[y] * margins.sum(1) / c).mean()
    assert torch.allclose(make_loss("hinge", "softmax", class_weights=w)(out, y), weighted)


def test_mse():
    pred, t = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.5, 2.0, 1.0])
    assert make_loss("mse", "linear")(pred, t).item() == pytest.approx((0.25 + 0 + 9) / 3)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("mse", "softmax"),
        ("mse", "sigmoid"),
        ("cross_entropy", "sigmoid"),
        ("bce", "softmax"),
        ("bce", "linear"),
        ("hinge", "linear"),
        ("cross_entropy", "linear"),
    ],
)
def test_loss_that_does_not_fit_the_head_is_a_config_error(name, kind):
    with pytest.raises(ConfigError, match=f"train.loss: {name} does not fit a {kind} output"):
        make_loss(name, kind)


def test_auto_class_weights_equal_scikit_learn_balanced():
    from sklearn.utils.class_weight import compute_class_weight

    rng = np.random.default_rng(0)
    y = rng.choice(4, size=200, p=[0.55, 0.25, 0.15, 0.05])
    ours = class_weights(torch.from_numpy(y), 4, "auto")
    ref = compute_class_weight("balanced", classes=np.arange(4), y=y)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6)
    assert ours.dtype == torch.float32


def test_class_weights_none_list_and_wrong_length():
    y = torch.tensor([0, 1, 1, 2])
    assert class_weights(y, 3, "none") is None
    assert torch.equal(class_weights(y, 3, [1.0, 2.0, 0.5]), torch.tensor([1.0, 2.0, 0.5]))
    with pytest.raises(ConfigError, match=r"train\.class_weights has 2 values but the data has 3"):
        class_weights(y, 3, [1.0, 2.0])


def test_class_weights_of_a_class_missing_from_training_stay_finite():
    w = class_weights(torch.tensor([0, 0, 1, 1]), 3, "auto")
    assert torch.isfinite(w).all()
    assert w[:2].tolist() == pytest.approx([4 / 6, 4 / 6])


def test_sample_weights_make_each_class_equally_likely():
    y = torch.tensor([0] * 8 + [1] * 3 + [2] * 1)
    w = sample_weights(y, 3)
    assert w.shape == (12,)
    per_class = torch.zeros(3).index_add_(0, y, w)
    assert torch.allclose(per_class, torch.ones(3))
    drawn = torch.multinomial(
        w, 30_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    share = torch.bincount(y[drawn], minlength=3).float() / 30_000
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.02)


def test_supervised_objective_returns_loss_outputs_and_metrics():
    torch.manual_seed(0)
    model = MLP(3, [4], num_outputs=2)
    batch = Batch(torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), torch.arange(5))
    objective = Supervised(make_loss("auto", "softmax"), "classification", "softmax", ["a", "b"])
    loss, outputs, targets = objective(model, batch)
    assert outputs.shape == (5, 2) and targets is batch.y
    assert torch.allclose(loss, F.cross_entropy(outputs, batch.y))
    assert isinstance(objective.metrics(), ClassificationMetrics)
    regression = Supervised(make_loss("auto", "linear"), "regression", "linear", None)
    assert isinstance(regression.metrics(), RegressionMetrics)


def test_token_objectives_shift_mask_and_score_the_right_positions():
    """seq2seq: the decoder reads target[:-1] and is scored on target[1:] without padding."""
    seen = {}

    class Echo(torch.nn.Module):
        def forward(self, src, tgt_in):
            seen["tgt_in"] = tgt_in
            return torch.zeros(*tgt_in.shape, 9)

    text = {"pad_id": 0, "vocab_size": 9, "special_ids": {"pad": 0, "bos": 1, "eos": 2}}
    tgt = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    batch = Batch(torch.tensor([[5, 6], [7, 0]]), tgt, torch.arange(2))
    loss, _, labels = TokenObjective("seq2seq", text)(Echo(), batch)
    assert torch.equal(seen["tgt_in"], tgt[:, :-1])
    assert labels.tolist() == [[5, 6, 2, -100], [7, 2, -100, -100]]
    assert float(loss) == pytest.approx(math.log(9))  # uniform logits over 9 tokens


def test_masked_lm_objective_predicts_only_masked_positions():
    torch.manual_seed(0)
    text = {
        "pad_id": 0,
        "vocab_size": 30,
        "special_ids": {"pad": 0, "unk": 1, "mask": 2},
    }
    ids = torch.randint(3, 30, (8, 40))
    ids[:, 30:] = 0  # padding is never chosen
    model = torch.nn.Sequential(torch.nn.Embedding(30, 30))
    loss, logits, labels = TokenObjective("masked_lm", text)(
        model, Batch(ids, ids, torch.arange(8))
    )
    chosen = labels != -100
    assert logits.shape == (8, 40, 30)
    assert int(chosen.sum()) == 8 * round(30 * 0.15)  # 15 % of each row's real tokens
    assert not chosen[:, 30:].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.isfinite(loss)


def test_build_objective_rejects_supervised_keys_on_token_objectives():
    from danlu.data.spec import DataSpec

    spec = DataSpec("language_modeling", "text", [8], text={"pad_id": 0, "special_ids": {}})
    train = {
        "objective": "auto",
        "label_smoothing": 0.0,
        "class_weights": "auto",
        "loss": "auto",
        "mlm_probability": 0.15,
    }
    with pytest.raises(ConfigError, match=r"train.class_weights and train.loss apply to"):
        build_objective(train, spec, "gpt", "softmax", None)
    with pytest.raises(ConfigError, match=r"masked_lm needs a \[MASK\] token"):
        build_objective({**train, "class_weights": "none"}, spec, "bert", "softmax", None)
