"""`danlu pipeline CONFIG` and `danlu quickstart`: the stages of a config's `pipeline:` section
run in order on one run directory (registered on cli.app).

Stage lines are printed as the stages go; a table of the stages (status, seconds, key result)
and the next commands come at the end, or just before the serve stage, which blocks until
Ctrl-C. A failed stage is one `error: stage NAME failed: ...` line and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from danlu.cli import Debug, Overrides, app, command, err, out

QUICKSTART = "quickstart_r8"  # the bundled config (src/danlu/configs/quickstart_r8.yaml)

RunDirOption = Annotated[
    Path | None,
    typer.Option(help="the run directory", show_default="<runs_dir>/<name> of the config"),
]
NoServe = Annotated[
    bool, typer.Option("--no-serve", help="leave the serve stage out (scripts and CI)")
]


@app.command()
@command
def pipeline(
    config: Annotated[str, typer.Argument(help="config file or bundled example name")],
    overrides: Overrides = None,
    run_dir: RunDirOption = None,
    no_serve: NoServe = False,
    start: Annotated[
        str | None, typer.Option("--from", help="run this stage and the later ones again")
    ] = None,
    only: Annotated[
        str | None, typer.Option(help="comma-separated stages to run (even if done)")
    ] = None,
    debug: Debug = False,
) -> None:
    """Run the config's pipeline: data_check → train|finetune → evaluate → compress → report →
    register → serve (the stages its pipeline: section lists). Re-running skips stages
    already done, resumes an interrupted training and redoes stages whose inputs changed;
    progress is in RUN/pipeline.json."""
    names = [n.strip() for n in only.split(",") if n.strip()] if only else None
    _run(config, overrides or [], run_dir, not no_serve, start, names, quickstart=False)


@app.command()
@command
def quickstart(
    overrides: Overrides = None,
    no_serve: NoServe = False,
    run_dir: RunDirOption = None,
    port: Annotated[int | None, typer.Option(help="serve on this port (0 = any free one)")] = None,
    debug: Debug = False,
) -> None:
    """The whole life of a model in minutes: check the Reuters R8 news data, fine-tune MiniLM
    briefly, evaluate on the official test split, compress to int8 with the trade-off table,
    write the report, register the model and serve it with the web playground."""
    extra = [f"serve.port={port}"] if port is not None else []
    _run(
        QUICKSTART, [*(overrides or []), *extra], run_dir, not no_serve, None, None, quickstart=True
    )


def _run(
    config: str,
    overrides: list[str],
    run_dir: Path | None,
    serve: bool,
    start: str | None,
    only: list[str] | None,
    *,
    quickstart: bool,
) -> None:
    from danlu.pipeline import run_pipeline
    from danlu.train.loop import TrainingInterrupted

    def say(line: str) -> None:
        stage, sep, rest = line.partition(": ")
        text = f"[bold]{escape(stage)}[/]{sep}{escape(rest)}" if sep else escape(line)
        out.print(text, highlight=False, soft_wrap=True)

    try:
        result = run_pipeline(
            config, overrides, run_dir=run_dir, serve=serve, start=start, only=only,
            say=say, before_serve=lambda r: _summary(r, serving=True, quickstart=quickstart),
        )  # fmt: skip
    except TrainingInterrupted as e:
        err.print(
            escape(f"{e}. Run the same command again to resume it."),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    if "serve" not in result.records:
        _summary(result, serving=False, quickstart=quickstart)


def _summary(result: Any, *, serving: bool, quickstart: bool = False) -> None:
    """The table of stages, then the headline facts and the next commands."""
    from danlu.pipeline import serve_settings

    out.print(_table(result))
    facts = result.context.results
    evaluated, registered = facts.get("evaluate"), facts.get("register")
    run = escape(str(result.run.path))
    lines = []
    if evaluated:
        count = f" on {evaluated['count']:,} examples" if evaluated.get("count") else ""
        lines.append(
            f"[bold green]{evaluated['split']} {evaluated['metric']}: "
            f"{evaluated['value']:.4f}[/]{count}"
        )
    lines.append(f"run directory: {run}")
    if facts.get("report"):
        lines.append(f"report: {escape(facts['report']['report'])}")
    if registered:
        lines.append(
            f"registry: [bold]{escape(registered['ref'])}[/] (stage {registered['stage']}) "
            f"in {escape(registered['root'])}"
        )
    ref = escape(f"{registered['name']}:{registered['stage']}" if registered else run)
    settings = serve_settings(result.context)
    port = settings.port or 8000
    root = result.context.settings.register.root  # not the default one: say where it is
    serve_root, store_root = (f" --registry {root}", f" --root {root}") if root else ("", "")
    if serving:
        lines.append(f"playground: [bold]{_url(settings)}[/] (starting; Ctrl-C stops it)")
    else:
        lines.append(f"serve it: danlu serve {ref} --port {port}{escape(serve_root)}")
    commands = [f"danlu evaluate {run} --split test", f"danlu report {run}"]
    if registered:
        commands += [
            f"danlu registry show {ref}{escape(store_root)}",
            f"danlu registry promote {ref} --stage prod{escape(store_root)}",
        ]
    if quickstart:
        commands.append(
            f"curl -s 127.0.0.1:{port}/v1/predict -H 'Content-Type: application/json' "
            '-d \'{"inputs": ["crude oil prices rose after opec cut output"]}\''
        )
    lines += ["", "next:", *(f"  {c}" for c in commands)]
    out.print("\n".join(lines), highlight=False, soft_wrap=True)


def _table(result: Any) -> Table:
    grid = Table(title=f"pipeline of {escape(str(result.run.path))}")
    for col in ("stage", "status", "seconds", "result"):
        grid.add_column(col, justify="right" if col == "seconds" else "left")
    for label in result.stages:
        record = result.records.get(label)
        if record is None:
            grid.add_row(label, "[yellow]starting[/]", "", "")
            continue
        status = "[dim]done before[/]" if record.get("skipped") else "[green]done[/]"
        seconds = record.get("seconds")
        grid.add_row(
            label,
            status,
            "-" if seconds is None else f"{seconds:.1f}",
            escape(str((record.get("summary") or {}).get("result", ""))),
        )
    return grid


def _url(settings: Any) -> str:
    if not settings.port:
        return "(a free port: the server prints it)"
    return f"http://{settings.host}:{settings.port}/"
