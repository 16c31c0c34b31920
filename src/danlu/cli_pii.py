"""`danlu data scan CONFIG`: personal data in the data a config names (registered on
cli.data_app).

It reads the data as training would (`data.build`'s readers, no splitting or tokenizing),
counts e-mail addresses, phone numbers, card numbers, IBANs, IP addresses and the custom
`data.pii.patterns` per column, prints a table with masked examples and writes the report
as JSON (runs/<name>-scan/pii.json unless --out). Finding PII is not an error: the exit
status is 0, and the summary says how to redact it (`data.redact_pii: true`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from danlu.cli import Debug, Overrides, command, data_app, out
from danlu.errors import ConfigError, DataError


def scan_config(
    config: str | Path | dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out_dir: str | Path | None = None,
    examples: int = 3,
) -> tuple[dict[str, Any], Path]:
    """Scan the data of a config; write pii.json into `out_dir` (default runs/<name>-scan/)
    and return the report and its path."""
    from danlu.config import load
    from danlu.data.build import resolve
    from danlu.data.pii_scan import scan
    from danlu.rundir import atomic_write_text

    cfg = load(config, list(overrides))
    d = cfg.data
    if d.task == "chat":
        raise DataError(
            "danlu data scan does not read chat conversations yet",
            fix="scan the conversation file as a table (data.task unset, data.pii.columns)",
        )
    start = time.perf_counter()
    raw = resolve(
        d.dataset,
        image=d.image.model_dump(),
        cache_dir=d.cache_dir,
        mirror=d.mirror,
        download=d.download,
        task=d.task,
        text=d.text,
        label=d.label,
        target=d.target,
        encoding_errors=d.encoding_errors,
    )
    pii = d.pii.model_dump()
    report = scan(raw, **pii, names=(d.text or "source", d.target or "target"), examples=examples)
    report = {
        "dataset": d.dataset,
        **report,
        "redact_pii": d.redact_pii,
        "seconds": round(time.perf_counter() - start, 3),
    }
    folder = Path(out_dir) if out_dir is not None else Path(cfg.runs_dir) / f"{cfg.name}-scan"
    path = folder / "pii.json"
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report, path


@data_app.command("scan")
@command
def data_scan(
    config: Annotated[str, typer.Argument(help="config file or bundled example name")],
    overrides: Overrides = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="write pii.json here (default runs/<name>-scan)")
    ] = None,
    examples: Annotated[
        int, typer.Option(help="masked examples shown per column and kind", min=0)
    ] = 3,
    debug: Debug = False,
) -> None:
    """Find personal data (e-mails, phones, cards, IBANs, IPs, custom patterns) in the data a
    config names; report counts per column with masked examples (exit 0 even when found)."""
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out '{out_dir}' is a file", fix="pass a folder")
    report, path = scan_config(config, overrides or [], out_dir=out_dir, examples=examples)
    _print(report)
    out.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


def _print(report: dict[str, Any]) -> None:
    table = Table(title=f"personal data in {report['origin']}")
    for name, justify in (("column", "left"), ("kind", "left"), ("matches", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("values with PII", justify="right")
    table.add_column("examples (masked)")
    for column, info in report["columns"].items():
        for kind, found in info["found"].items():
            share = f"{info['values_with_pii']:,} of {info['values']:,}"
            table.add_row(
                escape(column),
                kind,
                f"{found['count']:,}",
                share,
                escape(", ".join(found["examples"])),
            )
    scanned = ", ".join(f"{escape(c)} ({i['values']:,})" for c, i in report["columns"].items())
    out.print(f"scanned: {scanned or 'no text columns'}", highlight=False, soft_wrap=True)
    total = report["total"]
    if not total:
        out.print("[green]no personal data found[/]", highlight=False)
        return
    out.print(table)
    kinds = {k for i in report["columns"].values() for k in i["found"]}
    if report["redact_pii"]:
        advice = "data.redact_pii is on: training replaces them with placeholders"
    else:
        advice = "set data.redact_pii: true to replace them with placeholders before training"
    out.print(
        f"[bold yellow]found {total:,} piece{'s' if total != 1 else ''} of personal data[/] "
        f"({', '.join(sorted(kinds))}); {advice}",
        highlight=False,
        soft_wrap=True,
    )
