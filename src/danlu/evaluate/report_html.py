"""The building blocks of report.html and compare.html: what a report reads from a run
directory (RunFiles: config.yaml, lineage.json, data_card.json, history.jsonl, metrics.json;
never the model), small HTML pieces that escape every user-supplied string, and the page
frame (inline CSS, header, table of contents; no script, no external resource).

    files = read_run(RunDir.open("runs/xor"))
    page("xor", header_html, [("metrics", "Metrics", table(["metric"], [["x"]]))])
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from danlu.evaluate import plots
from danlu.rundir import RunDir, now, read_json

# ---------------------------------------------------------------------- the run's files


@dataclass
class RunFiles:
    """What a report reads from a run directory (never the model)."""

    run: RunDir
    config: dict[str, Any]
    config_text: str
    lineage: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.lineage.get("run") or self.run.path.name)

    @property
    def task(self) -> str | None:
        task = self.card.get("task") or (self.config.get("data") or {}).get("task")
        if task:
            return str(task)
        m = next(iter(self.metrics.values()), {})
        for key, guess in (("per_class", "classification"), ("rmse", "regression")):
            if key in m:
                return guess
        return "language_modeling" if "perplexity" in m else None

    def get(self, dotted: str) -> Any:
        value: Any = self.config
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value


def read_run(run: RunDir) -> RunFiles:
    text = run.config.read_text(encoding="utf-8")
    config = yaml.safe_load(text) or {}
    files = RunFiles(run, config if isinstance(config, dict) else {}, text)
    if run.lineage.is_file():
        files.lineage = read_json(run.lineage)
    if run.data_card.is_file():
        files.card = read_json(run.data_card)
    if run.metrics.is_file():
        files.metrics = {k: v for k, v in read_json(run.metrics).items() if isinstance(v, dict)}
    if run.history.is_file():
        for line in run.history.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                (files.val if row.get("split") == "val" else files.train).append(row)
    return files


# ------------------------------------------------------------------------- html pieces


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """4 decimals for floats, thousands separators for counts, escaped text otherwise."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-4:
            return f"{value:.2e}"
        return f"{value:,.2f}" if abs(value) >= 1e4 else f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return esc(json.dumps(value, ensure_ascii=False, default=str))
    return esc(value)


def config_value(value: Any) -> str:
    """A config value as YAML spells it (floats exactly: a learning rate is never rounded)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list)):
        return esc(json.dumps(value, ensure_ascii=False, default=str))
    return esc(value)


def seconds(value: Any) -> str:
    if not is_num(value):
        return "–"
    return f"{value:.2f} s" if value < 10 else f"{value:,.1f} s"


def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; `head` and the cells are HTML already (escape before)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def pairs(items: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in items)
    return f"<table class='pairs'><tbody>{rows}</tbody></table>"


def figure(fn: Any, *args: Any, alt: str = "figure") -> str:
    if not plots.available():
        return "<p class='muted'>Figures need matplotlib: pip install 'danlu[report]'.</p>"
    png = fn(*args)
    return f"<img class='figure' alt='{esc(alt)}' src='data:image/png;base64,{png}'>" if png else ""


def note(text: str) -> str:
    return f"<p class='muted'>{text}</p>"


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalars(m: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in m.items() if is_num(v) and k != "count"}


# ------------------------------------------------------------------------------ the page

CSS = """
:root { --ink: #1d232b; --muted: #6b7480; --line: #e3e7ec; --accent: #1f5fa8; --soft: #f5f7fa; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       margin: 0; background: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
header { background: var(--soft); border-bottom: 1px solid var(--line); }
header .inner { max-width: 1100px; margin: 0 auto; padding: 1.4rem 2rem 1.2rem; }
h1 { font-size: 1.6rem; margin: 0 0 0.4rem; }
h2 { font-size: 1.2rem; margin: 2.2rem 0 0.8rem; padding-bottom: 0.3rem;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 1rem; margin: 1.2rem 0 0.5rem; }
.chips > span { display: inline-block; margin: 0 0.4rem 0.3rem 0; padding: 0.1rem 0.55rem;
              border: 1px solid var(--line); border-radius: 999px; background: #fff;
              font-size: 0.85rem; }
.chips b { color: var(--muted); font-weight: 500; margin-right: 0.25rem; }
.status-completed { color: #1b7a3a; } .status-failed, .status-interrupted { color: #b00020; }
.status-running { color: #b26a00; }
.headline { font-size: 1.05rem; margin-top: 0.5rem; }
.headline .value { font-size: 1.7rem; font-weight: 650; color: var(--accent); margin: 0 0.3rem; }
nav.toc { margin: 1rem 0 0; font-size: 0.9rem; }
nav.toc a { margin-right: 0.9rem; color: var(--accent); text-decoration: none;
            white-space: nowrap; }
nav.toc a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 0.4rem 0 0.8rem; font-size: 0.88rem; }
th, td { border-bottom: 1px solid var(--line); padding: 0.3rem 0.7rem; text-align: left;
         vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; white-space: nowrap; }
table.num td:not(:first-child), table.num th:not(:first-child) { text-align: right;
    font-variant-numeric: tabular-nums; }
table.pairs th { color: var(--muted); font-weight: 500; white-space: nowrap; width: 11rem; }
table.runs td:not(:first-child), table.runs th:not(:first-child) { min-width: 9rem; }
td .text { max-width: 32rem; white-space: pre-wrap; word-break: break-word; }
img.figure { display: block; max-width: 100%; height: auto; margin: 0.5rem 0; }
img.thumb { width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated;
            border: 1px solid var(--line); }
code { font: 0.82rem ui-monospace, SFMono-Regular, Menlo, monospace; word-break: break-all; }
pre { background: var(--soft); padding: 0.8rem; overflow-x: auto; font-size: 0.8rem;
      max-height: 32rem; border: 1px solid var(--line); }
details summary { cursor: pointer; color: var(--accent); margin: 0.3rem 0; }
.muted, .ci, .tag { color: var(--muted); } .tag { font-size: 0.85rem; font-weight: 500; } .ci { font-size: 0.8rem; }
.level { font-weight: 600; text-transform: uppercase; font-size: 0.75rem; }
.level.blocker { color: #b00020; } .level.warning { color: #b26a00; } .level.info { color: #1f5fa8; }
.warn, .bad { color: #b00020; } .good { color: #1b7a3a; }
.best { background: #e3f1e6; font-weight: 650; }
.note { background: #fff7e6; border-left: 4px solid #d9822b; padding: 0.5rem 0.8rem; }
footer { color: var(--muted); font-size: 0.8rem; margin-top: 3rem; }
"""


def page(title: str, header: str, sections: list[tuple[str, ...]]) -> str:
    """A whole page. `sections` are (id, title, body html[, tag]): the table of contents links
    the titles; the tag (plain text, e.g. "test split") is shown after the title."""
    toc = "\n".join(f"<a href='#{s[0]}'>{esc(s[1])}</a>" for s in sections)
    body = "\n".join(
        f"<section id='{s[0]}'><h2>{esc(s[1])}"
        + (f" <span class='tag'>{esc(s[3])}</span>" if len(s) > 3 and s[3] else "")
        + f"</h2>{s[2]}</section>"
        for s in sections
    )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><div class='inner'>{header}<nav class='toc'>{toc}</nav></div></header>"
        f"<main>{body}<footer>Written by danlu on {esc(now())}.</footer></main></body></html>\n"
    )


def chips(items: list[tuple[str, str]]) -> str:
    """label: value badges (values are HTML already)."""
    return (
        "<div class='chips'>"
        + "".join(f"<span><b>{esc(k)}</b>{v}</span>" for k, v in items)
        + "</div>"
    )
