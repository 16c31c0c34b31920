"""Token cache: build throughput against a plain per-document loop, and hit time against a rebuild.

The same corpus, the same trained tokenizer (byte-level BPE, 8,000 entries by default, trained
before any timer), one EOS after each document:

- danlu:  `build_token_cache` on an empty cache: batched `encode_batch_fast` (parallel in Rust),
          streamed to tokens.bin + offsets.npy + meta.json with checksums, atomic publish;
- loop:   `for doc in corpus: ids.extend(tokenizer.encode(doc).ids)` then one numpy array (no
          file written, so the peer does strictly less work);
- hit:    `build_token_cache` again on the finished entry (checksums verified, memmap opened).

Each contestant runs interleaved, best of --repeats. The corpus is the English Bible prose from
the SWORD module engWEB2015eb (Debian `sword-text-web`, one document per chapter), or any text
file / folder given with --corpus (one document per paragraph).

    python benchmarks/token_cache.py [--corpus bible|PATH] [--type bpe] [--vocab-size 8000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def load_corpus(source: str):
    if source == "bible":
        from danlu.data.sword import bible_corpus

        return bible_corpus("engWEB2015eb", unit="chapter")
    from danlu.data.text import read_corpus

    return read_corpus(source)


def plain_loop(corpus, encoder) -> int:
    tok, eos = encoder.tokenizer, encoder.eos_id
    ids: list[int] = []
    for doc in corpus.documents():
        ids.extend(tok.encode(doc, add_special_tokens=False).ids)
        ids.append(eos)
    return len(np.array(ids, dtype=np.uint16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="bible", help="bible, or a text file / folder")
    ap.add_argument("--type", default="bpe", choices=["bpe", "wordpiece", "unigram", "char"])
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from danlu.data.token_cache import build_token_cache
    from danlu.data.tokenize import TextEncoder, train_tokenizer

    corpus = load_corpus(args.corpus)
    encoder = TextEncoder(
        train_tokenizer(corpus.documents(), type=args.type, vocab_size=args.vocab_size)
    )
    encoder.encode_ids(["warm up the thread pool"] * 64)
    root = tempfile.mkdtemp(prefix="danlu-bench-")
    best = {"danlu": float("inf"), "loop": float("inf"), "hit": float("inf")}
    n_tokens = 0
    try:
        for r in range(args.repeats):
            cache_dir = os.path.join(root, str(r))
            t = time.perf_counter()
            cache = build_token_cache(corpus, encoder, cache_dir=cache_dir)
            best["danlu"] = min(best["danlu"], time.perf_counter() - t)
            n_tokens, n_docs = len(cache), cache.n_documents
            del cache
            t = time.perf_counter()
            loop_tokens = plain_loop(corpus, encoder)
            best["loop"] = min(best["loop"], time.perf_counter() - t)
            assert loop_tokens == n_tokens, (loop_tokens, n_tokens)
            t = time.perf_counter()
            build_token_cache(corpus, encoder, cache_dir=cache_dir)
            best["hit"] = min(best["hit"], time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{corpus.origin}: {corpus.size_bytes / 1e6:.1f} MB, {n_docs:,} documents, "
        f"{n_tokens:,} tokens ({args.type} {encoder.vocab_size:,}), {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}, best of {args.repeats}:"
    )
    for name in ("danlu", "loop"):
        rate = n_tokens / best[name]
        print(
            f"  build {name:<6} {best[name]:8.3f} s  {rate / 1e6:6.2f} M tokens/s  "
            f"danlu speed ×{best[name] / best['danlu']:.2f}"
        )
    print(
        f"  cache hit    {best['hit'] * 1e3:8.1f} ms              "
        f"rebuild / hit ×{best['danlu'] / best['hit']:.0f}"
    )


if __name__ == "__main__":
    main()
