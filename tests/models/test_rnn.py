"""RNN: shapes, causality, exact padding invariance, cached generation, training, round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from danlu import models
from danlu.errors import ConfigError
from danlu.models.rnn import RNN, build_rnn
from danlu.registry import MODELS
from danlu.rundir import save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

V, PAD, EOS = 40, 0, 1


def _lm(cell: str = "lstm", **kwargs) -> RNN:
    torch.manual_seed(0)
    kwargs = {"dim": 16, "hidden_size": 32, **kwargs}
    return build_rnn([20], None, V, PAD, {"pad": PAD, "eos": EOS}, cell=cell, **kwargs).eval()


def _classifier(cell: str = "lstm", num_outputs: int = 3, **kwargs) -> RNN:
    torch.manual_seed(0)
    kwargs = {"dim": 16, "hidden_size": 32, **kwargs}
    return build_rnn([20], num_outputs, V, PAD, {"pad": PAD}, cell=cell, **kwargs).eval()


def _lively(model: RNN, std: float = 0.5) -> RNN:
    """Larger random weights: outputs (and greedy tokens) then vary with every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _pad(row: torch.Tensor, left: int, right: int) -> torch.Tensor:
    return torch.cat([torch.full((left,), PAD), row, torch.full((right,), PAD)])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_and_head_shapes(cell):
    ids = _ids(3, 12)
    lm = _lm(cell)
    assert MODELS["rnn"] is build_rnn
    assert (lm.vocab_size, lm.pad_id, lm.context) == (V, PAD, None)
    assert lm(ids).shape == (3, 12, V) and lm.hidden(ids).shape == (3, 12, 32)
    assert lm.proj.weight.shape == (16, 32) and lm.lm_head is None  # tied through a projection
    assert _lm(cell, tie_weights=False).lm_head.weight.shape == (V, 32)
    assert _lm(cell, dim=32).proj is None
    for pooling in ("last", "mean"):
        for bidirectional, width in ((False, 32), (True, 64)):
            clf = _classifier(cell, 5, pooling=pooling, bidirectional=bidirectional)
            assert clf(ids).shape == (3, 5) and clf.hidden(ids).shape == (3, 12, width)
    assert _classifier(cell, 1)(ids).shape == (3, 1)  # regression


def test_tied_logits_use_the_embedding_matrix():
    lm, ids = _lm(), _ids(2, 6)
    assert not any("lm_head" in k for k in lm.state_dict())
    before = lm(ids)
    with torch.no_grad():
        lm.embed.weight[5] += 1.0  # token 5 is not in ids: only its logit column can change
    after = lm(ids)
    changed = (after - before).abs().amax((0, 1)) > 0
    assert changed[5] and changed.sum() == 1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm_is_causal(cell):
    lm, ids = _lm(cell, num_layers=2), _ids(2, 16)
    changed = ids.clone()
    changed[:, 9:] = _ids(2, 7, seed=1)
    a, b = lm(ids), lm(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-5
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # left-padded path too
    assert torch.allclose(lm(ids, mask)[:, :9], lm(changed, mask)[:, :9], atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classifier_ignores_padding(cell, bidirectional, pooling):
    clf = _lively(_classifier(cell, 4, bidirectional=bidirectional, pooling=pooling, dropout=0.3))
    rows = [_ids(1, n, seed=n)[0] for n in (5, 9, 12)]
    alone = torch.cat([clf(r[None]) for r in rows])  # (3, 4), no padding at all
    right = torch.stack([_pad(r, 0, 14 - len(r)) for r in rows])
    left = torch.stack([_pad(r, 14 - len(r), 0) for r in rows])
    both = torch.stack([_pad(r, 2, 16 - len(r)) for r in rows])
    for padded in (right, left, both):
        assert torch.allclose(clf(padded), alone, atol=1e-5)
        assert torch.allclose(clf(padded, padded != PAD), alone, atol=1e-5)
    hidden = clf.hidden(left)
    assert torch.all(hidden[left == PAD] == 0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_last_joins_forward_end_and_backward_start(cell):
    clf = _lively(_classifier(cell, 2, bidirectional=True, num_layers=2))
    row = _ids(1, 7)
    _, state = clf.rnn(clf.embed(row))
    h = state[0] if cell == "lstm" else state  # (layers · 2, 1, H)
    expected = clf.head.out(torch.cat([h[-2], h[-1]], -1))  # top layer, both directions
    left = _pad(row[0], 4, 0)[None]
    assert torch.allclose(clf(left), expected, atol=1e-5)
    assert torch.allclose(clf(_pad(row[0], 0, 4)[None]), expected, atol=1e-5)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.bidirectional") as e:
        build_rnn([8], None, V, PAD, {}, bidirectional=True)
    assert "false" in e.value.fix
    with pytest.raises(ConfigError, match=r"model\.cell"):
        build_rnn([8], 2, V, PAD, {}, cell="rnn")
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        build_rnn([8], 2, V, PAD, {}, pooling="cls")
    clf = _classifier(context=8)
    assert clf(_ids(2, 8)).shape == (2, 3)
    with pytest.raises(ConfigError, match=r"model\.context: 8"):
        clf(_ids(2, 9))
    with pytest.raises(ConfigError, match="classification head"):
        clf.generate(_ids(1, 3), max_new_tokens=2)
    lm = _lm(context=8)
    assert lm.generate(_ids(1, 8), max_new_tokens=4, temperature=0).shape == (1, 12)
    with pytest.raises(ConfigError, match=r"model\.context: 8"):
        lm.generate(_ids(1, 9), max_new_tokens=1)
    with pytest.raises(ConfigError, match="temperature"):
        lm.generate(_ids(1, 3), max_new_tokens=1, temperature=-1.0)


def _left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    rows = [_ids(1, n, seed=10 + n)[0] for n in (6, 3, 1)]
    ids = torch.stack([_pad(r, 6 - len(r), 0) for r in rows])  # (3, 6)
    return ids, ids != PAD


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cached_greedy_generation_equals_recomputation(cell):
    lm = _lively(_lm(cell, num_layers=2))
    ids, mask = _left_padded_prompts()
    cached = lm.generate(ids, mask, max_new_tokens=12, temperature=0)
    uncached = lm.generate(ids, mask, max_new_tokens=12, temperature=0, use_cache=False)
    assert cached.shape == (3, 18) and torch.equal(cached, uncached)
    assert torch.equal(cached[:, :6], ids)
    for i, n in enumerate((6, 3, 1)):  # each row as if it were alone and unpadded
        alone = lm.generate(ids[i : i + 1, 6 - n :], None, max_new_tokens=12, temperature=0)
        assert torch.equal(alone[0, n:], cached[i, 6:])
    logits = lm(cached, torch.cat([mask, torch.ones(3, 12, dtype=torch.bool)], 1))
    assert torch.equal(logits[:, 5:-1].argmax(-1), cached[:, 6:])  # greedy = argmax of forward


def test_generation_stops_at_eos_and_on_token():
    lm = _lively(_lm())
    ids, mask = _left_padded_prompts()
    free = lm.generate(ids, mask, max_new_tokens=8, temperature=0)
    eos = int(free[0, 8])  # row 0's third new token becomes the end token
    out = lm.generate(ids, mask, max_new_tokens=8, temperature=0, eos_id=eos)
    assert out.shape == (3, 9)  # every row has ended by then: generation stops
    for row, expected in zip(out, free, strict=True):
        ends = (row[6:] == eos).nonzero()
        first = int(ends[0, 0]) + 6 if len(ends) else len(row)
        assert torch.equal(row[: first + 1], expected[: first + 1])
        assert torch.all(row[first + 1 :] == PAD)  # pads after the end
    seen = []
    stopped = lm.generate(
        ids,
        mask,
        max_new_tokens=8,
        temperature=0,
        on_token=lambda t: seen.append(t) or len(seen) == 3,
    )
    lm.train()  # dropout is switched off while generating, then the mode comes back
    assert torch.equal(lm.generate(ids, mask, max_new_tokens=8, temperature=0), free)
    assert lm.training
    assert stopped.shape == (3, 9) and torch.equal(stopped, free[:, :9]) and len(seen) == 3
    g = torch.Generator().manual_seed(0)
    sampled = lm.generate(ids, mask, max_new_tokens=5, top_k=5, generator=g)
    again = lm.generate(
        ids, mask, max_new_tokens=5, top_k=5, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.shape == (3, 11) and torch.equal(sampled, again)


def _lm_loss(model: RNN, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])  # (B, T-1, V)
    return nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))


def _train(model, loss_fn, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_overfits_one_batch(cell):
    model, ids = _lm(cell, dropout=0.0), _ids(4, 16)
    losses = _train(model, lambda: _lm_loss(model, ids), 120, lr=2e-2)
    assert losses[0] > 3.0 and losses[-1] < 0.05


def test_classifier_loss_falls_on_tiny_data():
    torch.manual_seed(1)
    ids = _ids(32, 10, seed=3)
    lengths = torch.randint(3, 11, (32,), generator=torch.Generator().manual_seed(4))
    ids[torch.arange(10) >= lengths[:, None]] = PAD  # right-padded, varying lengths
    y = (ids == 7).any(1).long() + (ids == 9).any(1).long()  # how many of two markers occur
    model = _classifier("gru", 3, bidirectional=True, pooling="mean", dropout=0.0)
    losses = _train(model, lambda: nn.functional.cross_entropy(model(ids), y), 60)
    assert losses[-1] < 0.5 * losses[0]


def test_lm_loss_falls_and_pinned_value():
    data = torch.arange(2, 2 + 8 * 17).remainder(V - 2).add(2).view(8, 17)  # rising counts
    model = _lm("lstm", dropout=0.1)
    losses = _train(model, lambda: _lm_loss(model, data), 30, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0]
    assert losses[0] == pytest.approx(3.6878, abs=1e-3)  # ≈ ln 40: uniform at the start
    assert losses[-1] == pytest.approx(1.3186, abs=1e-3)


@pytest.mark.parametrize(
    "build",
    [lambda: _lm("gru", num_layers=2), lambda: _classifier("lstm", 3, bidirectional=True)],
    ids=["gru_lm", "bilstm_classifier"],
)
def test_safetensors_round_trip(tmp_path, build):
    model, ids = build(), _ids(4, 10)
    _train(model, lambda: model(ids).float().square().mean(), 3)
    save_safetensors(tmp_path / "rnn.safetensors", models.state_for_saving(model))
    fresh = build()
    assert not torch.equal(fresh(ids), model.eval()(ids))
    models.load_weights(fresh, tmp_path / "rnn.safetensors")
    assert torch.equal(fresh(ids), model(ids))
