"""Learning-curve math: fit a saturating power law, project it, and say what it means.

    fit = fit_curve(sizes, means, higher_is_better=True, ceiling=1.0)
    fit.predict([2 * n])                          # the metric with twice the data
    p = project(sizes, scores, [1, 2, 4], n_now)  # values, bootstrap bands, verdict

The model is metric(n) = a - b·n^(-c) for a metric that rises with data (accuracy) and
a + b·n^(-c) for one that falls (RMSE): `a` is where the curve flattens, `b` how far below it
the curve starts, `c` how fast it closes the gap. Sizes are divided by the largest measured
size before fitting, so the parameters stay on the scale of the metric. Fewer than three sizes,
or a fit that fails, fall back to a line in log(n) (two sizes) or a constant (one).

Pure numpy/scipy: nothing here knows about data or models, so it is tested on synthetic curves.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

C_BOUNDS = (0.01, 3.0)  # exponent range: slower than n^-0.01 is flat, faster than n^-3 is a step
BAND = (10.0, 90.0)  # percentiles of the bootstrap projections: an 80 % band


@dataclass
class CurveFit:
    a: float
    b: float
    c: float
    method: str  # power_law | log_linear | constant
    higher_is_better: bool
    n_ref: float
    cov: np.ndarray | None = None

    def predict(self, n: Any) -> np.ndarray:
        x = np.asarray(n, dtype=np.float64) / self.n_ref
        if self.method == "power_law":
            s = self.a - self.b * x ** (-self.c)
        elif self.method == "log_linear":
            s = self.a + self.b * np.log(x)
        else:
            s = np.full_like(x, self.a)
        return s if self.higher_is_better else -s

    def to_dict(self) -> dict[str, Any]:
        sign = 1 if self.higher_is_better else -1
        return {
            "method": self.method,
            "formula": _formula(self.method, self.higher_is_better),
            "a": sign * self.a,  # in metric units: the plateau (power law), value at n_ref
            "b": self.b,
            "c": self.c,
            "n_ref": self.n_ref,
        }


def _formula(method: str, higher: bool) -> str:
    if method == "power_law":
        return f"a {'-' if higher else '+'} b·(n/n_ref)^(-c)"
    if method == "log_linear":
        return f"a {'+' if higher else '-'} b·ln(n/n_ref)"
    return "a"


def power_law(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * x ** (-c)


def _jacobian(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    t = x ** (-c)
    return np.stack([np.ones_like(x), -t, b * t * np.log(x)], axis=1)  # d/da, d/db, d/dc


def fit_curve(
    sizes: Any,
    values: Any,
    *,
    higher_is_better: bool = True,
    ceiling: float | None = None,
    polish: bool = True,
) -> CurveFit:
    """Fit the mean metric at each training size. `ceiling` bounds the plateau (1.0 for
    accuracy, 0.0 for RMSE: the best value the metric can take). `polish`: finish with
    scipy's curve_fit from the profile solution (and take its covariance); the bootstrap,
    which refits hundreds of times, skips it."""
    n = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    s = y if higher_is_better else -y  # a score that rises with data
    top = math.inf if ceiling is None else (ceiling if higher_is_better else -ceiling)
    n_ref = float(n.max())
    x = n / n_ref
    if len(np.unique(n)) >= 3:
        fit = _power_law(x, s, top, polish)
        if fit is not None:
            (a, b, c), cov = fit
            return CurveFit(a, b, c, "power_law", higher_is_better, n_ref, cov)
    if len(np.unique(n)) >= 2:
        slope, intercept = np.polyfit(np.log(x), s, 1)
        b = max(float(slope), 0.0)
        return CurveFit(float(intercept), b, 0.0, "log_linear", higher_is_better, n_ref)
    return CurveFit(float(s.mean()), 0.0, 0.0, "constant", higher_is_better, n_ref)


C_GRID = np.geomspace(*C_BOUNDS, 120)


def _profile(x: np.ndarray, s: np.ndarray, c: np.ndarray, lo: float, hi: float):
    """For each exponent c, the best (a, b) with lo ≤ a ≤ hi and b ≥ 0 (the model is linear
    in a and b once c is fixed: the unconstrained solution, else the best one on an edge of
    the box). Returns a, b, sse, each shaped like c."""
    t = x[None, :] ** (-c[:, None])  # (G, m)
    tm, sm = t.mean(axis=1), s.mean()
    var = np.maximum(((t - tm[:, None]) ** 2).sum(axis=1), 1e-300)
    b_free = -((t - tm[:, None]) * (s - sm)).sum(axis=1) / var
    cands = [(sm + b_free * tm, b_free)]  # unconstrained
    cands.append((np.full_like(c, min(max(sm, lo), hi)), np.zeros_like(c)))  # b = 0
    tt = (t**2).sum(axis=1)
    for edge in (lo, hi):  # a on a bound, b ≥ 0 by least squares
        if math.isfinite(edge):
            cands.append((np.full_like(c, edge), np.maximum(((edge - s) * t).sum(axis=1) / tt, 0)))
    best_a, best_b, best = np.zeros_like(c), np.zeros_like(c), np.full_like(c, np.inf)
    for a, b in cands:
        ok = (b >= 0) & (a >= lo - 1e-12) & (a <= hi + 1e-12)
        sse = ((a[:, None] - b[:, None] * t - s) ** 2).sum(axis=1)
        take = ok & (sse < best)
        best_a, best_b, best = (
            np.where(take, a, best_a),
            np.where(take, b, best_b),
            np.where(take, sse, best),
        )
    return best_a, best_b, best


def _power_law(
    x: np.ndarray, s: np.ndarray, top: float, polish: bool
) -> tuple[tuple, np.ndarray | None] | None:
    """Least squares of a - b·x^(-c) within the bounds: a profile over a grid of c refined by
    a bounded 1-D search, then (polish) scipy's curve_fit from there, kept if no worse."""
    from scipy.optimize import minimize_scalar

    lo = float(s.min())
    hi = top if math.isfinite(top) else math.inf
    hi = max(hi, lo)
    sse = _profile(x, s, C_GRID, lo, hi)[2]
    k = int(np.argmin(sse))
    left, right = C_GRID[max(k - 1, 0)], C_GRID[min(k + 1, len(C_GRID) - 1)]
    res = minimize_scalar(
        lambda c: float(_profile(x, s, np.array([c]), lo, hi)[2][0]),
        bounds=(left, right),
        method="bounded",
        options={"xatol": 1e-4},
    )
    c = float(res.x) if res.fun <= sse[k] else float(C_GRID[k])
    a1, b1, sse1 = (float(v[0]) for v in _profile(x, s, np.array([c]), lo, hi))
    if not np.isfinite(sse1):
        return None
    params, cov = (a1, b1, c), None
    if polish:
        params, cov = _curve_fit(x, s, params, sse1, lo, hi)
    return params, cov


def _curve_fit(x, s, params, sse, lo, hi) -> tuple[tuple, np.ndarray | None]:
    """scipy's bounded curve_fit from the profile solution; its covariance feeds the band when
    there is a single seed. Any failure keeps the profile solution."""
    from scipy.optimize import OptimizeWarning, curve_fit

    eps = 1e-9 * max(1.0, abs(hi) if math.isfinite(hi) else 1.0)
    upper = hi + eps if hi <= lo + eps else hi
    p0 = (min(max(params[0], lo), upper), max(params[1], 0.0), params[2])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, pcov = curve_fit(
                power_law,
                x,
                s,
                p0=p0,
                jac=_jacobian,
                maxfev=2000,
                bounds=([lo, 0.0, C_BOUNDS[0]], [upper, np.inf, C_BOUNDS[1]]),
            )
    except (RuntimeError, ValueError):
        return params, None
    if np.all(np.isfinite(popt)) and np.sum((power_law(x, *popt) - s) ** 2) <= sse * (1 + 1e-9):
        return tuple(float(v) for v in popt), pcov
    return params, pcov


# ------------------------------------------------------------------------ projection


def project(
    sizes: Any,
    scores: Any,
    factors: list[float],
    n_now: float,
    *,
    higher_is_better: bool = True,
    ceiling: float | None = None,
    min_gain: float | None = None,
    metric: str = "accuracy",
    boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the mean curve of `scores` (seeds × sizes; NaN = missing) and project it to
    factor × n_now for each factor, with an 80 % band from bootstrapping the seeds."""
    n = np.asarray(sizes, dtype=np.float64)
    m = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    means = np.nanmean(m, axis=0)
    fit = fit_curve(n, means, higher_is_better=higher_is_better, ceiling=ceiling)
    grid = np.geomspace(n.min(), max(n.max(), max(factors, default=1.0) * n_now), 40)
    targets = np.concatenate([np.array([1.0, 2.0, *factors]) * n_now, grid])
    point = fit.predict(targets)
    draws = _bootstrap(n, m, targets, higher_is_better, ceiling, boot, seed)
    if draws is None:
        draws = _parametric(fit, targets, boot, seed)
    lo, hi = (None, None) if draws is None else np.percentile(draws, BAND, axis=0)
    out = {
        "fit": fit.to_dict(),
        "sizes": n.tolist(),
        "means": means.tolist(),
        "std": np.nanstd(m, axis=0).tolist(),
        "n_now": n_now,
        "projections": [
            {
                "factor": float(f),
                "n": float(t),
                "value": float(v),
                "low": None if lo is None else float(lo[i + 2]),
                "high": None if hi is None else float(hi[i + 2]),
            }
            for i, (f, t, v) in enumerate(zip(factors, targets[2:], point[2:], strict=False))
        ],
        "curve": {  # for plots: the fit and its band on a log-spaced grid of sizes
            "n": grid.tolist(),
            "value": point[-len(grid) :].tolist(),
            "low": None if lo is None else lo[-len(grid) :].tolist(),
            "high": None if hi is None else hi[-len(grid) :].tolist(),
        },
    }
    sign = 1.0 if higher_is_better else -1.0
    gain = sign * (point[1] - point[0])
    if draws is not None:
        g = sign * (draws[:, 1] - draws[:, 0])
        band = tuple(float(v) for v in np.percentile(g, BAND))
    else:
        band = (-math.inf, math.inf)
    if min_gain is None:
        min_gain = 0.005 if higher_is_better else 0.01 * abs(float(point[0]))
    out["gain_2x"] = {"value": float(gain), "low": band[0], "high": band[1], "min_gain": min_gain}
    last = m[:, np.argmax(n)]
    last = last[np.isfinite(last)]
    noise = float(last.std() / math.sqrt(len(last))) if len(last) > 1 else 0.0
    out["gain_2x"]["noise"] = noise
    points = higher_is_better and ceiling == 1.0  # accuracy-like: speak in points
    out["verdict"] = verdict(
        float(gain), band, min_gain, fit.method, noise=noise, points=points, metric=metric
    )
    return out


def _bootstrap(n, m, targets, higher, ceiling, boot, seed) -> np.ndarray | None:
    """Projections refitted on per-size means of seed values drawn with replacement. With
    four or more sizes, half the draws also leave one size out, so that the band covers how
    much the extrapolation leans on any one point (seed noise alone made it too narrow)."""
    counts = np.sum(np.isfinite(m), axis=0)
    if m.shape[0] < 2 or counts.min() < 2:
        return None
    rng = np.random.default_rng(seed)
    out = np.empty((boot, len(targets)))
    for i in range(boot):
        keep = np.arange(len(n))
        if len(n) >= 4 and rng.random() < 0.5:
            keep = np.delete(keep, rng.integers(len(n)))
        means = []
        for j in keep:
            col = m[:, j][np.isfinite(m[:, j])]
            means.append(rng.choice(col, len(col)).mean())
        refit = fit_curve(n[keep], means, higher_is_better=higher, ceiling=ceiling, polish=False)
        out[i] = refit.predict(targets)
    return out


def _parametric(fit: CurveFit, targets: np.ndarray, boot: int, seed: int) -> np.ndarray | None:
    """One seed: sample the power law's parameters from the fit covariance."""
    if fit.method != "power_law" or fit.cov is None or not np.all(np.isfinite(fit.cov)):
        return None
    rng = np.random.default_rng(seed)
    params = rng.multivariate_normal([fit.a, fit.b, fit.c], fit.cov, size=boot, method="eigh")
    params[:, 1] = params[:, 1].clip(0)
    params[:, 2] = params[:, 2].clip(*C_BOUNDS)
    x = targets[None, :] / fit.n_ref
    s = params[:, :1] - params[:, 1:2] * x ** (-params[:, 2:3])
    return s if fit.higher_is_better else -s


# --------------------------------------------------------------------------- verdict


def verdict(
    gain: float,
    band: tuple[float, float],
    min_gain: float,
    method: str = "power_law",
    *,
    noise: float = 0.0,
    points: bool = True,
    metric: str = "accuracy",
) -> dict[str, str]:
    """rising | flat | noisy, from the 1× → 2× gain (an improvement, in metric units) and its
    80 % band; `min_gain` is the smallest gain worth collecting data for. `noise` is the
    standard error of the mean at the largest measured size.

    rising: the band clears min_gain, or the band is narrower than min_gain and the estimate
    clears it; flat: the band stays below min_gain, or it is narrow and the estimate does,
    and the noise is below min_gain; noisy: anything else (a wide band across min_gain, or
    noise larger than the gain we try to resolve). `points`: say accuracy in points."""
    lo, hi = band

    def amount(v: float) -> str:
        if not math.isfinite(v):
            return "?"
        v = 0.0 if abs(v) < 1e-9 else v
        return f"{100 * v:.1f} points" if points else f"{v:.3g}"

    if method == "constant":
        return {"code": "noisy", "text": "too noisy to tell: measure at least three fractions"}
    adds = "add" if points else f"improve {metric} by"
    precise = noise <= min_gain and hi - lo < min_gain  # a narrow band: trust the estimate
    if lo >= min_gain or (precise and gain >= min_gain):
        text = f"more data is likely to {adds} about {amount(gain)} (1× → 2×; 80 % band "
        return {"code": "rising", "text": text + f"{amount(lo)} to {amount(hi)})"}
    if noise <= min_gain and (hi < min_gain or precise):
        text = f"the curve has flattened: change the model or features (1× → 2× would {adds} "
        return {"code": "flat", "text": text + f"{amount(gain)}, at most {amount(hi)})"}
    return {
        "code": "noisy",
        "text": f"too noisy to tell: 1× → 2× would {adds} between {amount(lo)} and "
        f"{amount(hi)}; add seeds or fractions",
    }
