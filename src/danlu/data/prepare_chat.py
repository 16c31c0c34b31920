"""Instruction / chat data (`data.task: chat`) → causal-LM rows that learn assistant turns only.

    bundle = build(dataset="chats.jsonl", task="chat",
                   tokenizer={"type": "pretrained", "path": "checkpoints/smollm2"}, seed=0)
    bundle.splits["train"].x, .y       # (N, L) ids and next-token labels (-100 = not learned)
    bundle.conversations["val"]        # held-out conversations, scored on generated answers

Conversations are split (train / val / test by fraction, seeded), rendered with the
checkpoint's own chat template (ChatML when it has none; data.chat) and labelled on the
assistant turns. Training rows are packed to data.block_size when data.pack is set; held-out
rows are one conversation each. `local-instructions` is a built-in instruction set made from
the local datasets: the language of a fortune, the topic of a Reuters article, and an
English verse translated into Spanish.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from danlu.data import chat
from danlu.data.loader import Split
from danlu.data.prepare import DataBundle
from danlu.data.spec import DataSpec
from danlu.data.splits import split_positions, subset
from danlu.data.tokenize import TextEncoder
from danlu.errors import DataError

LOCAL = "local-instructions"


def build_chat(
    dataset: str,
    *,
    tokenizer: dict[str, Any] | None,
    block_size: int,
    pack: bool,
    split: dict[str, Any],
    seed: int,
    max_samples: int | None,
    max_eval_samples: int | None,
    cache_dir: str | None = None,
) -> DataBundle:
    conversations, origin = _read(dataset, seed, cache_dir)
    if (
        not tokenizer
        or tokenizer.get("type") not in ("pretrained", "file")
        or not tokenizer.get("path")
    ):
        raise DataError(
            "data.task: chat needs the model's tokenizer and chat template",
            fix="use model.type: hf (its checkpoint's tokenizer is used), or set "
            "data.tokenizer: {type: pretrained, path: CHECKPOINT}",
        )
    tok = chat.chat_tokenizer(tokenizer["path"])
    test = split["test"]
    if test == "official":
        raise DataError(
            f"{origin}: chat data has no official test split", fix="set data.split.test: 0.1"
        )
    positions, how = split_positions(
        len(conversations),
        None,
        val=split["val"],
        test=0.0 if test == "auto" else test,
        has_official=False,
        seed=seed,
        stratify=False,
        origin=origin,
    )
    positions["train"] = subset(positions["train"], None, max_samples, seed)
    for name in ("val", "test"):
        if name in positions:
            positions[name] = subset(positions[name], None, max_eval_samples, seed)
    pad = _pad_id(tok, conversations[: min(len(conversations), 200)])
    splits: dict[str, Split] = {}
    held: dict[str, list[list[dict[str, str]]]] = {}
    dropped: dict[str, int] = {}
    for name in ("train", "val", "test"):
        rows = positions.get(name, np.zeros(0, np.int64))
        convs = [conversations[i] for i in rows]
        examples, dropped[name] = chat.encode_chat(
            convs, tok, max_length=block_size, origin=f"{origin} ({name})"
        )
        x, y = chat.pack(
            examples, block_size=block_size, pad_id=pad, packing=pack and name == "train"
        )
        index = np.arange(len(x)) if pack and name == "train" else np.asarray(rows)[: len(x)]
        splits[name] = Split(x, y, index)
        held[name] = convs
    if not len(splits["train"]):
        raise DataError(
            f"{origin}: no training conversation fits data.block_size={block_size} tokens "
            "before its first assistant answer",
            fix="raise data.block_size",
        )
    encoder = TextEncoder(tok.backend_tokenizer, max_length=block_size)
    text = {
        "tokenizer": "tokenizer.json",
        "tokenizer_hash": encoder.hash,
        "vocab_size": len(tok),
        "max_length": block_size,
        "width": block_size,
        "truncation": "truncate",
        "pad_id": int(pad),
        "special_ids": encoder.special_ids,
        "block_size": block_size,
        "pack": pack,
        "end_of_turn_id": chat.end_of_turn_id(tok),
        "template": "chatml" if tok.chat_template == chat.CHATML else "checkpoint",
    }
    spec = DataSpec("chat", "text", [block_size], text=text)
    digest = hashlib.sha256(json.dumps(conversations, sort_keys=True).encode()).hexdigest()
    learned = {k: int((s.y != chat.IGNORE).sum()) for k, s in splits.items()}
    card = {
        "dataset": dataset,
        "origin": origin,
        "task": "chat",
        "input": "text",
        "content_hash": digest,
        "sizes": {k: len(v) for k, v in held.items()},  # conversations
        "rows": {k: len(s) for k, s in splits.items()},
        "test_split": how,
        "text": {
            "block_size": block_size,
            "pack": pack,
            "learned_tokens": learned,
            "dropped_too_long": dropped,
            "template": text["template"],
        },
        "findings": [
            {
                "level": "warning",
                "message": f"{n} {name} conversations do not reach an assistant answer within "
                f"{block_size} tokens and are left out",
                "action": "raise data.block_size",
            }
            for name, n in dropped.items()
            if n
        ],
    }
    bundle = DataBundle(splits, spec, card, digest, raw=conversations, encoder=encoder)
    bundle.conversations = held
    bundle.chat_tokenizer = tok
    return bundle


def _pad_id(tok: Any, sample: list) -> int:
    """A padding id the rendered conversations never use: the attention mask is `ids != pad`,
    and chat tokenizers often pad with the end-of-turn token (SmolLM2: <|im_end|>)."""
    used: set[int] = set()
    for conv in sample:
        used.update(tok(chat.render(tok, conv), add_special_tokens=False)["input_ids"])
    for candidate in (tok.pad_token_id, tok.unk_token_id, 0, tok.eos_token_id):
        if candidate is not None and candidate not in used:
            return int(candidate)
    return int(tok.pad_token_id or 0)


def _read(dataset: str, seed: int, cache_dir: str | None) -> tuple[list, str]:
    if dataset == LOCAL:
        return local_instructions(seed=seed, cache_dir=cache_dir), LOCAL
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise DataError(
            f"chat data '{dataset}' is not a file",
            fix=f"give a JSONL file of conversations, or the built-in '{LOCAL}'",
        )
    return chat.read_chat(path), str(path)


def local_instructions(
    *, seed: int = 0, per_task: int = 400, cache_dir: str | None = None
) -> list[list[dict[str, str]]]:
    """Instruction/answer pairs from the local datasets (short answers, exact-match scored):
    which language a fortune is in, the topic of a Reuters article, an English verse in
    Spanish. Deterministic for a seed."""
    from danlu.data import builtin

    rng = random.Random(seed)
    out: list[list[dict[str, str]]] = []

    def ask(question: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    names = {"en": "English", "de": "German", "es": "Spanish"}
    lang = builtin.load("fortunes-langid", cache=cache_dir, mirror=None, download=False)
    items = [(t, str(y)) for t, y in zip(lang.texts, lang.labels, strict=True) if len(t) < 300]
    for text, label in rng.sample(items, min(per_task, len(items))):
        out.append(
            ask(f"Which language is this text written in?\n\n{text}", names.get(label, label))
        )
    r8 = builtin.load("r8", cache=cache_dir, mirror=None, download=False)
    items = [(t, str(y)) for t, y in zip(r8.texts, r8.labels, strict=True) if len(t) < 600]
    for text, label in rng.sample(items, min(per_task, len(items))):
        out.append(
            ask(
                "Classify this news article into one of: acq, crude, earn, grain, interest, "
                f"money-fx, ship, trade. Answer with the label only.\n\n{text}",
                label,
            )
        )
    pairs = builtin.load("bible-en-es", cache=cache_dir, mirror=None, download=False)
    items = [(s, t) for s, t in zip(pairs.sources, pairs.targets, strict=True) if len(s) < 120]
    for src, tgt in rng.sample(items, min(per_task, len(items))):
        out.append(ask(f"Translate into Spanish:\n\n{src}", tgt))
    rng.shuffle(out)
    return out
