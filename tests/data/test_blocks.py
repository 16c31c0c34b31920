"""Language-model blocks: shapes, the x/y shift, (seed, epoch) determinism, exact resume,
sequential coverage, packing against one document per block, held-out tails."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from danlu.data.blocks import IGNORE, BlockLoader, TokenSplit, holdout
from danlu.data.loader import Batch
from danlu.data.text import RawCorpus
from danlu.data.token_cache import build_token_cache
from danlu.data.tokenize import TextEncoder, train_tokenizer
from danlu.errors import DataError

PAD = 0


@pytest.fixture
def split() -> TokenSplit:
    """12 documents of 1..40 tokens; token values are positions + 1, so never PAD."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 41, size=12)
    lengths[3] = 1  # a one-token document has no target
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.uint16)
    return TokenSplit(tokens, offsets)


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(p.x, q.x) and torch.equal(p.y, q.y) and torch.equal(p.rows, q.rows)
        for p, q in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("order", ["random", "sequential"])
def test_shapes_and_shift(split, pack, order):
    loader = BlockLoader(split, batch_size=4, block_size=8, order=order, pack=pack, seed=1)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) > 1
    for b in batches:
        assert b.x.dtype == torch.int64 and b.y.dtype == torch.int64 and b.rows.dtype == torch.int64
        assert b.x.shape == b.y.shape == (len(b.rows), 8) and len(b) <= 4
        tokens = torch.from_numpy(split.tokens.astype(np.int64))
        for x, y, start in zip(b.x, b.y, b.rows, strict=True):
            n = int((y != IGNORE).sum())  # targets in this block
            assert torch.equal(x[:n], tokens[start : start + n])
            assert torch.equal(y[:n], tokens[start + 1 : start + 1 + n])
            assert (y[n:] == IGNORE).all() and (x[n + 1 :] == PAD).all()


def test_random_order_is_a_pure_function_of_seed_and_epoch(split):
    def run(seed, epoch):
        return list(BlockLoader(split, 4, 8, seed=seed).epoch(epoch))

    assert same(run(3, 1), run(3, 1))
    assert not same(run(3, 1), run(3, 2))
    assert not same(run(3, 1), run(4, 1))
    unpacked = [list(BlockLoader(split, 4, 8, seed=3, pack=False).epoch(e)) for e in (0, 0, 1)]
    assert same(unpacked[0], unpacked[1]) and not same(unpacked[0], unpacked[2])


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("order", ["random", "sequential"])
def test_resume_gives_exactly_the_remaining_batches(split, pack, order):
    loader = BlockLoader(split, 3, 8, order=order, pack=pack, seed=7)
    full = list(loader.epoch(2))
    for k in (0, 1, len(full) - 1, len(full)):
        again = BlockLoader(split, 3, 8, order=order, pack=pack, seed=7)  # a fresh process
        assert same(list(again.epoch(2, start=k)), full[k:])


def test_sequential_packed_blocks_cover_every_target_once(split):
    loader = BlockLoader(split, 5, 8, order="sequential")
    ys = torch.cat([b.y.flatten() for b in loader.epoch(0)])
    assert ys[ys != IGNORE].tolist() == split.tokens[1:].tolist()
    starts = torch.cat([b.rows for b in loader.epoch(0)])
    assert starts.tolist() == list(range(0, len(split) - 1, 8))


@pytest.mark.parametrize("pack", [True, False])
def test_a_one_row_batch_keeps_padding_out_of_its_inputs(split, pack):
    """With one row, x and y slices share a buffer unless copied: IGNORE must not leak into x."""
    loader = BlockLoader(split, batch_size=1, block_size=8, order="sequential", pack=pack)
    for b in loader.epoch(0):
        assert (b.x >= 0).all()


def test_unpacked_blocks_stay_inside_one_document(split):
    loader = BlockLoader(split, 4, 8, order="sequential", pack=False)
    targets = []
    for b in loader.epoch(0):
        for y, start in zip(b.y, b.rows, strict=True):
            doc = np.searchsorted(split.offsets, int(start), side="right") - 1
            end = split.offsets[doc + 1]
            real = y[y != IGNORE]
            assert int(start) + len(real) < end  # the last target is inside the document
            targets.append(real)
    per_doc = [
        split.tokens[a + 1 : b] for a, b in zip(split.offsets[:-1], split.offsets[1:], strict=True)
    ]
    assert torch.cat(targets).tolist() == np.concatenate(per_doc).tolist()
    shuffled = BlockLoader(split, 4, 8, order="random", pack=False, seed=0)
    assert sum(len(b) for b in shuffled.epoch(0)) == loader.blocks  # the same blocks, shuffled


def test_packing_through_the_token_cache_separates_documents_with_eos():
    docs = ["in the beginning", "and the earth was", "void", "and darkness was upon the deep"]
    enc = TextEncoder(train_tokenizer(docs * 5, type="char", vocab_size=64))
    digest = hashlib.sha256("|".join(docs).encode()).hexdigest()
    cache = build_token_cache(RawCorpus(lambda: iter(docs), "verses", digest, 0), enc)
    whole = TokenSplit.of(cache)
    packed = next(BlockLoader(whole, 64, 16, order="sequential").epoch(0))
    text = enc.decode(packed.x.flatten(), skip_special_tokens=False)
    assert "beginning[EOS]and the earth" in text
    one_each = next(BlockLoader(whole, 64, 16, order="sequential", pack=False).epoch(0))
    # 17, 18, 5 and 31 tokens with EOS: documents over 17 tokens take two blocks
    assert len(one_each) == 6 and one_each.rows.tolist() == [0, 17, 33, 35, 40, 56]
    assert enc.decode(one_each.x[3]) == "void" and one_each.y[3, 3] == enc.eos_id
    assert (one_each.y[3, 4:] == IGNORE).all() and (one_each.x[3, 5:] == enc.pad_id).all()


def test_blocks_per_epoch_and_drop_last(split):
    assert len(BlockLoader(split, 4, 8, blocks_per_epoch=10)) == 3
    assert len(BlockLoader(split, 4, 8, blocks_per_epoch=10, drop_last=True)) == 2
    last = list(BlockLoader(split, 4, 8, blocks_per_epoch=10).epoch(0))[-1]
    assert len(last) == 2


def test_too_few_tokens_for_a_training_block_names_block_size(split):
    with pytest.raises(DataError, match=r"data\.block_size=1000 needs at least 1001"):
        BlockLoader(split, 4, 1000)
    assert len(BlockLoader(split, 4, 1000, order="sequential")) == 1  # evaluation pads


def test_holdout_last_fraction_of_tokens(split):
    train, val = holdout(split, 0.05)
    n = len(split)
    assert len(val) == round(0.05 * n) and len(train) + len(val) == n
    assert val.start == len(train) and val.tokens[0] == split.tokens[len(train)]
    assert train.offsets[0] == 0 and train.offsets[-1] == len(train)
    assert val.offsets[0] == 0 and val.offsets[-1] == len(val)
    assert train.n_documents + val.n_documents in (split.n_documents, split.n_documents + 1)
    whole = TokenSplit(split.tokens, split.offsets)
    assert holdout(whole, 0.0)[0].tokens.tolist() == split.tokens.tolist()


def test_holdout_by_documents_cuts_on_a_boundary(split):
    train, val = holdout(split, 0.25, by="documents")
    assert val.n_documents == 3 and train.n_documents == 9
    assert len(train) == split.offsets[9]
    assert np.array_equal(val.offsets + len(train), split.offsets[9:])


def test_holdout_errors(split):
    with pytest.raises(DataError, match=r"data\.split\.val=1\.5"):
        holdout(split, 1.5)
    tiny = TokenSplit(split.tokens[:1], np.array([0, 1]))
    with pytest.raises(DataError, match="leaves one side empty"):
        holdout(tiny, 0.5, by="documents")


def test_unpacked_training_needs_a_document_with_a_target():
    ones = TokenSplit(np.arange(1, 4, dtype=np.uint16), np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match=r"data\.pack: false needs documents of 2\+ tokens"):
        BlockLoader(ones, 2, 4, pack=False)
    assert len(BlockLoader(ones, 2, 4, pack=False, order="sequential")) == 0
