"""`danlu compress RUN` and `danlu export RUN`: smaller and faster variants of a run, measured
(registered on cli.app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from danlu.cli import Debug, app, command, out


@app.command()
@command
def compress(
    run: Annotated[Path, typer.Argument(help="a trained run directory (the parent)")],
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML with a compress: section",
            show_default="the run's compress: section, else the model family's defaults",
        ),
    ] = None,
    only: Annotated[str | None, typer.Option(help="comma-separated variant names to make")] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="folder for the variants", show_default="RUN/compressed/"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="make variants again even if complete")] = False,
    measure: Annotated[bool, typer.Option(help="time each variant (batch 1 and 32)")] = True,
    debug: Debug = False,
) -> None:
    """Quantize, prune, distill, tie or export a run: each variant becomes a run evaluated on
    the parent's split and timed, and RUN/compress_report.html compares them and recommends
    the fastest within the accuracy budget."""
    from danlu.api_compress import compress as run_compress

    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    result = run_compress(
        run, config, only=names, out=out_dir, overwrite=overwrite, measure=measure
    )
    out.print(table(result.table))
    t = result.table
    out.print(
        f"recommended: [bold]{escape(str(t['recommended']))}[/] — {escape(t['reason'])}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(f"wrote [bold]{escape(str(result.report))}[/]", highlight=False, soft_wrap=True)


def table(t: dict[str, Any]) -> Table:
    grid = Table(title=f"{t['metric']} on {t.get('split', 'test')} (budget {t['budget']} points)")
    for col in ("variant", "size", "params", "ms @1", "/s @32", t["metric"], "Δ"):
        grid.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for r in t["rows"]:
        metric, delta = r.get("metric"), r.get("delta")
        ok = r.get("within_budget")
        grid.add_row(
            escape(r["name"]),
            _size(r.get("file_bytes")),
            f"{r['parameters']:,}" if r.get("parameters") else "-",
            _num(r.get("latency_ms", {}).get("1"), ".2f"),
            _num(r.get("throughput", {}).get("32"), ",.0f"),
            _num(metric, ".4f"),
            "" if delta is None else f"[{'green' if ok else 'red'}]{delta:+.2f}[/]",
        )
    return grid


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _size(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
@command
def export(
    run: Annotated[Path, typer.Argument(help="run directory")],
    fmt: Annotated[str, typer.Option("--format", help="onnx, torchscript or safetensors")] = "onnx",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="folder to write into", show_default="RUN/export/")
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="largest output difference accepted in the parity check")
    ] = 1e-3,
    debug: Debug = False,
) -> None:
    """Export a run's model (ONNX with dynamic batch and sequence axes, TorchScript, or plain
    safetensors), then check the file against the model on held-out inputs."""
    from danlu.api_compress import export as run_export

    result = run_export(run, fmt, out_dir, tolerance=tolerance)
    p = result.parity
    check = (
        f"; parity on {p['inputs']} held-out batches: max |Δ| {p['max_abs_diff']:.2e}" if p else ""
    )
    out.print(f"wrote [bold]{escape(str(result.path))}[/]{check}", highlight=False, soft_wrap=True)
