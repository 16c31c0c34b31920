"""`danlu registry add | list | show | promote | remove | checkout`: named, numbered versions of
run directories in a content-addressed store (registered on cli.app; the work is done by
danlu.serve.store.ModelStore)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from danlu.cli import Debug, app, command, out
from danlu.errors import ConfigError
from danlu.manifest import human_size

if TYPE_CHECKING:
    from danlu.serve.store import ModelStore, Version

registry_app = typer.Typer(
    help="The model registry: add runs as versions, list, show, promote, remove, check out.",
    no_args_is_help=True,
)
Root = Annotated[
    Path | None,
    typer.Option(help="registry folder", show_default="$DANLU_REGISTRY, else ./registry"),
]
Stage = Annotated[str, typer.Option(help="dev, staging or prod")]
PREFERRED = ("accuracy", "f1_macro", "r2", "rmse", "mae", "perplexity", "loss")
LINEAGE = ("run", "status", "config_hash", "data_hash", "started", "ended", "parameters",
           "precision", "steps", "parent")  # fmt: skip


def _store(root: Path | None) -> ModelStore:
    from danlu.serve.store import ModelStore

    return ModelStore(root)


def _print(text: str) -> None:
    out.print(text, highlight=False, soft_wrap=True)


@registry_app.command()
@command
def add(
    run: Annotated[Path, typer.Argument(help="a completed run directory")],
    name: Annotated[str, typer.Option("--name", help="the model's name in the registry")],
    stage: Stage = "dev",
    root: Root = None,
    trusted_key: Annotated[
        Path | None,
        typer.Option(help="require the run to be signed by this public key (KEY.pub)"),
    ] = None,
    debug: Debug = False,
) -> None:
    """Record RUN as the next version of NAME: its files (all but checkpoints/, tb/,
    compressed/, export/) are stored once by SHA-256, with its lineage and metrics."""
    store = _store(root)
    held = {e["sha256"] for v in store.versions() for e in v.files.values()}
    version = store.add(run, name, stage=stage, trusted_key=trusted_key)
    new = sum(e["size"] for e in version.files.values() if e["sha256"] not in held)
    out.print(table([version]))
    _print(
        f"added [bold]{version.ref}[/] ({version.stage}): {len(version.files)} files, "
        f"{human_size(version.size)} ({human_size(new)} new) in {escape(str(store.root))}"
    )


@registry_app.command("list")
@command
def list_versions(
    name: Annotated[str | None, typer.Argument(help="only this model's versions")] = None,
    root: Root = None,
    debug: Debug = False,
) -> None:
    """List the registered versions (of one model), oldest first."""
    store = _store(root)
    versions = store.versions(name)
    if not versions:
        what = f"model '{name}'" if name else "no models"
        _print(f"{escape(str(store.root))}: {what}{' has no versions' if name else ''}")
        return
    out.print(table(versions))


@registry_app.command()
@command
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME:STAGE")],
    root: Root = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the full record as JSON")] = False,
    debug: Debug = False,
) -> None:
    """Show one version: stage, hashes, source, metrics, lineage and files."""
    v = _store(root).get(ref)
    if as_json:
        out.print_json(json.dumps(asdict(v), default=str))
        return
    facts = {
        "version": f"{v.ref} ({v.stage})",
        "task": f"{v.task} · {v.model_type}" + (f" · variant {v.variant}" if v.variant else ""),
        "weights": v.weights_sha256,
        "created": v.created,
        "source": v.source,
        "signed by": v.signer or "not checked",
        "files": f"{len(v.files)}, {human_size(v.size)}",
    }
    facts |= {f"lineage.{k}": v.lineage[k] for k in LINEAGE if v.lineage.get(k) is not None}
    for split, values in v.metrics.items():
        if isinstance(values, dict):
            shown = {k: x for k, x in values.items() if isinstance(x, (int, float))}
            facts[f"metrics.{split}"] = ", ".join(f"{k} {_num(x)}" for k, x in shown.items())
    for key, value in facts.items():
        _print(f"[bold]{escape(key)}[/]: {escape(str(value))}")
    files = Table(title="files")
    for col in ("path", "size", "sha256"):
        files.add_column(col, justify="right" if col == "size" else "left", no_wrap=True)
    for rel, entry in v.files.items():
        files.add_row(escape(rel), human_size(entry["size"]), entry["sha256"][:16])
    out.print(files)


@registry_app.command()
@command
def promote(
    ref: Annotated[str, typer.Argument(help="NAME (then VERSION), NAME:VERSION or NAME:STAGE")],
    stage: Annotated[str, typer.Option("--stage", help="dev, staging or prod")],
    version: Annotated[int | None, typer.Argument(help="version number")] = None,
    root: Root = None,
    debug: Debug = False,
) -> None:
    """Move a version to a stage; `NAME:STAGE` and plain `NAME` then refer to the newest
    version in it (plain NAME: the newest prod version)."""
    if version is not None and ":" in ref:
        raise ConfigError(
            f"give either NAME VERSION or a reference, not both ('{ref}' and {version})",
            fix=f"run `danlu registry promote {ref} --stage {stage}`",
        )
    done = _store(root).promote(ref if version is None else f"{ref}:{version}", stage)
    _print(f"[bold]{done.ref}[/] is now {done.stage}")


@registry_app.command()
@command
def remove(
    name: Annotated[str, typer.Argument(help="the model")],
    version: Annotated[int | None, typer.Argument(help="one version (default: all)")] = None,
    root: Root = None,
    debug: Debug = False,
) -> None:
    """Remove a version (or every version) of a model, its checkout, and the stored files no
    other version holds."""
    gone = _store(root).remove(name, version)
    _print(f"removed {', '.join(v.ref for v in gone)}")


@registry_app.command()
@command
def checkout(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME:STAGE")],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="also copy it to this new folder (writable)"),
    ] = None,
    root: Root = None,
    debug: Debug = False,
) -> None:
    """Materialize a version as a run directory (ROOT/checkouts/NAME/VERSION/), every file
    checked against its SHA-256; print its path."""
    run = _store(root).checkout(ref)
    path = run.path
    if out_dir is not None:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise ConfigError(f"--out '{out_dir}' exists and is not empty", fix="pass a new folder")
        shutil.copytree(path, out_dir, copy_function=shutil.copyfile, dirs_exist_ok=True)
        path = out_dir
    _print(f"{escape(str(path))}")


# --------------------------------------------------------------------------------- tables


def table(versions: list[Version]) -> Table:
    grid = Table()
    for col in ("name", "version", "stage", "weights"):  # never cut
        grid.add_column(col, justify="right" if col == "version" else "left", no_wrap=True)
    for col in ("task", "metric", "created", "source"):
        grid.add_column(col, overflow="fold")
    for v in versions:
        colour = {"prod": "green", "staging": "yellow"}.get(v.stage, "default")
        grid.add_row(
            escape(v.name),
            str(v.version),
            f"[{colour}]{v.stage}[/]",
            v.weights_sha256[:12],
            escape(v.task + (f" ({v.variant})" if v.variant else "")),
            escape(headline(v)),
            v.created[:16].replace("T", " "),
            escape(v.source),
        )
    return grid


def headline(v: Version) -> str:
    """The metric a version is known by: test (else val, else any split) accuracy, F1, R², …;
    else the best validation value recorded in its lineage."""
    for split in ("test", "val", *v.metrics):
        values = v.metrics.get(split)
        for key in PREFERRED if isinstance(values, dict) else ():
            if isinstance(values.get(key), (int, float)):
                return f"{split} {key} {_num(values[key])}"
    best = v.lineage.get("best") or {}
    if isinstance(best, dict) and isinstance(best.get("value"), (int, float)):
        return f"{best.get('metric')} {_num(best['value'])}"
    return "-"


def _num(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


app.add_typer(registry_app, name="registry")
