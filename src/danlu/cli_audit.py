"""`danlu audit RUN`: the membership-inference privacy audit (registered on cli.app).

The attack lives in danlu.evaluate.audit, shadow training in danlu.api_audit; this module
prints the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from danlu.cli import Debug, app, command, out


@app.command()
@command
def audit(
    run: Annotated[Path, typer.Argument(help="run directory")],
    split: Annotated[
        str | None,
        typer.Option(help="held-out split (non-members)", show_default="test, else val"),
    ] = None,
    samples: Annotated[int, typer.Option(help="examples drawn from each side")] = 2000,
    shadow: Annotated[int, typer.Option(help="shadow models to train (0: loss attack only)")] = 0,
    shadow_steps: Annotated[
        int | None,
        typer.Option(help="training steps per shadow model", show_default="the run's passes"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the samples and shadow models")] = 0,
    debug: Debug = False,
) -> None:
    """Membership-inference audit: how well an attacker tells the run's training examples from
    held-out ones by the model's losses (AUC 0.5 = no leakage). Writes RUN/audit.json and
    RUN/audit.html."""
    from danlu.api_audit import audit as run_audit

    result = run_audit(
        run, split=split, samples=samples, shadow=shadow, seed=seed, shadow_steps=shadow_steps
    )
    summary(result, run)


def summary(result: dict[str, Any], run: Path) -> None:
    sizes = result["loss"]
    out.print(
        f"{escape(str(run))} · {sizes['members']} training vs {sizes['non_members']} "
        f"{result['split']} examples · per-example {result['loss_kind']}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    table.add_column("attack")
    for column in ("AUC", "95 % CI", "advantage", "TPR @ 1 % FPR"):
        table.add_column(column, justify="right")
    for name, label in (("loss", "loss threshold"), ("shadow", "shadow models")):
        if name in result:
            a = result[name]
            low = a["tpr_at_fpr"].get("0.01")
            table.add_row(
                label,
                f"{a['auc']:.4f}",
                f"{a['auc_ci95'][0]:.3f}–{a['auc_ci95'][1]:.3f}",
                f"{a['advantage']:.4f}",
                "–" if low is None else f"{low:.4f}",
            )
    out.print(table)
    h = result["losses"]
    out.print(
        f"mean loss: members {h['members']['mean']:.4g}, non-members "
        f"{h['non_members']['mean']:.4g}",
        highlight=False,
    )
    if result.get("privacy"):
        p = result["privacy"]
        out.print(f"DP training: ε = {p['epsilon']}, δ = {p['delta']}", highlight=False)
    out.print(escape(result["interpretation"]), highlight=False, soft_wrap=True)
    out.print(f"wrote {escape(str(run / 'audit.json'))} and audit.html", highlight=False)
