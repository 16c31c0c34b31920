"""The sufficiency estimate: curve fit, projections, verdicts, nested fractions, end to end."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from danlu.config import MLPConfig, TrainConfig
from danlu.data import build
from danlu.tune.curve import fit_curve, project, verdict
from danlu.tune.sufficiency import estimate, learning_curve, nested_subsets

SIZES = np.array([250, 500, 1000, 2000, 4000, 8000])


def accuracy_curve(n, a=0.92, b=3.0, c=0.5):
    return a - b * np.asarray(n, dtype=float) ** (-c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_parameters_from_noisy_curves(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = accuracy_curve(SIZES) + rng.normal(0, 0.001, len(SIZES))
    fit = fit_curve(SIZES, y, ceiling=1.0)
    assert fit.method == "power_law"
    assert fit.a == pytest.approx(0.92, abs=0.01)
    assert fit.c == pytest.approx(0.5, abs=0.1)
    assert fit.b * fit.n_ref**fit.c == pytest.approx(3.0, rel=0.3)  # b in raw-n units
    assert fit.predict([16000])[0] == pytest.approx(accuracy_curve(16000), abs=0.003)


def test_fit_of_a_falling_metric() -> None:
    rng = np.random.default_rng(3)
    rmse = 2.0 + 5.0 * SIZES**-0.4 + rng.normal(0, 0.002, len(SIZES))
    fit = fit_curve(SIZES, rmse, higher_is_better=False, ceiling=0.0)
    assert fit.method == "power_law" and fit.to_dict()["a"] == pytest.approx(2.0, abs=0.05)
    assert fit.c == pytest.approx(0.4, abs=0.1)
    assert fit.predict([16000])[0] == pytest.approx(2.0 + 5.0 * 16000**-0.4, abs=0.01)


def test_fallbacks_for_few_points() -> None:
    two = fit_curve([100, 200], [0.8, 0.85])
    assert two.method == "log_linear"
    assert two.predict([400])[0] == pytest.approx(0.9)
    one = fit_curve([100], [0.8])
    assert one.method == "constant" and one.predict([1000])[0] == 0.8
    same = fit_curve([100, 200, 400], [0.8, 0.8, 0.8], ceiling=1.0)  # a flat line still fits
    assert same.predict([800])[0] == pytest.approx(0.8, abs=1e-6)


def scores(values: np.ndarray, noise: float, seeds: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return values[None, :] + rng.normal(0, noise, (seeds, len(values)))


def test_verdict_of_a_rising_curve() -> None:
    n = SIZES[:4]
    p = project(n, scores(accuracy_curve(n), 0.001), [1, 2, 4], 2000, ceiling=1.0)
    assert p["verdict"]["code"] == "rising"
    assert "more data is likely to add about" in p["verdict"]["text"]
    true_gain = accuracy_curve(4000) - accuracy_curve(2000)
    assert p["gain_2x"]["value"] == pytest.approx(true_gain, abs=0.004)
    assert [q["factor"] for q in p["projections"]] == [1, 2, 4]
    for q in p["projections"]:
        assert q["low"] <= q["value"] <= q["high"]


def test_verdict_of_a_flat_curve() -> None:
    n = SIZES[:4]
    p = project(n, scores(np.full(4, 0.85), 0.001), [1, 2], 2000, ceiling=1.0)
    assert p["verdict"]["code"] == "flat"
    assert p["verdict"]["text"].startswith("the curve has flattened: change the model or features")


def test_verdict_of_a_noisy_curve() -> None:
    n = SIZES[:4]
    p = project(n, scores(accuracy_curve(n), 0.03, seed=1), [1, 2], 2000, ceiling=1.0)
    assert p["verdict"]["code"] == "noisy"
    assert p["verdict"]["text"].startswith("too noisy to tell")


def test_verdict_rules() -> None:
    assert verdict(0.02, (0.01, 0.03), 0.005)["code"] == "rising"
    assert verdict(0.001, (0.0, 0.003), 0.005)["code"] == "flat"
    assert verdict(0.006, (0.004, 0.007), 0.005)["code"] == "rising"  # narrow band: trust it
    assert verdict(0.004, (0.0, 0.02), 0.005)["code"] == "noisy"
    assert verdict(0.001, (0.0, 0.003), 0.005, noise=0.01)["code"] == "noisy"
    rmse = verdict(0.2, (0.1, 0.3), 0.05, points=False, metric="rmse")
    assert rmse["text"].startswith("more data is likely to improve rmse by about 0.2")


# ------------------------------------------------------------------------- fractions


def test_nested_subsets_are_nested_and_stratified() -> None:
    y = np.array([0] * 600 + [1] * 300 + [2] * 100)
    subsets = nested_subsets(y, len(y), [0.1, 0.2, 0.4, 0.8, 1.0], seed=0)
    assert [len(s) for s in subsets] == [100, 200, 400, 800, 1000]
    for small, large in itertools.pairwise(subsets):
        assert set(small) <= set(large)
    for s in subsets:
        share = np.bincount(y[s], minlength=3) / len(s)
        assert share == pytest.approx([0.6, 0.3, 0.1], abs=0.011)
    again = nested_subsets(y, len(y), [0.1], seed=0)[0]
    other = nested_subsets(y, len(y), [0.1], seed=1)[0]
    assert np.array_equal(again, subsets[0]) and not np.array_equal(other, subsets[0])
    plain = nested_subsets(None, 50, [0.2, 0.5], seed=0)  # regression: no labels
    assert set(plain[0]) <= set(plain[1]) and len(plain[1]) == 25


def test_learning_curve_calls_the_scorer_on_nested_subsets() -> None:
    seen: list[tuple[int, int]] = []

    def score(rows: np.ndarray, seed: int) -> float:
        seen.append((len(rows), seed))
        return len(rows) / 100

    sizes, s = learning_curve(100, None, [0.5, 0.1], 2, score, seed=7)
    assert sizes == [10, 50]
    assert seen == [(10, 7), (50, 7), (10, 8), (50, 8)]
    assert s.tolist() == [[0.1, 0.5], [0.1, 0.5]]


# ------------------------------------------------------------------------ end to end


def test_estimate_with_the_baseline_on_a_tiny_dataset(blobs_csv: Path) -> None:
    bundle = build(dataset=str(blobs_csv), label="kind", seed=0)
    r = estimate(bundle, fractions=[0.2, 0.4, 0.6, 0.8], seeds=2, project_to=[1, 2])
    assert r["model"] == "baseline" and r["metric"] == "accuracy" and r["split"] == "val"
    n = len(bundle.splits["train"])
    assert r["sizes"] == [round(f * n) for f in (0.2, 0.4, 0.6, 0.8)]
    assert np.array(r["scores"]).shape == (2, 4)
    assert min(min(row) for row in r["scores"]) > 0.8  # separable blobs
    assert [p["n"] for p in r["projections"]] == [n, 2 * n]
    assert r["verdict"]["code"] in ("rising", "flat", "noisy")
    assert len(r["curve"]["n"]) == len(r["curve"]["value"]) == 40


def test_estimate_with_the_configured_model_and_regression(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    y = 3 * x[:, 0] - x[:, 1] + rng.normal(0, 0.1, 200)
    path = tmp_path / "line.csv"
    path.write_text("a,b,y\n" + "\n".join(f"{p},{q},{t}" for (p, q), t in zip(x, y, strict=True)))
    bundle = build(dataset=str(path), label="y", task="regression", seed=0)
    train = TrainConfig(
        epochs=1, batch_size=16, precision="fp32", optimizer={"name": "adam", "lr": 0.2}
    ).model_dump()
    r = estimate(
        bundle,
        fractions=[0.25, 0.5, 1.0],
        seeds=1,
        model="configured",
        max_steps=60,
        model_config=MLPConfig(type="mlp", hidden_sizes=[]).model_dump(),
        train_config=train,
    )
    assert r["metric"] == "rmse"
    assert np.isfinite(r["scores"]).all()
    assert max(r["means"]) < 0.5 * np.std(y)  # far better than predicting the mean
    assert r["fit"]["formula"] == "a + b·(n/n_ref)^(-c)" or r["fit"]["method"] != "power_law"
