"""Generate text from a run: what `danlu generate RUN --prompt ...` and danlu.generate call.

    texts = generate("runs/tiny_gpt", ["ROMEO:", "JULIET:"], max_new_tokens=200,
                     temperature=0.8, top_k=40, stop=["\\n\\n"])   # the continuations

A causal language model (gpt, rnn) continues each prompt. Prompts are encoded without special
tokens, after the tokenizer's end-of-text token when it has one (training joins documents
with it, so every document but the first follows one), truncated on the left to the model's
context, left-padded into one batch and run through model.generate. A seq2seq model
translates each prompt (encoded with special tokens, as its training sources were).

The result is the generated text only, cut before the first stop string. `stream(row, piece)`
receives it piece by piece as it is produced: new ids are decoded after a few prompt tokens
(so word-start markers such as Metaspace's decode as in the full text), a trailing
incomplete UTF-8 character (byte-level BPE) or a possible start of a stop string is held back
until the next token settles it. The pieces of a row join to its returned text whenever
decoding more tokens only appends text (byte-level BPE, char and unigram tokenizers do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from danlu import models
from danlu.data.tokenize import TextEncoder
from danlu.device import resolve_device
from danlu.errors import ConfigError
from danlu.evaluate.run import load_model
from danlu.models.compressed import device_of, place
from danlu.models.sampling import check_options, left_pad
from danlu.rundir import RunDir
from danlu.serve.decoding import Continuation

log = logging.getLogger("danlu")
Stream = Callable[[int, str], None]


# ---------------------------------------------------------------------------- generation


def generate(
    run: str | Path | RunDir,
    prompts: str | list[str],
    *,
    device: str = "auto",
    **options: Any,
) -> list[str]:
    """The generated continuation (or translation) of each prompt, without the prompt.
    `options`: those of Generator.__call__ (max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, stop, num_beams, seed, stream)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_request(texts, options.get("max_new_tokens", 128), options.get("num_beams", 1), ())
    return Generator(run, device)(texts, **options)


class Generator:
    """A run loaded once for generation: `generate` makes one per call, the server keeps one."""

    def __init__(self, run: str | Path | RunDir, device: str = "auto") -> None:
        self.run = run if isinstance(run, RunDir) else RunDir.open(run)
        self.model, self.cfg, self.spec, _ = load_model(self.run)
        self.family, self.task = models.family(self.model, self.cfg.model.type), self.spec.task
        causal = (
            self.task in ("language_modeling", "chat")
            and self.family != "bert"
            and callable(getattr(self.model, "generate", None))
        )
        if not self.seq2seq and not causal:
            message, fix = _cannot_generate(self.run, self.family, self.task)
            raise ConfigError(message, fix=fix)
        self.encoder = TextEncoder.load(self.run.tokenizer)
        self.device = place(self.model, resolve_device(device))

    @property
    def seq2seq(self) -> bool:
        return self.task == "seq2seq"

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """A conversation in the chat run's template, ready for the assistant's next turn."""
        from danlu.data.chat import chat_tokenizer, render

        return render(chat_tokenizer(self.run.chat_tokenizer), messages, generation=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encoder.encode_ids([text])[0]) if text else 0

    def __call__(
        self,
        texts: list[str],
        *,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        stop: str | list[str] | None = None,
        num_beams: int = 1,
        seed: int = 0,
        stream: Stream | None = None,
        rendered: bool = False,
    ) -> list[str]:
        """Continue (or translate) `texts`. A chat run takes each text as the user's turn,
        unless `rendered` says the texts are conversations already in its template."""
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        check_request(texts, max_new_tokens, num_beams, stop)
        check_options(temperature, top_k, top_p, repetition_penalty)
        if not self.seq2seq and num_beams != 1:
            raise ConfigError(
                f"num_beams: {num_beams} — beam search is for seq2seq runs; run "
                f"'{self.run.path}' is a {self.family} language model",
                fix="use num_beams 1 (greedy with temperature 0, or sampling)",
            )
        sample = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        sample |= {"repetition_penalty": repetition_penalty}
        sample["generator"] = torch.Generator(self.device).manual_seed(seed)
        common = {"max_new_tokens": max_new_tokens, "stop": stop, "stream": stream}
        model, encoder = self.model, self.encoder
        if self.seq2seq:
            limit = (self.spec.text or {}).get("max_length") or model.context
            return translate(
                model, encoder, texts, num_beams=num_beams, limit=limit, **sample, **common
            )
        if self.task == "chat":  # a prompt is the user's turn, answered in the chat template
            end = self.spec.text.get("end_of_turn_id")
            if not rendered:
                texts, end = chat_prompts(self.run, self.spec, texts)
            return complete(model, encoder, texts, end=end, separate=False, **sample, **common)
        return complete(model, encoder, texts, **sample, **common)

    def run_batch(
        self,
        parts: list[Part],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        rendered: bool = False,
    ) -> list[list[str]]:
        """Continue the prompts of several requests in one call (causal LMs; the sampling
        options are theirs in common). Each part keeps its stop strings, token limit, seed
        (its own random stream, so a seeded request samples what it would alone) and stream;
        a part whose client left stops being tracked while the others go on."""
        if self.seq2seq:
            raise ConfigError("run_batch continues prompts of causal language models")
        check_options(temperature, top_k, top_p, repetition_penalty)
        owner = [(p, r) for p, part in enumerate(parts) for r in range(len(part.texts))]
        texts = [t for part in parts for t in part.texts]
        for part in parts:
            check_request(part.texts, part.max_new_tokens, 1, part.stop)
        seeded = [torch.Generator(self.device).manual_seed(part.seed) for part in parts]
        sample = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        sample |= {"repetition_penalty": repetition_penalty}
        sample["generator"] = [seeded[p] for p, _ in owner]
        rows = RowLimits(
            stops=[list(parts[p].stop) for p, _ in owner],
            limits=[parts[p].max_new_tokens for p, _ in owner],
            alive=lambda i: not parts[owner[i][0]].cancelled(),
        )

        def stream(i: int, piece: str) -> None:
            p, r = owner[i]
            if parts[p].stream is not None:
                parts[p].stream(r, piece)

        end, separate = None, True
        if self.task == "chat":
            end, separate = self.spec.text.get("end_of_turn_id"), False
            if not rendered:
                texts, end = chat_prompts(self.run, self.spec, texts)
        out = complete(
            self.model, self.encoder, texts, max_new_tokens=max(rows.limits), stream=stream,
            end=end, separate=separate, rows=rows, **sample,
        )  # fmt: skip
        results: list[list[str]] = [[] for _ in parts]
        for (p, _), text in zip(owner, out, strict=True):
            results[p].append(text)
        return results


@dataclass
class Part:
    """One request's prompts in a batched generation call (Generator.run_batch)."""

    texts: list[str]
    max_new_tokens: int
    stop: list[str]
    seed: int
    stream: Stream | None = None  # (row of this part, piece)
    cancelled: Callable[[], bool] = lambda: False


def chat_prompts(run: RunDir, spec: Any, texts: list[str]) -> tuple[list[str], int | None]:
    """Prompts as user turns in a chat run's template, and the token that ends an answer."""
    from danlu.data.chat import chat_tokenizer, render

    tok = chat_tokenizer(run.chat_tokenizer)
    texts = [render(tok, [{"role": "user", "content": t}], generation=True) for t in texts]
    return texts, spec.text.get("end_of_turn_id")


def check_request(texts: list[str], max_new_tokens: int, num_beams: int, stop) -> None:
    if not texts:
        raise ConfigError("no prompts given", fix='pass --prompt "Once upon a time"')
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            what = "is empty" if isinstance(text, str) else f"is a {type(text).__name__}"
            raise ConfigError(f"prompt {i + 1} {what}", fix="give every prompt some text")
    if max_new_tokens < 1:
        raise ConfigError(
            f"max_new_tokens must be 1 or more, got {max_new_tokens}", fix="use e.g. 128"
        )
    if num_beams < 1:
        raise ConfigError(f"num_beams must be 1 or more, got {num_beams}", fix="use 1, or e.g. 4")
    if stop and not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"stop strings must be non-empty text, got {stop!r}", fix="drop them")


def _cannot_generate(run: RunDir, family: str, task: str) -> tuple[str, str]:
    if task == "language_modeling":  # bert: a masked LM
        return (
            f"run '{run.path}' is a {family} masked language model: it fills in [MASK] tokens "
            "and cannot generate text left to right",
            "pretrain a gpt or rnn language model to generate (model.type: gpt)",
        )
    return (
        f"run '{run.path}' is a {family} {task} model: it predicts labels, not text",
        f"use `danlu predict {run.path}`",
    )


def complete(
    model: Any,
    encoder: TextEncoder,
    texts: list[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    stream: Stream | None = None,
    end: int | None = None,
    separate: bool = True,
    rows: RowLimits | None = None,
    **sample: Any,
) -> list[str]:
    """Continue prompts with a causal LM (anything with GPT.generate's signature). `end`:
    the token that ends a continuation (default EOS); `separate`: prompts follow an EOS, as
    every document but the first did in pretraining (not for chat-rendered prompts). `rows`:
    per-row stop strings, token limits and liveness, for prompts of several requests."""
    context = getattr(model, "context", None)
    ids_rows, eos = prompt_ids(encoder, texts, end=end, separate=separate, context=context)
    ids, mask = left_pad(ids_rows, model.pad_id)  # (B, T)
    stops = rows.stops if rows is not None else [stop] * len(texts)
    limits = rows.limits if rows is not None else [max_new_tokens] * len(texts)
    rows_text = [Continuation(encoder.decode, r, s) for r, s in zip(ids_rows, stops, strict=True)]
    live, made = [True] * len(texts), [0] * len(texts)

    def emit(i: int, piece: str) -> None:
        if piece and stream is not None:
            stream(i, piece)

    def on_token(tokens: torch.Tensor) -> bool:
        for i, t in enumerate(tokens.tolist()):
            if live[i] and rows is not None and not rows.alive(i):
                live[i] = False  # its client left: the other rows go on
            if live[i]:
                c, made[i] = rows_text[i], made[i] + 1
                emit(i, c.finish() if t == eos else c.push(t))
                if made[i] >= limits[i] and not c.done:
                    emit(i, c.finish())
                live[i] = not c.done
        return not any(live)

    track = stream is not None or any(stops) or rows is not None
    max_new_tokens = max(limits)
    if isinstance(sample.get("generator"), torch.Generator):  # each row draws in turn from it,
        sample["generator"] = [sample["generator"]] * len(texts)  # batched with others or not
    device = device_of(model)
    out = model.generate(
        ids.to(device),
        mask.to(device),
        max_new_tokens=max_new_tokens,
        eos_id=eos,
        on_token=on_token if track else None,
        **sample,
    )
    for i, c in enumerate(rows_text):
        if not track:
            c.push(*_until(out[i, ids.shape[1] :].tolist(), eos))
        piece = c.finish()
        if rows is None or rows.alive(i):
            emit(i, piece)
    return [c.text for c in rows_text]


@dataclass
class RowLimits:
    """Per-row settings when one call continues the prompts of several requests."""

    stops: list[list[str]]
    limits: list[int]  # max new tokens of each row
    alive: Callable[[int], bool] = lambda row: True  # False: stop tracking that row


def prompt_ids(
    encoder: TextEncoder,
    texts: list[str],
    *,
    end: int | None = None,
    separate: bool = True,
    context: int | None = None,
) -> tuple[list[list[int]], int | None]:
    """Each prompt's token ids as a causal LM continues it (after EOS when `separate`; its
    last `context` tokens), and the token that ends a continuation (`end`, default EOS)."""
    eos = end if end is not None else encoder.special_ids.get("eos")
    rows = encoder.encode_ids(texts)
    for i, row in enumerate(rows):
        if not row:
            raise ConfigError(f"prompt {i + 1} has no tokens", fix="give it some text")
    start = [eos] if eos is not None and separate else []
    return _fit_context([start + row for row in rows], context), eos


def translate(
    model: Any,
    encoder: TextEncoder,
    texts: list[str],
    *,
    max_new_tokens: int,
    num_beams: int,
    limit: int,
    stop: Sequence[str] = (),
    stream: Stream | None = None,
    **sample: Any,
) -> list[str]:
    """Translate prompts with a seq2seq model; each row is streamed whole when done."""
    special = encoder.special_ids
    bos = special.get("bos", special.get("cls"))
    eos = special.get("eos", special.get("sep"))
    lengths = [len(ids) for ids in encoder.encode_ids(texts, add_special_tokens=True)]
    for i, n in enumerate(lengths):
        if n > limit:
            log.warning("prompt %d has %d tokens, more than %d: its end is cut", i + 1, n, limit)
    enc = encoder.encode_batch(texts, max_length=limit, truncation="truncate")
    device = device_of(model)
    if num_beams > 1:  # deterministic: temperature does not apply (top_k etc. are refused)
        sample = {**sample, "temperature": 0.0, "generator": None}
    if max_new_tokens > model.context:  # a target never exceeds the trained length
        log.info("max_new_tokens %d → %d (model.context)", max_new_tokens, model.context)
        max_new_tokens = model.context
    out = model.generate(
        torch.from_numpy(enc.ids).to(device),
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        bos_id=bos,
        eos_id=eos,
        **sample,
    )
    results = []
    for i, row in enumerate(out.tolist()):
        c = Continuation(encoder.decode, [], stop)
        c.push(*_until(row, eos))
        piece = c.finish()
        if piece and stream is not None:
            stream(i, piece)
        results.append(c.text)
    return results


def _fit_context(rows: list[list[int]], context: int | None) -> list[list[int]]:
    """Keep the last `context` tokens of longer prompts (with a warning)."""
    if context is None:
        return rows
    for i, row in enumerate(rows):
        if len(row) > context:
            log.warning(
                "prompt %d has %d tokens, more than model.context=%d: keeping its last %d",
                i + 1,
                len(row),
                context,
                context,
            )
    return [row[-context:] for row in rows]


def _until(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids
