"""Raw data → a DataBundle: splits in memory, the fitted DataSpec and the data card.

`images()` and `table()` take what a source returned (RawImages, RawTable), split it
deterministically, fit the preprocessing on the training split only, and check the result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from danlu.data.blocks import BlockLoader, TokenSplit
from danlu.data.card import build_card, findings_for
from danlu.data.images import RawImages, channel_stats
from danlu.data.loader import BatchLoader, Split
from danlu.data.spec import DataSpec
from danlu.data.splits import split_positions, subset
from danlu.data.tables import (
    RawTable,
    TablePreprocessor,
    check_label,
    encode_labels,
    feature_columns,
)
from danlu.errors import DataError


@dataclass
class DataBundle:
    splits: dict[str, Split]  # train, val, test (val/test may be empty)
    spec: DataSpec
    card: dict[str, Any]
    content_hash: str
    augment: dict[str, Any] | None = None
    # what the source returned (RawTable / RawImages / RawText): `data check` reads the values
    # before any policy (missing cells, columns, texts, file names) through Split.index
    raw: Any = None
    encoder: Any = None  # text: the fitted TextEncoder, saved in the run as tokenizer.json
    conversations: dict[str, list] | None = None  # chat: the conversations of each split
    chat_tokenizer: Any = None  # chat: the transformers tokenizer with its chat template

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        order: str = "sequential",
        seed: int = 0,
        weights: torch.Tensor | None = None,
        train: bool = False,
        device: str = "cpu",
        group_by_length: bool = False,
    ) -> BatchLoader:
        if isinstance(self.splits[split], TokenSplit):  # a language-model corpus
            text = self.spec.text
            return BlockLoader(
                self.splits[split],
                batch_size,
                text["block_size"],
                order="random" if train else "sequential",
                seed=seed,
                pack=text["pack"],
                pad_id=text["pad_id"],
                device=device,
            )
        transform = self.spec.transform(self.augment if train else None)
        return BatchLoader(
            self.splits[split],
            batch_size,
            order=order,
            seed=seed,
            weights=weights,
            transform=transform,
            augment=train and transform is not None and transform.augments,
            device=device,
            drop_last="single" if train else False,
            pad_id=self.spec.text["pad_id"] if self.spec.input == "text" else None,
            group_by_length=group_by_length,
            aligned=self.spec.task == "chat",  # labels per token: cut with the ids
        )


# ------------------------------------------------------------------------------- images


def images(
    raw: RawImages,
    dataset: str,
    task: str,
    image: dict[str, Any],
    normalize: bool,
    *,
    split: dict[str, Any],
    seed: int,
    max_samples: int | None,
    max_eval_samples: int | None,
) -> DataBundle:
    origin = raw.origin
    if task != "classification":
        raise DataError(f"{origin}: image datasets support task: classification, got {task}")
    x = _conform(raw.x, image)
    tx = _conform(raw.test_x, image) if raw.test_x is not None else None
    pos, how = split_positions(
        len(x),
        raw.y,
        val=split["val"],
        test=split["test"],
        has_official=tx is not None,
        seed=seed,
        stratify=split["stratify"],
        origin=origin,
    )
    arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, p in pos.items():
        limit = max_samples if name == "train" else max_eval_samples
        p = subset(p, raw.y, limit, seed)
        arrays[name] = (x[p], raw.y[p], p)
    if how == "official":
        p = subset(np.arange(len(tx)), raw.test_y, max_eval_samples, seed)
        arrays["test"] = (tx[p], raw.test_y[p], p)
    names = raw.class_names
    _check_classes(arrays, names, origin)
    splits = {
        k: Split(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(b), p)
        for k, (a, b, p) in arrays.items()
    }
    mean, std = (
        channel_stats(arrays["train"][0]) if normalize else ([0.0] * x.shape[1], [1.0] * x.shape[1])
    )
    c, h, w = x.shape[1:]
    spec = DataSpec(
        task,
        "image",
        [c, h, w],
        names,
        None,
        None,
        {"channels": c, "size": [h, w], "mean": mean, "std": std},
    )
    digest = _hash_arrays([raw.x, raw.y] + ([raw.test_x, raw.test_y] if tx is not None else []))
    findings = findings_for(splits, names, {k: v[0] for k, v in arrays.items()})
    card = build_card(
        dataset=dataset,
        origin=origin,
        task=task,
        input_kind="image",
        splits=splits,
        class_names=names,
        how_test=how,
        content_hash=digest,
        details={"image": {"shape": [c, h, w], "mean": mean, "std": std}},
        findings=findings,
    )
    return DataBundle(splits, spec, card, digest)


def _conform(x: np.ndarray, image: dict[str, Any]) -> np.ndarray:
    """Apply data.image.channels / resize to an in-memory image array (N, C, H, W) uint8."""
    channels, size = image.get("channels"), image.get("resize")
    if channels == 1 and x.shape[1] == 3:
        w = np.array([0.299, 0.587, 0.114])[None, :, None, None]
        x = np.round((x * w).sum(1, keepdims=True)).clip(0, 255).astype(np.uint8)
    elif channels == 3 and x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    if size and tuple(x.shape[2:]) != tuple(size):
        t = F.interpolate(
            torch.from_numpy(x).float(),
            size=tuple(size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        x = t.round().clamp(0, 255).to(torch.uint8).numpy()
    return x


# -------------------------------------------------------------------------------- tables


def table(
    raw: RawTable,
    dataset: str,
    task: str | None,
    label: str | None,
    features: list[str] | None,
    declared: dict[str, str],
    missing: str,
    fill_value: Any,
    normalize: bool,
    *,
    split: dict[str, Any],
    seed: int,
    max_samples: int | None,
    max_eval_samples: int | None,
) -> DataBundle:
    origin = raw.origin
    frame, test_frame = raw.frame, raw.test_frame
    label = check_label(frame, label or raw.label, origin)
    names = feature_columns(frame, label, features, declared, origin)
    task = task or raw.task or "classification"
    dropped = 0
    if missing == "drop":
        before = len(frame)
        frame = frame.dropna(subset=[*names, label])
        dropped = before - len(frame)
        if test_frame is not None:
            test_frame = test_frame.dropna(subset=[*names, label])
        if frame.empty:
            raise DataError(
                f"{origin}: every row has a missing value; data.missing: drop left none",
                fix="use data.missing: mean or constant",
            )
    _check_task(frame[label], task, origin)
    both = frame[label] if test_frame is None else pd.concat([frame[label], test_frame[label]])
    _, classes = encode_labels(both, task, origin)
    y, _ = encode_labels(frame[label], task, origin, classes)
    pos, how = split_positions(
        len(frame),
        y if classes else None,
        val=split["val"],
        test=split["test"],
        has_official=test_frame is not None,
        seed=seed,
        stratify=split["stratify"],
        origin=origin,
    )
    pre = TablePreprocessor.fit(
        frame.iloc[pos["train"]], names, declared, missing, fill_value, normalize, origin
    )
    x = pre.transform(frame, origin)
    parts = {k: (x[p], y[p], frame.index.to_numpy()[p]) for k, p in pos.items()}
    if how == "official":
        ty, _ = encode_labels(test_frame[label], task, origin, classes)
        parts["test"] = (pre.transform(test_frame, origin), ty, test_frame.index.to_numpy())
    splits = {}
    for k, (a, b, idx) in parts.items():
        keep = subset(
            np.arange(len(b)),
            b if classes else None,
            max_samples if k == "train" else max_eval_samples,
            seed,
        )
        splits[k] = Split(torch.from_numpy(a[keep]), torch.from_numpy(b[keep]), idx[keep])
    if classes:
        _check_classes({k: (None, s.y.numpy(), None) for k, s in splits.items()}, classes, origin)
    spec = DataSpec(task, "table", [x.shape[1]], classes, label, pre.to_dict(), None)
    digest = _hash_frames([raw.frame] + ([raw.test_frame] if raw.test_frame is not None else []))
    findings = findings_for(splits, classes, {k: s.x.numpy() for k, s in splits.items()})
    findings += _table_findings(frame, names, dropped)
    columns = [
        {
            "name": c.name,
            "kind": c.kind,
            "missing": int(frame[c.name].isna().sum()),
            **(
                {"mean": c.mean, "std": c.std}
                if c.kind == "numeric"
                else {"categories": c.categories}
            ),
        }
        for c in pre.columns
    ]
    card = build_card(
        dataset=dataset,
        origin=origin,
        task=task,
        input_kind="table",
        splits=splits,
        class_names=classes,
        how_test=how,
        content_hash=digest,
        details={"label": label, "columns": columns, "rows_dropped": dropped},
        findings=findings,
    )
    return DataBundle(splits, spec, card, digest)


def _check_task(labels: pd.Series, task: str, origin: str) -> None:
    if task == "classification" and pd.api.types.is_float_dtype(labels):
        values = labels.dropna()
        if len(values) and not np.all(np.mod(values, 1) == 0):
            raise DataError(
                f"{origin}: label column '{labels.name}' holds non-integer numbers "
                f"(e.g. {values[np.mod(values, 1) != 0].iloc[0]}) but the task is classification",
                fix="set data.task: regression, or use class labels",
            )


def _table_findings(frame: pd.DataFrame, names: list[str], dropped: int) -> list[dict[str, str]]:
    out = []
    for c in names:
        n = int(frame[c].isna().sum())
        if n:
            out.append(
                {
                    "level": "info",
                    "message": f"column '{c}' has {n} missing values",
                    "action": "check data.missing (error, drop, mean, constant)",
                }
            )
        if frame[c].nunique(dropna=True) <= 1:
            out.append(
                {
                    "level": "warning",
                    "message": f"column '{c}' is constant",
                    "action": f"drop it: data.columns.{c}: ignore",
                }
            )
    if dropped:
        out.append(
            {
                "level": "info",
                "message": f"{dropped} rows with missing values dropped",
                "action": "use data.missing: mean to keep them",
            }
        )
    return out


# -------------------------------------------------------------------------------- checks


def _check_classes(arrays: dict[str, tuple[Any, np.ndarray, Any]], names: list[str], origin: str):
    train_y = arrays["train"][1]
    if len(np.unique(train_y)) < 2:
        only = names[int(train_y[0])] if len(train_y) else "none"
        raise DataError(
            f"{origin}: the training split holds only one class ('{only}')",
            fix="classification needs at least two classes; check data.label and the data",
        )
    for name, (_, y, _) in arrays.items():
        if len(y) == 0 and name == "train":
            raise DataError(f"{origin}: the training split is empty")


def _hash_arrays(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _hash_frames(frames: list[pd.DataFrame]) -> str:
    h = hashlib.sha256()
    for f in frames:
        h.update(",".join(map(str, f.columns)).encode())
        h.update(pd.util.hash_pandas_object(f, index=False).to_numpy().tobytes())
    return h.hexdigest()
