"""DataSpec: everything needed to turn raw inputs into model inputs, saved as preprocess.json.

The spec is fitted on the training split (feature statistics, categories, class names) and
travels with the run, so evaluation, prediction and serving transform inputs exactly as
training did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu.data.images import ImageTransform, load_image
from danlu.data.tables import TablePreprocessor
from danlu.data.text_augment import TokenTransform
from danlu.errors import DataError


@dataclass
class DataSpec:
    task: str  # classification | regression
    input: str  # table | image
    input_shape: list[int]  # (F,) for tables, (C, H, W) for images
    class_names: list[str] | None = None
    label: str | None = None
    table: dict[str, Any] | None = None  # TablePreprocessor.to_dict()
    image: dict[str, Any] | None = None  # channels, size, mean, std
    text: dict[str, Any] | None = None  # tokenizer file, max_length, pad_id, special_ids

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**d)

    # ----------------------------------------------------------------- raw → model input

    def transform(self, augment: dict[str, Any] | None = None) -> Any:
        """What turns a stored batch into model input: image normalization (+ augmentation),
        token augmentation for text, nothing for tables. `augment` is `data.augment`."""
        augment = augment or {}
        if self.image is not None:
            keys = ("crop_padding", "hflip", "rotate")
            return ImageTransform(
                self.image["mean"],
                self.image["std"],
                **{k: augment[k] for k in keys if k in augment},
            )
        if self.text is not None and augment:
            ids = self.text["special_ids"]
            protected = [ids[r] for r in ("cls", "sep", "bos", "eos") if r in ids]
            return TokenTransform(
                pad_id=self.text["pad_id"],
                mask_id=ids.get("mask", ids.get("unk", 0)),
                protected=protected,
                delete=augment.get("token_delete", 0.0),
                swap=augment.get("token_swap", 0.0),
                mask=augment.get("token_mask", 0.0),
            )
        return None

    def table_features(self, frame: pd.DataFrame, origin: str = "input") -> torch.Tensor:
        """Rows of a table (with the training feature columns) → (N, F) float32."""
        if self.table is None:
            raise DataError(f"{origin}: this model takes images, not table rows")
        pre = TablePreprocessor.from_dict(self.table)
        return torch.from_numpy(pre.transform(frame, origin))

    def image_pixels(self, images: list[str | Path | np.ndarray]) -> torch.Tensor:
        """Image files or (H, W[, C]) / (C, H, W) uint8 arrays → (N, C, H, W) uint8, resized."""
        if self.image is None:
            raise DataError("this model takes table rows, not images")
        c, h, w = self.input_shape
        out = []
        for item in images:
            if isinstance(item, (str, Path)):
                arr = load_image(Path(item), c, (h, w))
            else:
                arr = _array_image(np.asarray(item), c, (h, w))
            out.append(arr)
        return (
            torch.from_numpy(np.stack(out)) if out else torch.empty(0, c, h, w, dtype=torch.uint8)
        )


def _array_image(arr: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) → (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(f"an image array must be (H, W) or (H, W, C), got shape {arr.shape}")
    im = Image.fromarray(arr.astype(np.uint8)).convert("L" if channels == 1 else "RGB")
    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
