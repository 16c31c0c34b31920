"""The trade-off table of `danlu compress`: each variant (quantized, pruned, distilled,
shared, exported) against its parent run, in metric points, file size and speed, with one
recommendation, written as compress_report.json and a self-contained compress_report.html.

`tradeoff` is pure arithmetic on plain dicts (one per run, measured elsewhere). Δ is the
metric change in points (difference × scale), signed so that negative is worse whichever way
the metric runs. A variant is within budget when it loses at most `budget` points; the
recommendation is the one within budget with the highest batch-32 throughput (ties: the
smaller file). The page reuses the evaluation report's frame, CSS, tables and figure
conventions (evaluate/report_html.py, evaluate/plots.py):

    table = tradeoff(parent, variants, metric="accuracy", higher_is_better=True)
    write_report(table, Path("runs/x/compress"), title="x · compression")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from danlu.errors import ConfigError
from danlu.evaluate import plots
from danlu.evaluate.report_html import chips, esc, figure, fmt, is_num, note, page, table
from danlu.rundir import atomic_write_json, atomic_write_text

SMALL, LARGE = "1", "32"  # the batch sizes of the latency and throughput columns
EPS = 1e-9  # float noise allowed at the budget's edge (0.905 → 0.900 is 0.5 points)
JSON_NAME, HTML_NAME = "compress_report.json", "compress_report.html"
LEFT = "style='text-align: left'"  # text cells of a right-aligned table


# ------------------------------------------------------------------------------ the table


def tradeoff(
    parent: dict[str, Any],
    variants: list[dict[str, Any]],
    *,
    metric: str,
    higher_is_better: bool,
    budget: float = 0.5,
    scale: float = 100.0,
) -> dict[str, Any]:
    """The parent row, then each variant with delta, size_ratio, speedup_b1, speedup_b32 and
    within_budget added (the inputs are not changed); the recommended variant and why."""
    if not (is_num(budget) and budget >= 0 and is_num(scale) and scale > 0):
        raise ConfigError(
            f"compress budget must be ≥ 0 and scale > 0, got budget={budget}, scale={scale}",
            fix="use e.g. budget: 0.5 (points) and scale: 100 for a metric in [0, 1]",
        )
    names = [str(r.get("name")) for r in (parent, *variants)]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two compressed variants are named '{dup}'", fix="name each once")
    sign = 1.0 if higher_is_better else -1.0
    rows = [_row(parent, parent, sign, scale, budget, is_parent=True)]
    rows += [_row(v, parent, sign, scale, budget, is_parent=False) for v in variants]
    recommended, reason = _recommend(rows[1:], parent, metric, budget)
    return {
        "metric": metric,
        "higher_is_better": higher_is_better,
        "budget": budget,
        "scale": scale,
        "rows": rows,
        "recommended": recommended,
        "reason": reason,
    }


def _row(
    v: dict[str, Any],
    parent: dict[str, Any],
    sign: float,
    scale: float,
    budget: float,
    *,
    is_parent: bool,
) -> dict[str, Any]:
    m, m0 = v.get("metric"), parent.get("metric")
    delta = round(sign * (m - m0) * scale, 9) if is_num(m) and is_num(m0) else None
    within = None if delta is None or is_parent else bool(-delta <= budget + EPS)
    return {
        **v,
        "delta": delta,
        "size_ratio": _ratio(v.get("file_bytes"), parent.get("file_bytes")),
        "speedup_b1": _ratio(_at(parent, "latency_ms", SMALL), _at(v, "latency_ms", SMALL)),
        "speedup_b32": _ratio(_at(v, "throughput", LARGE), _at(parent, "throughput", LARGE)),
        "within_budget": within,
    }


def _at(row: dict[str, Any], key: str, batch: str) -> float | None:
    """row[key][batch] whether the batch size is written as a string (JSON) or an int."""
    values = row.get(key) or {}
    value = values.get(batch, values.get(int(batch)))
    return float(value) if is_num(value) and math.isfinite(value) else None


def _ratio(a: Any, b: Any) -> float | None:
    return float(a) / float(b) if is_num(a) and is_num(b) and b > 0 else None


def _recommend(
    rows: list[dict[str, Any]], parent: dict[str, Any], metric: str, budget: float
) -> tuple[str | None, str]:
    if not rows:
        return None, "No compressed variant was made, so there is nothing to recommend."
    if not is_num(parent.get("metric")):
        return None, (
            f"The parent run has no {metric} value, so no variant can be checked against the "
            f"budget of {budget:g} points."
        )
    ok = [r for r in rows if r["within_budget"]]
    if not ok:
        return None, _none_within(rows, metric, budget)
    best = max(ok, key=lambda r: (_at(r, "throughput", LARGE) or -math.inf, -_bytes(r)))
    return str(best["name"]), _why(best, len(ok), metric, budget)


def _bytes(row: dict[str, Any]) -> float:
    size = row.get("file_bytes")
    return float(size) if is_num(size) else math.inf


def _none_within(rows: list[dict[str, Any]], metric: str, budget: float) -> str:
    scored = [r for r in rows if r["delta"] is not None]
    if not scored:
        return f"No variant has a {metric} value to check against the budget of {budget:g} points."
    closest = max(scored, key=lambda r: r["delta"])
    return (
        f"No variant stays within {budget:g} points of the parent's {metric}; the closest is "
        f"{closest['name']} ({closest['delta']:+.2f} points)."
    )


def _why(best: dict[str, Any], n_ok: int, metric: str, budget: float) -> str:
    speed = best["speedup_b32"]
    size = best["size_ratio"]
    among = "the only variant" if n_ok == 1 else f"the fastest of {n_ok} variants"
    facts = [f"{speed:.2f}× the parent's batch-{LARGE} throughput"] if speed else []
    facts += [f"{size:.2f}× its file size"] if size else []
    slower = " (no faster than the parent: keep the parent unless size matters)"
    return (
        f"{best['name']} is {among} within {budget:g} points of the parent's {metric} "
        f"({best['delta']:+.2f} points)"
        + (f", at {' and '.join(facts)}" if facts else "")
        + (slower if speed is not None and speed <= 1 else "")
        + "."
    )


# ------------------------------------------------------------------------------- the page


def write_report(table: dict[str, Any], out_dir: Path, *, title: str) -> tuple[Path, Path]:
    """out_dir/compress_report.json (the table as is) and out_dir/compress_report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / JSON_NAME, out / HTML_NAME
    atomic_write_json(json_path, table)
    sections = [
        ("variants", "Variants", _variants_section(table)),
        ("tradeoff", "Speed against metric", _plot_section(table)),
        ("speed", "Latency and throughput", _speed_section(table)),
    ]
    atomic_write_text(html_path, page(title, _header(table, title), sections))
    return json_path, html_path


def _header(t: dict[str, Any], title: str) -> str:
    rows = t["rows"]
    parent = rows[0] if rows else {}
    way = "higher is better" if t.get("higher_is_better", True) else "lower is better"
    items = [
        ("parent", f"<code>{esc(parent.get('run') or parent.get('name', '?'))}</code>"),
        ("metric", f"{esc(t['metric'])} ({way})"),
        ("budget", f"{t['budget']:g} points (× {t['scale']:g})"),
        ("variants", fmt(len(rows) - 1)),
    ]
    best = t.get("recommended")
    pick = f"<span class='value'>{esc(best)}</span>" if best else "<span class='value'>none</span>"
    line = f"recommended{pick}<span class='ci'>{esc(t.get('reason', ''))}</span>"
    return f"<h1>{esc(title)}</h1>{chips(items)}<div class='headline'>{line}</div>"


def human_bytes(n: Any) -> str:
    """1536 → '1.5 KiB' (binary units)."""
    if not is_num(n):
        return "–"
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exp:.1f} {('KiB', 'MiB', 'GiB')[exp - 1]}"


def _x(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"<br><span class='muted'>{value:.{digits}f}×</span>"


def _variants_section(t: dict[str, Any]) -> str:
    head = ["variant", "method", "file size", "parameters", f"latency b{SMALL}<br>(ms)"]
    head += [
        f"throughput b{LARGE}<br>(samples/s)",
        esc(t["metric"]),
        "Δ points",
        "within<br>budget",
    ]
    head += ["notes"]
    body = [
        _cells(r, i == 0, r.get("name") == t.get("recommended")) for i, r in enumerate(t["rows"])
    ]
    return table(head, body, "num") + note(
        f"Δ: the change in {esc(t['metric'])} against the parent in points (difference × "
        f"{t['scale']:g}); negative is worse. Within budget: a loss of at most "
        f"{t['budget']:g} points. Sizes are the weight files of each run; under each size, "
        f"latency and throughput, the ratio to the parent's size and the speed-up over it."
    )


def _cells(r: dict[str, Any], is_parent: bool, picked: bool) -> list[str]:
    name = f"<b>{esc(r.get('name'))}</b>" if picked or is_parent else esc(r.get("name"))
    if picked:
        name += " <span class='good tag'>recommended</span>"
    delta = r.get("delta")
    cls = "" if delta is None or is_parent else "good" if delta >= 0 else "bad"
    within = {True: "<span class='good'>✓</span>", False: "<span class='bad'>✗</span>"}
    notes = "; ".join(str(n) for n in r.get("notes") or [])
    return [
        name,
        f"<div {LEFT}>{esc(r.get('method') or r.get('kind') or '')}</div>",
        human_bytes(r.get("file_bytes")) + ("" if is_parent else _x(r.get("size_ratio"))),
        fmt(r.get("parameters")),
        _ms(_at(r, "latency_ms", SMALL)) + ("" if is_parent else _x(r.get("speedup_b1"))),
        _rate(_at(r, "throughput", LARGE)) + ("" if is_parent else _x(r.get("speedup_b32"))),
        fmt(r.get("metric")),
        "parent" if is_parent else f"<span class='{cls}'>{_signed(delta)}</span>",
        "–" if is_parent else within.get(r.get("within_budget"), "–"),
        f"<div class='text' style='text-align: left; min-width: 9rem'>{esc(notes)}</div>"
        if notes
        else "",
    ]


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}" if v < 10 else f"{v:,.1f}"


def _rate(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def _signed(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


def _plot_section(t: dict[str, Any]) -> str:
    img = figure(scatter, t, alt=f"{t['metric']} against batch-{LARGE} throughput")
    if img:
        return img + note(
            f"Each point is a run: right is faster, the dashed line is the budget "
            f"({t['budget']:g} points from the parent). Green: within budget; red: over it; "
            "ringed: the recommended variant."
        )
    if not plots.available():
        return figure(scatter, t)  # the note that asks for matplotlib
    return note(f"No run has both a {esc(t['metric'])} value and a batch-{LARGE} throughput.")


def _speed_section(t: dict[str, Any]) -> str:
    sizes = sorted({int(b) for r in t["rows"] for b in (r.get("latency_ms") or {})})
    if not sizes:
        return note("No latency was measured.")
    head = ["variant"] + [f"b{b} median / p90 (ms)" for b in sizes]
    head += [f"b{b} (samples/s)" for b in sizes] + ["threads"]
    rows = [
        [esc(r.get("name"))]
        + [_lat(r, b) for b in sizes]
        + [_rate(_at(r, "throughput", str(b))) for b in sizes]
        + [fmt(r.get("threads"))]
        for r in t["rows"]
    ]
    return table(head, rows, "num") + note(
        "Measured in one process on this machine: compare the rows with each other, "
        "not with other machines. Throughput comes from the median batch time."
    )


def _lat(r: dict[str, Any], b: int) -> str:
    return f"{_ms(_at(r, 'latency_ms', str(b)))} / {_ms(_at(r, 'latency_ms_p90', str(b)))}"


def scatter(t: dict[str, Any]) -> str | None:
    """Metric (y) against batch-32 throughput (x): the parent as a star, the variants green
    (within budget) or red, each labelled; the budget as a dashed horizontal line."""
    pts = [
        (r, _at(r, "throughput", LARGE), r.get("metric"))
        for r in t["rows"]
        if _at(r, "throughput", LARGE) is not None and is_num(r.get("metric"))
    ]
    if not pts:
        return None
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    parent = t["rows"][0]
    for i, (r, x, y) in enumerate(pts):
        is_parent = r is parent
        colour = plots.BLUE if is_parent else _colour(r.get("within_budget"))
        ax.scatter(
            [x],
            [y],
            s=140 if is_parent else 50,
            marker="*" if is_parent else "o",
            color=colour,
            edgecolor="black",
            linewidth=0.6,
            zorder=3,
            label="parent" if is_parent else None,
        )
        if r.get("name") == t.get("recommended"):
            ax.scatter([x], [y], s=260, facecolor="none", edgecolor="#1b7a3a", lw=1.5, zorder=2)
        ax.annotate(
            plots.short(str(r.get("name"))),
            (x, y),
            xytext=(5, 5 if i % 2 == 0 else -11),
            textcoords="offset points",
            fontsize=8,
        )
    _budget_line(ax, t, parent)
    ax.set(xlabel=f"throughput at batch {LARGE} (samples/s)", ylabel=str(t["metric"]))
    ax.grid(alpha=0.25)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return plots.png(plt, fig)


def _colour(within: bool | None) -> str:
    return plots.GREY if within is None else "#1b7a3a" if within else plots.RED


def _budget_line(ax: Any, t: dict[str, Any], parent: dict[str, Any]) -> None:
    m0 = parent.get("metric")
    if not is_num(m0):
        return
    step = t["budget"] / t["scale"]
    edge = m0 - step if t.get("higher_is_better", True) else m0 + step
    ax.axhline(edge, ls="--", color=plots.ORANGE, lw=1, label=f"budget ({t['budget']:g} points)")
