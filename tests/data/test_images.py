"""Image sources (IDX, CIFAR binary, class folders), their defects, and batch transforms."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images, write_cifar, write_idx
from danlu.data import build
from danlu.data.images import ImageTransform, augment, channel_stats
from danlu.errors import DataError

# ----------------------------------------------------------------------------------- IDX


def test_idx_gzipped_with_official_test(idx_folder: Path) -> None:
    bundle = build(dataset=str(idx_folder), seed=0)
    x, y = make_images(60)
    tx, ty = make_images(30, seed=1)
    assert bundle.card["sizes"] == {"train": 54, "val": 6, "test": 30}
    assert bundle.card["test_split"] == "official"
    assert bundle.spec.input == "image"
    assert bundle.spec.input_shape == [1, 8, 8]
    assert bundle.spec.class_names == ["0", "1", "2"]
    test = bundle.splits["test"]
    assert test.x.dtype == torch.uint8
    assert np.array_equal(test.index, np.arange(30))
    assert np.array_equal(test.x.numpy(), tx)
    assert np.array_equal(test.y.numpy(), ty)
    for name in ("train", "val"):
        split = bundle.splits[name]
        assert np.array_equal(split.x.numpy(), x[split.index])
        assert np.array_equal(split.y.numpy(), y[split.index])
    mean, std = channel_stats(x[bundle.splits["train"].index])
    assert bundle.spec.image == {"channels": 1, "size": [8, 8], "mean": mean, "std": std}


def test_idx_raw_equals_gzipped(idx_folder: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw_idx"
    raw.mkdir()
    for f in idx_folder.iterdir():
        (raw / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    a, b = build(dataset=str(idx_folder)), build(dataset=str(raw))
    assert a.content_hash == b.content_hash
    for name, split in a.splits.items():
        assert torch.equal(b.splits[name].x, split.x)
        assert torch.equal(b.splits[name].y, split.y)


def test_idx_without_test_files_carves_a_test_split(tmp_path: Path) -> None:
    folder = tmp_path / "train_only"
    folder.mkdir()
    x, y = make_images(60)
    write_idx(folder / "train-images-idx3-ubyte.gz", x[:, 0])
    write_idx(folder / "train-labels-idx1-ubyte.gz", y)
    bundle = build(dataset=str(folder))
    assert bundle.card["test_split"] == "fraction 0.2"
    assert bundle.card["sizes"] == {"test": 12, "train": 42, "val": 6}
    with pytest.raises(DataError, match="no official test split"):
        build(dataset=str(folder), split={"test": "official"})


def test_idx_resize_and_channels(idx_folder: Path) -> None:
    bundle = build(dataset=str(idx_folder), image={"resize": [4, 4], "channels": 3})
    assert bundle.spec.input_shape == [3, 4, 4]
    assert len(bundle.spec.image["mean"]) == 3
    train = bundle.splits["train"]
    assert train.x.shape == (54, 3, 4, 4)
    assert train.x.dtype == torch.uint8
    px = train.x.numpy().astype(int)
    assert np.array_equal(px[:, 0], px[:, 1]) and np.array_equal(px[:, 0], px[:, 2])
    # the bright band of class c (row 0, 2 or 5 of 8) lands in row 0, 1 or 2 of 4
    brightest = px[:, 0].mean(axis=2).argmax(axis=1)
    assert np.array_equal(brightest, np.array([0, 1, 2])[train.y.numpy()])


def test_idx_colour_images_are_channels_last(tmp_path: Path) -> None:
    folder = tmp_path / "rgb_idx"
    folder.mkdir()
    x, y = make_images(30, channels=3)
    write_idx(folder / "train-images-idx4-ubyte.gz", x.transpose(0, 2, 3, 1))  # (N, H, W, C)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y)
    bundle = build(dataset=str(folder), split={"val": 0, "test": 0.2})
    assert bundle.spec.input_shape == [3, 8, 8]
    train = bundle.splits["train"]
    assert np.array_equal(train.x.numpy(), x[train.index])


def test_idx_wrong_magic(idx_folder: Path) -> None:
    path = idx_folder / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(b"\x12\x34" + data[2:]))
    with pytest.raises(DataError) as e:
        build(dataset=str(idx_folder))
    msg = str(e.value)
    assert str(path) in msg
    assert "wrong magic number 12 34 08 03" in msg
    assert "expected 00 00 <type> <dims>" in msg


def test_idx_size_does_not_match_header(idx_folder: Path) -> None:
    path = idx_folder / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-5]))
    with pytest.raises(DataError) as e:
        build(dataset=str(idx_folder))
    msg = str(e.value)
    assert str(path) in msg
    assert f"has {60 * 64 - 5} data bytes, expected {60 * 64} for shape (60, 8, 8)" in msg


def test_idx_images_and_labels_disagree(idx_folder: Path) -> None:
    write_idx(idx_folder / "train-labels-idx1-ubyte.gz", np.zeros(59))
    with pytest.raises(DataError, match=r"hold 60 images but labels '.*train-labels.*' hold 59"):
        build(dataset=str(idx_folder))


def test_idx_corrupt_gzip(idx_folder: Path) -> None:
    path = idx_folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz' is not readable gzip"):
        build(dataset=str(idx_folder))


# --------------------------------------------------------------------------------- CIFAR


def test_cifar_folder(cifar_folder: Path) -> None:
    bundle = build(dataset=str(cifar_folder), seed=0)
    x, y = make_images(40, classes=4, size=32, channels=3)
    tx, ty = make_images(12, classes=4, size=32, channels=3, seed=1)
    assert bundle.card["sizes"] == {"train": 36, "val": 4, "test": 12}
    assert bundle.card["test_split"] == "official"
    assert bundle.spec.class_names == list("abcdefghij")
    assert bundle.spec.input_shape == [3, 32, 32]
    assert np.array_equal(bundle.splits["test"].x.numpy(), tx)
    assert np.array_equal(bundle.splits["test"].y.numpy(), ty)
    train = bundle.splits["train"]
    assert np.array_equal(train.x.numpy(), x[train.index])
    assert np.array_equal(train.y.numpy(), y[train.index])
    assert len(bundle.spec.image["mean"]) == 3
    # the fixture uses 4 of the 10 CIFAR classes
    absent = [f for f in bundle.card["findings"] if "classes absent" in f["message"]]
    assert absent and absent[0]["message"].endswith("e, f, g, h, i, j")


def test_cifar_to_grayscale(cifar_folder: Path) -> None:
    bundle = build(dataset=str(cifar_folder), image={"channels": 1})
    tx, _ = make_images(12, classes=4, size=32, channels=3, seed=1)
    assert bundle.spec.input_shape == [1, 32, 32]
    gray = np.round(0.299 * tx[:, :1] + 0.587 * tx[:, 1:2] + 0.114 * tx[:, 2:]).astype(np.uint8)
    assert np.array_equal(bundle.splits["test"].x.numpy(), gray)


def test_cifar_size_not_a_multiple_of_the_record(cifar_folder: Path) -> None:
    path = cifar_folder / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError) as e:
        build(dataset=str(cifar_folder))
    msg = str(e.value)
    assert str(path) in msg
    assert f"has {20 * 3073 - 7} bytes, not a multiple of the 3073-byte record" in msg


def test_cifar_label_out_of_range(cifar_folder: Path) -> None:
    x, y = make_images(5, classes=4, size=32, channels=3)
    y[3] = 12
    write_cifar(cifar_folder / "test_batch.bin", x, y)
    with pytest.raises(DataError, match=r"test_batch\.bin': record 3 has label 12, expected 0-9"):
        build(dataset=str(cifar_folder))


# ------------------------------------------------------------------------- class folders


def _saved_pixels(folder: Path, images: np.ndarray) -> np.ndarray:
    """The fixture's arrays in the order danlu reads files (class folders, then sorted names)."""
    files = [p for d in sorted(folder.iterdir()) for p in sorted(d.iterdir())]
    return np.stack([images[int(p.stem)] for p in files])


def test_png_class_folder(image_folder: Path) -> None:
    bundle = build(dataset=str(image_folder), seed=0)
    x, _ = make_images(24)
    assert bundle.spec.class_names == ["class_0", "class_1", "class_2"]
    assert bundle.spec.input_shape == [1, 8, 8]
    assert bundle.card["sizes"] == {"test": 5, "train": 17, "val": 2}
    assert bundle.card["test_split"] == "fraction 0.2"
    ordered = _saved_pixels(image_folder, x)
    labels = np.repeat([0, 1, 2], 8)
    for split in bundle.splits.values():
        assert np.array_equal(split.x.numpy(), ordered[split.index])  # PNG is lossless
        assert np.array_equal(split.y.numpy(), labels[split.index])


def test_jpeg_class_folder_rgb(tmp_path: Path) -> None:
    folder = tmp_path / "jpegs"
    x, y = make_images(18, channels=3, size=16)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = folder / ["cat", "dog", "eel"][label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i}.jpg", quality=95)
    bundle = build(dataset=str(folder), split={"val": 0, "test": 0.5})
    assert bundle.spec.class_names == ["cat", "dog", "eel"]
    assert bundle.spec.input_shape == [3, 16, 16]
    assert bundle.card["sizes"] == {"test": 9, "train": 9, "val": 0}
    ordered = _saved_pixels(folder, x).astype(int)
    for name in ("train", "test"):
        split = bundle.splits[name]
        got = split.x.numpy().astype(int)
        assert np.abs(got - ordered[split.index]).mean() < 12  # lossy, but the same picture


def test_train_and_test_subfolders_use_the_official_split(tmp_path: Path) -> None:
    folder = tmp_path / "tt"
    for part, n, seed in [("train", 30, 0), ("test", 9, 1)]:
        x, y = make_images(n, seed=seed)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = folder / part / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0]).save(d / f"{i}.png")
    bundle = build(dataset=str(folder), seed=0)
    assert bundle.card["test_split"] == "official"
    assert bundle.card["sizes"] == {"train": 27, "val": 3, "test": 9}
    tx, _ = make_images(9, seed=1)
    assert np.array_equal(bundle.splits["test"].x.numpy(), _saved_pixels(folder / "test", tx))
    assert bundle.card["class_balance"]["test"] == {"c0": 3, "c1": 3, "c2": 3}


def test_channels_3_on_grayscale_folder(image_folder: Path) -> None:
    bundle = build(dataset=str(image_folder), image={"channels": 3})
    train = bundle.splits["train"].x
    assert train.shape[1:] == (3, 8, 8)
    assert torch.equal(train[:, 0], train[:, 1]) and torch.equal(train[:, 0], train[:, 2])
    gray = build(dataset=str(image_folder))
    assert torch.equal(gray.splits["train"].x[:, 0], train[:, 0])


def _mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    x, y = make_images(12)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = folder / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        arr = np.full((10, 12), 128, np.uint8) if i == 5 else img[0]
        Image.fromarray(arr).save(d / f"{i}.png")
    return folder


def test_mixed_sizes_need_resize(tmp_path: Path) -> None:
    folder = _mixed_folder(tmp_path)
    with pytest.raises(DataError) as e:
        build(dataset=str(folder))
    msg = str(e.value)
    assert f"'{folder / 'c0' / '0.png'}' is 8×8" in msg
    assert f"'{folder / 'c2' / '5.png'}' is 10×12" in msg
    assert "data.image.resize" in msg

    bundle = build(dataset=str(folder), image={"resize": [8, 8]}, split={"val": 0, "test": 0.25})
    assert bundle.spec.input_shape == [1, 8, 8]
    assert sum(bundle.card["sizes"].values()) == 12
    every = torch.cat([s.x for s in bundle.splits.values()])
    assert (every == 128).all(dim=(1, 2, 3)).sum() == 1


def test_unreadable_image(image_folder: Path) -> None:
    bad = image_folder / "class_1" / "4.png"
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(DataError) as e:
        build(dataset=str(image_folder))
    assert f"image '{bad}' is unreadable" in str(e.value)
    assert "remove or replace the file" in str(e.value)


def test_truncated_image(image_folder: Path) -> None:
    bad = image_folder / "class_2" / "5.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        build(dataset=str(image_folder), image={"channels": 1})
    assert f"image '{bad}' is unreadable or truncated" in str(e.value)


def test_hidden_folders_and_files_are_not_classes_or_images(image_folder: Path) -> None:
    (image_folder / ".ipynb_checkpoints").mkdir()
    (image_folder / "class_0" / ".ipynb_checkpoints").mkdir()
    (image_folder / "class_0" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(
        (image_folder / "class_0" / "0.png").read_bytes()
    )
    (image_folder / "class_1" / "._1.png").write_bytes(b"macOS resource fork, not an image")
    bundle = build(dataset=str(image_folder))
    assert bundle.spec.class_names == ["class_0", "class_1", "class_2"]
    assert sum(bundle.card["sizes"].values()) == 24


def test_spec_turns_files_and_arrays_into_model_pixels(image_folder: Path) -> None:
    bundle = build(dataset=str(image_folder), image={"channels": 3})
    x, _ = make_images(24)
    big = np.kron(x[4, 0], np.ones((2, 2), np.uint8))  # 16×16, resized back to 8×8
    pixels = bundle.spec.image_pixels([image_folder / "class_1" / "4.png", x[7, 0], big])
    assert pixels.shape == (3, 3, 8, 8) and pixels.dtype == torch.uint8
    assert np.array_equal(pixels[0].numpy(), np.repeat(x[4], 3, axis=0))
    assert np.array_equal(pixels[1].numpy(), np.repeat(x[7], 3, axis=0))
    assert pixels[2, 0].float().mean(1).argmax() == 2  # class 1's bright band, row 2 of 8
    assert bundle.spec.image_pixels([]).shape == (0, 3, 8, 8)
    with pytest.raises(DataError, match=r"image 'nope\.png' not found"):
        bundle.spec.image_pixels(["nope.png"])


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "nothing" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"nothing' holds no images in class subfolders"):
        build(dataset=str(tmp_path / "nothing"))


def test_card_finds_images_shared_by_train_and_test(tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    x, y = make_images(30, seed=2)
    for part, pick in [("train", range(30)), ("test", [0, 1, 2, 3])]:
        for i in pick:
            d = folder / part / f"c{y[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0]).save(d / f"{i}.png")
    bundle = build(dataset=str(folder), split={"val": 0})
    messages = [f["message"] for f in bundle.card["findings"]]
    assert "4 test examples also appear in the training data" in messages


# ------------------------------------------------------------------------ transforms


def test_channel_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(37, 3, 5, 6), dtype=np.uint8)
    mean, std = channel_stats(x, chunk=8)
    scaled = x.astype(np.float64) / 255.0
    assert np.allclose(mean, scaled.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(std, scaled.std(axis=(0, 2, 3)), atol=1e-9)


def test_channel_stats_of_a_constant_image_keep_std_positive() -> None:
    mean, std = channel_stats(np.full((4, 1, 3, 3), 51, np.uint8))
    assert mean == [pytest.approx(0.2)]
    assert std == [1e-3]


def test_transform_normalizes_per_channel() -> None:
    x = torch.tensor([0, 51, 102, 255], dtype=torch.uint8).view(1, 1, 2, 2).repeat(2, 2, 1, 1)
    out = ImageTransform([0.2, 0.5], [0.1, 0.25])(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, 0].flatten(), torch.tensor([-2.0, 0.0, 2.0, 8.0]), atol=1e-5)
    assert torch.allclose(out[1, 1].flatten(), torch.tensor([-2.0, -1.2, -0.4, 2.0]), atol=1e-5)


def _images(seed: int = 0) -> torch.Tensor:
    x, _ = make_images(16, size=8, channels=2, seed=seed)
    return torch.from_numpy(x).float() / 255.0


@pytest.mark.parametrize(
    "kw",
    [
        {"padding": 2, "hflip": False, "degrees": 0.0},
        {"padding": 0, "hflip": True, "degrees": 0.0},
        {"padding": 0, "hflip": False, "degrees": 15.0},
        {"padding": 3, "hflip": True, "degrees": 10.0},
    ],
)
def test_augment_keeps_shape_and_is_seeded(kw: dict) -> None:
    x = _images()
    a = augment(x, torch.Generator().manual_seed(1), **kw)
    b = augment(x, torch.Generator().manual_seed(1), **kw)
    c = augment(x, torch.Generator().manual_seed(2), **kw)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_augment_crop_is_a_shifted_window() -> None:
    x = _images()
    out = augment(x, torch.Generator().manual_seed(0), 2, False, 0.0)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert hits, f"image {i} is not a crop of its padded original"
        shifts.add(hits[0])
    assert len(shifts) > 1


def test_augment_flip_flips_some_images() -> None:
    x = _images()
    out = augment(x, torch.Generator().manual_seed(0), 0, True, 0.0)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_no_augmentation_is_the_identity_path() -> None:
    x = torch.from_numpy(make_images(4)[0])
    plain = ImageTransform([0.3], [0.2])
    assert not plain.augments
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(plain(x, g), plain(x, None))
    assert torch.equal(g.get_state(), state)  # no random numbers drawn
    assert torch.allclose(plain(x), (x.float() / 255 - 0.3) / 0.2)
    xf = _images()
    assert torch.equal(augment(xf, g, 0, False, 0.0), xf)


def test_transform_with_augmentation() -> None:
    x = torch.from_numpy(make_images(8)[0])
    t = ImageTransform([0.3], [0.2], crop_padding=2, hflip=True)
    assert t.augments
    a = t(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, t(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, t(x, torch.Generator().manual_seed(6)))
    assert torch.equal(t(x, None), ImageTransform([0.3], [0.2])(x))  # no generator: eval path
