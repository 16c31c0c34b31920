"""Images: IDX files (MNIST, Fashion-MNIST), CIFAR-10 binary batches, class folders.

Every reader returns uint8 arrays shaped (N, C, H, W) and int64 labels; normalization and
augmentation happen per batch on the device (see `ImageTransform`), so the dataset stays
compact in memory. Every defect in a file is a DataError naming the file and the index.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from danlu.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR_RECORD = 1 + 3 * 32 * 32


@dataclass
class RawImages:
    """Images as loaded: x (N, C, H, W) uint8, y (N,) int64; test_* = the official test split."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]
    origin: str
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    files: list[str] | None = None
    test_files: list[str] | None = None
    extra: dict = field(default_factory=dict)


# -------------------------------------------------------------------------------- IDX


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw): magic 0 0 <dtype> <ndim>, big-endian int32 dims."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"IDX file '{path}' not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"IDX file '{path}' is not readable gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"'{path}' is not an IDX file: wrong magic number {raw[:4].hex(' ') or '(empty)'}",
            fix="expected 00 00 <type> <dims> as in MNIST files (e.g. 00 00 08 03 for images)",
        )
    ndim, dtype = raw[3], np.dtype(IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file '{path}' is truncated inside its header")
    dims = [int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4)]
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file '{path}' has {len(raw) - header} data bytes, expected {expected} for "
            f"shape {tuple(dims)}",
            fix="the file is truncated or corrupt; download it again",
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim not in (3, 4):
        raise DataError(f"IDX images '{images}' have {x.ndim} dimensions, expected 3 (N, H, W)")
    if y.ndim != 1:
        raise DataError(f"IDX labels '{labels}' have {y.ndim} dimensions, expected 1 (N,)")
    if len(x) != len(y):
        raise DataError(
            f"IDX images '{images}' hold {len(x)} images but labels '{labels}' hold {len(y)}"
        )
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x.astype(np.uint8)), y.astype(np.int64)


def find_idx(folder: Path) -> dict[str, Path] | None:
    """Locate train/test image and label IDX files in a folder, or None if there are none."""
    files = [p for p in folder.iterdir() if "idx" in p.name and p.is_file()]
    if not files:
        return None
    found: dict[str, Path] = {}
    for p in files:
        part = "test" if ("t10k" in p.name or "test" in p.name) else "train"
        kind = "images" if "images" in p.name else "labels" if "labels" in p.name else None
        if kind:
            found[f"{part}_{kind}"] = p
    if "train_images" not in found or "train_labels" not in found:
        raise DataError(
            f"folder '{folder}' has IDX files but no train images/labels pair",
            fix="expected names like train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)",
        )
    return found


def read_idx_folder(folder: Path, class_names: list[str] | None = None) -> RawImages:
    found = find_idx(folder)
    assert found is not None
    x, y = read_idx_pair(found["train_images"], found["train_labels"])
    test_x = test_y = None
    if "test_images" in found and "test_labels" in found:
        test_x, test_y = read_idx_pair(found["test_images"], found["test_labels"])
    n = int(max(y.max(), test_y.max() if test_y is not None else 0)) + 1
    names = class_names or [str(i) for i in range(n)]
    return RawImages(x, y, names, str(folder), test_x, test_y)


# ------------------------------------------------------------------------------ CIFAR


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32×32)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"CIFAR batch '{path}' is unreadable ({e})") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DataError(
            f"CIFAR batch '{path}' has {raw.size} bytes, not a multiple of the "
            f"{CIFAR_RECORD}-byte record",
            fix="the file is truncated or not in the CIFAR-10 binary format",
        )
    rec = raw.reshape(-1, CIFAR_RECORD)
    y = rec[:, 0].astype(np.int64)
    if y.max() > 9:
        bad = int(np.argmax(y > 9))
        raise DataError(f"CIFAR batch '{path}': record {bad} has label {y[bad]}, expected 0-9")
    return np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32)), y


def read_cifar_folder(folder: Path) -> RawImages:
    train = sorted(folder.glob("data_batch_*.bin"))
    if not train:
        raise DataError(f"folder '{folder}' has no CIFAR-10 data_batch_*.bin files")
    parts = [read_cifar_batch(p) for p in train]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x = test_y = None
    if (folder / "test_batch.bin").is_file():
        test_x, test_y = read_cifar_batch(folder / "test_batch.bin")
    meta = folder / "batches.meta.txt"
    names = (
        [s.strip() for s in meta.read_text().splitlines() if s.strip()] if meta.is_file() else []
    )
    if len(names) < 10:
        names = [str(i) for i in range(10)]
    return RawImages(x, y, names[:10], str(folder), test_x, test_y)


# ----------------------------------------------------------------------- class folders


def load_image(
    path: Path, channels: int | None = None, size: tuple[int, int] | None = None
) -> np.ndarray:
    """One image file as a (C, H, W) uint8 array (converted and resized when asked)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = {1: "L", 3: "RGB"}.get(channels or 0)
            if mode is None:
                mode = "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image '{path}' not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(
            f"image '{path}' is unreadable or truncated ({e})",
            fix="remove or replace the file",
        ) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, skipping hidden files and folders (._x.png, .ipynb_checkpoints)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_class_folder(
    folder: Path, channels: int | None, size: tuple[int, int] | None, classes: list[str] | None
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Images in <folder>/<class>/*.png; returns x, y, class names, files."""
    # hidden folders (.ipynb_checkpoints, .git, ...) are not classes
    names = classes or sorted(
        d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    files, labels = [], []
    for label, name in enumerate(names):
        found = image_files(folder / name) if (folder / name).is_dir() else []
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(
            f"folder '{folder}' holds no images in class subfolders",
            fix=f"expected {folder}/<class name>/<image>{'|'.join(IMAGE_SUFFIXES[:3])}",
        )
    if channels is None:
        channels = max(load_image(f).shape[0] for f in files[:: max(1, len(files) // 50)])
    arrays = [load_image(f, channels, size) for f in files]
    first = arrays[0].shape
    for f, a in zip(files, arrays, strict=True):
        if a.shape != first:
            raise DataError(
                f"images differ in size: '{files[0]}' is {first[1]}×{first[2]} but '{f}' is "
                f"{a.shape[1]}×{a.shape[2]}",
                fix="set data.image.resize: [height, width] to resize every image",
            )
    return np.stack(arrays), np.asarray(labels, np.int64), names, [str(f) for f in files]


def read_image_folder(
    folder: Path, channels: int | None = None, size: tuple[int, int] | None = None
) -> RawImages:
    """A folder of class subfolders, or train/ and test/ folders each holding class subfolders."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        x, y, names, files = read_class_folder(folder / "train", channels, size, None)
        tx, ty, _, tfiles = read_class_folder(folder / "test", channels or x.shape[1], size, names)
        if tx.shape[2:] != x.shape[2:]:
            raise DataError(
                f"test images are {tx.shape[2]}×{tx.shape[3]} ('{tfiles[0]}') but training "
                f"images are {x.shape[2]}×{x.shape[3]} ('{files[0]}')",
                fix="set data.image.resize: [height, width] to resize every image",
            )
        return RawImages(x, y, names, str(folder), tx, ty, files, tfiles)
    x, y, names, files = read_class_folder(folder, channels, size, None)
    return RawImages(x, y, names, str(folder), files=files)


# -------------------------------------------------------------------- batch transforms


@dataclass
class ImageTransform:
    """uint8 (B, C, H, W) → normalized float, with optional seeded augmentation (training)."""

    mean: list[float]
    std: list[float]
    crop_padding: int = 0
    hflip: bool = False
    rotate: float = 0.0

    @property
    def augments(self) -> bool:
        return bool(self.crop_padding or self.hflip or self.rotate)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.float() / 255.0  # (B, C, H, W), never in place on the caller's tensor
        if generator is not None and self.augments:
            x = augment(x, generator, self.crop_padding, self.hflip, self.rotate)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def augment(
    x: torch.Tensor, g: torch.Generator, padding: int, hflip: bool, degrees: float
) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip and small rotation, per image."""
    b, _, h, w = x.shape
    dev = x.device
    if padding:
        padded = F.pad(x, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]  # (B, C, H, W)
    if hflip:
        flip = (torch.rand(b, generator=g) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if degrees:
        angle = (torch.rand(b, generator=g) * 2 - 1).to(dev) * math.radians(degrees)
        cos, sin = angle.cos(), angle.sin()
        zero = torch.zeros_like(cos)
        theta = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(b, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    return x


def channel_stats(x: np.ndarray, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), scaled to [0, 1]."""
    c = x.shape[1]
    total = np.zeros(c)
    sq = np.zeros(c)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].astype(np.float64) / 255.0
        total += part.sum(axis=(0, 2, 3))
        sq += (part**2).sum(axis=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-12))
    return [float(m) for m in mean], [float(max(s, 1e-3)) for s in std]
