"""An explanation as one self-contained HTML page: inline CSS, images as base64 PNG, every
text escaped. Green marks what speaks for the target (or the generated token), red what
speaks against it; the stronger the colour, the larger the score (relative to the largest).

    html = render(result)                  # result: what danlu.api_explain.explain returns
    html = render(result, pixels=pixels)   # images: (C, H, W) uint8, shown next to the map
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

import numpy as np

GREEN, RED, BLUE = (22, 150, 60), (214, 40, 40), (40, 90, 200)
IMAGE_SIDE = 256  # small images are enlarged (nearest neighbour) to about this many pixels
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em} .muted{color:#666}
table.facts td{padding:2px 12px 2px 0} .warning{background:#fff4d6;border:1px solid #e0b030;
padding:8px 12px;border-radius:4px} .tokens{font-family:ui-monospace,monospace;line-height:2;
white-space:pre-wrap;font-size:1.05em} .tok{padding:2px 1px;border-radius:3px}
table.bars td{padding:3px 8px} .bar{height:14px;display:inline-block;border-radius:2px}
table.heat{border-collapse:collapse;font-family:ui-monospace,monospace;font-size:11px}
table.heat td{width:18px;height:18px;border:1px solid #eee;padding:0}
table.heat th{font-weight:normal;padding:0 4px;white-space:pre} table.heat thead th{
writing-mode:vertical-rl;transform:rotate(180deg);text-align:left} figure{display:inline-block;
margin:0 24px 12px 0} figcaption{text-align:center;color:#666} img{image-rendering:pixelated}
"""


def render(result: dict[str, Any], pixels: np.ndarray | None = None) -> str:
    """The page for one explanation."""
    parts = [_header(result)]
    if result.get("warning"):
        parts.append(f'<p class="warning">{escape(result["warning"])}</p>')
    kind = result["kind"]
    if result["method"] == "attention":
        parts.append(_attention(result))
    elif kind == "table":
        parts.append(_bars(result["features"]))
    elif kind == "image":
        parts.append(_image(result["map"], pixels))
    elif kind == "generation":
        parts.append(_generation(result))
    else:
        parts.append("<h2>Tokens</h2>" + _highlight(result["tokens"], result["scores"]))
    title = f"danlu explain · {result['method']} · {result['input']}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}'
        f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def _header(r: dict[str, Any]) -> str:
    facts = [("run", r["run"]), ("input", r["input"]), ("model", f"{r['model']} ({r['task']})")]
    facts.append(("method", r["method"].replace("_", " ")))
    p = r.get("prediction") or {}
    if "label" in p:
        facts.append(("prediction", f"{p['label']} (probability {p['probability']:.4f})"))
    elif "value" in p:
        facts.append(("prediction", f"{p['value']:.6g}"))
    if r.get("target"):
        facts.append(("explained", f"probability of {r['target']['label']}"))
    if "convergence_delta" in r:
        facts.append(
            ("convergence delta", f"{r['convergence_delta']:+.3g} ({r['relative_delta']:.1%} of "
             f"the output's change, {r['n_steps']} steps)")
        )  # fmt: skip
    rows = "".join(
        f'<tr><td class="muted">{escape(k)}</td><td>{escape(v)}</td></tr>' for k, v in facts
    )
    return f'<h1>Explanation</h1><table class="facts">{rows}</table>'


def colour(value: float, peak: float, positive=GREEN, negative=RED) -> str:
    """A CSS background for a score: hue by sign, opacity by |value| / peak."""
    strength = min(abs(value) / peak, 1.0) if peak > 0 else 0.0
    r, g, b = positive if value >= 0 else negative
    return f"rgba({r},{g},{b},{0.85 * strength:.3f})"


def _peak(values: Any) -> float:
    arr = np.abs(np.asarray(values, dtype=float))
    return float(arr.max()) if arr.size else 0.0


def _highlight(tokens: list[str], scores: list[float], peak: float | None = None) -> str:
    """Tokens as coloured spans (their score on hover); newlines shown as ↵."""
    peak = _peak(scores) if peak is None else peak
    spans = "".join(
        f'<span class="tok" style="background:{colour(s, peak)}" title="{s:+.4g}">'
        f"{escape(t.replace(chr(10), '↵' + chr(10)))}</span>"
        for t, s in zip(tokens, scores, strict=True)
    )
    return f'<div class="tokens">{spans}</div>'


def _bars(features: list[dict[str, Any]]) -> str:
    """Table columns ranked by |score|, each with its value and a bar."""
    peak = _peak([f["score"] for f in features])
    rows = []
    for f in sorted(features, key=lambda f: -abs(f["score"])):
        width = 240 * abs(f["score"]) / peak if peak else 0
        c = colour(f["score"], peak if f["score"] else 1.0)
        rows.append(
            f"<tr><td>{escape(str(f['name']))}</td><td class='muted'>{escape(str(f.get('value', '')))}"
            f"</td><td>{f['score']:+.4g}</td><td><span class='bar' style='width:{width:.0f}px;"
            f"background:{c}'></span></td></tr>"
        )
    head = "<tr><th>column</th><th>value</th><th>score</th><th></th></tr>"
    return f"<h2>Columns</h2><table class='bars'>{head}{''.join(rows)}</table>"


# ---------------------------------------------------------------------------- images


def png(rgb: np.ndarray) -> str:
    """(H, W, 3) uint8 → a data: URI of a PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay(pixels: np.ndarray, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) uint8 and an (H, W) map → the image and the map over a grey copy of it, both
    (H', W', 3), enlarged."""
    rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
    rgb = rgb.transpose(1, 2, 0).astype(float)  # (H, W, 3)
    grey = rgb.mean(-1, keepdims=True).repeat(3, -1)
    peak = _peak(heat)
    alpha = (np.abs(heat) / peak if peak else np.zeros_like(heat))[..., None] * 0.75
    hue = np.where(heat[..., None] >= 0, np.array(GREEN), np.array(RED))
    mixed = grey * (1 - alpha) + hue * alpha
    scale = max(1, IMAGE_SIDE // max(heat.shape))
    big = [np.kron(a, np.ones((scale, scale, 1))) for a in (rgb, mixed)]
    return big[0], big[1]


def _image(heat: list[list[float]], pixels: np.ndarray | None) -> str:
    heat_arr = np.asarray(heat, dtype=float)
    if pixels is None:
        pixels = np.full((1, *heat_arr.shape), 255, dtype=np.uint8)
    image, mixed = overlay(pixels, heat_arr)
    figures = "".join(
        f'<figure><img src="{png(a)}" alt="{escape(name)}"><figcaption>{escape(name)}'
        "</figcaption></figure>"
        for a, name in ((image, "input"), (mixed, "attribution (green: for, red: against)"))
    )
    return f"<h2>Image</h2>{figures}"


# ------------------------------------------------------------------ matrices of tokens


def heatmap(rows: list[str], columns: list[str], matrix: Any, signed: bool) -> str:
    """A (rows × columns) matrix as a table of coloured cells, labels escaped."""
    peak = _peak(matrix)
    head = "".join(f"<th>{escape(_label(c))}</th>" for c in columns)
    body = []
    for label, values in zip(rows, matrix, strict=True):
        cells = "".join(
            f'<td style="background:{colour(v, peak) if signed else colour(v, peak, BLUE)}" '
            f'title="{v:.4g}"></td>'
            for v in values
        )
        body.append(f"<tr><th>{escape(_label(label))}</th>{cells}</tr>")
    return f'<table class="heat"><thead><tr><th></th>{head}</tr></thead>{"".join(body)}</table>'


def _label(token: str) -> str:
    return token.replace("\n", "↵").replace("\t", "⇥") or "∅"


def _attention(r: dict[str, Any]) -> str:
    which = "mean over heads" if r["head"] is None else f"head {r['head']}"
    parts = [
        f"<h2>Attention ({r['layers']} layers × {r['heads']} heads; {escape(which)})</h2>"
        "<p class='muted'>row: the token attending; column: the token attended to.</p>"
    ]
    for i, matrix in enumerate(r["attention"]):
        parts.append(f"<h3>layer {i + 1}</h3>" + heatmap(r["tokens"], r["tokens"], matrix, False))
    return "".join(parts)


def _generation(r: dict[str, Any]) -> str:
    gen = r["generated_tokens"]
    parts = [
        "<h2>Generated</h2>",
        _highlight(r["tokens"] + gen, [0.0] * len(r["tokens"]) + [1.0] * len(gen), 1.0),
        "<h2>Generated × prompt</h2><p class='muted'>row: a generated token; column: a prompt "
        "token; green: raises the generated token's log-probability.</p>",
        heatmap(gen, r["tokens"], r["normalized"], True),
        "<h2>Prompt, per generated token</h2>",
    ]
    for token, row in zip(gen, r["normalized"], strict=True):
        parts.append(f"<h3>{escape(_label(token))}</h3>" + _highlight(r["tokens"], row, 1.0))
    return "".join(parts)
