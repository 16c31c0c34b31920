"""`danlu VERB ...`: a thin layer over the public API (danlu.api).

A user error (config, data, files) prints one line and exits with status 2; --debug (or
DANLU_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from danlu.errors import DanluError

app = typer.Typer(
    name="danlu",
    help="danlu (丹炉): data → model → train → evaluate → predict, with one config and one run directory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(
    help="Show the resolved config or the config schema.", no_args_is_help=True
)
datasets_app = typer.Typer(help="Built-in datasets.", no_args_is_help=True)
data_app = typer.Typer(
    help="Check the data: quality findings, and whether more data would help.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
app.add_typer(datasets_app, name="datasets")
app.add_typer(data_app, name="data")

out = Console()
err = Console(stderr=True)

Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="key=value overrides, e.g. train.epochs=2", show_default=False),
]
Nproc = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="train in N processes with DDP, under torch.distributed.run (torchrun)",
        show_default=False,
    ),
]


def command(fn):
    """Run a command body, turning user errors into one line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug") or os.environ.get("DANLU_DEBUG") == "1"
        _logging()
        try:
            return fn(*args, **kwargs)
        except DanluError as e:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr (which test runners and redirections replace)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _logging() -> None:
    logger = logging.getLogger("danlu")
    if not logger.handlers:
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _split_args(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """`danlu train --resume RUN a=b` puts the first override where the config would go."""
    overrides = list(overrides or [])
    if config is not None and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return config, overrides


# --------------------------------------------------------------------------------- train


@app.command()
@command
def train(
    config: Annotated[
        str | None, typer.Argument(help="config file or bundled example name")
    ] = None,
    overrides: Overrides = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="write the run here instead of runs/<name>")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue this run from its last checkpoint")
    ] = None,
    force: Annotated[bool, typer.Option(help="resume even if the config or data changed")] = False,
    nproc: Nproc = None,
    debug: Debug = False,
) -> None:
    """Train a model; the run directory holds everything later stages need."""
    _training("train", config, overrides, run_dir, resume, force, nproc)


def _training(
    verb: str,
    config: str | None,
    overrides: list[str] | None,
    run_dir: Path | None,
    resume: Path | None,
    force: bool,
    nproc: int | None = None,
) -> None:
    from danlu import api
    from danlu.train import distributed
    from danlu.train.loop import TrainingInterrupted

    if nproc is not None and not distributed.under_torchrun():  # re-run under torchrun
        distributed.check_nproc(nproc, _train_device(config, overrides))
        if nproc > 1:
            raise typer.Exit(distributed.launch(nproc, sys.argv[1:]))
    config, overrides = _split_args(config, overrides)
    if config is None and resume is None:
        example = "gpt_bible_char" if verb == "pretrain" else "fashion_cnn"
        raise DanluError("no config given", fix=f"run `danlu {verb} configs/{example}.yaml`")
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise DanluError(f"--run-dir '{run_dir}' is a file", fix="pass a new or empty folder")
    try:
        result = getattr(api, verb)(config, overrides, run_dir=run_dir, resume=resume, force=force)
    except DanluError:
        if not distributed.current().is_main:  # rank 0 prints the error line
            raise typer.Exit(2) from None
        raise
    except TrainingInterrupted as e:
        if not distributed.current().is_main:
            raise typer.Exit(130) from None
        err.print(
            escape(f"{e}. Resume with: danlu {verb} --resume {e.run.path}"),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    if distributed.current().is_main:
        _train_summary(result)


def _train_device(config: str | None, overrides: list[str] | None) -> str:
    """train.device of the config, when it reads (for the --nproc limit); else auto."""
    from danlu.config import load

    config, overrides = _split_args(config, overrides)
    try:
        return load(config, overrides).train.device if config else "auto"
    except Exception:
        return "auto"


def _train_summary(result: Any) -> None:
    fit = result.fit
    out.print(
        f"run: [bold]{escape(str(result.run.path))}[/]  ({fit.step} steps, "
        f"{fit.seconds:.1f}s, {fit.device}, {fit.precision})",
        highlight=False,
        soft_wrap=True,
    )
    if fit.best_value is not None:
        out.print(
            f"best {fit.monitor}: {fit.best_value:.4f} at step {fit.best_step}", highlight=False
        )
    if result.equation:
        out.print(f"fitted: {escape(result.equation)}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------ evaluate


@app.command()
@command
def evaluate(
    run: Annotated[Path, typer.Argument(help="run directory")],
    split: Annotated[str | None, typer.Option(help="train, val or test (default: config)")] = None,
    report: Annotated[bool, typer.Option(help="also write report.html")] = True,
    debug: Debug = False,
) -> None:
    """Score a run on a split; prints a table, writes metrics.json and report.html."""
    from danlu import api

    if split is not None and split not in ("train", "val", "test"):
        raise DanluError(f"--split {split!r} is not a split", fix="use train, val or test")
    metrics = api.evaluate(run, split)
    _metrics_table(metrics, metrics["split"], run)
    if report:
        from danlu.evaluate.report import write_report

        path = write_report(run, metrics["split"])
        out.print(f"report: {escape(str(path))}", highlight=False, soft_wrap=True)


def _metrics_table(metrics: dict[str, Any], split: str, run: Path) -> None:
    count = metrics.get("count", "?")
    unit = "tokens scored" if "perplexity" in metrics else "examples"
    if "generated" in metrics:
        unit += f", {metrics['generated']} targets generated"
    out.print(f"{escape(str(run))} · {split} split · {count} {unit}")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    out.print(table)
    ci = metrics.get("ci")
    if ci:
        out.print(
            f"{ci['metric']} {ci['value']:.4f}, {ci['level']:.0%} bootstrap interval "
            f"[{ci['low']:.4f}, {ci['high']:.4f}] ({ci['replicates']} replicates)",
            highlight=False,
        )
    per_class = metrics.get("per_class")
    if per_class:
        t = Table(title="per class")
        for col in ("class", "precision", "recall", "f1", "support"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for name, m in per_class.items():
            t.add_row(
                escape(name),
                f"{m['precision']:.3f}",
                f"{m['recall']:.3f}",
                f"{m['f1']:.3f}",
                str(m["support"]),
            )
        out.print(t)
    cm = metrics.get("confusion_matrix")
    if cm and len(cm) <= 12:
        out.print("confusion matrix (rows: true, columns: predicted):")
        for row in cm:
            out.print("  " + " ".join(f"{v:>6d}" for v in row), highlight=False)


# ------------------------------------------------------------------------------- predict


@app.command()
@command
def predict(
    run: Annotated[Path, typer.Argument(help="run directory")],
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT...", help="CSV/Parquet rows, image files, or a folder of images"
        ),
    ],
    out_path: Annotated[
        Path | None, typer.Option("--out", help="write predictions to this CSV")
    ] = None,
    debug: Debug = False,
) -> None:
    """Predict labels (and class probabilities) or values for new inputs."""
    from danlu import api
    from danlu.rundir import atomic_write_text

    if out_path is not None and out_path.is_dir():
        raise DanluError(
            f"--out '{out_path}' is a folder", fix="pass a file name such as preds.csv"
        )
    frame = api.predict(run, inputs[0] if len(inputs) == 1 else inputs)
    if out_path is not None:
        try:
            atomic_write_text(out_path, frame.to_csv(index=False))
        except OSError as e:
            raise DanluError(f"cannot write predictions to '{out_path}': {e.strerror}") from None
        out.print(escape(f"wrote {len(frame)} predictions to {out_path}"), soft_wrap=True)
    shown = frame.head(20)
    table = Table()
    cols = [c for c in shown.columns if not c.startswith("prob_")][:4]
    for c in cols:
        table.add_column(c)
    for _, row in shown.iterrows():
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else escape(str(v)) for v in row[cols]])
    out.print(table)
    if len(frame) > len(shown):
        out.print(
            f"… {len(frame) - len(shown)} more rows" + ("" if out_path else " (use --out FILE)")
        )


# ------------------------------------------------------------------------------ datasets


@datasets_app.command("list")
@command
def datasets_list(debug: Debug = False) -> None:
    """Built-in dataset names, sizes, and whether each is on this machine."""
    from danlu.data import builtin

    out.print("[bold]built-in datasets[/] (data.dataset: NAME)\n")
    for b in builtin.CATALOG.values():
        ok, where = builtin.status(b)
        state = "[green]local[/]" if ok else "[yellow]not local[/]"
        out.print(f"[bold]{b.name:14s}[/] {b.task} · {escape(b.size)}", highlight=False)
        out.print(
            f"{'':14s} {state}: {escape(where)}  ({escape(b.source)})",
            highlight=False,
            soft_wrap=True,
        )
    out.print(
        "Also: a CSV/Parquet file, a folder of IDX files, CIFAR-10 batches or class subfolders."
    )


# ---------------------------------------------------------------------------- data check

LEVEL_STYLE = {"blocker": "bold red", "warning": "yellow", "info": "dim"}


@data_app.command("check")
@command
def data_check(
    config: Annotated[str, typer.Argument(help="config file or bundled example name")],
    overrides: Overrides = None,
    sufficiency: Annotated[
        bool,
        typer.Option(
            "--sufficiency/--no-sufficiency",
            help="estimate whether more data would help (learning curve; the slow part)",
        ),
    ] = True,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="write data_card.json and data_check.html here"),
    ] = None,
    debug: Debug = False,
) -> None:
    """Check the data before training; exits with status 2 when a finding is a blocker."""
    from danlu import api

    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise DanluError(f"--out '{out_dir}' is a file", fix="pass a folder")
    result = api.data_check(config, overrides or [], sufficiency=sufficiency, out=out_dir)
    _check_summary(result)
    if result.blockers:
        raise typer.Exit(2)


def _check_summary(result: Any) -> None:
    card = result.card
    counts = {lv: sum(f["level"] == lv for f in result.findings) for lv in LEVEL_STYLE}
    sizes = ", ".join(f"{k} {v:,}" for k, v in card.get("sizes", {}).items())
    out.print(f"[bold]{escape(str(card.get('dataset')))}[/] · {escape(sizes)}", highlight=False)
    out.print(
        "findings: "
        + ", ".join(
            f"[{LEVEL_STYLE[lv]}]{n} {lv}{'s' if n != 1 and lv != 'info' else ''}[/]"
            for lv, n in counts.items()
        ),
        highlight=False,
    )
    for f in result.findings:
        style = LEVEL_STYLE[f["level"]]
        out.print(
            f"  [{style}]{f['level']:7s}[/] {escape(f['message'])}\n"
            f"          → {escape(f['action'])}",
            highlight=False,
            soft_wrap=True,
        )
    s = result.sufficiency
    if s:
        t = Table(title=f"learning curve ({s['model']}, {s['metric']} on {s['split']})")
        for col in ("training examples", s["metric"]):
            t.add_column(col, justify="right")
        for n, m, sd in zip(s["sizes"], s["means"], s["std"], strict=True):
            t.add_row(f"{n:,}", f"{m:.4f} ± {sd:.4f}")
        for p in s["projections"]:
            band = "" if p["low"] is None else f"  [{p['low']:.4f}, {p['high']:.4f}]"
            t.add_row(f"{p['factor']:g}× → {p['n']:,.0f}", f"[bold]{p['value']:.4f}[/]{band}")
        out.print(t)
        out.print(f"[bold]verdict:[/] {escape(s['verdict']['text'])}", highlight=False)
    out.print(
        f"wrote {escape(str(result.out / 'data_card.json'))} and data_check.html",
        highlight=False,
        soft_wrap=True,
    )


# -------------------------------------------------------------------------------- config


@config_app.command("show")
@command
def config_show(
    config: Annotated[str, typer.Argument(help="config file or bundled example name")],
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Print the resolved config (defaults filled in, overrides applied, validated)."""
    from danlu.config import load

    sys.stdout.write(load(config, overrides or []).to_yaml())


@config_app.command("schema")
@command
def config_schema(debug: Debug = False) -> None:
    """Print the JSON schema of the config."""
    from danlu.config import Config

    sys.stdout.write(json.dumps(Config.model_json_schema(), indent=2) + "\n")


# the verbs of these modules register themselves on `app` when imported
from danlu import cli_audit, cli_card, cli_compress, cli_explain  # noqa: E402, F401, I001
from danlu import cli_finetune, cli_integrity, cli_pii, cli_report, cli_serve  # noqa: E402, F401
from danlu import cli_monitor, cli_pipeline, cli_registry, cli_text  # noqa: E402, F401
from danlu import cli_estimate, cli_tune  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
