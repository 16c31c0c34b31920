"""The sections of report.html, each a function of the run's files and of one split's entry
in metrics.json that returns the section's HTML, or None when the run has no data for it
(older runs, tasks without it): the page then leaves the section out. All user text goes
through `esc`; the figures come from plots.py.

    files = read_run(RunDir.open("runs/xor"))
    for sid, title, render in SECTIONS:
        body = render(files, files.metrics["train"])
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from danlu.evaluate import plots
from danlu.evaluate.metrics import lower_is_better
from danlu.evaluate.report_html import (
    RunFiles,
    config_value,
    esc,
    figure,
    fmt,
    is_num,
    note,
    pairs,
    scalars,
    seconds,
    table,
)

MAX_ROWS = 50  # table rows shown for classes, slice groups, generations
MAX_TEXT = 400  # characters of a text input or generation shown
SUMMARY_KEYS = (  # the config keys of the summary table, when set (split on spaces)
    "name seed data.dataset data.task data.label data.text data.target data.split model.type "
    "model.pretrained model.hidden_sizes model.num_layers model.num_heads model.dim "
    "model.dropout model.output model.lora train.epochs train.max_steps train.batch_size "
    "train.optimizer.name train.optimizer.lr train.optimizer.weight_decay train.schedule.name "
    "train.schedule.warmup_steps train.precision train.monitor train.early_stopping "
    "evaluate.split evaluate.metrics"
)


CODE = ("data hash", "config hash", "code", "command")  # lineage values shown as code


def class_names(files: RunFiles, m: dict[str, Any]) -> list[str]:
    names = m.get("class_names") or list(m.get("per_class") or {}) or files.card.get("classes")
    return [str(n) for n in names or []]


# ------------------------------------------------------------------------------ sections


def config_section(f: RunFiles, m: dict[str, Any]) -> str:
    rows = [
        (k, config_value(f.get(k)))
        for k in SUMMARY_KEYS.split()
        if f.get(k) not in (None, "", [], {})
    ]
    return (
        pairs(rows)
        + "<details><summary>full config.yaml</summary>"
        + f"<pre>{esc(f.config_text)}</pre></details>"
    )


def lineage_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    lin = f.lineage
    if not lin:
        return None
    code, host, best = lin.get("code") or {}, lin.get("host") or {}, lin.get("best") or {}
    params, trainable = lin.get("parameters"), lin.get("trainable_parameters")
    if is_num(params) and is_num(trainable):
        params = f"{params:,} ({trainable:,} trainable)"
    items = {  # label: plain value (None or empty: not shown)
        "status": lin.get("status"),
        "data hash": lin.get("data_hash"),
        "config hash": lin.get("config_hash"),
        "code": (code.get("git_commit") or "")[:12],
        "seed": lin.get("seed"),
        "host": " · ".join(str(host[k]) for k in ("hostname", "platform") if host.get(k)),
        "CPUs": host.get("cpu_count"),
        "command": " ".join(map(str, lin.get("command") or [])),
        "started": lin.get("started"),
        "ended": lin.get("ended"),
        "training time": seconds(lin["train_seconds"]) if "train_seconds" in lin else None,
        "device": lin.get("device"),
        "precision": lin.get("precision"),
        "steps": lin.get("steps"),
        "parameters": params,
        "best": None
        if best.get("value") is None
        else f"{best.get('metric')} {fmt(best['value'])} at step {fmt(best.get('step'))}",
        "stopped early": lin.get("stopped_early"),
        "packages": ", ".join(f"{k} {v}" for k, v in (lin.get("packages") or {}).items()),
    }
    dirty = " <span class='warn'>with uncommitted changes</span>" if code.get("git_dirty") else ""
    shown = {k: v for k, v in items.items() if v not in (None, "")}
    rows = [(k, f"<code>{esc(v)}</code>" if k in CODE else fmt(v)) for k, v in shown.items()]
    return pairs([(k, v + dirty if k == "code" else v) for k, v in rows])


def data_card_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    card = f.card
    if not card:
        return None
    items = [(k, esc(card[k])) for k in ("dataset", "input", "label", "test_split") if card.get(k)]
    out = [pairs(items)] if items else []
    sizes = card.get("sizes") or {}
    if sizes:
        out.append(table(["split", "examples"], [[esc(s), fmt(n)] for s, n in sizes.items()]))
    balance = card.get("class_balance") or {}
    splits = [s for s, c in balance.items() if isinstance(c, dict) and sum(c.values())]
    if splits:
        names = list(balance[splits[0]])
        totals = {s: sum(balance[s].values()) for s in splits}
        rows = [
            [esc(n)]
            + [
                f"{fmt(balance[s].get(n, 0))} <span class='muted'>"
                f"({balance[s].get(n, 0) / totals[s]:.1%})</span>"
                for s in splits
            ]
            for n in names[:MAX_ROWS]
        ]
        out += ["<h3>Class balance</h3>", table(["class", *map(esc, splits)], rows, "num")]
        if len(names) > MAX_ROWS:
            out.append(note(f"… and {len(names) - MAX_ROWS:,} more classes"))
    findings = [x for x in card.get("findings") or [] if isinstance(x, dict)]
    out.append("<h3>Findings</h3>")
    if not findings:
        out.append("<p>No findings: nothing looked wrong in the data.</p>")
    else:
        rows = [
            [
                f"<span class='level {esc(x.get('level'))}'>{esc(x.get('level'))}</span>",
                esc(x.get("message", x.get("code", ""))),
                esc(x.get("action", "")),
            ]
            for x in findings
        ]
        out.append(table(["level", "finding", "action"], rows))
    return "".join(out)


def learning_curves_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    if not f.train and not f.val:
        return None
    body = figure(plots.learning_curves, f.train, f.val, alt="learning curves")
    if not body:
        return None
    best = f.lineage.get("best") or {}
    if best.get("value") is not None:
        body += note(
            f"Weights kept: best {esc(best.get('metric'))} {fmt(best['value'])} at step "
            f"{fmt(best.get('step'))}."
        )
    return body


def metrics_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    splits = [s for s, v in f.metrics.items() if scalars(v)]
    if not splits:
        return None
    names: dict[str, None] = {}
    for s in splits:
        names.update(dict.fromkeys(scalars(f.metrics[s])))
    rows = [["examples", *(fmt(f.metrics[s].get("count")) for s in splits)]]
    for name in names:
        cells = []
        for s in splits:
            v, ci = f.metrics[s].get(name), f.metrics[s].get("ci") or {}
            cell = fmt(v)
            if ci.get("metric") == name and ci.get("low") is not None:
                cell += f" <span class='ci'>[{fmt(ci['low'])}, {fmt(ci.get('high'))}]</span>"
            cells.append(cell)
        arrow = "↓" if lower_is_better(name) else "↑"
        rows.append([f"{esc(name)} <span class='muted'>{arrow}</span>", *cells])
    rows.append(["evaluated", *(esc(f.metrics[s].get("evaluated", "–")) for s in splits)])
    ci = next((f.metrics[s]["ci"] for s in splits if f.metrics[s].get("ci")), None)
    tail = ""
    if ci:
        level = ci.get("level") if is_num(ci.get("level")) else 0.95
        tail = note(
            f"[low, high]: {level:.0%} bootstrap confidence interval of {esc(ci.get('metric'))} "
            f"({fmt(ci.get('replicates'))} replicates)."
        )
    return table(["metric", *(esc(s) for s in splits)], rows, "num") + tail


def confusion_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    cm, names = m.get("confusion_matrix"), class_names(f, m)
    if not cm or len(cm) != len(names):
        return None
    return figure(plots.confusion_matrix, cm, names, alt="confusion matrix") + note(
        "Rows are true classes, columns predicted; the numbers are counts, the colour the "
        "share of the row."
    )


def roc_pr_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    curves = m.get("curves") or {}
    found = list(dict.fromkeys([*(curves.get("roc") or {}), *(curves.get("pr") or {})]))
    if not found:
        return None
    support = {k: (v or {}).get("support", 0) for k, v in (m.get("per_class") or {}).items()}
    order = found
    tail = ""
    if len(found) > plots.MAX_CURVES:
        order = sorted(found, key=lambda c: -support.get(c, 0))[: plots.MAX_CURVES]
        tail = note(f"The {plots.MAX_CURVES} largest of {len(found):,} classes are drawn.")
    return figure(plots.roc_pr, curves, order, alt="ROC and precision-recall curves") + tail


def calibration_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    cal = (m.get("curves") or {}).get("calibration") or {}
    if not any((b or {}).get("count") for b in cal.get("bins") or []):
        return None
    return figure(plots.calibration, cal, alt="reliability diagram") + note(
        "Each bar is a bin of predictions by confidence; a calibrated model's bars reach the "
        "diagonal. Below: how many examples fall in each bin."
    )


def per_class_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    per = m.get("per_class") or {}
    if not per:
        return None
    cols = ["precision", "recall", "f1", "support"]
    cols += [c for c in ("roc_auc", "pr_auc") if any(c in (v or {}) for v in per.values())]
    rows = [[esc(n), *(fmt((v or {}).get(c)) for c in cols)] for n, v in per.items()]
    return table(["class", *cols], rows, "num")


def worst_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    worst = [w for w in m.get("worst") or [] if isinstance(w, dict)]
    if not worst:
        return None
    head = ["where", "true", "predicted", "confidence", "loss", "input"]
    rows = [
        [
            esc(w.get("where", w.get("position", ""))),
            fmt(w.get("true")),
            fmt(w.get("predicted")),
            fmt(w.get("confidence")),
            fmt(w.get("loss")),
            _input(w.get("input")),
        ]
        for w in worst
    ]
    return note("The examples with the highest loss, worst first.") + table(head, rows, "worst")


def _input(inp: Any) -> str:
    if not isinstance(inp, dict):
        return ""
    kind = inp.get("kind")
    if kind == "text":
        return f"<div class='text'>{esc(_cut(str(inp.get('text', ''))))}</div>"
    if kind == "row":
        values = inp.get("values") or {}
        return "<br>".join(f"<b>{esc(k)}</b> {fmt(v)}" for k, v in values.items())
    if kind == "image" and _is_png(inp.get("png")):
        return f"<img class='thumb' alt='input image' src='data:image/png;base64,{inp['png']}'>"
    return note("(input not shown)")


def _is_png(data: Any) -> bool:
    try:
        return isinstance(data, str) and base64.b64decode(data[:16])[:8] == b"\x89PNG\r\n\x1a\n"
    except (binascii.Error, ValueError):
        return False


def _cut(text: str, n: int = MAX_TEXT) -> str:
    return text if len(text) <= n else text[:n] + "…"


def generations_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    examples = [x for x in m.get("examples") or [] if isinstance(x, dict)]
    if not examples:
        return None
    first = "prompt" if any("prompt" in x for x in examples) else "source"
    rows = [
        [
            f"<div class='text'>{esc(_cut(str(x.get(k, x.get('source', '')) or '')))}</div>"
            for k in (first, "reference", "generated")
        ]
        for x in examples[:MAX_ROWS]
    ]
    tail = note(f"First {MAX_ROWS} of {len(examples):,}.") if len(examples) > MAX_ROWS else ""
    return table([first, "reference", "generated"], rows, "gen") + tail


def decision_surface_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    s = m.get("decision_surface") or {}
    if not (s.get("xs") and s.get("ys") and (s.get("proba") or s.get("predicted"))):
        return None
    names = class_names(f, m)
    what = (
        f"the probability of class '{esc(names[-1])}'" if len(names) <= 2 else "the predicted class"
    )
    return figure(plots.decision_surface, s, names, alt="decision surface") + note(
        f"The colour is {what} over the plane of the two features; the points are the split's "
        "examples coloured by their label."
    )


def regression_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    s = m.get("sample") or {}
    true, pred = s.get("true") or [], s.get("predicted") or []
    if not true or len(true) != len(pred):
        return None
    return figure(plots.regression, true, pred, alt="predicted against true")


def slices_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    slices = {k: v for k, v in (m.get("slices") or {}).items() if (v or {}).get("groups")}
    if not slices:
        return None
    out = []
    for column, s in slices.items():
        groups = sorted(s["groups"].items(), key=lambda g: -((g[1] or {}).get("count") or 0))
        cols = list(dict.fromkeys(k for _, g in groups for k in g if k != "count"))
        worst = {c: _worst([g.get(c) for _, g in groups], c) for c in cols}
        rows = [
            [esc(name), fmt(g.get("count"))]
            + [_mark(fmt(g.get(c)), g.get(c) is not None and g.get(c) == worst[c]) for c in cols]
            for name, g in groups[:MAX_ROWS]
        ]
        gaps = s.get("gaps") or {}
        if gaps:
            rows.append(["<b>gap (max − min)</b>", ""] + [fmt(gaps.get(c)) for c in cols])
        out += [f"<h3>{esc(column)}</h3>", table(["group", "count", *map(esc, cols)], rows, "num")]
        fair = [
            f"{label} {fmt(s[k])}"
            for k, label in (
                ("demographic_parity_difference", "demographic parity difference"),
                ("equalized_odds_difference", "equalized odds difference"),
            )
            if is_num(s.get(k))
        ]
        if fair:
            out.append(f"<p>{' · '.join(fair)}</p>")
    return note("The worst group per metric is marked.") + "".join(out)


def _worst(values: list[Any], metric: str) -> Any:
    nums = [v for v in values if is_num(v)]
    if metric == "positive_rate" or len(nums) < 2 or min(nums) == max(nums):  # neither good nor bad
        return None
    return max(nums) if lower_is_better(metric) else min(nums)


def _mark(cell: str, on: bool) -> str:
    return f"<span class='bad'>{cell}</span>" if on else cell


def ensemble_section(f: RunFiles, m: dict[str, Any]) -> str | None:
    members = [x for x in m.get("members") or [] if isinstance(x, dict)]
    if not members:
        return None
    rows = []
    for x in members:
        metric, value = str(x.get("metric", m.get("headline", ""))), x.get("value")
        ens = m.get(metric)
        gain = None
        if is_num(ens) and is_num(value):
            gain = value - ens if lower_is_better(metric) else ens - value
        cls = "good" if gain is not None and gain > 0 else "bad" if gain else ""
        sign = "+" if gain is not None and gain > 0 else ""
        rows.append(
            [
                esc(x.get("run")),
                esc(metric),
                fmt(value),
                fmt(ens),
                f"<span class='{cls}'>{sign}{fmt(gain)}</span>",
            ]
        )
    return table(["member", "metric", "member value", "ensemble", "gain"], rows, "num") + note(
        "Gain: how much better the ensemble is than each member alone (positive is better)."
    )


SECTIONS = [  # (id, title, function) in page order
    ("config", "Configuration", config_section),
    ("lineage", "Lineage", lineage_section),
    ("data-card", "Data card", data_card_section),
    ("learning-curves", "Learning curves", learning_curves_section),
    ("metrics", "Metrics", metrics_section),
    ("confusion-matrix", "Confusion matrix", confusion_section),
    ("roc-pr", "ROC and precision-recall", roc_pr_section),
    ("calibration", "Calibration", calibration_section),
    ("per-class", "Per class", per_class_section),
    ("worst-errors", "Worst errors", worst_section),
    ("generations", "Generations", generations_section),
    ("decision-surface", "Decision surface", decision_surface_section),
    ("regression", "Predicted vs true", regression_section),
    ("slices", "Slices", slices_section),
    ("ensemble", "Ensemble", ensemble_section),
]
