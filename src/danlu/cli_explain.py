"""`danlu explain RUN INPUT`: attributions for one input (registered on cli.app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from danlu.cli import Debug, app, command, err, out

TOP = 5  # features / tokens listed in the summary


@app.command()
@command
def explain(
    run: Annotated[Path, typer.Argument(help="run directory")],
    item: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help='a table row as JSON (\'{"x1": 0.3, "x2": 1}\'), a CSV/Parquet file, an image '
            "file, a text, or a prompt (language models)",
        ),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            help="integrated_gradients, feature_ablation, lime, kernel_shap (tables, texts), "
            "occlusion (images), attention (Transformers), generation (language models)",
            show_default="by model kind",
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="class label to explain", show_default="the predicted one")
    ] = None,
    row: Annotated[int, typer.Option(help="table files: the row to explain (1 = first)")] = 1,
    n_steps: Annotated[int, typer.Option(help="integrated gradients: integration steps")] = 50,
    max_new_tokens: Annotated[int, typer.Option(help="language models: tokens to generate")] = 20,
    head: Annotated[
        int | None, typer.Option(help="attention: one head", show_default="the mean over heads")
    ] = None,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="write FILE.html and FILE.json, or into a folder",
            show_default="RUN/explanations/",
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Explain a prediction: which columns, pixels or tokens it rests on (Captum), written as
    HTML and JSON; for a language model, which prompt tokens each generated token rests on."""
    from danlu.api_explain import explain as run_explain

    result = run_explain(
        run, item, method=method, target=target, out=out_path, n_steps=n_steps, row=row,
        max_new_tokens=max_new_tokens, head=head,
    )  # fmt: skip
    summary(result)


def summary(r: dict[str, Any]) -> None:
    p, method = r.get("prediction") or {}, r["method"].replace("_", " ")
    if "label" in p:
        label = escape(p["label"])
        out.print(
            f"prediction: [bold]{label}[/] (probability {p['probability']:.4f})", soft_wrap=True
        )
    elif "value" in p:
        out.print(f"prediction: [bold]{p['value']:.6g}[/]")
    explained = f" of {escape(r['target']['label'])}" if r.get("target") else ""
    if r["method"] == "attention":
        which = "mean over heads" if r["head"] is None else f"head {r['head']}"
        out.print(
            f"attention: {r['layers']} layers × {r['heads']} heads over {len(r['tokens'])} "
            f"tokens ({which})"
        )
    elif r["kind"] == "generation":
        text = escape(repr(r["generated_text"]))
        out.print(f"generated: {text}  ({method})", soft_wrap=True)
        for token, row in list(zip(r["generated_tokens"], r["normalized"], strict=True))[:TOP]:
            top = max(range(len(row)), key=lambda i: row[i]) if row else None
            rests = "—" if top is None else f"{escape(repr(r['tokens'][top]))} ({row[top]:+.2f})"
            out.print(f"  {escape(repr(token)):>10} ← {rests}", highlight=False)
    elif r["kind"] == "image":
        import numpy as np

        heat = np.asarray(r["map"])
        y, x = np.unravel_index(heat.argmax(), heat.shape)
        out.print(
            f"{method}{explained}: a map of {heat.shape[0]}×{heat.shape[1]} pixels, the "
            f"strongest evidence at row {y + 1}, column {x + 1}",
            soft_wrap=True,
        )
    else:
        items = r["features"] if r["kind"] == "table" else _tokens(r)
        out.print(f"{method}{explained}, strongest first:")
        for item in sorted(items, key=lambda f: -abs(f["score"]))[:TOP]:
            out.print(f"  {escape(str(item['name'])):<24} {item['score']:+.4f}", highlight=False)
    if r.get("warning"):
        err.print(f"[yellow]warning:[/] {escape(r['warning'])}", soft_wrap=True)
    files = r["files"]
    out.print(f"wrote {escape(files['html'])} and {escape(files['json'])}", soft_wrap=True)


def _tokens(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": repr(t), "score": s} for t, s in zip(r["tokens"], r["scores"], strict=True)]
