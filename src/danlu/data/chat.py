"""Chat data for causal LMs: conversations, a chat template, assistant-only labels, packed rows.

    convs = read_chat("train.jsonl")                # [[{"role": "user", "content": ...}, ...]]
    tok = chat_tokenizer("checkpoints/smollm2")     # keeps its template; ChatML if it has none
    examples, dropped = encode_chat(convs, tok, max_length=512, origin="train.jsonl")
    x, y = pack(examples, block_size=512, pad_id=tok.pad_token_id, packing=True)
    prompt, reference = prompt_and_reference(convs[0], tok)   # held-out evaluation

A JSONL line is `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ...,
"response": ...}` (optionally `"system": ...`). Only assistant turns are learned: their content
tokens and the token closing each turn (`<|im_end|>`, `</s>`...) keep their id as label, every
other token is -100. Turns are found by rendering conversation prefixes with the tokenizer's own
template and mapping character offsets to tokens, so any template works. Packed rows let
examples attend to the ones before them in the row (no block-diagonal mask); labels never cross.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from danlu.data.tokenize import ROLES
from danlu.errors import DataError
from danlu.rundir import atomic_write_text

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger("danlu")

Message = dict[str, str]
CHAT_ROLES = ("system", "user", "assistant")
IGNORE = -100
TEMPLATE_FILE = "chat_template.jinja"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
SHAPES = '{"messages": [{"role": "user", "content": "..."}, ...]} or {"prompt": "...", "response": "..."}'


# ---------------------------------------------------------------------------------- reading


def read_chat(path: str | Path) -> list[list[Message]]:
    """Conversations of a JSONL file (blank lines skipped); errors name `file:line`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"chat file '{p}' not found", fix="check the path of the JSONL file")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(
            f"chat file '{p}' is not UTF-8 (byte {e.start})", fix="re-save it as UTF-8"
        ) from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}:{n}: invalid JSON ({e.msg}, column {e.colno})",
                fix=f"each line must be one JSON object: {SHAPES}",
            ) from None
        out.append(_conversation(record, f"{p}:{n}"))
    if not out:
        raise DataError(f"chat file '{p}' has no conversations", fix=f"add JSONL lines: {SHAPES}")
    return out


def read_chat_records(records: Iterable[Any], origin: str) -> list[list[Message]]:
    """Conversations of in-memory records (same shapes); errors name `origin:N`, N from 1."""
    out = [_conversation(r, f"{origin}:{i}") for i, r in enumerate(records, 1)]
    if not out:
        raise DataError(f"chat data '{origin}' has no conversations", fix=f"give records: {SHAPES}")
    return out


def _conversation(record: Any, where: str) -> list[Message]:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object, got {type(record).__name__}", fix=f"use {SHAPES}"
        )
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: 'messages' must be a non-empty list", fix=f"use {SHAPES}")
        messages = [_message(m, where, j) for j, m in enumerate(raw, 1)]
    elif "prompt" in record or "response" in record:
        for key in ("prompt", "response", "system"):
            if key in ("prompt", "response") and key not in record:
                raise DataError(f"{where}: has no '{key}'", fix=f"use {SHAPES}")
            if not isinstance(record.get(key, ""), str):
                kind = type(record[key]).__name__
                raise DataError(
                    f"{where}: '{key}' must be a string, got {kind}", fix=f"use {SHAPES}"
                )
        messages = [{"role": "system", "content": record["system"]}] if "system" in record else []
        messages += [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            f"{where}: neither a 'messages' list nor 'prompt'/'response' (keys: {keys})",
            fix=f"use {SHAPES}",
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"chat data needs assistant turns to learn from: {where} has none",
            fix="add an assistant message to the conversation, or remove it",
        )
    return messages


def _message(m: Any, where: str, j: int) -> Message:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(
            f"{where}: message {j} needs 'role' and 'content'",
            fix='write messages as {"role": "user", "content": "..."}',
        )
    if m["role"] not in CHAT_ROLES:
        raise DataError(
            f"{where}: message {j} has unknown role {m['role']!r}",
            fix=f"use one of {', '.join(CHAT_ROLES)}",
        )
    if not isinstance(m["content"], str):
        raise DataError(
            f"{where}: message {j} content must be a string, got {type(m['content']).__name__}",
            fix="write the content as plain text",
        )
    return {"role": m["role"], "content": m["content"]}


# -------------------------------------------------------------------------------- tokenizer


def chat_tokenizer(source: Any) -> PreTrainedTokenizerFast:
    """A fast tokenizer with a chat template from a checkpoint folder, a tokenizer.json, a
    .gguf file, a tokenizers.Tokenizer or a transformers tokenizer (changed in place); ChatML
    (adding <|im_start|> and <|im_end|> as special tokens when missing) if it has none."""
    from tokenizers import AddedToken

    tok = _tokenizer_from(source)
    if not getattr(tok, "is_fast", False):
        raise DataError(
            f"tokenizer '{source}' has no fast (Rust) version, needed for offsets",
            fix="use a checkpoint with a tokenizer.json",
        )
    if not tok.chat_template:
        missing = [t for t in CHATML_TOKENS if t not in tok.get_vocab()]
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], True)
        tok.chat_template = CHATML
        log.info(
            "tokenizer has no chat template: using ChatML (<|im_start|>role ... <|im_end|>)%s",
            f"; added {len(missing)} special tokens, so the model's embeddings must have "
            f"{len(tok)} rows"
            if missing
            else "",
        )
    return tok


def _tokenizer_from(source: Any) -> Any:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if isinstance(source, Tokenizer):
        return _with_roles(PreTrainedTokenizerFast(tokenizer_object=source))
    p = Path(source).expanduser()
    if p.is_dir() and ((p / "tokenizer_config.json").is_file() or (p / "config.json").is_file()):
        return _load(lambda: AutoTokenizer.from_pretrained(str(p)), p)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        file = str(p / "tokenizer.json")
        tok = _with_roles(_load(lambda: PreTrainedTokenizerFast(tokenizer_file=file), p))
        tok.chat_template = load_chat_template(p)
        return tok
    if p.is_file() and p.suffix == ".gguf":
        return _load(lambda: AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name), p)
    if p.is_file():
        return _with_roles(_load(lambda: PreTrainedTokenizerFast(tokenizer_file=str(p)), p))
    raise DataError(
        f"tokenizer '{p}' not found (no tokenizer.json, checkpoint folder or .gguf)",
        fix="point at a checkpoint folder, a tokenizer.json or a .gguf file",
    )


def _load(make: Any, p: Path) -> Any:
    try:
        return make()
    except Exception as e:  # OSError, ValueError, the Rust loader's Exception: "cannot load"
        raise DataError(
            f"tokenizer '{p}' could not be loaded ({e})",
            fix="point at a checkpoint folder, a tokenizer.json or a .gguf file",
        ) from None


def _with_roles(tok: Any) -> Any:
    """Name bos/eos/pad/unk on a bare tokenizer from the tokens it has (see ROLES)."""
    vocab = tok.get_vocab()
    for role in ("bos", "eos", "pad", "unk"):
        name = next((n for n in ROLES[role] if n in vocab), None)
        if name is not None and getattr(tok, f"{role}_token", None) is None:
            setattr(tok, f"{role}_token", name)
    return tok


def save_chat_template(tok: Any, folder: str | Path) -> Path:
    """Write the tokenizer's chat template to <folder>/chat_template.jinja (atomic)."""
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError("the tokenizer has no chat template to save (use chat_tokenizer)")
    path = Path(folder) / TEMPLATE_FILE
    atomic_write_text(path, template)
    return path


def save_chat_tokenizer(tok: Any, folder: str | Path) -> Path:
    """The whole tokenizer (tokenizer.json, special tokens, chat template) in `folder`, written
    to a temporary sibling and renamed into place: what a chat run re-reads its data with."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    if not (tmp / TEMPLATE_FILE).is_file():  # older transformers keep it in the config only
        save_chat_template(tok, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


def load_chat_template(folder: str | Path) -> str | None:
    """The template saved by save_chat_template in `folder`, or None."""
    path = Path(folder) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


# --------------------------------------------------------------------------------- encoding


def render(
    tok: Any, messages: Sequence[Message], *, generation: bool = False, where: str = ""
) -> str:
    """The template's text of `messages` (with the assistant header when `generation`)."""
    try:
        text = tok.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # jinja errors and the template's own raise_exception
        raise DataError(
            f"{where or 'conversation'}: the chat template rejects it ({e})",
            fix="check the order of roles (many templates want user/assistant alternating)",
        ) from None
    return text if isinstance(text, str) else text[0]


def encode_chat(
    conversations: Iterable[Sequence[Message]], tok: Any, *, max_length: int, origin: str
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, labels) per conversation, truncated to max_length, and how many were dropped
    because their first assistant token lies beyond max_length. Labels are -100 except on
    assistant content and the token closing each assistant turn."""
    examples, dropped = [], 0
    for i, messages in enumerate(conversations, 1):
        where = f"{origin}:{i}"
        text = render(tok, messages, where=where)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        spans = _assistant_spans(tok, messages, text, where)
        labels = [IGNORE] * len(ids)
        for t, (s, e) in enumerate(offsets):
            piece = text[s:e]
            if piece.strip():  # a token " Hello" begins where its text does
                s += len(piece) - len(piece.lstrip())
            if any(a <= s < b for a, b in spans):
                labels[t] = ids[t]
        first = next((t for t, y in enumerate(labels) if y != IGNORE), None)
        if first is None or first >= max_length:
            dropped += 1
            continue
        examples.append((ids[:max_length], labels[:max_length]))
    if dropped:
        log.info(f"{origin}: {dropped} conversation(s) dropped: no answer in {max_length} tokens")
    return examples, dropped


def _assistant_spans(tok: Any, messages: Sequence[Message], text: str, where: str) -> list:
    """Character spans [a, b) of each assistant turn in `text`: from where the template's
    prefix (with the generation prompt) ends to where the turn's text ends, trailing
    whitespace excluded (so `<|im_end|>` is in, the newline after it is not)."""
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = render(tok, messages[:k], generation=True, where=where)
        except DataError:  # e.g. templates refusing an empty conversation or a system-only one
            before = None
        after = render(tok, messages[: k + 1], where=where)
        if before is not None and text.startswith(before):
            a = len(before)
        else:  # the template rewrites earlier turns: look for the content after what agrees
            a = text.find(m["content"], len(os.path.commonprefix([before or "", text])))  # noqa: RUF071
            if a < 0:
                raise DataError(
                    f"{where}: cannot find assistant message {k + 1} in the rendered template",
                    fix="use a chat template that renders message contents verbatim",
                )
        b = len(after.rstrip()) if text.startswith(after) else a + len(m["content"])
        if b > a:
            spans.append((a, b))
    return spans


def end_of_turn_id(tok: Any) -> int | None:
    """The special token closing an assistant turn (a stop id for generation), if any."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (examples, _) = encode_chat([probe], tok, max_length=1 << 30, origin="probe")
    labelled = [y for y in examples[0][1] if y != IGNORE] if examples else []
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    return labelled[-1] if labelled and labelled[-1] in special else None


# ---------------------------------------------------------------------------------- batches


def pack(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    block_size: int,
    pad_id: int,
    packing: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows x (N, L) and targets y (N, L), int64: y[t] is the label of token t+1
    (-100 at each example's last token and on padding). packing=True cuts the stream of all
    examples into rows of block_size (the last one padded); packing=False gives one row per
    example, padded to the longest (at most block_size). No examples give (0, block_size)."""
    import torch

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    xs = [list(ids) for ids, _ in examples]
    ys = [[*list(labels)[1:], IGNORE] for _, labels in examples]
    if packing:
        flat_x = [t for x in xs for t in x]
        flat_y = [t for y in ys for t in y]
        n = -(-len(flat_x) // block_size)
        rows_x = [flat_x[r * block_size : (r + 1) * block_size] for r in range(n)]
        rows_y = [flat_y[r * block_size : (r + 1) * block_size] for r in range(n)]
        width = block_size
    else:
        rows_x = [x[:block_size] for x in xs]
        rows_y = [y[:block_size] for y in ys]
        width = max((len(r) for r in rows_x), default=block_size)
    x = torch.full((len(rows_x), width), pad_id, dtype=torch.int64)
    y = torch.full((len(rows_x), width), IGNORE, dtype=torch.int64)
    for r, (rx, ry) in enumerate(zip(rows_x, rows_y, strict=True)):
        x[r, : len(rx)] = torch.tensor(rx, dtype=torch.int64)
        y[r, : len(ry)] = torch.tensor(ry, dtype=torch.int64)
    return x, y


def prompt_and_reference(messages: Sequence[Message], tok: Any) -> tuple[str, str]:
    """For held-out evaluation: the text before the LAST assistant turn, ending with the
    template's generation prompt (tokenize it with add_special_tokens=False), and that
    turn's content as the reference."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(
            "chat data needs assistant turns to learn from: this conversation has none",
            fix="add an assistant message to the conversation",
        )
    return render(tok, messages[:last], generation=True), messages[last]["content"]
