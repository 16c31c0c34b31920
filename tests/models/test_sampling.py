"""Sampling (greedy, top-k, top-p, temperature, repetition penalty), left padding, and the
incremental decoding / stop strings of serve.generate."""

from __future__ import annotations

import pytest
import torch

from danlu.data.tokenize import TextEncoder, train_tokenizer
from danlu.errors import ConfigError
from danlu.models.gpt import GPT
from danlu.models.sampling import check_options, left_pad, next_token, penalize_repeats
from danlu.serve.decoding import Continuation, first_stop, partial_stop
from danlu.serve.generate import check_request, complete

pytestmark = pytest.mark.usefixtures("one_thread")


def logits_(b: int = 4, v: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# ------------------------------------------------------------------------------ sampling


def test_greedy_top_k_1_and_tiny_top_p_are_argmax():
    logits = logits_()
    argmax = logits.argmax(-1)
    assert torch.equal(next_token(logits, temperature=0), argmax)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(next_token(logits, top_k=1, generator=g), argmax)
        assert torch.equal(next_token(logits, top_p=1e-6, generator=g), argmax)


def test_temperature_sampling_is_reproducible_with_a_seeded_generator():
    logits = logits_(b=8)

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.stack([next_token(logits, temperature=2.0, generator=g) for _ in range(10)])

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    top2 = {int(next_token(logits, top_k=2, generator=g)) for _ in range(200)}
    assert top2 == {0, 1}
    nucleus = {int(next_token(logits, top_p=0.7, generator=g)) for _ in range(200)}
    assert nucleus == {0, 1}  # 0.5 < 0.7 ≤ 0.5 + 0.3: the smallest set reaching 0.7
    everything = {int(next_token(logits, top_p=1.0, generator=g)) for _ in range(400)}
    assert everything == {0, 1, 2, 3}


def test_low_temperature_concentrates_high_temperature_spreads():
    logits = torch.log(torch.tensor([[0.6, 0.4]])).expand(2000, 2)
    g = torch.Generator().manual_seed(0)
    cold = next_token(logits, temperature=0.1, generator=g).float().mean().item()
    hot = next_token(logits, temperature=10.0, generator=g).float().mean().item()
    assert cold < 0.05  # share of token 1: (0.4/0.6)^10 / (1 + ...) ≈ 0.017
    assert 0.45 < hot < 0.55


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    generated = torch.tensor([[0, 1, 1]])  # token 1 twice: penalized once
    out = penalize_repeats(logits, generated, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0]]))  # not in place
    # greedy with the penalty: token 0 (2.0 → 0.8) loses to token 2 (1.0)
    logits = torch.tensor([[2.0, -1.0, 1.0]])
    pick = next_token(logits, generated=torch.tensor([[0]]), temperature=0, repetition_penalty=2.5)
    assert pick.tolist() == [2]
    assert next_token(logits, generated=torch.tensor([[0]]), temperature=0).tolist() == [0]


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_options_out_of_range_are_config_errors(options, name):
    with pytest.raises(ConfigError, match=name) as e:
        check_options(**options)
    assert e.value.fix


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool


# ------------------------------------------------------------- incremental decoding


def test_stop_string_helpers():
    assert first_stop("abc\n\ndef", ["\n\n", "d"]) == 3
    assert first_stop("abc", ["x"]) is None
    assert partial_stop("abc\n", ["\n\n"]) == 1
    assert partial_stop("abc THE E", ["THE END"]) == 5
    assert partial_stop("abc", ["xy", "cd"]) == 1
    assert partial_stop("abc", ["xy"]) == 0
    assert partial_stop("abc THE EN", ["THE END", "EN"]) == 6


@pytest.fixture(scope="module")
def byte_bpe() -> TextEncoder:
    text = ["héllo wörld, 你好 world\n\nthe end"] * 3
    return TextEncoder(train_tokenizer(text, type="bpe", vocab_size=270, min_frequency=1))


def test_continuation_streams_whole_characters_and_cuts_at_stop(byte_bpe):
    text = "你好 wörld the end"
    ids = byte_bpe.encode(text)
    assert len(ids) > len(text) - 4  # mostly single bytes: characters span several tokens
    c = Continuation(byte_bpe.decode, byte_bpe.encode("x"), stop=["the end"])
    pieces = [c.push(t) for t in ids] + [c.finish()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == c.text == "你好 wörld "
    assert c.done


def test_continuation_keeps_word_boundaries_of_metaspace_tokenizers():
    enc = TextEncoder(
        train_tokenizer(["hello world hello there"] * 5, type="unigram", vocab_size=30)
    )
    full = enc.encode("hello world there")
    c = Continuation(enc.decode, full[:2], stop=[])
    pieces = [c.push(t) for t in full[2:]] + [c.finish()]
    assert enc.decode(full[:2]) + "".join(pieces) == "hello world there"


def test_complete_streams_what_it_returns_and_stops_at_stop_strings(byte_bpe):
    torch.manual_seed(0)
    model = GPT(byte_bpe.vocab_size, 32, num_layers=1, num_heads=2, dim=16)
    streamed: dict[int, str] = {}

    def stream(row: int, piece: str) -> None:
        streamed[row] = streamed.get(row, "") + piece

    def run(**kwargs) -> list[str]:
        g = torch.Generator().manual_seed(0)
        return complete(model, byte_bpe, ["héllo", "wo"], max_new_tokens=12, generator=g, **kwargs)

    free = run()
    assert run(stream=stream) == free
    assert [streamed[0], streamed[1]] == free
    stop = free[0][3:5]  # a string in row 0's continuation
    cut = run(stop=[stop])
    assert cut[0] == free[0][: free[0].index(stop)]
    assert cut[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])


@pytest.mark.parametrize(
    ("texts", "max_new", "beams", "stop", "message"),
    [
        ([], 8, 1, [], "no prompts given"),
        (["a", ""], 8, 1, [], "prompt 2 is empty"),
        (["a", 3], 8, 1, [], "prompt 2 is a int"),
        (["a"], 0, 1, [], "max_new_tokens must be 1 or more, got 0"),
        (["a"], 8, 0, [], "num_beams must be 1 or more"),
        (["a"], 8, 1, [""], "stop strings must be non-empty"),
    ],
)
def test_bad_requests_are_config_errors(texts, max_new, beams, stop, message):
    with pytest.raises(ConfigError, match=message) as e:
        check_request(texts, max_new, beams, stop)
    assert e.value.fix
    check_request(["a", "b"], 8, 1, ["\n"])  # a good one passes
