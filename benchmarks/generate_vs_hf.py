"""Greedy generation speed: danlu's GPT against Hugging Face transformers' GPT2LMHeadModel.

Both models have the same sizes (4 layers, 4 heads, width 256, vocabulary 65 — a character
model —, learned positions, 1024 positions), are randomly initialised, run in fp32 on CPU
under inference mode and decode 128 new tokens greedily with no end-of-sequence token, so
both always produce all 128. Each number is the best of 3 runs after a warm-up run.

    python benchmarks/generate_vs_hf.py              # prints a markdown table
    python benchmarks/generate_vs_hf.py --threads 1  # one CPU thread

Reported: new tokens per second at batch 1 and batch 8 (prompt of 16 tokens), and
milliseconds per new token at prompt 16 vs prompt 512 (how decoding cost grows with the
prefix): the whole call / 128, then split into the prompt + first token (generate with
max_new_tokens=1) and each later token. Ratios > 1 mean danlu is faster. Other processes on
the machine make the numbers noisy; run it on an idle machine for stable figures.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from danlu.models.gpt import GPT

VOCAB, LAYERS, HEADS, DIM, POSITIONS, NEW = 65, 4, 4, 256, 1024, 128


def danlu_model() -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, POSITIONS, num_layers=LAYERS, num_heads=HEADS, dim=DIM).eval()


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=DIM,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_danlu(model: GPT, ids: torch.Tensor, new: int = NEW) -> Callable[[], object]:
    def fn():
        out = model.generate(ids, max_new_tokens=new, temperature=0.0)
        assert out.shape[1] == ids.shape[1] + new

    return fn


def run_hf(model, ids: torch.Tensor, new: int = NEW) -> Callable[[], object]:
    mask = torch.ones_like(ids)

    def fn():
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert out.shape[1] == ids.shape[1] + new

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs = danlu_model(), hf_model()
    gen = torch.Generator().manual_seed(0)

    def timed(batch: int, length: int, new: int = NEW) -> tuple[float, float]:
        ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
        return best_of(run_danlu(ours, ids, new)), best_of(run_hf(theirs, ids, new))

    rows = []
    for batch in (1, 8):
        t_ours, t_hf = timed(batch, 16)
        name = f"new tokens/s, batch {batch}, prompt 16"
        rows.append((name, batch * NEW / t_ours, batch * NEW / t_hf, t_hf / t_ours))
    per_token, decode = {}, {}
    for length in (16, 512):
        t_ours, t_hf = timed(1, length)
        p_ours, p_hf = timed(1, length, new=1)  # the prompt and the first token
        per_token[length] = 1000 * t_ours / NEW
        decode[length] = 1000 * (t_ours - p_ours) / (NEW - 1)
        name = f"ms per new token, batch 1, prompt {length}"
        rows.append((name, per_token[length], 1000 * t_hf / NEW, t_hf / t_ours))
        name = f"  of which prompt + first token, ms (prompt {length})"
        rows.append((name, 1000 * p_ours, 1000 * p_hf, p_hf / p_ours))
        name = f"  ms per later token (prompt {length})"
        later_hf = 1000 * (t_hf - p_hf) / (NEW - 1)
        rows.append((name, decode[length], later_hf, later_hf / decode[length]))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, greedy, "
        f"{NEW} new tokens, best of 3 after a warm-up\n"
    )
    print("| measure | danlu | transformers | danlu speed-up |")
    print("|---|---:|---:|---:|")
    for name, a, b, ratio in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {ratio:.2f}× |")
    print(
        f"\ndanlu, prompt 512 vs 16: {per_token[512] / per_token[16]:.2f}× the time per new "
        f"token (prompt included), {decode[512] / decode[16]:.2f}× per later token"
    )


if __name__ == "__main__":
    main()
