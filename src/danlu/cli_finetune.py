"""Verbs that make a run out of runs or checkpoints: `danlu merge`, `danlu ensemble` and
`danlu convert gguf` (registered on cli.app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from danlu.cli import Debug, app, command, out

convert_app = typer.Typer(help="Convert checkpoints into formats danlu trains from.")
app.add_typer(convert_app, name="convert")


@app.command()
@command
def merge(
    run: Annotated[Path, typer.Argument(help="run directory trained with model.lora")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="merged run folder (default: RUN-merged)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    debug: Debug = False,
) -> None:
    """Merge a LoRA run's adapters into its base weights (full precision), after checking
    merged against unmerged outputs on held-out inputs (max difference ≤ 1e-4)."""
    from danlu.merge import merge as run_merge

    result = run_merge(run, out_dir, overwrite=overwrite)
    out.print(
        f"merged {escape(str(run))} → [bold]{escape(str(result.run.path))}[/] "
        f"({result.parameters:,} parameters; max difference {result.max_difference:.2e} on "
        f"{result.inputs} held-out examples)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@command
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="two or more runs of the same task and data")],
    out_dir: Annotated[Path, typer.Option("--out", help="the ensemble run folder to write")],
    weights: Annotated[
        str | None, typer.Option(help="comma-separated member weights (default: equal)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    debug: Debug = False,
) -> None:
    """Average several runs' predicted probabilities (or values) into one run, then evaluate
    it and each member on the same split."""
    from danlu.ensemble import ensemble as build
    from danlu.errors import ConfigError

    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ConfigError(
                f"--weights {weights!r} is not a comma-separated list of numbers",
                fix="e.g. --weights 0.5,0.3,0.2 (one per run)",
            ) from None
    result = build([str(r) for r in runs], out_dir, weights=parsed, overwrite=overwrite)
    m = result.metrics
    metric = m.get("headline", "accuracy")
    out.print(
        f"ensemble of {len(runs)} runs → [bold]{escape(str(result.run.path))}[/] · "
        f"{m.get('split')} {metric} {m.get(metric, float('nan')):.4f}",
        highlight=False,
        soft_wrap=True,
    )
    for member in m.get("members", []):
        value = member["value"]
        gain = m.get(metric, float("nan")) - value if value is not None else float("nan")
        out.print(
            f"  {escape(member['run'])}: {metric} {value:.4f} (ensemble {gain:+.4f})",
            highlight=False,
            soft_wrap=True,
        )


@convert_app.command("gguf")
@command
def convert_gguf(
    file: Annotated[
        str, typer.Argument(help="a .gguf file, or pkg:PACKAGE/file.gguf inside a package")
    ],
    out_dir: Annotated[Path, typer.Argument(help="checkpoint folder to write")],
    overwrite: Annotated[bool, typer.Option(help="replace OUT_DIR if it exists")] = False,
    debug: Debug = False,
) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder that `model.type: hf` loads."""
    from danlu.convert import convert_gguf as run_convert
    from danlu.models.hf import resolve

    folder = run_convert(resolve(file), out_dir, overwrite=overwrite)
    out.print(
        f"wrote [bold]{escape(str(folder))}[/] — use it as model.pretrained: {escape(str(folder))}",
        highlight=False,
        soft_wrap=True,
    )
