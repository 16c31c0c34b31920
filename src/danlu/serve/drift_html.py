"""drift.html: a drift report as one self-contained page (inline CSS and PNG figures, no script).

    write_html(report.to_dict(), Path("logs/monitor/drift.html"), title="fashion")

A status banner, the table of checks, then reference-vs-live histograms of the most drifted
features, the predicted class mix and the confidence trend. The page frame, tables and
escaping come from danlu.evaluate.report_html, the figures use danlu.evaluate.plots; every
text from the report (feature and class names, categories, tokens) is escaped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from danlu.evaluate import plots
from danlu.evaluate.report_html import chips, esc, figure, note, page, table
from danlu.rundir import atomic_write_text

COLOURS = {"ok": "#1b7a3a", "warn": "#b26a00", "drift": "#b00020", "not enough": "#555555"}
LEVEL = {"drift": 2, "warn": 1, "ok": 0}
MAX_FEATURES = 6  # feature histograms drawn
MAX_BARS = 20  # bins or categories in one histogram


def write_html(report: dict[str, Any], path: Path, title: str) -> Path:
    atomic_write_text(path, render(report, title))
    return path


def render(report: dict[str, Any], title: str) -> str:
    """The page of a DriftReport.to_dict()."""
    status = report["status"]
    banner = (
        f"<div style='border-left:6px solid {COLOURS.get(status, '#555')};padding:0.6rem 1rem;"
        f"background:#f6f6f6;margin:0.6rem 0'><b style='color:{COLOURS.get(status, '#555')};"
        f"text-transform:uppercase'>{esc(status)}</b> · {esc(report['message'])}</div>"
    )
    window = report.get("window") or ["–", "–"]
    badges = [
        ("live samples", esc(report["live"])),
        ("training examples", esc(report["reference"])),
        ("window", f"{esc(window[0])} → {esc(window[1])}"),
    ]
    if report.get("since"):
        badges.append(("drifting since", esc(report["since"])))
    header = f"<h1>Drift: {esc(title)}</h1>{chips(badges)}{banner}"
    sections = [("checks", "Checks", _checks(report["checks"]) or note(report["message"]))]
    features = _top_features(report["checks"])
    if features:
        body = figure(bars, features, alt="reference and live histograms")
        sections.append(("features", "Reference vs live", body, "most drifted first"))
    outputs = _outputs(report["checks"])
    if outputs:
        sections.append(("outputs", "Predictions", outputs))
    return page(f"{title} drift", header, sections)


def _checks(checks: list[dict[str, Any]]) -> str:
    if not checks:
        return ""
    rows = []
    for c in sorted(checks, key=lambda c: -LEVEL[c["status"]]):
        colour = COLOURS[c["status"]]
        rows.append(
            [
                f"<code>{esc(c['name'])}</code>",
                f"{c['value']:.4g}",
                esc(c["threshold"]),
                f"<b style='color:{colour}'>{esc(c['status'])}</b>",
                esc(c.get("detail") or ""),
            ]
        )
    return table(["check", "value", "threshold", "status", "detail"], rows)


def _top_features(checks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(title, plot) of the input checks with histograms, the most drifted first."""
    drawn = [
        c
        for c in checks
        if c.get("plot") and "labels" in c["plot"] and not c["name"].endswith("class_mix")
    ]
    drawn.sort(key=lambda c: (-LEVEL[c["status"]], -c["value"]))
    return [(f"{c['name']} = {c['value']:.3g}", c["plot"]) for c in drawn[:MAX_FEATURES]]


def _outputs(checks: list[dict[str, Any]]) -> str:
    found = {c["name"]: c for c in checks}
    parts = []
    if "psi:class_mix" in found:
        c = found["psi:class_mix"]
        parts.append(figure(bars, [(f"class mix, PSI {c['value']:.3g}", c["plot"])], alt="mix"))
    if "confidence_trend" in found:
        c = found["confidence_trend"]
        parts.append(figure(trend, c["plot"]["trend"], alt="confidence across the window"))
    return "".join(parts)


# -------------------------------------------------------------------------------- figures


def bars(panels: list[tuple[str, dict[str, Any]]]) -> str:
    """One panel per (title, {"labels", "reference", "live"}): the shares side by side."""
    plt = plots.pyplot()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    for ax, (title, plot) in zip(axes.ravel(), panels, strict=False):
        labels = [plots.short(str(x), 14) for x in plot["labels"]][:MAX_BARS]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, plot["reference"][:MAX_BARS], 0.4, label="training", color=plots.BLUE)
        ax.bar(x + 0.2, plot["live"][:MAX_BARS], 0.4, label="live", color=plots.ORANGE)
        ax.set_xticks(x, labels, rotation=45 if len(labels) > 3 else 0, ha="right", fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("share")
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return plots.png(plt, fig)


def trend(means: list[float]) -> str:
    """The mean confidence of consecutive equal-count chunks of the window."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3))
    ax.plot(range(1, len(means) + 1), means, marker="o", color=plots.BLUE)
    ax.set_xlabel("chunk of the window (oldest first)")
    ax.set_ylabel("mean confidence")
    ax.set_title("confidence across the window")
    ax.grid(alpha=0.25)
    fig.tight_layout()
    return plots.png(plt, fig)
