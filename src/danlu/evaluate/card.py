"""MODEL_CARD.md for a run, written only from what the run directory already records.

    write_card("runs/xor", intended_use="Teaching: the XOR of two inputs.")

The sections follow "Model Cards for Model Reporting" (Mitchell et al., 2019): model details,
intended use, training data, evaluation (confidence interval, per class, fairness slices),
privacy, compression, limitations, how to use. Hugging Face metadata (license, tags, datasets,
metrics, base_model, library_name) sits in YAML front matter so the hub renders it.

A run with only config.yaml and weights still gets a card: what is missing says "not
recorded" or "not evaluated" (card_facts.py reads every file defensively). What only a person
can say (intended use, licence) comes from the arguments or a card file (RUN/card.yaml unless
another is given); the stand-ins generated from the task and the data say they are defaults.
"""

from __future__ import annotations

import json
import shlex
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from danlu.errors import ConfigError
from danlu.evaluate import card_facts as facts
from danlu.evaluate.card_facts import (
    CARD_NAME,
    FAIRNESS,
    NO,
    as_dict,
    as_list,
    cell,
    load,
    num,
    pairs,
    pick,
    table,
)
from danlu.evaluate.report_html import RunFiles, is_num
from danlu.manifest import update_manifest
from danlu.rundir import RunDir, atomic_write_text, now

__all__ = ["CARD_NAME", "write_card"]

CARD_FILE = "card.yaml"  # the run's own card inputs, read when no other card file is given
CARD_KEYS = ("intended_use", "out_of_scope", "license", "developers", "tags", "limitations")
PRIVACY = [  # (label, the keys lineage "privacy" may record it under)
    ("ε spent", ("epsilon", "eps", "epsilon_spent")),
    ("δ", ("delta",)),
    ("target ε", ("target_epsilon",)),
    ("noise multiplier σ", ("noise_multiplier", "sigma", "noise")),
    ("per-example clipping norm", ("max_grad_norm", "clipping", "clip")),
    ("accountant", ("accountant",)),
    ("sample rate", ("sample_rate",)),
]
ATTACKS = {"loss": "loss threshold", "shadow": "shadow models"}  # audit.json keys
MAX_ROWS = 20  # rows of the class-balance, per-class and slice tables


def write_card(
    run: str | Path | RunDir,
    *,
    intended_use: str | None = None,
    out_of_scope: str | None = None,
    card: str | Path | None = None,
    license: str | None = None,
) -> Path:
    """Write RUN/MODEL_CARD.md atomically and return its path. `card` is a YAML file with any
    of CARD_KEYS (default: RUN/card.yaml when present); the keyword arguments win over it."""
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    given = _card_inputs(run, card)
    options = {"intended_use": intended_use, "out_of_scope": out_of_scope, "license": license}
    given.update({k: v for k, v in options.items() if v})
    path = run.path / CARD_NAME
    atomic_write_text(path, render(facts.read(run), given))
    update_manifest(run.path, [path])
    return path


def _card_inputs(run: RunDir, card: str | Path | None) -> dict[str, Any]:
    path = Path(card) if card is not None else run.path / CARD_FILE
    if card is None and not path.is_file():
        return {}
    fix = f"give a YAML map with keys among {', '.join(CARD_KEYS)}"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(
            f"card file '{path}' is unreadable ({type(e).__name__})", fix=fix
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"card file '{path}' is not a map of keys to text", fix=fix)
    unknown = [str(k) for k in raw if k not in CARD_KEYS]
    if unknown:
        raise ConfigError(f"card file '{path}': unknown key '{unknown[0]}'", fix=fix)
    return raw


def _ci_text(m: dict[str, Any], name: str) -> str:
    ci = facts.ci(m, name)
    if not ci:
        return "no confidence interval recorded"
    level = ci["level"] if is_num(ci.get("level")) else 0.95
    reps = f", {ci['replicates']} bootstrap replicates" if ci.get("replicates") else ""
    return f"{level:.0%} CI [{num(ci['low'])}, {num(ci.get('high'))}]{reps}"


# ---------------------------------------------------------------------------- the card


def render(f: RunFiles, given: dict[str, Any]) -> str:
    """The whole card: YAML front matter, then one Markdown section per topic."""
    split = facts.main_split(f)
    m = f.metrics.get(split, {}) if split else {}
    base = facts.base_model(f)
    sections = [
        ("Model details", _details(f, given, base)),
        ("Intended use", _intended(f, given)),
        ("Training data", _data(f)),
        ("Evaluation", _evaluation(f, split, m)),
        ("Privacy", _privacy(f)),
        ("Compression", _compression(f)),
        ("Limitations", _limitations(f, split, m, given)),
        ("How to use", _usage(f)),
    ]
    lines = [f"# Model card: {f.name}", "", _summary(f, split, m)]
    for title, body in sections:
        if body:
            lines += ["", f"## {title}", "", *body]
    lines += ["", "---", "", f"_Written by `danlu card` from the run's files on {now()}._"]
    return _front_matter(f, given, m, dict(base)) + "\n".join(lines) + "\n"


def _front_matter(f: RunFiles, given: dict[str, Any], m: dict, base: dict) -> str:
    tags = ["danlu", f.task, f.card.get("input"), f.get("model.type")]
    tags += ["differential-privacy"] if as_dict(f.lineage.get("privacy")) else []
    tags += ["lora"] if f.get("model.lora") else []
    tags += ["compressed"] if (f.run.path / "compression.json").is_file() else []
    extra = given.get("tags") or []
    tags += extra if isinstance(extra, list) else [extra]
    meta: dict[str, Any] = {"license": str(given.get("license") or "unknown")}
    meta |= {"library_name": "danlu", "tags": list(dict.fromkeys(str(t) for t in tags if t))}
    if facts.data_name(f):  # a hub id, a built-in name, or a local file's name
        meta["datasets"] = [facts.data_name(f)]
    if facts.main_metrics(f, m):
        meta["metrics"] = facts.main_metrics(f, m)
    if base.get("hub id"):
        meta["base_model"] = base["hub id"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def _summary(f: RunFiles, split: str | None, m: dict[str, Any]) -> str:
    text = f"A danlu `{f.get('model.type') or '?'}` model for {f.task or 'an unrecorded task'}"
    text += f", trained on {facts.data_name(f)}." if facts.data_name(f) else "."
    name = facts.headline_metric(f, m)
    if name is None:
        return text + " Not evaluated."
    return text + f" {name} on the {split} split: **{num(m[name])}** ({_ci_text(m, name)})."


def _details(f: RunFiles, given: dict[str, Any], base: list[tuple[str, Any]]) -> list[str]:
    lin, code = f.lineage, as_dict(f.lineage.get("code"))
    commit = code.get("git_commit")
    if commit and code.get("git_dirty"):
        commit = f"{commit} (with uncommitted changes)"
    model = as_dict(f.config.get("model"))
    arch = [(k, v) for k, v in model.items() if k != "type" and v not in (None, [], {})]
    hf = load(f.run.hf_config / "config.json")  # an hf run: the checkpoint's architecture
    arch += [(k, hf[k]) for k in ("model_type", "num_hidden_layers", "hidden_size") if k in hf]
    seconds, base_licence = lin.get("train_seconds"), dict(base).get("licence", "unknown")
    of_base = "" if base_licence == "unknown" else f" (the base model's: {base_licence})"
    rows = [
        ("name", f.name),
        ("family", model.get("type")),
        ("architecture", ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in arch)),
        ("parameters", lin.get("parameters")),
        ("trainable parameters", lin.get("trainable_parameters")),
        (
            "licence",
            given.get("license") or f"unknown: set it with --license or a card file{of_base}",
        ),
        ("developers", given.get("developers")),
        ("danlu version", as_dict(lin.get("packages")).get("danlu")),
        ("code commit", commit),
        ("training date", lin.get("ended") or lin.get("started")),
        ("status", lin.get("status")),
        ("device", lin.get("device")),
        ("precision", lin.get("precision")),
        ("steps", lin.get("steps")),
        ("training time", f"{seconds:,.1f} s" if is_num(seconds) else None),
    ]
    return pairs(rows) + (["", "**Base model**", "", *pairs(base)] if base else [])


def _intended(f: RunFiles, given: dict[str, Any]) -> list[str]:
    data = facts.data_name(f) or "its training data"
    classes = [str(c) for c in as_list(f.card.get("classes"))]
    named = ", ".join(classes[:10]) + (", …" if len(classes) > 10 else "")
    among = f"one of {len(classes)} classes ({named})" if classes else "the classes it learned"
    use = {
        "classification": f"Assign {facts.inputs(f)} like those of {data} to {among}.",
        "regression": f"Estimate {f.get('data.label') or 'a value'} from {facts.inputs(f)} like "
        f"those of {data}.",
        "language_modeling": f"Continue text in the style of {data}.",
        "seq2seq": f"Turn a source text into a target text as in {data}.",
        "chat": f"Answer chat messages as in {data}.",
    }.get(str(f.task), f"The task it was trained for, on data like {data}.")
    scope = (
        f"Inputs unlike {data} (another population, source, language or time); decisions with "
        "legal or similarly significant effects on people without human review; any use the "
        "evaluation below does not cover."
    )
    out = []
    for key, title, default in (
        ("intended_use", "Primary use", use),
        ("out_of_scope", "Out of scope", scope),
    ):
        mark = "" if given.get(key) else " _(default derived from the task and the data: edit it)_"
        out += [f"**{title}**{mark}: {given.get(key) or default}", ""]
    how = "`danlu card RUN --intended-use TEXT --out-of-scope TEXT`"
    return [*out, f"Set them with {how} or in the run's {CARD_FILE}."]


def _data(f: RunFiles) -> list[str]:
    card, name = f.card, facts.dataset(f)
    source, licence = facts.data_source(name)
    out = pairs(
        [
            ("dataset", name),
            ("source", source),
            ("licence", licence),
            ("input", card.get("input")),
            ("label", card.get("label") or f.get("data.label")),
            ("test split", card.get("test_split")),
            ("content hash", card.get("content_hash") or f.lineage.get("data_hash")),
        ]
    )
    sizes = as_dict(card.get("sizes")) or as_dict(f.lineage.get("data_sizes"))
    rows = [[cell(s), n] for s, n in sizes.items()]
    out += ["", *table(["split", "examples"], rows)] if rows else ["", f"Split sizes: {NO}."]
    balance = {str(s): c for s, c in as_dict(card.get("class_balance")).items() if as_dict(c)}
    if balance:
        names = list(dict.fromkeys(k for c in balance.values() for k in c))
        rows = [[cell(n), *(_share(c, n) for c in balance.values())] for n in names[:MAX_ROWS]]
        out += ["", "**Class balance**", "", *table(["class", *balance], rows)]
        out += [f"… and {len(names) - MAX_ROWS:,} more classes."] if len(names) > MAX_ROWS else []
    if card:
        findings = [x for x in as_list(card.get("findings")) if isinstance(x, dict)]
        out += ["", "**Data findings**: " + ("" if findings else "none, nothing looked wrong.")]
        out += [f"- {x.get('level')}: {cell(x.get('message', x.get('code')))}" for x in findings]
    pii = card.get("pii_redacted")
    if pii is not None:
        found = facts.counts(pii) or "nothing found"
        out += ["", f"**PII redacted** (replaced by typed placeholders before training): {found}."]
    elif f.get("data.redact_pii"):
        out += ["", f"`data.redact_pii` is on; what it replaced is {NO}."]
    return out


def _share(counts: dict[str, Any], name: str) -> str:
    n, total = counts.get(name, 0), sum(v for v in counts.values() if is_num(v))
    return f"{num(n)} ({n / total:.1%})" if is_num(n) and total else num(n)


def _evaluation(f: RunFiles, split: str | None, m: dict[str, Any]) -> list[str]:
    if not f.metrics:
        return [f"Not evaluated: run `danlu evaluate {f.run.path}`, then `danlu card` again."]
    name, out = facts.headline_metric(f, m), []
    if name is not None:
        count, ci = num(m.get("count")), _ci_text(m, name)
        out += [f"**{name} = {num(m[name])}** on the {split} split ({count} examples; {ci}).", ""]
    splits = list(f.metrics)
    names = dict.fromkeys(n for s in splits for n in facts.main_metrics(f, f.metrics[s]))
    rows = [["examples", *(f.metrics[s].get("count") for s in splits)]]
    rows += [[n, *(_metric_cell(f.metrics[s], n) for s in splits)] for n in names]
    out += [*table(["metric", *map(cell, splits)], rows), "", "[low, high]: bootstrap CI."]
    per = {k: as_dict(v) for k, v in as_dict(m.get("per_class")).items()}
    if per:
        keys = ("precision", "recall", "f1", "support")
        rows = [[cell(k), *(v.get(c) for c in keys)] for k, v in list(per.items())[:MAX_ROWS]]
        out += ["", f"**Per class** ({split} split)", "", *table(["class", *keys], rows)]
    for column, s in as_dict(m.get("slices")).items():
        out += _slice(str(column), as_dict(s), split)
    return out


def _metric_cell(m: dict[str, Any], name: str) -> str:
    if m.get(name) is None:
        return "–"
    ci = facts.ci(m, name)
    return num(m[name]) + (f" [{num(ci['low'])}, {num(ci.get('high'))}]" if ci else "")


def _slice(column: str, s: dict[str, Any], split: str | None) -> list[str]:
    groups = {str(k): as_dict(v) for k, v in as_dict(s.get("groups")).items()}
    if not groups:
        return []
    cols = list(dict.fromkeys(k for g in groups.values() for k in g if k != "count"))
    rows = [[cell(k), g.get("count"), *(g.get(c, "–") for c in cols)] for k, g in groups.items()]
    gaps = as_dict(s.get("gaps"))
    if gaps:
        rows.append(["gap (max − min)", "", *(gaps.get(c, "–") for c in cols)])
    fair = [f"{label} {num(s[k])}" for k, label in FAIRNESS if is_num(s.get(k))]
    out = ["", f"**Fairness slices by `{cell(column)}`** ({split} split)", ""]
    out += table(["group", "count", *map(cell, cols)], rows[: MAX_ROWS + 1])
    return out + (["", " · ".join(fair)] if fair else [])


def _privacy(f: RunFiles) -> list[str]:
    p, configured = as_dict(f.lineage.get("privacy")), f.get("train.privacy")
    if p:
        eps, delta = pick(p, *PRIVACY[0][1]), pick(p, *PRIVACY[1][1])
        how = "DP-SGD: per-example gradient clipping and Gaussian noise"
        out = [
            f"Trained with **(ε = {num(eps)}, δ = {num(delta)})-differential privacy** ({how}).",
            "",
        ]
        out += pairs(
            [(label, pick(p, *keys)) for label, keys in PRIVACY if pick(p, *keys) is not None]
        )
    elif configured:
        out = [f"`train.privacy` is configured ({cell(configured)}) but no ε spent is recorded."]
    else:
        out = ["Trained **without differential privacy**: it may remember single examples."]
    audit = load(f.run.path / "audit.json")
    found = facts.attacks(audit)
    if not found:
        return [*out, "", f"Membership-inference audit: not run (`danlu audit {f.run.path}`)."]
    rows = [
        [
            cell(ATTACKS.get(n, n)),
            pick(a, "auc", "attack_auc"),
            facts.interval(a),
            a.get("advantage"),
        ]
        for n, a in found
    ]
    meaning = audit.get("interpretation")
    return [
        *out,
        "",
        "**Membership-inference audit** (audit.json)",
        "",
        *table(["attack", "AUC", "95% CI", "advantage"], rows),
        "",
        cell(meaning) if isinstance(meaning, str) else "AUC 0.5: the attack is at chance.",
    ]


def _compression(f: RunFiles) -> list[str]:
    meta = load(f.run.path / "compression.json")
    if meta:
        parent = as_dict(f.lineage.get("parent")).get("run")
        main = ("method", "kind", "format")
        rest = {k: v for k, v in meta.items() if k not in main and isinstance(v, (str, int, float))}
        out = pairs([*((k, meta.get(k)) for k in main), ("settings", rest), ("parent run", parent)])
        found = facts.variant_row(f, parent)
        if found:
            metric, r = found
            delta, size, speed = (num(r.get(k)) for k in ("delta", "size_ratio", "speedup_b32"))
            out += [
                "",
                f"Against the parent: {metric} {delta} points, {size}× the file size, "
                f"{speed}× the batch-32 throughput.",
            ]
        return out
    report = load(f.run.path / "compress_report.json")
    rows = [as_dict(r) for r in as_list(report.get("rows"))]
    if not rows:
        return []
    keys = ("metric", "delta", "size_ratio", "speedup_b32")
    body = [
        [cell(r.get("name")), cell(r.get("method", "")), *(r.get(k) for k in keys)] for r in rows
    ]
    head = [
        "variant",
        "method",
        str(report.get("metric", "metric")),
        "Δ points",
        "size ×",
        "speed-up",
    ]
    best = (
        f"Recommended: **{report.get('recommended') or 'none'}**. {cell(report.get('reason', ''))}"
    )
    return ["`danlu compress` variants (compress_report.json):", "", *table(head, body), "", best]


def _limitations(f: RunFiles, split: str | None, m: dict, given: dict[str, Any]) -> list[str]:
    extra = given.get("limitations") or []
    extra = [cell(x) for x in (extra if isinstance(extra, list) else [extra])]
    return [f"- {x}" for x in [*facts.limitations(f, split, m), *extra]]


def _usage(f: RunFiles) -> list[str]:
    run, path = shlex.quote(str(f.run.path)), json.dumps(str(f.run.path))
    if f.task in ("language_modeling", "seq2seq", "chat"):
        shell, py = f'danlu generate {run} --prompt "..."', f'danlu.generate({path}, "...")'
    else:
        shell, py = (
            f"danlu predict {run} INPUT --out predictions.csv",
            f'danlu.predict({path}, "INPUT")',
        )
    lines = ["```bash", shell, f"danlu evaluate {run} --split test", f"danlu report {run}"]
    served = (files("danlu") / "serve" / "server.py").is_file()  # `danlu serve`, once it exists
    lines += [f"danlu serve {run}"] if served else []
    out = [*lines, "```", "", "```python", "import danlu", "", py, "```"]
    text = f.get("data.text") or "text"
    what = {
        "table": f"a CSV or Parquet file of {facts.inputs(f)}",
        "images": "image files or a folder of images",
        "text": f"a CSV or Parquet file with a `{text}` column",
    }.get(str(f.card.get("input")))
    return [*out, "", f"INPUT: {what}."] if what and "predict" in shell else out
