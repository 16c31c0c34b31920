"""`danlu card RUN`: write RUN/MODEL_CARD.md from what the run records (registered on cli.app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from danlu.cli import Debug, app, command, out


@app.command()
@command
def card(
    run: Annotated[Path, typer.Argument(help="run directory")],
    intended_use: Annotated[
        str | None, typer.Option(help="what the model is for (default: derived from the task)")
    ] = None,
    out_of_scope: Annotated[
        str | None, typer.Option(help="uses it is not meant for (default: a generic text)")
    ] = None,
    license: Annotated[
        str | None, typer.Option("--license", help="the model's licence, e.g. apache-2.0")
    ] = None,
    card_file: Annotated[
        Path | None,
        typer.Option(
            "--card",
            help="YAML with intended_use, out_of_scope, license, developers, tags, limitations "
            "(default: RUN/card.yaml when present)",
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Write RUN/MODEL_CARD.md: model details, intended use, training data and its licence,
    metrics with confidence intervals, fairness slices, privacy, limitations and how to use it,
    with Hugging Face metadata as YAML front matter. `danlu report` links it."""
    from danlu.evaluate.card import write_card

    path = write_card(
        run,
        intended_use=intended_use,
        out_of_scope=out_of_scope,
        card=card_file,
        license=license,
    )
    out.print(f"wrote [bold]{escape(str(path))}[/]", highlight=False, soft_wrap=True)
