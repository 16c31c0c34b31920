"""Optimizers (decay groups, types, hyperparameters) and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from danlu.models.mlp import MLP
from danlu.train.optim import Schedule, build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MLP(4, [8], num_outputs=3, norm="layer")


def _sgd(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=lr)


def test_weight_decay_applies_only_to_matrices():
    model = _model()
    opt = build_optimizer(model, name="adamw", lr=0.01, weight_decay=0.1)
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.body[0].weight), id(model.head.weight)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in rest["params"]) == [
        "body.0.bias",
        "body.1.bias",
        "body.1.weight",
        "head.bias",
    ]
    assert all(p.ndim < 2 for p in rest["params"])


def test_frozen_parameters_are_left_out():
    model = _model()
    model.head.weight.requires_grad_(False)
    opt = build_optimizer(model, name="sgd", lr=0.1)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.head.weight) not in ids and len(ids) == 5


def test_a_model_without_biases_has_one_group():
    model = nn.Linear(3, 2, bias=False)
    assert len(build_optimizer(model, name="adam", lr=0.1).param_groups) == 1


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_and_nesterov(nesterov):
    opt = build_optimizer(_model(), name="sgd", lr=0.05, momentum=0.9, nesterov=nesterov)
    assert type(opt) is torch.optim.SGD
    for g in opt.param_groups:
        assert g["lr"] == 0.05 and g["momentum"] == 0.9 and g["nesterov"] is nesterov


@pytest.mark.parametrize(
    ("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_adam_and_adamw(name, cls):
    opt = build_optimizer(
        _model(), name=name, lr=3e-4, weight_decay=0.01, betas=(0.8, 0.95), eps=1e-6
    )
    assert type(opt) is cls
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_adamw_decays_weights_but_not_biases():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    opt = build_optimizer(model, name="adamw", lr=0.1, weight_decay=0.5)
    model.weight.grad = torch.zeros(2, 2)
    model.bias.grad = torch.zeros(2)
    opt.step()  # zero gradients: only decoupled decay moves the weights
    assert torch.allclose(model.weight, torch.full((2, 2), 1 - 0.1 * 0.5))
    assert torch.equal(model.bias, torch.ones(2))


def _lrs(sched: Schedule, steps: list[int]) -> list[float]:
    out = []
    for s in steps:
        sched.apply(s)
        out.append(sched.lr)
    return out


def test_constant_schedule():
    sched = Schedule(_sgd(0.5), total_steps=100)
    assert sched.lr == 0.5
    assert _lrs(sched, [0, 1, 50, 100]) == [0.5] * 4


def test_linear_warmup():
    sched = Schedule(_sgd(1.0), total_steps=100, warmup_steps=4)
    assert sched.lr == pytest.approx(0.25)  # applied at construction for step 0
    assert _lrs(sched, [0, 1, 2, 3, 4, 50]) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_step_schedule_multiplies_by_gamma_every_step_size():
    sched = Schedule(_sgd(1.0), total_steps=100, name="step", step_size=10, gamma=0.5)
    got = _lrs(sched, [0, 9, 10, 19, 20, 35])
    assert got == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.125])


def test_cosine_with_floor_ends_at_the_floor():
    sched = Schedule(_sgd(2.0), total_steps=100, name="cosine", min_lr_ratio=0.1)
    floor = 0.2

    def expected(s: int) -> float:
        return floor + (2.0 - floor) * 0.5 * (1 + math.cos(math.pi * s / 100))

    steps = [0, 25, 50, 75, 100, 150]
    assert _lrs(sched, steps) == pytest.approx([expected(min(s, 100)) for s in steps])
    assert _lrs(sched, [100])[0] == pytest.approx(floor)
    assert _lrs(sched, [50])[0] == pytest.approx(1.1)


def test_cosine_after_warmup():
    sched = Schedule(_sgd(1.0), total_steps=110, name="cosine", warmup_steps=10)
    assert _lrs(sched, [0, 4, 9]) == pytest.approx([0.1, 0.5, 1.0])
    assert _lrs(sched, [60])[0] == pytest.approx(0.5)  # half-way through the cosine
    assert _lrs(sched, [110])[0] == pytest.approx(0.0, abs=1e-12)


def test_schedule_scales_every_group_from_its_own_base():
    model = _model()
    opt = build_optimizer(model, name="sgd", lr=0.4)
    opt.param_groups[1]["lr"] = 0.2
    sched = Schedule(opt, total_steps=10, name="step", step_size=5, gamma=0.5)
    sched.apply(5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.1])


def test_plateau_matches_torch_reduce_on_plateau():
    values = [1.0, 0.9, 0.95, 0.92, 0.91, 0.93, 0.8, 0.85, 0.86, 0.87, 0.88, 0.9, 0.95]
    sched = Schedule(_sgd(1.0), total_steps=100, name="plateau", factor=0.5, patience=2)
    ref_opt = _sgd(1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, mode="min", factor=0.5, patience=2, threshold=0.0
    )
    ours, theirs = [], []
    for v in values:
        if sched.observe(v):
            sched.apply(10)
        ref.step(v)
        ours.append(sched.lr)
        theirs.append(ref_opt.param_groups[0]["lr"])
    assert ours == pytest.approx(theirs)
    # lowered after the 3rd evaluation in a row without improvement (patience 2), then again
    assert ours == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125])


def test_plateau_for_a_metric_where_higher_is_better():
    sched = Schedule(
        _sgd(1.0), total_steps=10, name="plateau", factor=0.1, patience=0, lower_is_better=False
    )
    assert sched.observe(0.5) is False  # first value: the reference
    assert sched.observe(0.6) is False  # better
    assert sched.observe(0.6) is True  # not better: patience 0 lowers at once
    sched.apply(3)
    assert sched.lr == pytest.approx(0.1)
    assert sched.observe(float("nan")) is False


def test_plateau_scale_multiplies_the_warmup_and_other_schedules_ignore_observe():
    sched = Schedule(_sgd(1.0), total_steps=10, name="plateau", warmup_steps=4, patience=0)
    sched.observe(1.0)
    sched.observe(2.0)
    assert _lrs(sched, [1, 8]) == pytest.approx([0.25, 0.5])
    const = Schedule(_sgd(1.0), total_steps=10, patience=0)
    assert const.observe(1.0) is False and const.observe(2.0) is False
    assert _lrs(const, [5]) == [1.0]


def test_state_dict_round_trip():
    sched = Schedule(_sgd(1.0), total_steps=50, name="plateau", factor=0.5, patience=1)
    for v in [1.0, 1.1, 1.2, 1.3]:
        sched.observe(v)
    state = sched.state_dict()
    assert state == {"scale": 0.5, "best": 1.0, "bad": 1}
    other = Schedule(_sgd(1.0), total_steps=50, name="plateau", factor=0.5, patience=1)
    other.load_state_dict(state)
    assert _lrs(other, [7]) == _lrs(sched, [7]) == [0.5]
    # both continue identically: one more bad evaluation lowers the lr again
    assert other.observe(1.4) is sched.observe(1.4) is True
    assert other.state_dict() == sched.state_dict()
