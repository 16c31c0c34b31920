"""The figures of report.html and compare.html, each returned as a base64 PNG string.

Every function takes plain data read from a run directory (history lines, metrics.json
entries) and never a model. matplotlib is imported lazily (the `report` extra) with the Agg
backend, and every figure is closed once encoded:

    image = confusion_matrix([[5, 1], [0, 4]], ["cat", "dog"])   # "iVBORw0KGgo..."
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from danlu.evaluate.metrics import lower_is_better

MAX_CURVES = 10  # ROC/PR lines drawn: the largest classes beyond this
BLUE, ORANGE, RED, GREY = "#1f5fa8", "#d9822b", "#b00020", "#888888"


def available() -> bool:
    """Whether matplotlib (the `report` extra) is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def png(plt: Any, fig: Any) -> str:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


# ------------------------------------------------------------------------ learning curves


def learning_curves(train: list[dict], val: list[dict], max_metrics: int = 6) -> str | None:
    """Loss (train vs val), the validation metrics and the learning rate, against the step."""
    loss = [(r["step"], r["train_loss"]) for r in train if _num(r.get("train_loss"))]
    val_loss = [(r["step"], r["val_loss"]) for r in val if _num(r.get("val_loss"))]
    # scores (higher is better) share a scale; losses and errors belong with the loss panel
    names = [k for k in _keys(val) if k not in ("step", "epoch") and not lower_is_better(k)]
    names = names[:max_metrics]
    lr = [(r["step"], r["lr"]) for r in train if _num(r.get("lr"))]
    constant_lr = lr[0][1] if lr and len({v for _, v in lr}) == 1 else None
    if constant_lr is not None:  # a flat line says less than the loss panel's title
        lr = []
    panels = [p for p, keep in (("loss", loss or val_loss), ("val", names), ("lr", lr)) if keep]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.6, 3.2))
    axes = np.atleast_1d(axes)
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "loss":
            _line(ax, loss, "train", BLUE, alpha=0.9)
            _line(ax, val_loss, "val", ORANGE, marker="o")
            ax.set_title("loss" if constant_lr is None else f"loss (constant lr {constant_lr:g})")
            if val_loss:
                ax.legend(frameon=False)
        elif panel == "val":
            for name in names:
                pts = [(r["step"], r[name]) for r in val if _num(r.get(name))]
                _line(ax, pts, name.removeprefix("val_"), None, marker="o")
            ax.set_title("validation metrics")
            ax.legend(frameon=False, fontsize=7)
        else:
            _line(ax, lr, "lr", GREY)
            ax.set_title("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_xlabel("step")
        ax.grid(alpha=0.25)
    fig.tight_layout()
    return png(plt, fig)


def overlaid_curves(runs: list[tuple[str, list[dict], list[dict]]], monitor: str | None) -> str:
    """compare.html: train loss and one validation metric of every run on shared axes."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if monitor else 1, figsize=(10 if monitor else 5.5, 3.4))
    axes = np.atleast_1d(axes)
    for i, (name, train, val) in enumerate(runs):
        colour = f"C{i % 10}"
        _line(
            axes[0],
            [(r["step"], r["train_loss"]) for r in train if _num(r.get("train_loss"))],
            short(name, 30),
            colour,
        )
        if monitor:
            pts = [(r["step"], r[monitor]) for r in val if _num(r.get(monitor))]
            _line(axes[1], pts, short(name, 30), colour, marker="o")
    axes[0].set_title("train loss")
    if monitor:
        axes[1].set_title(monitor)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return png(plt, fig)


def _line(ax: Any, pts: list, label: str, colour: str | None, **kw: Any) -> None:
    if not pts:
        return
    x, y = zip(*pts, strict=True)
    if len(pts) < 3:  # a line of one point is invisible
        kw.setdefault("marker", "o")
    kw.setdefault("markersize", 3)
    ax.plot(x, y, label=label, color=colour, linewidth=1.3, **kw)


def _keys(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update({k: None for k, v in r.items() if _num(v)})
    return list(seen)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# ------------------------------------------------------------------------ classification


def confusion_matrix(cm: list[list[int]], class_names: list[str]) -> str:
    """Counts in the cells; the colour is the share of each true class (row-normalized)."""
    counts = np.asarray(cm, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    n = len(class_names)
    side = float(np.clip(0.5 * n + 2.0, 3.5, 11.0))
    size = 12 if n <= 4 else 9 if n <= 12 else 6
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                colour = "white" if share[i, j] > 0.55 else "#222"
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]:,}",
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=size,
                )
    labels = [short(c) for c in class_names]
    step = max(1, n // 40)
    ax.set_xticks(
        range(0, n, step),
        labels[::step],
        rotation=45 if n > 4 else 0,
        ha="right" if n > 4 else "center",
    )
    ax.set_yticks(range(0, n, step), labels[::step])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.spines[:].set_visible(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return png(plt, fig)


def roc_pr(curves: dict[str, Any], order: list[str]) -> str:
    """ROC and precision-recall curves side by side, one line per class in `order`."""
    roc, pr = curves.get("roc") or {}, curves.get("pr") or {}
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, name in enumerate(order):
        colour = f"C{i % 10}"
        if name in roc:
            c = roc[name]
            a.plot(
                c["fpr"],
                c["tpr"],
                color=colour,
                lw=1.3,
                label=f"{short(name)} (AUC {_f(c.get('auc'))})",
            )
        if name in pr:
            c = pr[name]
            b.plot(
                c["recall"],
                c["precision"],
                color=colour,
                lw=1.3,
                label=f"{short(name)} (AP {_f(c.get('ap'))})",
            )
    a.plot([0, 1], [0, 1], ls="--", color=GREY, lw=0.8)
    a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    b.set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in (a, b):
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=7, loc="lower right" if ax is a else "lower left")
    fig.tight_layout()
    return png(plt, fig)


def calibration(cal: dict[str, Any]) -> str:
    """Reliability diagram (accuracy against confidence per bin) over the bin counts."""
    bins = [b for b in cal.get("bins", []) if b.get("count")]
    plt = pyplot()
    fig, (a, b) = plt.subplots(
        2, 1, figsize=(5.5, 5.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    lows = np.array([x["low"] for x in bins], dtype=float)
    widths = np.array([x["high"] - x["low"] for x in bins], dtype=float)
    acc = np.array([x["accuracy"] for x in bins], dtype=float)
    conf = np.array([x["confidence"] for x in bins], dtype=float)
    a.bar(
        lows, acc, widths, align="edge", color=BLUE, alpha=0.75, edgecolor="white", label="accuracy"
    )
    a.bar(
        lows,
        np.abs(conf - acc),
        widths,
        bottom=np.minimum(acc, conf),
        align="edge",
        fill=False,
        edgecolor=RED,
        hatch="///",
        linewidth=0.6,
        label="gap to mean confidence",
    )
    a.plot([0, 1], [0, 1], ls="--", color=GREY, lw=0.8, label="perfect calibration")
    a.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    a.set_title(f"reliability (ECE {_f(cal.get('ece'))})")
    a.legend(frameon=False, fontsize=7, loc="upper left")
    b.bar(lows, [x["count"] for x in bins], widths, align="edge", color=GREY, edgecolor="white")
    b.set(xlabel="confidence", ylabel="examples")
    fig.tight_layout()
    return png(plt, fig)


def decision_surface(surface: dict[str, Any], class_names: list[str]) -> str:
    """Binary: P(last class) as a filled contour with the 0.5 boundary; more classes: the
    predicted class as coloured regions. The split's points on top, coloured by label."""
    xs, ys = np.asarray(surface["xs"], float), np.asarray(surface["ys"], float)
    proba = _grid(surface.get("proba"), xs, ys)
    predicted = _grid(surface.get("predicted"), xs, ys)
    binary = len(class_names) <= 2 and proba is not None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5))
    if binary:
        cs = ax.contourf(xs, ys, proba, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.75)
        ax.contour(xs, ys, proba, levels=[0.5], colors="#222", linewidths=1)
        fig.colorbar(cs, ax=ax, label=f"P({short(class_names[-1])})" if class_names else "P")
        colours = ["#2166ac", "#b2182b"]
    elif predicted is not None:
        k = max(len(class_names), 1)
        levels = np.arange(k + 1) - 0.5
        ax.contourf(
            xs, ys, predicted, levels=levels, colors=[f"C{i % 10}" for i in range(k)], alpha=0.3
        )
        colours = [f"C{i % 10}" for i in range(k)]
    else:
        colours = [f"C{i % 10}" for i in range(max(len(class_names), 1))]
    pts = surface.get("points") or {}
    labels = np.asarray(pts.get("label", []), dtype=int)
    x, y = np.asarray(pts.get("x", []), float), np.asarray(pts.get("y", []), float)
    markers = "os^Dv<>pPX"
    for i in np.unique(labels):
        name = class_names[i] if 0 <= i < len(class_names) else str(i)
        m = labels == i
        ax.scatter(
            x[m],
            y[m],
            s=70 if len(x) <= 50 else 24 if len(x) <= 500 else 8,
            color=colours[i % len(colours)],
            marker=markers[i % len(markers)],
            edgecolor="black",
            linewidth=0.8 if len(x) <= 500 else 0.3,
            label=short(name),
            zorder=3,
        )
    feats = surface.get("features") or ["x", "y"]
    ax.set(xlabel=feats[0], ylabel=feats[1] if len(feats) > 1 else "")
    if len(labels):
        ax.legend(
            loc="lower left",
            bbox_to_anchor=(0, 1.01),
            ncol=min(len(np.unique(labels)), 5),
            frameon=False,
            fontsize=8,
            title="label",
            alignment="left",
        )
    fig.tight_layout()
    return png(plt, fig)


def _grid(values: Any, xs: np.ndarray, ys: np.ndarray) -> np.ndarray | None:
    """A grid as (len(ys), len(xs)), rows along y (transposed when given the other way)."""
    if values is None:
        return None
    z = np.asarray(values, dtype=float)
    if z.shape == (len(ys), len(xs)):
        return z
    if z.shape == (len(xs), len(ys)):
        return z.T
    return None


# ---------------------------------------------------------------------------- regression


def regression(true: list[float], predicted: list[float]) -> str:
    """Predicted against true with the y = x line, and the histogram of residuals."""
    t, p = np.asarray(true, float), np.asarray(predicted, float)
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.scatter(t, p, s=10 if len(t) > 300 else 18, alpha=0.6, color=BLUE, edgecolor="none")
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    a.plot([lo, hi], [lo, hi], ls="--", color=RED, lw=1, label="y = x")
    a.set(xlabel="true", ylabel="predicted", title=f"predicted vs true ({len(t):,} examples)")
    a.legend(frameon=False)
    residuals = p - t
    b.hist(residuals, bins=min(50, max(5, len(t) // 10)), color=GREY, edgecolor="white")
    b.axvline(0, color=RED, lw=1)
    b.set(xlabel="residual (predicted − true)", ylabel="examples", title="residuals")
    for ax in (a, b):
        ax.grid(alpha=0.25)
    fig.tight_layout()
    return png(plt, fig)


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"
