"""report.html for a run and compare.html for several: self-contained pages (figures embedded
as base64 PNG, inline CSS, no script, no external resource) built only from the files of the
run directories; the model is never loaded.

    write_report("runs/xor")                                  # -> runs/xor/report.html
    write_comparison(["runs/a", "runs/b"], Path("compare.html"))

The sections of a run's report live in report_sections.py (each left out when its data is
absent), the figures in plots.py, the page frame and the file reading in report_html.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from danlu.errors import ConfigError
from danlu.evaluate import plots
from danlu.evaluate.card import CARD_NAME
from danlu.evaluate.metrics import headline, lower_is_better
from danlu.evaluate.report_html import (
    RunFiles,
    chips,
    config_value,
    esc,
    figure,
    fmt,
    is_num,
    note,
    page,
    read_run,
    scalars,
    seconds,
    table,
)
from danlu.evaluate.report_sections import SECTIONS
from danlu.manifest import update_manifest
from danlu.rundir import RunDir, atomic_write_text, read_json

log = logging.getLogger("danlu")

RUN_WIDE = {"config", "lineage", "data-card", "learning-curves", "metrics"}  # not per split
SPLIT_ORDER = ("test", "val", "train")


def write_report(run: str | Path | RunDir, split: str | None = None) -> Path:
    """Write report.html into the run directory and return its path. The per-split sections
    show `split` (default: the config's evaluate.split when evaluated, else test, else any)."""
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    files = read_run(run)
    split = main_split(files, split)
    m = files.metrics.get(split, {}) if split else {}
    sections = []
    for sid, title, render in SECTIONS:
        body = _render(render, files, m, sid)
        if body:
            sections.append((sid, title, body, "" if sid in RUN_WIDE else f"{split} split"))
    if (run.path / "audit.json").is_file():  # written by `danlu audit`: run-wide
        from danlu.evaluate.audit_html import report_section

        sections.append((*report_section(read_json(run.path / "audit.json")), ""))
    path = run.path / "report.html"
    html = page(f"{files.name} · danlu report", _header(files, m, split), sections)
    atomic_write_text(path, html)
    update_manifest(run.path, [path])
    return path


def main_split(files: RunFiles, split: str | None = None) -> str | None:
    if split is not None:
        if split not in files.metrics:
            have = ", ".join(files.metrics) or "none"
            raise ConfigError(
                f"metrics.json of run '{files.run.path}' has no '{split}' split "
                f"(evaluated splits: {have})",
                fix=f"run `danlu evaluate {files.run.path} --split {split}` first "
                f"(or `danlu report {files.run.path} --split {split}`)",
            )
        return split
    wanted = files.get("evaluate.split")
    for s in (wanted, *SPLIT_ORDER):
        if s in files.metrics:
            return s
    return next(iter(files.metrics), None)


def _render(render: Any, files: RunFiles, m: dict[str, Any], sid: str) -> str | None:
    """One section; data that does not follow the schema gives a note, not a broken page."""
    try:
        return render(files, m)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        log.warning("report.html: section '%s' not drawn (%s: %s)", sid, type(e).__name__, e)
        return (
            f"<p class='note render-error'>This section could not be drawn from the run's "
            f"files ({esc(type(e).__name__)}: {esc(e)}).</p>"
        )


def _headline(files: RunFiles, m: dict[str, Any]) -> tuple[str | None, Any]:
    """The task's headline metric as recorded (else the task's default, else the first)."""
    names = [m.get("headline"), headline(files.task or ""), *scalars(m)]
    name = next((n for n in names if n and is_num(m.get(n))), None)
    return name, m.get(name) if name else None


def _header(files: RunFiles, m: dict[str, Any], split: str | None) -> str:
    status = str(files.lineage.get("status") or "unknown")
    model = files.get("model.type") or "?"
    if files.get("model.pretrained"):
        model = f"{model} ({files.get('model.pretrained')})"
    items = [
        ("task", esc(files.task or "?")),
        ("model", esc(model)),
        ("status", f"<span class='status-{esc(status)}'>{esc(status)}</span>"),
        ("run", f"<code>{esc(files.run.path)}</code>"),
    ]
    if (files.run.path / CARD_NAME).is_file():  # written by `danlu card`, next to this page
        items.append(("model card", f"<a href='{CARD_NAME}'>{CARD_NAME}</a>"))
    if files.lineage.get("steps") is not None:
        items.insert(3, ("steps", fmt(files.lineage["steps"])))
    name, value = _headline(files, m)
    if name is None or value is None:
        line = f"not evaluated yet: <code>danlu evaluate {esc(files.run.path)}</code>"
    else:
        ci = m.get("ci") or {}
        extra = [f"{esc(split)} split", f"{fmt(m.get('count'))} examples"]
        if ci.get("metric") == name and ci.get("low") is not None:
            level = ci.get("level") if is_num(ci.get("level")) else 0.95
            extra.insert(0, f"{level:.0%} CI {fmt(ci['low'])} – {fmt(ci.get('high'))}")
        line = (
            f"{esc(name)}<span class='value'>{fmt(value)}</span>"
            f"<span class='ci'>{' · '.join(extra)}</span>"
        )
    return f"<h1>{esc(files.name)}</h1>{chips(items)}<div class='headline'>{line}</div>"


# ------------------------------------------------------------------------------ compare


def write_comparison(runs: list[str | Path | RunDir], out: str | Path = "compare.html") -> Path:
    """Write one page comparing runs side by side: metrics (best per row highlighted),
    overlaid learning curves and the config keys whose values differ. Returns its path."""
    if len(runs) < 2:
        got = f": '{runs[0]}'" if runs else ""
        raise ConfigError(
            f"compare needs at least two runs, got {len(runs)}{got}",
            fix="pass two or more run directories, e.g. `danlu compare runs/a runs/b`",
        )
    files = [read_run(r if isinstance(r, RunDir) else RunDir.open(r)) for r in runs]
    names = [f.run.path.name for f in files]
    if len(set(names)) < len(names):  # same folder names under different parents
        names = [str(f.run.path) for f in files]
    notes = []
    tasks = sorted({str(f.task) for f in files})
    if len(tasks) > 1:
        notes.append(
            f"These runs have different tasks ({esc(', '.join(tasks))}): "
            "their metrics are not comparable one to one."
        )
    splits = _shared_splits(files, notes)
    sections = [
        ("runs", "Runs", _runs_table(files, names)),
        ("metrics", "Metrics", _metrics_table(files, names, splits)),
        ("learning-curves", "Learning curves", _overlay(files, names, notes)),
        ("config-diff", "Config differences", _config_diff(files, names)),
    ]
    header = f"<h1>Comparison of {len(files)} runs</h1>" + chips(
        [(str(i + 1), esc(n)) for i, n in enumerate(names)]
    )
    header += "".join(f"<p class='note'>{n}</p>" for n in notes)
    out = Path(out)
    if out.is_dir():
        out = out / "compare.html"
    atomic_write_text(out, page("danlu comparison", header, [s for s in sections if s[2]]))
    return out


def _shared_splits(files: list[RunFiles], notes: list[str]) -> list[str | None]:
    """The split each run's column shows: one split all evaluated runs share (test first)."""
    evaluated = [set(f.metrics) for f in files if f.metrics]
    common = set.intersection(*evaluated) if evaluated else set()
    shared = next((s for s in (*SPLIT_ORDER, *sorted(common)) if s in common), None)
    if evaluated and shared is None:
        notes.append("The runs share no evaluated split: each column shows the run's own.")
    return [shared if shared in f.metrics else main_split(f) for f in files]


def _runs_table(files: list[RunFiles], names: list[str]) -> str:
    rows = [
        ["task", *(esc(f.task or "?") for f in files)],
        ["model", *(esc(f.get("model.type") or "?") for f in files)],
        ["status", *(esc(f.lineage.get("status", "?")) for f in files)],
        ["steps", *(fmt(f.lineage.get("steps")) for f in files)],
        ["parameters", *(fmt(f.lineage.get("parameters")) for f in files)],
        ["training time", *(seconds(f.lineage.get("train_seconds")) for f in files)],
        ["path", *(f"<code>{esc(f.run.path)}</code>" for f in files)],
    ]
    return table(["", *map(esc, names)], rows, "num runs")


def _metrics_table(files: list[RunFiles], names: list[str], splits: list[str | None]) -> str:
    entries = [f.metrics.get(s, {}) if s else {} for f, s in zip(files, splits, strict=True)]
    keys: dict[str, None] = {}
    for f, m in zip(files, entries, strict=True):
        first = _headline(f, m)[0] if m else None
        keys.update(dict.fromkeys([first] if first else []))
    for m in entries:
        keys.update(dict.fromkeys(scalars(m)))
    rows = [
        ["split", *(esc(s) if s else "<em class='muted'>not evaluated</em>" for s in splits)],
        ["examples", *(fmt(m.get("count")) for m in entries)],
    ]
    for key in keys:
        values = [m.get(key) for m in entries]
        nums = [v for v in values if is_num(v)]
        best = (min if lower_is_better(key) else max)(nums) if len(nums) > 1 else None
        cells = [
            _cell(v, m.get("ci"), key, v == best and best is not None)
            for v, m in zip(values, entries, strict=True)
        ]
        arrow = "↓" if lower_is_better(key) else "↑"
        rows.append([f"{esc(key)} <span class='muted'>{arrow}</span>", *cells])
    legend = note("The best value of each row is highlighted (↑ higher is better, ↓ lower).")
    return table(["metric", *map(esc, names)], rows, "num runs") + legend


def _cell(value: Any, ci: Any, key: str, best: bool) -> str:
    text = fmt(value) if value is not None else "–"
    if isinstance(ci, dict) and ci.get("metric") == key and ci.get("low") is not None:
        text += f"<br><span class='ci'>[{fmt(ci['low'])}, {fmt(ci.get('high'))}]</span>"
    return f"<span class='best'>{text}</span>" if best else text


def _overlay(files: list[RunFiles], names: list[str], notes: list[str]) -> str | None:
    if not any(f.train or f.val for f in files):
        return None
    monitors = [f.get("train.monitor") for f in files]
    monitor = next(
        (m for m, f in zip(monitors, files, strict=True) if m and any(m in r for r in f.val)),
        "val_loss" if any("val_loss" in r for f in files for r in f.val) else None,
    )
    if monitor and len({m for m in monitors if m}) > 1:
        notes.append(f"The runs monitor different metrics; the curves show {esc(monitor)}.")
    curves = [(n, f.train, f.val) for n, f in zip(names, files, strict=True)]
    return figure(plots.overlaid_curves, curves, monitor, alt="learning curves of every run")


def _config_diff(files: list[RunFiles], names: list[str]) -> str:
    flat = [_flatten(f.config) for f in files]
    keys = list(dict.fromkeys(k for d in flat for k in d))
    missing = object()
    rows = []
    for key in keys:
        values = [d.get(key, missing) for d in flat]
        if all(v == values[0] for v in values[1:]):
            continue
        cells = [
            "<span class='muted'>(not set)</span>" if v is missing else config_value(v)
            for v in values
        ]
        rows.append([f"<code>{esc(key)}</code>", *cells])
    if not rows:
        return "<p>The configs are identical.</p>"
    return table(["key", *map(esc, names)], rows, "runs")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
