"""The data card: what the data is, how it was split, and what looks wrong with it.

Findings are facts with a suggested action (class imbalance → class weights; duplicates
across train and test → leakage; constant columns → drop them), written to data_card.json.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from danlu.data.loader import Split


def class_balance(y: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(y, minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts, strict=True)}


def row_hashes(x: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return np.array([hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in flat])


def findings_for(
    splits: dict[str, Split], class_names: list[str] | None, raw_x: dict[str, np.ndarray]
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(level: str, message: str, action: str) -> None:
        out.append({"level": level, "message": message, "action": action})

    train = splits["train"]
    if class_names:
        counts = np.bincount(train.y.numpy(), minlength=len(class_names))
        present = counts[counts > 0]
        if len(present) < len(class_names):
            absent = [n for n, c in zip(class_names, counts, strict=True) if c == 0]
            add(
                "warning",
                f"classes absent from training: {', '.join(absent)}",
                "collect examples of them or remove them",
            )
        if present.min() * 3 < present.max():
            small = class_names[int(np.argmin(np.where(counts > 0, counts, counts.max() + 1)))]
            add(
                "warning",
                f"class imbalance: largest/smallest training class = "
                f"{present.max() / present.min():.1f} (smallest: '{small}')",
                "set train.class_weights: auto or train.sampler: weighted",
            )
        if present.min() < 10:
            add(
                "warning",
                f"a class has only {present.min()} training examples",
                "collect more examples or merge rare classes",
            )
    if "test" in raw_x and "train" in raw_x and len(raw_x["test"]):
        leaked = np.isin(row_hashes(raw_x["test"]), row_hashes(raw_x["train"])).sum()
        if leaked:
            add(
                "warning",
                f"{leaked} test examples also appear in the training data",
                "deduplicate the data: test scores are optimistic",
            )
    if "train" in raw_x and len(raw_x["train"]) > 1:
        h = row_hashes(raw_x["train"])
        dups = len(h) - len(np.unique(h))
        if dups:
            add(
                "info", f"{dups} duplicate examples in the training split", "consider deduplicating"
            )
    return out


def build_card(
    *,
    dataset: str,
    origin: str,
    task: str,
    input_kind: str,
    splits: dict[str, Split],
    class_names: list[str] | None,
    how_test: str,
    content_hash: str,
    details: dict[str, Any],
    findings: list[dict[str, str]],
) -> dict[str, Any]:
    card: dict[str, Any] = {
        "dataset": dataset,
        "origin": origin,
        "task": task,
        "input": input_kind,
        "content_hash": content_hash,
        "sizes": {name: len(s) for name, s in splits.items()},
        "test_split": how_test,
    }
    if class_names:
        card["classes"] = class_names
        card["class_balance"] = {
            name: class_balance(s.y.numpy(), class_names) for name, s in splits.items()
        }
    else:
        card["target"] = {
            name: {"mean": float(s.y.float().mean()), "std": float(s.y.float().std())}
            for name, s in splits.items()
            if len(s) > 1
        }
    card.update(details)
    card["findings"] = findings
    return card
