"""`danlu merge` and `danlu convert gguf`: the fine-tuning verbs (registered on cli.app)."""

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
