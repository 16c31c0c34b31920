"""BatchLoader: order as a pure function of (seed, epoch), resuming mid-epoch, weighting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_images
from danlu.data import Batch, BatchLoader, Split, build
from danlu.data.images import ImageTransform


def _split(n: int = 23) -> Split:
    x = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
    return Split(x, torch.arange(n) % 3, np.arange(n))


def _rows(loader: BatchLoader, epoch: int = 0) -> list[int]:
    return torch.cat([b.rows for b in loader.epoch(epoch)]).tolist()


def test_sequential_order() -> None:
    split = _split()
    loader = BatchLoader(split, 5)
    batches = list(loader.epoch(0))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert all(isinstance(b, Batch) for b in batches)
    assert _rows(loader, 0) == list(range(23)) == _rows(loader, 7)
    assert torch.equal(torch.cat([b.x for b in batches]), split.x)
    assert torch.equal(torch.cat([b.y for b in batches]), split.y)


def test_shuffle_is_a_pure_function_of_seed_and_epoch() -> None:
    split = _split()
    a, b = (
        BatchLoader(split, 4, order="shuffle", seed=3),
        BatchLoader(split, 4, order="shuffle", seed=3),
    )
    for epoch in (0, 1, 5):
        assert _rows(a, epoch) == _rows(b, epoch)
        assert sorted(_rows(a, epoch)) == list(range(23))  # a permutation: every row once
    assert _rows(a, 0) != _rows(a, 1)
    assert _rows(a, 0) != _rows(BatchLoader(split, 4, order="shuffle", seed=4), 0)
    assert _rows(a, 2) == _rows(a, 2)  # asking again does not advance any state
    batch = next(a.epoch(1))
    assert torch.equal(batch.x, split.x[batch.rows])
    assert torch.equal(batch.y, split.y[batch.rows])


@pytest.mark.parametrize("order", ["shuffle", "sequential", "weighted"])
def test_resume_yields_exactly_the_remaining_batches(order: str) -> None:
    split = _split()
    weights = torch.linspace(1, 2, len(split))
    loader = BatchLoader(split, 4, order=order, seed=1, weights=weights)
    full = list(loader.epoch(2))
    for start in (0, 2, 5):
        resumed = list(loader.epoch(2, start=start))
        assert len(resumed) == len(full) - start
        for got, want in zip(resumed, full[start:], strict=True):
            assert torch.equal(got.rows, want.rows)
            assert torch.equal(got.x, want.x)
            assert torch.equal(got.y, want.y)
    assert list(loader.epoch(2, start=len(loader))) == []


def test_resume_with_augmentation_repeats_the_same_random_draws() -> None:
    x, y = make_images(20)
    split = Split(torch.from_numpy(x), torch.from_numpy(y), np.arange(20))
    transform = ImageTransform([0.2], [0.3], crop_padding=2, hflip=True, rotate=10)
    loader = BatchLoader(split, 6, order="shuffle", seed=0, transform=transform, augment=True)
    full = list(loader.epoch(1))
    resumed = list(loader.epoch(1, start=2))
    assert torch.equal(resumed[0].x, full[2].x) and torch.equal(resumed[1].x, full[3].x)
    assert full[0].x.dtype == torch.float32 and full[0].x.shape == (6, 1, 8, 8)
    # the same rows get fresh draws in another epoch
    seq = BatchLoader(split, 6, seed=0, transform=transform, augment=True)
    e0, e1 = next(seq.epoch(0)), next(seq.epoch(1))
    assert torch.equal(e0.rows, e1.rows)
    assert not torch.equal(e0.x, e1.x)
    assert torch.equal(e0.x, next(seq.epoch(0)).x)


def test_weighted_order_balances_classes() -> None:
    y = torch.tensor([0] * 90 + [1] * 10)
    split = Split(torch.zeros(100, 1), y, np.arange(100))
    counts = torch.bincount(y).float()
    loader = BatchLoader(split, 25, order="weighted", seed=0, weights=1.0 / counts[y])
    drawn = torch.cat([torch.cat([b.y for b in loader.epoch(e)]) for e in range(10)])
    assert len(drawn) == 1000
    share = drawn.float().mean().item()  # share of the rare class
    assert 0.4 < share < 0.6
    plain = BatchLoader(split, 25, order="shuffle", seed=0)
    assert torch.cat([b.y for b in plain.epoch(0)]).float().mean().item() == pytest.approx(0.1)
    assert _rows(loader, 0) == _rows(loader, 0)
    assert _rows(loader, 0) != _rows(loader, 1)


def test_weighted_needs_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        BatchLoader(_split(), 4, order="weighted")


def test_len_with_and_without_drop_last() -> None:
    split = _split(10)
    assert len(BatchLoader(split, 4)) == 3
    dropping = BatchLoader(split, 4, drop_last=True)
    assert len(dropping) == 2
    assert [len(b) for b in dropping.epoch(0)] == [4, 4]
    assert [len(b) for b in BatchLoader(split, 4).epoch(0)] == [4, 4, 2]
    assert len(BatchLoader(split, 5, drop_last=True)) == 2
    assert len(BatchLoader(split, 10)) == 1
    # a split smaller than one batch is kept whole rather than dropped
    assert len(BatchLoader(split, 16, drop_last=True)) == 1


def test_bundle_loader_normalizes_and_augments_only_for_training(idx_folder: Path) -> None:
    bundle = build(dataset=str(idx_folder), augment={"crop_padding": 2, "hflip": True}, seed=0)
    mean, std = bundle.spec.image["mean"][0], bundle.spec.image["std"][0]
    train = bundle.splits["train"]

    evaluation = bundle.loader("train", 16)
    batch = next(evaluation.epoch(0))
    assert torch.allclose(batch.x, (train.x[:16].float() / 255 - mean) / std)
    assert len(evaluation) == 4  # 54 examples, the last batch kept

    a = list(bundle.loader("train", 16, order="shuffle", seed=2, train=True).epoch(0))
    b = list(bundle.loader("train", 16, order="shuffle", seed=2, train=True).epoch(0))
    assert all(torch.equal(p.x, q.x) for p, q in zip(a, b, strict=True))
    plain = (train.x[a[0].rows].float() / 255 - mean) / std
    assert a[0].x.shape == plain.shape
    assert not torch.equal(a[0].x, plain)


def test_bundle_loader_on_tables(blobs_csv: Path) -> None:
    bundle = build(dataset=str(blobs_csv), label="kind", seed=0)
    loader = bundle.loader("test", 10, train=True)
    batches = list(loader.epoch(0))
    assert [len(b) for b in batches] == [10, 10, 4]
    assert torch.equal(torch.cat([b.x for b in batches]), bundle.splits["test"].x)


def test_training_skips_a_last_batch_of_one_example() -> None:
    """A final batch of one example would break BatchNorm in training mode."""
    split = _split(33)
    assert len(BatchLoader(split, 8, drop_last="single")) == 4  # 33 = 4 × 8 + 1
    assert len(BatchLoader(split, 11, drop_last="single")) == 3  # no single leftover
    assert len(BatchLoader(_split(1), 8, drop_last="single")) == 1  # never empty
    sizes = [len(b) for b in BatchLoader(split, 8, order="shuffle", drop_last="single").epoch(0)]
    assert sizes == [8, 8, 8, 8]


def test_batchnorm_model_trains_when_the_split_leaves_one_example(tmp_path: Path) -> None:
    from conftest import tiny_config
    from danlu.api import train

    result = train(
        tiny_config(
            str(_blobs(tmp_path, 49)),
            data={"label": "y", "split": {"val": 0, "test": 0}},
            model={"norm": "batch"},
            train={"batch_size": 16, "epochs": 1},
        ),
        run_dir=tmp_path / "run",
        show_progress=False,
    )
    assert result.fit.step == 3  # 49 = 3 × 16 + 1: the single leftover is skipped


def _blobs(tmp_path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    lines = ["a,b,y"] + [f"{rng.normal(c):.3f},{rng.normal(-c):.3f},{c}" for c in y]
    path = tmp_path / "blobs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_configured_augment_section_drives_image_batches(idx_folder: Path) -> None:
    """The whole `data.augment` section (image and text keys) reaches image loaders."""
    from danlu.config import AugmentConfig

    augment = AugmentConfig(crop_padding=2, hflip=True).model_dump()
    bundle = build(dataset=str(idx_folder), augment=augment, seed=0)
    loader = bundle.loader("train", 8, order="shuffle", train=True)
    assert loader.augment
    first, again = next(loader.epoch(0)), next(loader.epoch(0))
    assert first.x.shape == (8, 1, 8, 8) and first.x.dtype == torch.float32
    assert torch.equal(first.x, again.x)  # seeded by (seed, epoch, batch)
    plain = next(bundle.loader("train", 8, order="shuffle").epoch(0))
    assert not torch.equal(first.x, plain.x)
