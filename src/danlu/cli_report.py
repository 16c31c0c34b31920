"""`danlu report` and `danlu compare`: the HTML pages of runs (registered on cli.app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from danlu.cli import Debug, app, command, out
from danlu.errors import ConfigError


@app.command()
@command
def report(
    run: Annotated[Path, typer.Argument(help="run directory")],
    split: Annotated[
        str | None, typer.Option(help="split to report on (default: config's evaluate.split)")
    ] = None,
    debug: Debug = False,
) -> None:
    """Write RUN/report.html: config, lineage, data card, learning curves, metrics and their
    plots (evaluating the split first when metrics.json has no entry for it)."""
    from danlu import api
    from danlu.evaluate.report import write_report
    from danlu.evaluate.report_html import read_run
    from danlu.rundir import RunDir

    files = read_run(RunDir.open(run))
    split = split or files.get("evaluate.split") or "test"
    if split not in files.metrics:
        if split not in ("train", "val", "test"):
            raise ConfigError(f"--split {split!r} is not a split", fix="use train, val or test")
        out.print(f"evaluating {escape(str(run))} on the {escape(split)} split first")
        api.evaluate(run, split)
    path = write_report(run, split)
    out.print(f"wrote [bold]{escape(str(path))}[/]", highlight=False, soft_wrap=True)


@app.command()
@command
def compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run directories")],
    out_file: Annotated[
        Path, typer.Option("--out", help="the page to write (default: compare.html)")
    ] = Path("compare.html"),
    debug: Debug = False,
) -> None:
    """Write one page comparing runs: metrics side by side (best highlighted), overlaid
    learning curves and the config keys that differ (runs never evaluated are evaluated on
    their config's split first)."""
    from danlu import api
    from danlu.evaluate.report import write_comparison
    from danlu.rundir import RunDir

    for r in runs:
        run_dir = RunDir.open(r)
        if run_dir.weights.is_file() and not run_dir.metrics.is_file():
            out.print(f"evaluating {escape(str(r))} first")
            api.evaluate(run_dir)
    path = write_comparison(runs, out_file)
    out.print(
        f"compared {len(runs)} runs → [bold]{escape(str(path))}[/]", highlight=False, soft_wrap=True
    )
