"""Token-level augmentation: deletion, swaps, masking; padding and special tokens untouched."""

from __future__ import annotations

import torch

from danlu.data.text_augment import TokenTransform, delete_tokens, swap_neighbours

PAD, MASK, CLS = 0, 4, 5


def _batch() -> torch.Tensor:
    # [CLS] w w w ... then padding; row 1 is shorter
    x = torch.full((2, 12), PAD)
    x[0, :10] = torch.tensor([CLS, 10, 11, 12, 13, 14, 15, 16, 17, 18])
    x[1, :6] = torch.tensor([CLS, 20, 21, 22, 23, 24])
    return x


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_no_generator_or_no_probability_is_the_identity() -> None:
    x = _batch()
    assert torch.equal(TokenTransform(PAD, MASK, [CLS], delete=0.5)(x, None), x)
    assert torch.equal(TokenTransform(PAD, MASK, [CLS])(x, _g()), x)


def test_deletion_keeps_order_moves_padding_to_the_end_and_spares_specials() -> None:
    x = _batch()
    editable = (x != PAD) & (x != CLS)
    out = delete_tokens(x, editable, 0.5, PAD, _g(1))
    for row_in, row_out in zip(x, out, strict=True):
        kept = [int(t) for t in row_out if t != PAD]
        original = [int(t) for t in row_in if t != PAD]
        assert kept[0] == CLS  # protected
        assert kept == [t for t in original if t in kept]  # a subsequence, order kept
        n = len(kept)
        assert torch.all(row_out[n:] == PAD) and torch.all(row_out[:n] != PAD)
    assert (out != PAD).sum() < (x != PAD).sum()  # p = 0.5 on 13 tokens deletes some


def test_deleting_everything_leaves_only_protected_tokens() -> None:
    x = _batch()
    out = delete_tokens(x, (x != PAD) & (x != CLS), 1.0, PAD, _g())
    assert out[:, 0].tolist() == [CLS, CLS]
    assert torch.all(out[:, 1:] == PAD)


def test_swaps_are_a_permutation_of_neighbours() -> None:
    x = _batch()
    editable = (x != PAD) & (x != CLS)
    out = swap_neighbours(x, editable, 1.0, _g(3))
    assert not torch.equal(out, x)
    for row_in, row_out in zip(x, out, strict=True):
        assert sorted(row_in.tolist()) == sorted(row_out.tolist())
        moved = (row_in != row_out).nonzero().flatten().tolist()
        for i in moved:  # every moved token came from a neighbour
            assert row_out[i] in (row_in[i - 1], row_in[min(i + 1, len(row_in) - 1)])
        assert row_out[0] == CLS and torch.equal(row_out[row_in == PAD], row_in[row_in == PAD])


def test_masking_replaces_only_editable_tokens() -> None:
    x = _batch()
    out = TokenTransform(PAD, MASK, [CLS], mask=1.0)(x, _g())
    editable = (x != PAD) & (x != CLS)
    assert torch.all(out[editable] == MASK)
    assert torch.equal(out[~editable], x[~editable])


def test_same_seed_same_result_other_seed_differs() -> None:
    t = TokenTransform(PAD, MASK, [CLS], delete=0.2, swap=0.2, mask=0.2)
    x = _batch()
    assert torch.equal(t(x, _g(7)), t(x, _g(7)))
    assert any(not torch.equal(t(x, _g(7)), t(x, _g(s))) for s in range(8, 12))
