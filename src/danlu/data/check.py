"""Data quality checks on a built DataBundle: what looks wrong, how bad it is, what to do.

    report = run_checks(bundle, max_length=256, label_noise=True)
    report.findings   # [{"level", "code", "message", "action"}], blockers first
    report.stats      # the numbers behind them (class balance, duplicates, lengths, ...)

Each finding has a level: `info` (worth knowing), `warning` (likely to cost accuracy or make
scores optimistic) or `blocker` (training on this data would be wrong; `danlu train` refuses
to start when `data.check.on_blockers: stop`). The blockers:

- `class_missing_from_train`: a class occurs in val or test but never in training: the model
  cannot predict it, and every example of it is scored wrong.
- `eval_in_train`: more than half of the val or test split are exact copies of training
  examples: the score measures memory, not generalization.
- `label_is_id`: the label column is an identifier (classification: more distinct labels
  than half the rows; regression: unique, monotone integers): there is nothing to learn.

The cheap checks (everything but label noise) take well under a second on Fashion-MNIST and run
before every training; label-noise candidates need a cross-validated baseline (see
`baseline.py`) and run in `danlu data check`. Text checks take plain lists of strings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from danlu.data import baseline, dedup
from danlu.data.check_rows import describe_row, split_inputs
from danlu.data.check_tables import table_checks

LEVELS = ("blocker", "warning", "info")
BLOCKER_SHARE = 0.5  # eval_in_train: share of val/test that may be copies of training rows
IMBALANCE_RATIO = 3.0  # largest / smallest training class above this: a warning
FEW_EXAMPLES = 10  # a training class with fewer examples: a warning
TRUNCATION_WARN = 0.1  # share of texts truncated by max_length above this: a warning
NOISE_P_OTHER, NOISE_P_GIVEN = 0.9, 0.05  # label-noise candidate thresholds (docs/data.md)
NOISE_LISTED = 200  # label-noise candidates listed in the stats, most confident first
NOISE_WARN = 0.02  # candidates above this share of checked rows: a warning (clean Fashion: 1.1 %)


@dataclass
class CheckReport:
    findings: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def add(self, level: str, code: str, message: str, action: str) -> None:
        assert level in LEVELS, level
        self.findings.append({"level": level, "code": code, "message": message, "action": action})

    @property
    def blockers(self) -> list[dict[str, str]]:
        return [f for f in self.findings if f["level"] == "blocker"]

    def counts(self) -> dict[str, int]:
        return {lv: sum(f["level"] == lv for f in self.findings) for lv in LEVELS}

    def sort(self) -> None:
        self.findings.sort(key=lambda f: LEVELS.index(f["level"]))


def run_checks(
    bundle: Any,
    *,
    max_length: int | None = None,
    label_noise: bool = False,
    max_rows: int = 20_000,
    seed: int = 0,
    count_tokens: Callable[[str], int] | None = None,
) -> CheckReport:
    """All checks on a DataBundle; `label_noise` adds the (slower) baseline-based one."""
    t0 = time.perf_counter()
    report = CheckReport()
    if bundle.spec.task not in ("classification", "regression"):
        report.stats["skipped"] = f"no checks for task {bundle.spec.task} yet"
        return report
    kind, inputs = split_inputs(bundle)
    report.stats["input"] = kind
    classes = bundle.spec.class_names
    labels = {name: s.y.numpy() for name, s in bundle.splits.items()}
    if classes:
        class_checks(report, labels, classes)
    if kind == "table" and bundle.raw is not None and hasattr(bundle.raw, "frame"):
        table_checks(report, bundle.raw, bundle.spec, bundle.card)
    if kind == "image":
        blank_images(report, inputs["train"])
    if kind == "text":
        text = getattr(bundle.spec, "text", None) or {}
        max_length = max_length or text.get("max_length")
        text_checks(report, inputs, max_length, count_tokens, getattr(bundle, "encoder", None))
    duplicate_checks(report, kind, inputs, labels if classes else None, bundle)
    report.stats["seconds"] = {"cheap": round(time.perf_counter() - t0, 3)}
    if label_noise and classes:
        t1 = time.perf_counter()
        noise_checks(report, bundle, kind, inputs["train"], classes, max_rows, seed)
        report.stats["seconds"]["label_noise"] = round(time.perf_counter() - t1, 3)
    report.sort()
    return report


# --------------------------------------------------------------------------- classes


def class_checks(report: CheckReport, labels: dict[str, np.ndarray], names: list[str]) -> None:
    c = len(names)
    counts = {k: np.bincount(y, minlength=c) for k, y in labels.items()}
    train = counts["train"]
    present = train[train > 0]
    weights = [len(labels["train"]) / (c * n) if n else None for n in train]
    ratio = float(present.max() / present.min())
    report.stats["class_balance"] = {
        "counts": {k: dict(zip(names, map(int, v), strict=True)) for k, v in counts.items()},
        "imbalance_ratio": round(ratio, 3),
        "class_weights": {
            n: round(w, 4) if w else None for n, w in zip(names, weights, strict=True)
        },
    }
    unseen, absent = [], []
    for i, name in enumerate(names):
        seen = {k: int(v[i]) for k, v in counts.items() if k != "train" and v[i]}
        if train[i] == 0 and seen:
            unseen.append(f"'{name}' ({', '.join(f'{k} {n}' for k, n in seen.items())})")
        elif train[i] == 0:
            absent.append(f"'{name}'")
    if unseen:
        report.add(
            "blocker",
            "class_missing_from_train",
            f"{_count(len(unseen), 'class', 'classes')} in val/test but never in training: "
            + _cut(", ".join(unseen)),
            "add training examples of them, or remove them from the data; keep "
            "data.split.stratify: true so every split holds every class",
        )
    if absent:
        report.add(
            "warning",
            "class_absent",
            f"{_count(len(absent), 'class has', 'classes have')} no examples in any split: "
            + _cut(", ".join(absent)),
            "remove them from the class list or collect examples of them",
        )
    if ratio > IMBALANCE_RATIO:
        small = names[int(np.argmin(np.where(train > 0, train, train.max() + 1)))]
        shown = ", ".join(f"{n}: {w:.2f}" for n, w in zip(names, weights, strict=True) if w)
        report.add(
            "warning",
            "class_imbalance",
            f"class imbalance: largest/smallest training class = {ratio:.1f} "
            f"(smallest: '{small}', {int(present.min())} examples)",
            f"set train.class_weights: auto (n / (C × count): {_cut(shown)}) "
            "or train.sampler: weighted",
        )
    if present.min() < FEW_EXAMPLES:
        report.add(
            "warning",
            "few_examples",
            f"a class has only {int(present.min())} training examples",
            "collect more examples or merge rare classes",
        )


# ----------------------------------------------------------------------- images, text


def blank_images(report: CheckReport, x: np.ndarray) -> None:
    flat = x.reshape(len(x), -1)
    blank = int(np.sum(flat.max(axis=1) == flat.min(axis=1)))
    report.stats["blank_images"] = blank
    if blank:
        report.add(
            "warning",
            "blank_images",
            f"{blank} training images have a single colour",
            "remove them: they are usually failed exports or placeholders",
        )


def text_lengths(
    texts: list[str],
    max_length: int | None = None,
    count: Callable[[str], int] | None = None,
    *,
    count_all: Callable[[list[str]], list[int]] | None = None,
) -> dict[str, Any]:
    """Length distribution (whitespace words unless `count` counts one text's tokens, or
    `count_all` a list's) and the share of texts longer than max_length."""
    if count_all is not None:
        lengths = np.asarray(count_all(texts), dtype=np.int64)
    else:
        lengths = np.array([count(t) if count else len(t.split()) for t in texts], np.int64)
    tokens = count is not None or count_all is not None
    if not len(lengths):
        return {"count": 0}
    q = np.percentile(lengths, [50, 90, 95, 99])
    edges = np.histogram_bin_edges(lengths, bins=min(30, max(1, int(lengths.max()))))
    hist, _ = np.histogram(lengths, bins=edges)
    out = {
        "count": len(lengths),
        "unit": "tokens" if tokens else "words",
        "mean": round(float(lengths.mean()), 2),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p95": float(q[2]),
        "p99": float(q[3]),
        "max": int(lengths.max()),
        "empty": int(np.sum(lengths == 0)),
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
    }
    if max_length:
        out["max_length"] = max_length
        out["truncated_share"] = float(np.mean(lengths > max_length))
    return out


def text_checks(
    report: CheckReport,
    texts: dict[str, list[str]],
    max_length: int | None,
    count: Callable[[str], int] | None,
    encoder: Any = None,
) -> None:
    """Lengths in the bundle's tokens (with special tokens, as the encoding counts them) when
    it has a tokenizer, else by `count`, else in whitespace words."""
    count_all = None
    if count is None and encoder is not None:

        def count_all(docs: list[str]) -> list[int]:
            return [len(ids) for ids in encoder.encode_ids(docs, add_special_tokens=True)]

    stats = {
        name: text_lengths(t, max_length, count, count_all=count_all) for name, t in texts.items()
    }
    report.stats["text_lengths"] = stats
    train = stats["train"]
    if train.get("empty"):
        report.add(
            "warning",
            "empty_texts",
            f"{train['empty']} training texts are empty",
            "drop them or fix the text column",
        )
    share = train.get("truncated_share", 0.0)
    if share:
        unit = train["unit"]
        report.add(
            "warning" if share > TRUNCATION_WARN else "info",
            "truncation",
            f"max_length {max_length} truncates {share:.1%} of training texts "
            f"(median {train['p50']:.0f}, p95 {train['p95']:.0f}, max {train['max']} {unit})",
            f"raise data.tokenizer.max_length towards p95 ({train['p95']:.0f}) if the ends matter"
            + ("; subword tokens outnumber words" if unit == "words" else ""),
        )


# ------------------------------------------------------------------------ duplicates


def duplicate_checks(
    report: CheckReport,
    kind: str,
    inputs: dict[str, Any],
    labels: dict[str, np.ndarray] | None,
    bundle: Any,
) -> None:
    exact = {k: dedup.hashes(v, kind) for k, v in inputs.items()}
    near = {k: dedup.hashes(v, kind, near=True) for k, v in inputs.items()}
    e, nr = dedup.duplicate_stats(exact, labels), dedup.duplicate_stats(near)
    for s in (e, nr):
        s["examples"] = [
            {"row": describe_row(bundle, a, i), "copy_of": describe_row(bundle, b, j)}
            for a, i, b, j in s["examples"]
        ]
    report.stats["duplicates"] = {"exact": e, "near": nr}
    for name, share in e["share_in_train"].items():
        n, total = e["in_train"][name], len(exact[name])
        near_n = nr["in_train"][name]
        if share > BLOCKER_SHARE:
            report.add(
                "blocker",
                "eval_in_train",
                f"{n} of {total} {name} examples ({share:.0%}) are exact copies of training "
                "examples",
                f"deduplicate before splitting: the {name} score would measure memory",
            )
        elif near_n:
            report.add(
                "warning",
                "leakage",
                f"{near_n} of {total} {name} examples ({near_n / total:.1%}) also appear in "
                f"training ({n} exact copies, {near_n - n} near)",
                f"deduplicate across splits: {name} scores are optimistic",
            )
    n_train = len(exact["train"])
    dup, near_dup = e["within"]["train"], nr["within"]["train"]
    if near_dup:
        share = near_dup / max(n_train, 1)
        report.add(
            "warning" if share > 0.05 else "info",
            "duplicates",
            f"{dup} exact and {near_dup - dup} near duplicates in the training split ({share:.1%})",
            "consider deduplicating: copies weigh more in training",
        )
    if e.get("label_conflicts"):
        report.add(
            "warning",
            "label_conflicts",
            f"{e['label_conflicts']} groups of identical examples carry different labels",
            "fix the labels of those copies (data_card.json lists duplicate examples)",
        )


# ------------------------------------------------------------------------ label noise


def noise_checks(
    report: CheckReport,
    bundle: Any,
    kind: str,
    train_inputs: Any,
    classes: list[str],
    max_rows: int,
    seed: int,
) -> None:
    """Rows a 5-fold cross-validated baseline confidently gives another class."""
    y = bundle.splits["train"].y.numpy()
    rows = np.arange(len(y))
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    # tables: the model's inputs (encoded, filled features), as raw cells may hold text
    x = bundle.splits["train"].x if kind == "table" else train_inputs
    x = baseline.baseline_inputs(x, kind)[rows]
    proba = baseline.cross_val_proba(kind, x, y[rows], seed=seed)
    found = baseline.confident_mistakes(
        proba, y[rows], p_other=NOISE_P_OTHER, p_given=NOISE_P_GIVEN
    )
    listed = []
    for r in found[:NOISE_LISTED]:
        p = proba[r]
        suggested = int(np.argmax(np.where(np.arange(len(p)) == y[rows][r], -1, p)))
        listed.append(
            {
                **describe_row(bundle, "train", int(rows[r])),
                "label": classes[int(y[rows][r])],
                "suggested": classes[suggested],
                "p_label": round(float(p[y[rows][r]]), 4),
                "p_suggested": round(float(p[suggested]), 4),
            }
        )
    share = len(found) / len(rows)
    report.stats["label_noise"] = {
        "checked": len(rows),
        "candidates": len(found),
        "share": share,
        "thresholds": {"p_other": NOISE_P_OTHER, "p_given": NOISE_P_GIVEN},
        "rows": listed,
    }
    if not len(found):
        report.add(
            "info",
            "label_noise",
            f"no label-noise candidates among {len(rows)} training examples checked",
            "none needed",
        )
    else:
        eg = "; ".join(f"{d['where']}: '{d['label']}' → '{d['suggested']}'" for d in listed[:3])
        report.add(
            "warning" if share > NOISE_WARN else "info",
            "label_noise",
            f"{len(found)} of {len(rows)} training examples checked ({share:.1%}) may be "
            f"mislabelled: a cross-validated baseline gives another class p ≥ {NOISE_P_OTHER} "
            f"and theirs p ≤ {NOISE_P_GIVEN} (e.g. {eg})",
            "review them (data_card.json lists the rows) and fix or drop wrong labels",
        )


def _count(n: int, one: str, many: str) -> str:
    return f"1 {one}" if n == 1 else f"{n} {many}"


def _cut(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
