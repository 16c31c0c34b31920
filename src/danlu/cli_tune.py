"""`danlu tune CONFIG`: hyperparameter search over the config's `tune.space` (registered on
cli.app). The study lives in danlu.tune.search; this module passes it danlu.api.train, prints
one line per trial and the summary table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from danlu.cli import Debug, Overrides, _split_args, app, command, out


@app.command()
@command
def tune(
    config: Annotated[
        str | None,
        typer.Argument(help="config with a tune: section (optional with --resume --study-dir)"),
    ] = None,
    overrides: Overrides = None,
    trials: Annotated[
        int | None, typer.Option(help="trial budget: finished + pruned trials of the study")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="time budget of this run in minutes (the current trial finishes)"),
    ] = None,
    study_dir: Annotated[
        Path | None, typer.Option(help="the study folder", show_default="<runs_dir>/<name>-tune")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue an existing study (refuse to start one)")
    ] = False,
    force: Annotated[bool, typer.Option(help="continue a study made from another config")] = False,
    debug: Debug = False,
) -> None:
    """Search hyperparameters with Optuna: each trial is a run in STUDY_DIR/trial-NNNN; the
    study (SQLite) continues when the command runs again. Writes best_config.yaml,
    tune_summary.json and tune_report.html."""
    from danlu import api
    from danlu.tune.search import run_study

    config, overrides = _split_args(config, overrides)
    result = run_study(
        config,
        overrides,
        train=api.train,
        trials=trials,
        timeout_minutes=timeout,
        study_dir=study_dir,
        resume=resume,
        force=force,
        say=lambda line: out.print(escape(line), highlight=False, soft_wrap=True),
    )
    summary(result)
    if result.stopped == "interrupted":
        raise typer.Exit(130)


MAX_ROWS = 40  # larger studies show their best trials (all are in tune_summary.json)


def summary(result: Any) -> None:
    s, folder = result.summary, result.study_dir
    out.print(_table(s))
    if s["best"]:
        b = s["best"]
        out.print(
            f"[bold]best:[/] trial {b['number']}, {s['metric']} {b['value']:.4f}  "
            f"({escape(' '.join(b['overrides']))})",
            highlight=False,
            soft_wrap=True,
        )
    if s["importance"]:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in s["importance"].items())
        out.print(f"importance (fANOVA): {escape(shown)}", highlight=False, soft_wrap=True)
    out.print(escape(_stop_note(result)), highlight=False, soft_wrap=True)
    written = [n for n in ("best_config.yaml", "tune_summary.json", "tune_report.html")
               if (folder / n).is_file()]  # fmt: skip
    out.print(f"wrote {escape(', '.join(str(folder / n) for n in written))}", soft_wrap=True)
    if s["best"]:
        out.print(f"next: danlu train {escape(str(folder / 'best_config.yaml'))}", soft_wrap=True)


def _table(s: dict[str, Any]) -> Table:
    """The trials: one column per searched key when they fit the terminal, else one column
    of key=value text; the best MAX_ROWS trials of a larger study."""
    from danlu.tune.space import short_keys, show

    rows, best = s["trials"], (s["best"] or {}).get("number")
    if len(rows) > MAX_ROWS:
        sign = 1 if s["direction"] == "minimize" else -1
        ranked = sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0)))
        rows = sorted(ranked[:MAX_ROWS], key=lambda r: r["number"])
    keys = list(rows[0]["params"]) if rows else []
    names = short_keys(keys)
    cells = [[show(r["params"].get(k)) for k in keys] for r in rows]
    widths = [max([len(names[k]), *(len(c[i]) for c in cells)]) + 3 for i, k in enumerate(keys)]
    wide = sum(widths) + len(s["metric"]) + 40 <= out.width
    shown = f"{len(rows)} of {len(s['trials'])}" if len(rows) < len(s["trials"]) else len(rows)
    table = Table(
        title=f"{s['study']}: {shown} trials, {s['metric']} ({s['direction']})",
        caption="pruned @N: stopped at its N-th evaluation" if s["counts"]["pruned"] else None,
    )
    params = [names[k] for k in keys] if wide else ["params"]
    for col in ("trial", *params, s["metric"], "state", "seconds"):
        table.add_column(escape(col), justify="left" if col in ("state", "params") else "right")
    for r, c in zip(rows, cells, strict=True):
        value = r["value"] if r["value"] is not None else r["last"]
        style = "bold green" if r["number"] == best else "dim" if r["state"] != "complete" else None
        text = c if wide else ["  ".join(f"{names[k]}={v}" for k, v in zip(keys, c, strict=True))]
        table.add_row(
            str(r["number"]),
            *map(escape, text),
            "–" if value is None else f"{value:.4f}",
            escape(r["state"] + (f" @{r['evaluations']}" if r["state"] == "pruned" else "")),
            "–" if r["seconds"] is None else f"{r['seconds']:.1f}",
            style=style,
        )
    return table


def _stop_note(result: Any) -> str:
    left = result.budget - result.counted
    again = "run the same command again to continue the study"
    if result.stopped == "timeout":
        return (
            f"stopped by the time budget after {result.ran} trial(s) in this run; "
            f"{result.counted} of {result.budget} trials done: {again}"
        )
    if result.stopped == "interrupted":
        return (
            f"stopped by Ctrl-C; the study is saved ({result.counted} of {result.budget}): {again}"
        )
    if left > 0:
        return f"{result.counted} of {result.budget} trials done: {again}"
    return f"trial budget reached: {result.counted} of {result.budget} trials"
