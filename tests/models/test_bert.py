"""BERT: shapes, padding invariance, bidirectionality, MLM masking, loss falls, round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from danlu import models
from danlu.errors import ConfigError
from danlu.models.bert import BERT, mask_tokens
from danlu.registry import MODELS
from danlu.rundir import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIALS = {"pad": PAD, "cls": CLS, "sep": SEP, "mask": MASK, "unk": UNK}
V = 40


def tiny(num_outputs=None, seed=0, **keys) -> BERT:
    torch.manual_seed(seed)
    keys = {"num_layers": 2, "num_heads": 4, "dim": 32, "dropout": 0.0, **keys}
    return MODELS["bert"](
        input_shape=[16],
        num_outputs=num_outputs,
        vocab_size=V,
        pad_id=PAD,
        special_ids=SPECIALS,
        **keys,
    )


def sentences(n: int, t: int, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """[CLS] w w ... [SEP] PAD ... rows with the given number of words."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, t), PAD)
    for i, length in enumerate(lengths):
        ids[i, 0] = CLS
        ids[i, 1 : length + 1] = torch.randint(5, V, (length,), generator=g)
        ids[i, length + 1] = SEP
    return ids


def test_shapes_of_mlm_and_sequence_heads():
    ids = sentences(3, 12, [4, 10, 7])
    mlm = tiny()
    assert mlm(ids).shape == (3, 12, V)
    assert mlm.hidden(ids).shape == (3, 12, 32)
    assert (mlm.vocab_size, mlm.pad_id, mlm.context) == (V, PAD, 16)
    assert tiny(num_outputs=5)(ids).shape == (3, 5)
    assert tiny(num_outputs=1, pooling="mean")(ids).shape == (3, 1)


def test_tied_decoder_is_the_embedding_and_stored_once():
    mlm = tiny()
    state = mlm.state_dict()
    assert "mlm.decoder.weight" not in state and "mlm.bias" in state
    ids = sentences(2, 8, [3, 5])
    h = mlm.mlm.transform(mlm.hidden(ids))
    assert torch.allclose(mlm(ids), h @ mlm.tok_emb.weight.T + mlm.mlm.bias, atol=1e-6)
    untied = tiny(tie_weights=False)
    assert untied.state_dict()["mlm.decoder.weight"].shape == (V, 32)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_extra_padding_changes_nothing(pooling):
    short = sentences(2, 10, [5, 8])
    long = torch.cat([short, torch.full((2, 6), PAD)], 1)  # (2, 16)
    head = tiny(num_outputs=3, pooling=pooling).eval()
    assert torch.allclose(head(short), head(long), atol=1e-5)
    mlm = tiny().eval()
    real = short != PAD
    assert torch.allclose(mlm(short)[real], mlm(long)[:, :10][real], atol=1e-5)


def test_every_position_sees_later_tokens():
    mlm = tiny().eval()
    ids = sentences(1, 12, [10])
    changed = ids.clone()
    changed[0, 9] = 5 if ids[0, 9] != 5 else 6
    a, b = mlm.hidden(ids), mlm.hidden(changed)
    assert (a[0, :9] - b[0, :9]).abs().amax(-1).min() > 1e-4  # every earlier position moved


def test_mask_tokens_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (64, 128), generator=g)  # specials scattered everywhere
    ids[:, 100:] = PAD
    specials = list(SPECIALS.values())
    inputs, labels = mask_tokens(ids, vocab_size=V, mask_id=MASK, special_ids=specials, generator=g)
    ordinary = ~torch.isin(ids, torch.tensor(specials))
    chosen = labels != -100
    assert not chosen[~ordinary].any()  # specials and PADs are never selected
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.01
    masked = (inputs == MASK) & chosen
    kept = (inputs == ids) & chosen
    swapped = chosen & ~masked & ~kept
    n = chosen.sum()
    assert abs(masked.sum() / n - 0.8) < 0.03
    assert abs(kept.sum() / n - 0.1) < 0.03
    assert abs(swapped.sum() / n - 0.1) < 0.03
    assert not torch.isin(inputs[swapped], torch.tensor(specials)).any()


def test_mask_tokens_selects_at_least_one_token_per_row():
    ids = sentences(4, 8, [1, 2, 3, 6])
    _, labels = mask_tokens(ids, vocab_size=V, mask_id=MASK, special_ids=[PAD, CLS, SEP, MASK])
    assert ((labels != -100).sum(1) >= 1).all()


def mlm_run(steps: int, lr: float = 3e-3) -> list[float]:
    model = tiny()
    data = sentences(2, 16, [14, 11], seed=1).repeat(4, 1)  # two sentences, repeated
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        inputs, labels = mask_tokens(
            data, vocab_size=V, mask_id=MASK, special_ids=list(SPECIALS.values()), generator=g
        )
        loss = F.cross_entropy(model(inputs).view(-1, V), labels.view(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_mlm_loss_falls_on_repeated_data():
    losses = mlm_run(100)
    assert sum(losses[:10]) / 10 > 3.0  # ≈ ln 40 = 3.7 at the start
    assert sum(losses[-10:]) / 10 < 0.6


def test_pinned_mlm_loss_after_ten_steps():
    # pinned from this seeded run: a change to the model, init or masking moves it
    assert mlm_run(10)[-1] == pytest.approx(3.16712, abs=1e-3)


def test_save_load_round_trip(tmp_path):
    ids = sentences(2, 12, [6, 9])
    for num_outputs in (None, 3):
        model = tiny(num_outputs).eval()
        save_safetensors(tmp_path / "w.safetensors", models.state_for_saving(model))
        fresh = tiny(num_outputs, seed=1).eval()
        assert not torch.equal(fresh(ids), model(ids))
        models.load_weights(fresh, tmp_path / "w.safetensors")
        assert torch.equal(fresh(ids), model(ids))


def test_num_heads_must_divide_dim():
    with pytest.raises(
        ConfigError, match=r"model\.num_heads: 3 does not divide model\.dim: 32"
    ) as e:
        tiny(num_heads=3)
    assert e.value.fix == "choose num_heads among 1, 2, 4, 8, 16, 32 (divisors of dim)"


def test_batch_longer_than_context_names_the_key():
    model = tiny(context=8)
    with pytest.raises(ConfigError, match=r"model\.context"):
        model(sentences(1, 12, [9]))
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        tiny(num_outputs=2, pooling="last")
