"""`danlu pretrain` and `danlu generate`: the text verbs of the CLI (registered on cli.app)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from danlu.cli import Debug, Nproc, Overrides, _training, app, command, out
from danlu.errors import DanluError


@app.command()
@command
def pretrain(
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
    """Pretrain a GPT, BERT (masked LM) or seq2seq model from scratch on a corpus.

    The run keeps tokenizer.json, the weights and the config; fine-tune from it with
    `model.init_from: runs/<name>`."""
    _training("pretrain", config, overrides, run_dir, resume, force, nproc)


@app.command()
@command
def generate(
    run: Annotated[Path, typer.Argument(help="run directory of a language model or seq2seq run")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="a prompt (repeat for a batch)")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="a text file with one prompt per line")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate per prompt")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy; higher = more random")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="sample among the k likeliest")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus: smallest set with mass p")] = None,
    repetition_penalty: Annotated[
        float, typer.Option(help=">1 discourages tokens already generated")
    ] = 1.0,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="stop at this string (repeatable)")
    ] = None,
    num_beams: Annotated[int, typer.Option(help="seq2seq: beam search width")] = 1,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    stream: Annotated[bool, typer.Option(help="print text as it is generated")] = True,
    debug: Debug = False,
) -> None:
    """Generate text from a trained run: continue prompts (GPT, RNN) or translate (seq2seq)."""
    from danlu import api

    prompts = list(prompt or [])
    if prompts_file is not None:
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DanluError(f"cannot read --prompts-file '{prompts_file}': {e}") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise DanluError(
            "no prompt given", fix='pass --prompt "In the beginning" (or --prompts-file FILE)'
        )
    task = _task(run)
    seq2seq = task == "seq2seq"
    single = len(prompts) == 1 and stream
    streamed: list[str] = []

    def show(row: int, piece: str) -> None:
        streamed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    if single and not seq2seq:  # the continuation (a chat run: the answer) follows the prompt
        sys.stdout.write(prompts[0] + ("\n" if task == "chat" else ""))
    texts = api.generate(
        run,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=stop or None,
        num_beams=num_beams,
        seed=seed,
        stream=show if single else None,
    )
    if single:
        if not streamed:  # beam search decides at the end: nothing was streamed
            sys.stdout.write(texts[0])
        sys.stdout.write("\n")
        return
    for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
        joined = (
            f"{escape(p)} → [cyan]{escape(t)}[/]" if seq2seq else f"{escape(p)}[cyan]{escape(t)}[/]"
        )
        out.print(f"[bold]#{i + 1}[/] {joined}", highlight=False, soft_wrap=True)


def _task(run: Path) -> str | None:
    from danlu.rundir import RunDir

    try:
        return RunDir.open(run).read("preprocess.json").get("task")
    except DanluError:  # api.generate reports a broken run properly
        return None
