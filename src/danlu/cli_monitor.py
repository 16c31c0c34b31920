"""`danlu monitor RUN_OR_NAME --log DIR`: drift of served traffic against the training data
(registered on cli.app).

Reads the server's request log (danlu.serve.requestlog), compares it with the run's training
profile (danlu.serve.drift), prints the checks, writes OUT/drift.json and OUT/drift.html and
exits 3 on drift (0 for ok, warn or too few samples) so scripts can act. On drift it writes
OUT/retrain_recommendation.json and .md; with --retrain-with NEW_DATA it trains a new run
(<run>-retrain-<date>, next to the run) on the training data plus the new rows. A config names
one data file, so "plus" is a copy: the training file with the new rows appended, written to
OUT/retrain_data/<new run><suffix>, which the new run's config points to.
"""

from __future__ import annotations

import os
import time
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from danlu.cli import Debug, app, command, out
from danlu.errors import ConfigError, DataError
from danlu.rundir import RunDir, atomic_write_json, atomic_write_text, now

STYLE = {"ok": "green", "warn": "yellow", "drift": "bold red", "not enough": "dim"}
RECOMMENDATION = "retrain_recommendation"
RETRAIN_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".pq")


@app.command()
@command
def monitor(
    run: Annotated[
        str,
        typer.Argument(
            metavar="RUN_OR_NAME", help="run directory, or registry NAME[:VERSION|:STAGE]"
        ),
    ],
    log: Annotated[Path, typer.Option(help="request log folder (serve.request_log)")],
    since: Annotated[float | None, typer.Option(help="only requests of the last HOURS")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="folder for drift.json / drift.html", show_default="LOG/monitor"
        ),
    ] = None,
    threshold_psi: Annotated[
        float, typer.Option(help="PSI from which a distribution has drifted (warning: X/2, ≤ 0.1)")
    ] = 0.25,
    min_samples: Annotated[int, typer.Option(help="live samples needed for a verdict")] = 100,
    retrain_with: Annotated[
        Path | None,
        typer.Option(help="labelled new rows (training data's format): on drift, train on both"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="model name in the log", show_default="registry or run folder name"),
    ] = None,
    registry: Annotated[str | None, typer.Option(help="registry root")] = None,
    debug: Debug = False,
) -> None:
    """Compare served inputs and predictions with the training data (PSI, Kolmogorov-Smirnov,
    text length and vocabulary, class mix, confidence). Exit status 3 on drift."""
    from danlu.serve.drift import Thresholds, compare, reference
    from danlu.serve.requestlog import RequestLog

    if not log.is_dir():
        raise DataError(
            f"request log folder '{log}' not found",
            fix="serve with a request log (danlu serve --request-log DIR, or serve.request_log)",
        )
    options = (
        ("--threshold-psi", threshold_psi),
        ("--min-samples", min_samples),
        ("--since", since),
    )
    bad = [(o, v) for o, v in options if v is not None and v <= 0]
    if bad:
        raise ConfigError(f"{bad[0][0]} is {bad[0][1]}", fix="it must be positive")
    name, rundir, checkout = _resolve(run, registry)
    name = model or name
    out_dir = out_dir or log / "monitor"
    cutoff = time.time() - since * 3600 if since is not None else None
    records = [r for r in RequestLog(log).read(since=cutoff) if r.get("model") == name]
    if not records:
        _no_records(log, name, cutoff)
    signed = (rundir.path / "manifest.sig").is_file()  # a new file would break its signature
    cache = out_dir / f"drift_reference-{name}.json" if checkout or signed else None
    ref = reference(rundir, cache=cache)
    th = Thresholds(
        psi_warn=min(0.1, threshold_psi / 2), psi_drift=threshold_psi, min_samples=min_samples
    )
    report = compare(ref, records, th, _token_names(rundir) if ref["input"] == "text" else None)
    result = {"model": name, "ref": run, "run": str(rundir.path), "log": str(log), "created": now()}
    result |= report.to_dict()
    _write(result, out_dir, name)
    _summary(report, name)
    out.print(f"wrote {escape(str(out_dir / 'drift.json'))} and drift.html", highlight=False)
    _recommend(result, report, rundir, out_dir, model)
    if retrain_with is not None and report.status == "drift":
        _retrain(rundir, retrain_with, out_dir, result)
    elif retrain_with is not None:
        out.print(
            f"{report.status}: not retraining (only on drift)", highlight=False, soft_wrap=True
        )
    if report.status == "drift":
        raise typer.Exit(3)


def _resolve(ref: str, registry: str | None) -> tuple[str, RunDir, bool]:
    """(name in the log, run, whether it is a registry checkout)."""
    path = Path(ref)
    if (path / "config.yaml").is_file():
        return path.resolve().name, RunDir.open(path), False
    try:
        from danlu.serve.store import resolve
    except ImportError:  # no registry in this installation
        return path.name, RunDir.open(path), False
    name, rundir = resolve(ref, registry)
    return name, rundir, True


def _no_records(log: Path, name: str, cutoff: float | None) -> None:
    from danlu.serve.requestlog import RequestLog

    logged = sorted({str(r.get("model")) for r in RequestLog(log).read(since=cutoff)})
    hint = f" (logged: {', '.join(logged)}; choose with --model)" if logged else ""
    message = f"no requests of model '{name}' in {log}{hint}"
    out.print(escape(message), highlight=False, soft_wrap=True)


def _token_names(run: RunDir) -> Any:
    from danlu.data.tokenize import TextEncoder

    tokenizer = TextEncoder.load(run.tokenizer).tokenizer
    return lambda i: tokenizer.id_to_token(int(i)) or str(i)


def _write(result: dict[str, Any], out_dir: Path, name: str) -> None:
    from danlu.serve.drift_html import write_html

    atomic_write_json(out_dir / "drift.json", result)
    write_html(result, out_dir / "drift.html", name)


def _summary(report: Any, name: str) -> None:
    table = Table()
    for column, justify in (("check", "left"), ("value", "right"), ("threshold", "left")):
        table.add_column(column, justify=justify)
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        status = f"[{STYLE[c.status]}]{c.status}[/]"
        table.add_row(
            escape(c.name), f"{c.value:.4g}", escape(c.threshold), status, escape(c.detail)
        )
    if report.checks:
        out.print(table)
    style = STYLE[report.status]
    out.print(
        f"{escape(name)}: [{style}]{escape(report.message)}[/]", highlight=False, soft_wrap=True
    )


# --------------------------------------------------------------------- recommendation


def _recommend(
    result: dict[str, Any], report: Any, run: RunDir, out_dir: Path, model: str | None
) -> None:
    """On drift OUT/retrain_recommendation.json and .md; otherwise an old one is removed."""
    paths = [out_dir / f"{RECOMMENDATION}.json", out_dir / f"{RECOMMENDATION}.md"]
    if report.status != "drift":
        for p in paths:
            p.unlink(missing_ok=True)
        return
    suffix = Path(run.load_config().data.dataset).suffix or ".csv"
    command_line = (
        f"danlu monitor {result['ref']} --log {result['log']}"
        + (f" --model {model}" if model else "")
        + f" --retrain-with NEW_LABELLED_DATA{suffix}"
    )
    rec = {
        "model": result["model"], "run": result["run"], "created": result["created"],
        "status": "drift", "since": result["since"], "window": result["window"],
        "samples": {"live": report.live, "training": report.reference},
        "drifted": [
            {"check": c.name, "value": c.value, "threshold": c.threshold, "detail": c.detail}
            for c in report.drifted
        ],
        "warnings": [c.name for c in report.checks if c.status == "warn"],
        "recommendation": "label a sample of recent traffic and retrain on the training data "
        "plus those rows; compare the new run with the old before promoting it",
        "suggested_command": command_line,
    }  # fmt: skip
    atomic_write_json(paths[0], rec)
    atomic_write_text(paths[1], _markdown(rec))
    out.print(f"wrote {escape(str(paths[0]))} and .md", highlight=False, soft_wrap=True)


def _markdown(rec: dict[str, Any]) -> str:
    lines = [
        f"# Retraining recommended: {rec['model']}",
        "",
        f"Drift since {rec['since']} (window {rec['window'][0]} → {rec['window'][1]}), "
        f"{rec['samples']['live']} live samples against {rec['samples']['training']} "
        f"training examples of run `{rec['run']}`.",
        "",
        "| check | value | threshold | detail |",
        "|---|---|---|---|",
        *[
            f"| `{d['check']}` | {d['value']:.4g} | {d['threshold']} | "
            f"{d['detail'].replace('|', '/')} |"
            for d in rec["drifted"]
        ],
        "",
        f"Warnings: {', '.join(rec['warnings']) or 'none'}.",
        "",
        f"What to do: {rec['recommendation']}:",
        "",
        f"    {rec['suggested_command']}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- retrain


def _retrain(run: RunDir, new_data: Path, out_dir: Path, result: dict[str, Any]) -> None:
    from danlu import api
    from danlu.manifest import update_manifest
    from danlu.rundir import update_lineage

    cfg = run.load_config()
    source = Path(cfg.data.dataset)
    if not (source.is_file() and source.name.lower().endswith(RETRAIN_SUFFIXES)):
        raise ConfigError(
            f"--retrain-with appends rows to a data file, and run '{run.path}' was trained on "
            f"data.dataset '{cfg.data.dataset}'",
            fix=f"retrain runs trained on a {', '.join(RETRAIN_SUFFIXES)} file, or merge the "
            "data yourself and `danlu train` on it",
        )
    if not new_data.is_file():
        raise DataError(
            f"--retrain-with file '{new_data}' not found",
            fix="pass a labelled file with the training data's columns",
        )
    merged, added = _merged(run, cfg, source, new_data)
    name = _new_name(run)
    data_path = (out_dir / "retrain_data" / f"{name}{source.suffix}").resolve()
    _write_table(merged, data_path)
    raw = cfg.to_dict()
    raw["name"], raw["data"]["dataset"] = name, str(data_path)
    out.print(
        f"retraining on {len(merged):,} rows ({added:,} new) → {escape(str(run.path.parent / name))}",
        highlight=False,
        soft_wrap=True,
    )
    trained = api.train(raw, run_dir=run.path.parent / name)
    update_lineage(
        trained.run, retrained_from=str(run.path.resolve()), added_rows=added,
        added_from=str(new_data.resolve()),
        drift={"since": result["since"], "checks": [c["name"] for c in result["checks"]
                                                    if c["status"] == "drift"]},
    )  # fmt: skip
    update_manifest(trained.run.path, [trained.run.lineage])  # keep `danlu verify` passing
    out.print(f"new run: {escape(str(trained.run.path))}", highlight=False, soft_wrap=True)


def _merged(run: RunDir, cfg: Any, source: Path, new_data: Path) -> tuple[Any, int]:
    """The training table with the new rows appended (the training file's columns)."""
    import pandas as pd

    from danlu.data.text import read_text_table

    spec = run.read("preprocess.json")
    if spec["input"] == "text":
        needed = [cfg.data.text or "text", spec["label"]]
        old = read_text_table(source, cfg.data.encoding_errors)
        new = read_text_table(new_data, cfg.data.encoding_errors)
    else:
        from danlu.data.tables import read_table

        needed = [c["name"] for c in spec["table"]["columns"]] + [spec["label"]]
        old, new = read_table(source), read_table(new_data)
    missing = [c for c in needed if c not in new.columns]
    if missing:
        raise DataError(
            f"'{new_data}' has no column(s) {', '.join(missing)}",
            fix=f"the new rows need the training columns: {', '.join(needed)}",
        )
    rows = new[[c for c in old.columns if c in new.columns]]
    return pd.concat([old, rows], ignore_index=True), len(rows)


def _new_name(run: RunDir) -> str:
    base = f"{run.path.name}-retrain-{date.today():%Y%m%d}"
    name, n = base, 1
    while (run.path.parent / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _write_table(frame: Any, path: Path) -> None:
    """CSV / TSV / JSONL / Parquet by the name's suffix, atomically (temp + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    lower = path.name.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    elif lower.endswith((".parquet", ".pq")):
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False, sep="\t" if lower.endswith(".tsv") else ",")
    os.replace(tmp, path)
