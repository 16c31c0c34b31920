"""What a model card says about a run, read defensively from its files, and the Markdown
pieces it is written with (card.py puts the sections together).

Nothing here raises on a missing or odd file: a missing JSON file reads as {}, a missing value
as None (the card prints "not recorded"). Licences come from danlu's built-in dataset catalogue
and from the base checkpoint's README front matter or the Python package that ships it; what
is not recorded is "unknown", never guessed. `limitations` turns evidence into sentences:
confidence-interval width, class balance, data findings, calibration, slice gaps, the audit.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from danlu.errors import DanluError
from danlu.evaluate.metrics import headline
from danlu.evaluate.report_html import RunFiles, is_num, scalars
from danlu.rundir import RunDir

log = logging.getLogger("danlu")

NO = "not recorded"
MAIN_METRICS = [
    *("accuracy", "f1_macro", "precision_macro", "recall_macro", "roc_auc", "pr_auc"),
    *("log_loss", "ece", "rmse", "mae", "r2", "loss", "perplexity", "bleu", "chrf", "rouge_l"),
    "exact_match",
]
FAIRNESS = [
    ("demographic_parity_difference", "demographic parity difference"),
    ("equalized_odds_difference", "equalized odds difference"),
]
CARD_NAME = "MODEL_CARD.md"


def load(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when it is missing or unreadable."""
    try:
        return as_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("model card: '%s' is unreadable (%s); treated as not recorded", path, e)
        return {}


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def pick(d: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` that `d` has a value for."""
    return next((d[k] for k in keys if d.get(k) is not None), None)


def read(run: RunDir) -> RunFiles:
    """config.yaml (not validated: older runs still get a card), lineage, data card, metrics."""
    text = run.config.read_text(encoding="utf-8", errors="replace")
    try:
        config = as_dict(yaml.safe_load(text))
    except yaml.YAMLError:
        config = {}
    f = RunFiles(run, config, text, lineage=load(run.lineage), card=load(run.data_card))
    f.metrics = {k: v for k, v in load(run.metrics).items() if isinstance(v, dict)}
    return f


# ----------------------------------------------------------------------------- markdown


def num(v: Any) -> str:
    if v is None:
        return NO
    if isinstance(v, bool) or not is_num(v):
        return cell(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.2e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


def cell(v: Any) -> str:
    """Text safe inside a Markdown table row (one line, pipes escaped)."""
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return " ".join(text.split()).replace("|", "\\|")


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table: str cells as given (escape them with `cell`), others as numbers."""
    lines = [head, ["---"] + ["---:"] * (len(head) - 1)]
    lines += [[c if isinstance(c, str) else num(c) for c in r] for r in rows]
    return ["| " + " | ".join(r) + " |" for r in lines]


def pairs(items: list[tuple[str, Any]]) -> list[str]:
    rows = [[f"**{k}**", NO if v in (None, "", [], {}) else num(v)] for k, v in items]
    return ["| | |", "|---|---|", *("| " + " | ".join(r) + " |" for r in rows)]


def interval(attack: dict[str, Any]) -> str:
    """An attack's recorded AUC interval as '[low, high]'."""
    v = attack.get("auc_ci95")
    ok = isinstance(v, list) and len(v) == 2 and all(map(is_num, v))
    return f"[{num(v[0])}, {num(v[1])}]" if ok else "–"


# ------------------------------------------------------------------------------ metrics


def main_split(f: RunFiles) -> str | None:
    order = (f.get("evaluate.split"), "test", "val", "train", *f.metrics)
    return next((s for s in order if s in f.metrics), None)


def headline_metric(f: RunFiles, m: dict[str, Any]) -> str | None:
    names = [m.get("headline"), headline(f.task or ""), *scalars(m)]
    return next((n for n in names if n and is_num(m.get(n))), None)


def main_metrics(f: RunFiles, m: dict[str, Any]) -> list[str]:
    wanted = [headline_metric(f, m), *as_list(f.get("evaluate.metrics")), *MAIN_METRICS]
    return [n for n in dict.fromkeys(wanted) if n and is_num(m.get(n))] or list(scalars(m))


def ci(m: dict[str, Any], name: str) -> dict[str, Any]:
    """The recorded bootstrap confidence interval of `name` ({} when there is none)."""
    found = as_dict(m.get("ci"))
    return found if found.get("metric") == name and is_num(found.get("low")) else {}


def attacks(audit: dict[str, Any], name: str = "attack", depth: int = 0) -> list[tuple[str, dict]]:
    """Every (attack, result) in audit.json that records an AUC, at any nesting; an attack is
    named by its key ("loss", "shadow") or its "name"."""
    found = [(name, audit)] if is_num(pick(audit, "auc", "attack_auc")) else []
    for k, v in audit.items() if depth < 3 else ():
        for x in v if isinstance(v, list) else [v]:
            found += attacks(x, str(pick(x, "name") or k), depth + 1) if isinstance(x, dict) else []
    return found


# ------------------------------------------------------------------------ data and model


def dataset(f: RunFiles) -> str | None:
    name = f.card.get("dataset") or f.get("data.dataset")
    return str(name) if name else None


def data_name(f: RunFiles) -> str | None:
    """The dataset as the card's text names it: a built-in or hub name, or a local file's name
    (its whole path stays in the training-data table only)."""
    name = dataset(f)
    return (name[3:] if name.startswith("hf:") else Path(name).name) if name else None


def data_source(name: str | None) -> tuple[str | None, str | None]:
    """(where the training data comes from, its licence) as danlu knows them."""
    if not name:
        return None, None
    from danlu.data.builtin import CATALOG

    b = next((b for b in CATALOG.values() if name in (b.name, *b.aliases)), None)
    if b is not None:
        return f"danlu built-in dataset: {b.source} ({b.size})", b.license or "unknown"
    if name.startswith("hf:"):
        return f"Hugging Face hub dataset {name[3:]}", "unknown"
    return "a local file or folder", "unknown"


def base_model(f: RunFiles) -> list[tuple[str, Any]]:
    """What the run starts from: a Hugging Face checkpoint or a danlu run (model.init_from)."""
    if f.get("model.type") == "hf" and f.get("model.pretrained"):
        return checkpoint(str(f.get("model.pretrained")))
    source = f.get("model.init_from")
    if not source:
        return []
    base = read(RunDir(source)) if (Path(source) / "config.yaml").is_file() else None
    data = data_name(base) if base else None
    return [
        ("source", f"danlu run {source}"),
        ("family", base.get("model.type") if base else None),
        ("trained on", data and f"{data} (licence: {data_source(data)[1]})"),
        ("licence", front_matter(Path(source) / CARD_NAME).get("license") or "unknown"),
    ]


def checkpoint(source: str) -> list[tuple[str, Any]]:
    """Name, hub id and licence of a Hugging Face checkpoint from its README (front matter,
    title) and, for `pkg:` sources, the metadata of the Python package that ships it."""
    try:
        from danlu.models.hf import resolve

        path = Path(resolve(source)).expanduser()
    except DanluError:
        path = Path(source)
    folder = path if path.is_dir() else path.parent
    readme = folder / "README.md"
    local = path.exists() and readme.is_file()
    text = readme.read_text(encoding="utf-8", errors="replace") if local else ""
    title = next(iter(re.findall(r"^# +(.+?)\s*$", text, re.M)), None)
    # the hub id the README gives the checkpoint, e.g. in its usage code: 'owner/<title>'
    own = re.search(rf"['\"]([\w.-]+/{re.escape(title)})['\"]", text) if title else None
    hub_id = own.group(1) if own else None
    if not path.exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        hub_id = source  # a hub name, loaded online
    rows = [("source", source), ("name", title), ("hub id", hub_id)]
    rows += [("architecture", load(folder / "config.json").get("model_type") if local else None)]
    rows += [("licence", (front_matter(readme) if local else {}).get("license") or "unknown")]
    if source.startswith("pkg:"):
        rows.append(("packaged as", _package(source[4:].partition("/")[0])))
    return rows


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a Markdown file ({} when there is none)."""
    try:
        found = re.match(r"---\s*\n(.*?)\n---\s*\n", path.read_text(encoding="utf-8"), re.S)
        return as_dict(yaml.safe_load(found.group(1))) if found else {}
    except (OSError, yaml.YAMLError):
        return {}


def _package(module: str) -> str | None:
    from importlib import metadata

    try:
        meta = metadata.metadata((metadata.packages_distributions().get(module) or [module])[0])
    except metadata.PackageNotFoundError:
        return None
    licence = meta.get("License-Expression") or meta.get("License") or "unknown"
    return f"Python package {meta['Name']} {meta['Version']} (package licence: {licence})"


def variant_row(f: RunFiles, parent: str | None) -> tuple[str, dict[str, Any]] | None:
    """(metric, this variant's row) in its parent's compress_report.json, when recorded."""
    for folder in (Path(parent) if parent else None, f.run.path.parent.parent):
        report = load(folder / "compress_report.json") if folder else {}
        for r in as_list(report.get("rows")):
            if as_dict(r).get("run") == str(f.run.path) or as_dict(r).get("name") == f.get("name"):
                return str(report.get("metric", "metric")), r
    return None


def inputs(f: RunFiles) -> str:
    """What the model takes, in words: 'table rows with the columns a, b', 'texts', …"""
    kind = f.card.get("input")
    if kind == "table":
        cols = [str(c.get("name")) for c in as_list(f.card.get("columns")) if isinstance(c, dict)]
        return f"table rows with the columns {', '.join(cols)}" if cols else "table rows"
    return {"text": "texts", "images": "images"}.get(str(kind), "inputs")


def counts(value: Any, prefix: str = "") -> str:
    """'email 3, phone 2' from a number or a (nested) map of counts."""
    if is_num(value):
        return f"{prefix}{num(value)}" if value else ""
    items = as_dict(value).items()
    parts = [counts(v, f"{prefix}{k}{'.' if isinstance(v, dict) else ' '}") for k, v in items]
    return ", ".join(p for p in parts if p)


# --------------------------------------------------------------------------- limitations


def limitations(f: RunFiles, split: str | None, m: dict[str, Any]) -> list[str]:
    """Limitations the run's own files show, most important first."""
    out, lin = [], f.lineage
    if lin.get("status") not in (None, "completed"):
        out.append(f"Training did not complete (status: {cell(lin['status'])}).")
    name = headline_metric(f, m)
    out += _metric_limits(f, split, m, name) if name else ["Not evaluated: its quality is unknown."]
    ratio = as_dict(as_dict(f.card.get("check")).get("class_balance")).get("imbalance_ratio")
    if is_num(ratio) and ratio >= 3:
        out.append(
            f"Imbalanced classes (largest / smallest = {ratio:.1f}): the rare classes are "
            "learned from few examples."
        )
    for x in as_list(f.card.get("findings")):
        if isinstance(x, dict) and x.get("level") in ("warning", "blocker"):
            out.append(f"Data finding ({x['level']}): {cell(x.get('message', x.get('code')))}")
    aucs = [pick(a, "auc", "attack_auc") for _, a in attacks(load(f.run.path / "audit.json"))]
    if aucs and max(aucs) > 0.6:
        out.append(
            f"A membership-inference attack reaches AUC {max(aucs):.3f}: the model reveals "
            "which examples it was trained on."
        )
    if as_dict(lin.get("code")).get("git_dirty"):
        out.append("Trained from code with uncommitted changes: its commit does not reproduce it.")
    out.append(
        f"Measured only on data like {data_name(f) or 'its training data'}: elsewhere, unknown."
    )
    return out


def _metric_limits(f: RunFiles, split: str | None, m: dict[str, Any], name: str) -> list[str]:
    out = []
    interval, count = ci(m, name), m.get("count")
    high = interval.get("high")
    width = high - interval["low"] if is_num(high) else None
    scale = 1.0 if 0 <= m[name] <= 1 else abs(m[name])  # an unbounded metric: relative width
    if (is_num(count) and count < 200) or (is_num(width) and width / scale > 0.1):
        span = f"; the confidence interval of {name} is {width:.3f} wide" if is_num(width) else ""
        out.append(f"Small {split} split ({num(count)} examples{span}): the estimate is rough.")
    if split != "test":
        out.append(f"Evaluated on the {split} split, not on a held-out test split.")
    f1 = {k: as_dict(v).get("f1") for k, v in as_dict(m.get("per_class")).items()}
    f1 = {k: v for k, v in f1.items() if is_num(v)}
    if len(f1) > 1 and max(f1.values()) - min(f1.values()) > 0.1:
        worst = min(f1, key=lambda k: f1[k])
        out.append(
            f"Weaker on class {cell(worst)}: F1 {num(f1[worst])}, "
            f"best class {num(max(f1.values()))}."
        )
    if is_num(m.get("ece")) and m["ece"] > 0.05:
        out.append(f"Probabilities are not calibrated (ECE {num(m['ece'])}): read them as scores.")
    for column, s in as_dict(m.get("slices")).items():
        s = as_dict(s)
        gaps = [f"{label} {num(s[k])}" for k, label in FAIRNESS if is_num(s.get(k)) and s[k] > 0.1]
        if gaps:
            out.append(f"Outcomes differ between groups of {cell(column)}: {', '.join(gaps)}.")
    return out
