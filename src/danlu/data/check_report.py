"""data_check.html: one self-contained page (figures embedded as base64 PNG, no network).

It shows the findings table, class balance per split, the text length histogram with the
max_length line, the learning curve with its band and projections, and label-noise
candidates. Everything comes from the data card (with its `check` and `sufficiency`
sections), so the page can be rebuilt from data_card.json alone:

    html = render(card)
"""

from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any

log = logging.getLogger("danlu")

LEVEL_COLOURS = {"blocker": "#b00020", "warning": "#b26a00", "info": "#1f5fa8"}
MAX_CLASSES_PLOTTED = 40

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35rem 0.5rem; text-align: left; vertical-align: top; }
.level { font-weight: 600; text-transform: uppercase; font-size: 0.8rem; }
.verdict { font-size: 1.1rem; padding: 0.6rem 0.8rem; background: #f3f5f8; border-left: 4px solid #1f5fa8; }
img { max-width: 100%; }
.muted { color: #777; }
"""


def render(card: dict[str, Any]) -> str:
    e = html.escape
    check = card.get("check", {})
    suff = card.get("sufficiency")
    sizes = ", ".join(f"{k} {v:,}" for k, v in card.get("sizes", {}).items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>data check: {e(str(card.get('dataset')))}</title><style>{CSS}</style></head><body>",
        f"<h1>Data check: {e(str(card.get('dataset')))}</h1>",
        f"<p>{e(str(card.get('task')))} · {e(str(card.get('input')))} · {e(sizes)} · "
        f"test split: {e(str(card.get('test_split')))}</p>",
    ]
    if suff:
        parts.append(f"<p class='verdict'>{e(suff['verdict']['text'])}</p>")
    parts += _findings(card.get("findings", []))
    figures = _figures(card, check, suff)
    parts += [f for key, f in figures if key != "curve"]
    if suff:
        parts += _projections(suff, [f for key, f in figures if key == "curve"])
    parts += _noise_rows(check.get("label_noise"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _findings(findings: list[dict[str, str]]) -> list[str]:
    e = html.escape
    if not findings:
        return ["<h2>Findings</h2><p>No findings: nothing looks wrong.</p>"]
    rows = [
        f"<tr><td class='level' style='color:{LEVEL_COLOURS.get(f['level'], '#222')}'>"
        f"{e(f['level'])}</td><td>{e(f['message'])}</td><td>{e(f['action'])}</td></tr>"
        for f in findings
    ]
    head = "<tr><th>level</th><th>finding</th><th>action</th></tr>"
    return ["<h2>Findings</h2>", f"<table>{head}{''.join(rows)}</table>"]


def _projections(suff: dict[str, Any], figure: list[str]) -> list[str]:
    metric = suff["metric"]
    rows = [
        f"<tr><td>{f:g}</td><td>{n:,.0f}</td><td>{m:.4f} ± {s:.4f}</td></tr>"
        for f, n, m, s in zip(
            suff["fractions"], suff["sizes"], suff["means"], suff["std"], strict=True
        )
    ]
    proj = [
        f"<tr><td>{p['factor']:g}× ({p['n']:,.0f})</td><td>{p['value']:.4f}</td><td>"
        + ("–" if p["low"] is None else f"{p['low']:.4f} – {p['high']:.4f}")
        + "</td></tr>"
        for p in suff["projections"]
    ]
    return [
        f"<h2>Learning curve ({html.escape(suff['model'])}, {metric} on {suff['split']})</h2>",
        *figure,
        "<table><tr><th>fraction</th><th>training examples</th>"
        f"<th>{metric} (mean ± std over {suff['seeds']} seeds)</th></tr>{''.join(rows)}</table>",
        f"<p>fit: {html.escape(suff['fit']['formula'])} ({suff['fit']['method']})</p>",
        "<table><tr><th>projected at</th><th>value</th><th>80 % band</th></tr>"
        f"{''.join(proj)}</table>",
    ]


def _noise_rows(noise: dict[str, Any] | None) -> list[str]:
    if not noise or not noise.get("rows"):
        return []
    e = html.escape
    rows = [
        f"<tr><td>{e(r['where'])}</td><td>{e(r['label'])}</td><td>{e(r['suggested'])}</td>"
        f"<td>{r['p_label']:.3f}</td><td>{r['p_suggested']:.3f}</td></tr>"
        for r in noise["rows"][:50]
    ]
    return [
        f"<h2>Label-noise candidates ({noise['candidates']} of {noise['checked']} checked"
        f"{', first 50' if len(noise['rows']) > 50 else ''})</h2>",
        "<table><tr><th>example</th><th>label</th><th>baseline says</th><th>p(label)</th>"
        f"<th>p(suggested)</th></tr>{''.join(rows)}</table>",
    ]


# ---------------------------------------------------------------------------- figures


def _figures(card: dict[str, Any], check: dict[str, Any], suff: dict[str, Any] | None) -> list:
    """(section, html) pairs; without matplotlib, one note instead of the figures."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("data_check.html without figures: pip install 'danlu[report]' (matplotlib)")
        return [
            ("note", "<p class='muted'>Figures need matplotlib: pip install 'danlu[report]'.</p>")
        ]
    out = []
    balance = card.get("class_balance")
    if balance:
        out += [("balance", "<h2>Class balance per split</h2>")]
        out += [("balance", _img(plt, _balance_figure(plt, balance)))]
    lengths = check.get("text_lengths", {}).get("train")
    if lengths and lengths.get("count"):
        out += [("lengths", "<h2>Text lengths (training split)</h2>")]
        out += [("lengths", _img(plt, _length_figure(plt, lengths)))]
    if suff:
        out += [("curve", _img(plt, _curve_figure(plt, suff)))]
    return out


def _img(plt: Any, fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='figure' src='data:image/png;base64,{data}'>"


def _balance_figure(plt: Any, balance: dict[str, dict[str, int]]) -> Any:
    import numpy as np

    splits = [s for s in ("train", "val", "test") if sum(balance.get(s, {}).values())]
    names = list(balance["train"])
    if len(names) > MAX_CLASSES_PLOTTED:  # the largest training classes
        names = sorted(names, key=lambda n: -balance["train"][n])[:MAX_CLASSES_PLOTTED]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) * len(splits) ** 0.5), 3.6))
    width = 0.8 / len(splits)
    x = np.arange(len(names))
    for i, s in enumerate(splits):
        total = sum(balance[s].values())
        share = [100 * balance[s].get(n, 0) / total for n in names]
        ax.bar(x + (i - (len(splits) - 1) / 2) * width, share, width, label=f"{s} ({total:,})")
    ax.set_xticks(
        x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center"
    )
    ax.set_ylabel("% of split")
    ax.legend(frameon=False)
    ax.set_title("class shares (equal bars = same balance in every split)")
    return fig


def _length_figure(plt: Any, lengths: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    edges, counts = lengths["histogram"]["edges"], lengths["histogram"]["counts"]
    ax.stairs(counts, edges, fill=True, alpha=0.6)
    if lengths.get("max_length"):
        share = lengths.get("truncated_share", 0.0)
        ax.axvline(lengths["max_length"], color="#b00020", linestyle="--")
        ax.text(
            lengths["max_length"],
            max(counts) * 0.9,
            f" max_length {lengths['max_length']}\n truncates {share:.1%}",
            color="#b00020",
        )
    ax.set_xlabel(f"length ({lengths['unit']})")
    ax.set_ylabel("texts")
    return fig


def _curve_figure(plt: Any, suff: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = suff["sizes"]
    for row in suff["scores"]:
        ax.scatter(sizes, row, color="#999", s=12, zorder=2)
    ax.plot(sizes, suff["means"], "o-", color="#1f5fa8", label="measured (mean)", zorder=3)
    curve = suff["curve"]
    ax.plot(curve["n"], curve["value"], "--", color="#b26a00", label="fit")
    if curve["low"] is not None:
        ax.fill_between(
            curve["n"], curve["low"], curve["high"], color="#b26a00", alpha=0.15, label="80 % band"
        )
    for p in suff["projections"]:
        err = None
        if p["low"] is not None:
            err = [[max(p["value"] - p["low"], 0)], [max(p["high"] - p["value"], 0)]]
        ax.errorbar([p["n"]], [p["value"]], yerr=err, fmt="s", color="#b00020", capsize=4)
        ax.annotate(
            f"{p['factor']:g}×", (p["n"], p["value"]), textcoords="offset points", xytext=(4, 6)
        )
    ax.axvline(suff["n_now"], color="#777", linewidth=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training examples")
    ax.set_ylabel(f"{suff['metric']} on {suff['split']}")
    ax.legend(frameon=False)
    return fig
