"""The checks of drift monitoring: statistics over training and live summaries.

Pure functions of arrays and summaries (danlu.serve.requestlog), so each can be tested on
hand-computed numbers. A check compares one quantity and returns its value, the rule it was
judged by and a status: ok | warn | drift.

    psi([50, 50], [25, 75])              # 0.2747: Σ (a − e) · ln(a / e), shares floored at 1e-4
    js_divergence([1, 1, 0], [0, 1, 1])  # 0.5 (base 2)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

EPS = 1e-4  # PSI: the smallest share of a bin
LEVELS = {"ok": 0, "warn": 1, "drift": 2}


@dataclass(frozen=True)
class Thresholds:
    psi_warn: float = 0.1
    psi_drift: float = 0.25
    p_value: float = 0.01  # KS and chi-square: drift when p < this ...
    effect: float = 0.1  # ... and the KS statistic D (chi-square: total variation) > this
    js_warn: float = 0.05  # vocabulary: JS divergence above what sampling alone gives
    js_drift: float = 0.1
    unk_warn: float = 0.02  # rise of the unknown-token rate
    unk_drift: float = 0.05
    confidence_warn: float = 0.05  # fall of the mean confidence
    confidence_drift: float = 0.15
    size_warn: float = 0.05  # share of images of another size than training's
    size_drift: float = 0.5
    min_samples: int = 100


@dataclass
class Check:
    name: str  # "psi:a", "ks:text.chars", "psi:class_mix", "vocab_js", ...
    value: float
    threshold: str
    status: str  # ok | warn | drift
    detail: str = ""
    p: float | None = None
    plot: dict[str, Any] | None = None  # {"labels", "reference", "live"} shares, or a trend


def features(
    summaries: Iterable[dict], profile: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Input summaries → numeric values (NaN when missing) and category texts per feature."""
    summaries = list(summaries)
    if profile["input"] == "text":
        keys = {"text.chars": "chars", "text.tokens": "tokens"}
    elif profile["input"] == "image":
        keys = {"pixel.mean": "mean", "pixel.std": "std"}
    else:
        numeric = [k for k, kind in profile["columns"].items() if kind == "numeric"]
        values = [s.get("values", {}) for s in summaries]
        num = {k: np.array([_number(v.get(k)) for v in values]) for k in numeric}
        cat = {
            k: [_category(v[k]) for v in values if v.get(k) is not None]
            for k, kind in profile["columns"].items()
            if kind != "numeric"
        }
        return num, cat
    return {k: np.array([_number(s.get(f)) for s in summaries]) for k, f in keys.items()}, {}


def _number(v: Any) -> float:
    try:
        return float(v) if v is not None and not isinstance(v, bool) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _category(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def numeric_checks(name: str, ref: dict, values: np.ndarray, th: Thresholds) -> list[Check]:
    """PSI on quantile bins of the reference, and the two-sample KS test."""
    from scipy.stats import ks_2samp

    values, sample = values[np.isfinite(values)], np.asarray(ref["sample"], dtype=float)
    if len(values) < 2 or len(sample) < 2:
        return []
    bins = int(np.clip(min(len(values), len(sample)) // 25, 2, 10))  # ~25 values per bin
    edges = quantile_edges(sample, bins)
    expected, actual = bin_counts(sample, edges), bin_counts(values, edges)
    value = psi(expected, actual)
    labels = _bin_labels(edges)
    plot = {"labels": labels, "reference": _shares(expected).tolist(),
            "live": _shares(actual).tolist()}  # fmt: skip
    ks = ks_2samp(sample, values)
    d, p = float(ks.statistic), float(ks.pvalue)
    moved = f"mean {_g(ref['mean'])} → {_g(values.mean())}"
    return [
        Check(f"psi:{name}", value, _psi_rule(th), level(value, th.psi_warn, th.psi_drift),
              moved, plot=plot),
        Check(f"ks:{name}", d, f"drift: p < {th.p_value:g} and D > {th.effect:g}",
              "drift" if p < th.p_value and d > th.effect else "ok", f"p = {p:.2g}", p=p),
    ]  # fmt: skip


def category_check(name: str, counts: dict[str, int], values: list[str], th: Thresholds) -> Check:
    """PSI over the reference's categories plus one bucket for categories it never saw."""
    cats = list(counts)
    seen = Counter(values)
    unseen = {k: v for k, v in seen.items() if k not in counts}
    expected = np.array([counts[c] for c in cats] + [0], dtype=float)
    actual = np.array([seen.get(c, 0) for c in cats] + [sum(unseen.values())], dtype=float)
    value = psi(expected, actual) if actual.sum() else 0.0
    top = sorted(unseen.items(), key=lambda kv: -kv[1])[:5]
    detail = ("unseen: " + ", ".join(f"{k!r} ×{v}" for k, v in top)) if top else ""
    plot = {"labels": [*cats, "(unseen)"], "reference": _shares(expected).tolist(),
            "live": _shares(actual).tolist()}  # fmt: skip
    return Check(name, value, _psi_rule(th), level(value, th.psi_warn, th.psi_drift), detail,
                 plot=plot)  # fmt: skip


def text_checks(
    ref: dict[str, Any],
    summaries: list[dict],
    th: Thresholds,
    names: Callable[[int], str] | None = None,
) -> list[Check]:
    """The unknown-token rate (when the tokenizer has an unknown token) and the vocabulary."""
    out = []
    if ref["unk_rate"] is not None:
        live = float(np.mean([s.get("unk", 0.0) for s in summaries]))
        rise = live - ref["unk_rate"]
        out.append(Check("unk_rate_shift", rise, f"warn ≥ {th.unk_warn:g}, drift ≥ "
                         f"{th.unk_drift:g}", level(rise, th.unk_warn, th.unk_drift),
                         f"unknown tokens {ref['unk_rate']:.1%} → {live:.1%}"))  # fmt: skip
    vocab = vocab_check(ref["token_counts"], [s.get("ids") or [] for s in summaries], th, names)
    return out + ([vocab] if vocab else [])


def vocab_check(
    counts: dict[str, int],
    bags: list[list[int]],
    th: Thresholds,
    names: Callable[[int], str] | None = None,
) -> Check | None:
    """JS divergence of token frequencies, judged by its excess over the mean divergence of
    20 multinomial samples of the training frequencies of the live size."""
    ids = sorted({int(k) for k in counts} | {i for bag in bags for i in bag})
    live = Counter(i for bag in bags for i in bag)
    p = np.array([counts.get(str(i), 0) for i in ids], dtype=float)
    q = np.array([live.get(i, 0) for i in ids], dtype=float)
    if not p.sum() or not q.sum():
        return None
    js = js_divergence(p, q)
    rng = np.random.default_rng(0)
    noise = float(np.mean([js_divergence(p, rng.multinomial(int(q.sum()), p / p.sum()))
                           for _ in range(20)]))  # fmt: skip
    ps, qs = p / p.sum(), q / q.sum()
    grew = qs > ps
    gain = np.zeros_like(qs)
    gain[grew] = qs[grew] * np.log2(qs[grew] / np.maximum(ps[grew], 1e-6))
    top = [i for i in np.argsort(-gain)[:8] if gain[i] > 0]  # the tokens that grew most
    name = names or str
    detail = f"sampling alone gives ≈ {noise:.3f}; more frequent live: " + ", ".join(
        f"{name(ids[i])!r} {qs[i]:.1%} (training {ps[i]:.1%})" for i in top[:5]
    )
    plot = {"labels": [name(ids[i]) for i in top], "reference": ps[top].tolist(),
            "live": qs[top].tolist()}  # fmt: skip
    rule = f"JS beyond sampling noise: warn ≥ {th.js_warn:g}, drift ≥ {th.js_drift:g}"
    status = level(max(js - noise, 0.0), th.js_warn, th.js_drift)
    return Check("vocab_js", js, rule, status, detail, plot=plot)


def size_check(ref: dict[str, int], summaries: list[dict], th: Thresholds) -> Check:
    shape = (ref["height"], ref["width"])
    other = [s for s in summaries if (s.get("height"), s.get("width")) != shape]
    share = len(other) / len(summaries)
    sizes = Counter(f"{s.get('height')}×{s.get('width')}" for s in other).most_common(3)
    detail = f"training {shape[0]}×{shape[1]}" + (
        "; live " + ", ".join(f"{k} ×{v}" for k, v in sizes) if sizes else ""
    )
    rule = f"warn ≥ {th.size_warn:g}, drift ≥ {th.size_drift:g}"
    return Check("size_mismatch", share, rule, level(share, th.size_warn, th.size_drift), detail)


def output_checks(reference: dict[str, Any], outputs: list[dict], th: Thresholds) -> list[Check]:
    ref = reference["outputs"]
    if "targets" in ref:
        values = np.array([_number(o.get("prediction")) for o in outputs])
        return numeric_checks("prediction", ref["targets"], values, th)
    labels = [str(o["label"]) for o in outputs if "label" in o]
    if not labels:
        return []
    out = [
        category_check(
            "psi:class_mix", dict(zip(ref["classes"], ref["counts"], strict=True)), labels, th
        )
    ]
    out.append(_chi_square(ref, labels, th))
    confidences = np.array([_number(o.get("confidence")) for o in outputs if "label" in o])
    return out + confidence_checks(reference.get("confidence"), confidences, th)


def _chi_square(ref: dict[str, Any], labels: list[str], th: Thresholds) -> Check:
    from scipy.stats import chisquare

    seen = Counter(labels)
    observed = np.array([seen.get(c, 0) for c in ref["classes"]], dtype=float)
    expected = np.asarray(ref["counts"], dtype=float)
    expected = expected / expected.sum() * observed.sum()
    keep = expected > 0
    p = float(chisquare(observed[keep], expected[keep]).pvalue) if observed.sum() else 1.0
    tvd = 0.5 * float(np.abs(_shares(observed) - _shares(expected)).sum()) if observed.sum() else 0
    status = "drift" if p < th.p_value and tvd > th.effect else "ok"
    rule = f"drift: p < {th.p_value:g} and total variation > {th.effect:g}"
    return Check("chi2:class_mix", tvd, rule, status, f"p = {p:.2g}", p=p)


def confidence_checks(ref: dict | None, values: np.ndarray, th: Thresholds) -> list[Check]:
    values = values[np.isfinite(values)]
    if len(values) < 8:
        return []
    rule = f"fall: warn ≥ {th.confidence_warn:g}, drift ≥ {th.confidence_drift:g}"
    out = []
    if ref:
        drop = ref["mean"] - float(values.mean())
        out.append(Check("confidence_drop", drop, rule,
                         level(drop, th.confidence_warn, th.confidence_drift),
                         f"{ref['split']} {ref['mean']:.3f} → live {values.mean():.3f}"))  # fmt: skip
    parts = np.array_split(values, min(10, len(values) // 4))
    means = [float(p.mean()) for p in parts]
    quarter = max(len(values) // 4, 1)
    fall = float(values[:quarter].mean() - values[-quarter:].mean())
    plot = {"trend": means}
    out.append(Check("confidence_trend", fall, rule,
                     level(fall, th.confidence_warn, th.confidence_drift),
                     f"first quarter {values[:quarter].mean():.3f} → last "
                     f"{values[-quarter:].mean():.3f}", plot=plot))  # fmt: skip
    return out


# ------------------------------------------------------------------------ statistics


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = EPS) -> float:
    """Population stability index of two histograms (counts or shares over the same bins):
    Σ (a − e) · ln(a / e), each share floored at `eps`."""
    e = np.maximum(_shares(np.asarray(expected, dtype=float)), eps)
    a = np.maximum(_shares(np.asarray(actual, dtype=float)), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def quantile_edges(sample: np.ndarray, bins: int) -> np.ndarray:
    """The inner edges of `bins` equal-count bins of the reference (ties merge bins)."""
    return np.unique(np.quantile(sample, np.linspace(0, 1, bins + 1)[1:-1]))


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: (-inf, e1], (e1, e2], ..., (ek, inf)."""
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two count or share vectors."""
    p, q = _shares(np.asarray(p, dtype=float)), _shares(np.asarray(q, dtype=float))
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def level(value: float, warn: float, drift: float) -> str:
    return "drift" if value >= drift else "warn" if value >= warn else "ok"


def worst(checks: list[Check]) -> str:
    return max((c.status for c in checks), key=LEVELS.__getitem__, default="ok")


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def _psi_rule(th: Thresholds) -> str:
    return f"warn ≥ {th.psi_warn:g}, drift ≥ {th.psi_drift:g}"


def _bin_labels(edges: np.ndarray) -> list[str]:
    if not len(edges):
        return ["all"]
    inner = [f"{_g(a)}–{_g(b)}" for a, b in pairwise(edges)]
    return [f"≤ {_g(edges[0])}", *inner, f"> {_g(edges[-1])}"]


def _g(v: float) -> str:
    return f"{v:.3g}"
