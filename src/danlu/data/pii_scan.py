"""PII in a data source: `scan` reports it, `redact_raw` replaces it (detectors: pii.py).

Both see the same values of a raw source (what `build.resolve` returns):

- tables: every column holding strings (only the string cells), or exactly the columns in
  `data.pii.columns` (every non-missing cell, read as text);
- labelled texts: the text column, plus any other source column named in `data.pii.columns`;
- pairs: the source and target texts; corpora: every line of every document.

`scan` (`danlu data scan`) counts matches per column and kind and keeps a few examples,
masked. `redact_raw` (`data.redact_pii: true`, called by `build` before anything reads the
texts: splits, tokenizer, token cache, content hash) returns a new raw with placeholders and
the counts the data card records as `pii_redacted`. A corpus is redacted line by line as its
documents stream, and its content hash is keyed with the detector, so a token cache built
from the unredacted text is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pandas as pd

from danlu.data.pii import Detector, detector, mask
from danlu.data.tables import RawTable
from danlu.data.text import RawCorpus, RawPairs, RawText
from danlu.errors import DataError

Counts = dict[str, dict[str, int]]  # column → kind → matches


# -------------------------------------------------------------------------------- values


def _is_text(values: pd.Series) -> bool:
    if not (values.dtype == object or pd.api.types.is_string_dtype(values.dtype)):
        return False
    return bool(values.map(lambda v: isinstance(v, str)).any())


def _pick(frame: pd.DataFrame, columns: list[str] | None, origin: str) -> list[str]:
    if columns is None:
        return [c for c in frame.columns if _is_text(frame[c])]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{origin}: data.pii.columns names {missing}, not columns of the data "
            f"(columns: {', '.join(map(str, frame.columns))})",
            fix="list columns that exist, or leave data.pii.columns unset to scan all text",
        )
    return list(columns)


def _cell_text(value: Any, explicit: bool) -> str | None:
    """The text of a cell to look at: strings; with named columns, any non-missing value."""
    if isinstance(value, str):
        return value
    if explicit and value is not None and not (pd.api.types.is_scalar(value) and pd.isna(value)):
        return str(value)
    return None


def _cells(frames: list[pd.DataFrame], column: str, explicit: bool) -> Iterator[str]:
    for frame in frames:
        for v in frame[column]:
            if (text := _cell_text(v, explicit)) is not None:
                yield text


def _lines(raw: RawCorpus) -> Iterator[str]:
    for doc in raw.documents():
        yield from doc.split("\n")


def fields(
    raw: Any, columns: list[str] | None = None, names: tuple[str, str] = ("source", "target")
) -> dict[str, Iterable[str]]:
    """Column name → the texts to look at (see the module docstring)."""
    if isinstance(raw, RawTable):
        frames = [raw.frame] + ([raw.test_frame] if raw.test_frame is not None else [])
        picked = _pick(raw.frame, columns, raw.origin)
        return {c: _cells(frames, c, columns is not None) for c in picked}
    if isinstance(raw, RawText):
        out: dict[str, Iterable[str]] = {}
        if columns is None or raw.text_name in columns:
            out[raw.text_name] = [*raw.texts, *(raw.test_texts or [])]
        others = [c for c in columns or [] if c != raw.text_name]
        if others:
            frame = raw.columns if raw.columns is not None else pd.DataFrame()
            out |= {c: _cells([frame], c, True) for c in _pick(frame, others, raw.origin)}
        return out
    if isinstance(raw, RawPairs):
        both = dict(zip(names, (raw.sources, raw.targets), strict=True))
        return {k: v for k, v in both.items() if columns is None or k in columns}
    if isinstance(raw, RawCorpus):
        return {"text": _lines(raw)}
    raise DataError(
        f"{getattr(raw, 'origin', 'the dataset')} holds no text to scan for personal data",
        fix="data scan and data.redact_pii apply to tables, texts, pairs and corpora",
    )


# ---------------------------------------------------------------------------------- scan


def scan(
    raw: Any,
    *,
    kinds: list[str] | None = None,
    patterns: dict[str, str] | None = None,
    columns: list[str] | None = None,
    names: tuple[str, str] = ("source", "target"),
    examples: int = 3,
) -> dict[str, Any]:
    """Matches per column and kind, with up to `examples` distinct masked examples each."""
    det = detector(kinds, patterns)
    report: dict[str, Any] = {}
    for name, values in fields(raw, columns, names).items():
        n = hit = 0
        counts: Counter[str] = Counter()
        shown: dict[str, list[str]] = {}
        for text in values:
            n += 1
            found = det.find(text)
            hit += bool(found)
            for m in found:
                counts[m.kind] += 1
                seen = shown.setdefault(m.kind, [])
                if len(seen) < examples and (masked := mask(m.text, m.kind)) not in seen:
                    seen.append(masked)
        report[str(name)] = {
            "values": n,
            "values_with_pii": hit,
            "found": {k: {"count": c, "examples": shown[k]} for k, c in counts.most_common()},
        }
    total = sum(f["count"] for col in report.values() for f in col["found"].values())
    return {"origin": raw.origin, **det.settings(), "total": total, "columns": report}


# -------------------------------------------------------------------------------- redact


def redact_raw(
    raw: Any,
    *,
    kinds: list[str] | None = None,
    patterns: dict[str, str] | None = None,
    columns: list[str] | None = None,
    names: tuple[str, str] = ("source", "target"),
) -> tuple[Any, Counts]:
    """A copy of `raw` with placeholders for what the detectors find, and the counts."""
    det = detector(kinds, patterns)
    if isinstance(raw, RawCorpus):
        return _redact_corpus(raw, det)
    wanted = set(fields(raw, columns, names))  # also checks the columns and the raw type
    counts: Counts = {}

    def apply(name: str, values: Iterable[Any], explicit: bool) -> list[Any]:
        out, tally = [], counts.setdefault(str(name), {})
        for v in values:
            text = _cell_text(v, explicit)
            new, found = det.redact(text) if text is not None else (v, None)
            for kind, c in (found or {}).items():
                tally[kind] = tally.get(kind, 0) + c
            out.append(new if found else v)
        return out

    def frame(f: pd.DataFrame | None, explicit: bool) -> pd.DataFrame | None:
        if f is None:
            return None
        f = f.copy()
        for c in [c for c in f.columns if c in wanted]:
            before = counts.get(str(c), {}).copy()
            values = apply(c, f[c], explicit)
            if counts[str(c)] != before:  # a column without PII keeps its type
                kind = f[c].dtype if pd.api.types.is_string_dtype(f[c].dtype) else object
                f[c] = pd.Series(values, index=f.index, dtype=kind)
        return f

    if isinstance(raw, RawTable):
        explicit = columns is not None
        return dataclasses.replace(
            raw, frame=frame(raw.frame, explicit), test_frame=frame(raw.test_frame, explicit)
        ), counts
    if isinstance(raw, RawText):
        texts, test = raw.texts, raw.test_texts
        if raw.text_name in wanted:
            texts = apply(raw.text_name, raw.texts, False)
            test = apply(raw.text_name, test, False) if test is not None else None
            wanted.discard(raw.text_name)
        return dataclasses.replace(
            raw, texts=texts, test_texts=test, columns=frame(raw.columns, True)
        ), counts
    sources, targets = raw.sources, raw.targets  # RawPairs
    if names[0] in wanted:
        sources = apply(names[0], raw.sources, False)
    if names[1] in wanted:
        targets = apply(names[1], raw.targets, False)
    return dataclasses.replace(raw, sources=sources, targets=targets), counts


def _redact_corpus(raw: RawCorpus, det: Detector) -> tuple[RawCorpus, Counts]:
    """Counted in one pass now; redacted again, identically, each time documents stream."""
    tally: Counter[str] = Counter()
    for line in _lines(raw):
        tally.update(det.redact(line)[1])

    def documents() -> Iterator[str]:
        for doc in raw.documents():
            yield "\n".join(det.redact(line)[0] for line in doc.split("\n"))

    keyed = hashlib.sha256(f"{raw.content_hash}:pii:{det.signature}".encode()).hexdigest()
    return dataclasses.replace(raw, documents=documents, content_hash=keyed), {"text": dict(tally)}


def record(bundle: Any, counts: Counts, kinds: list[str] | None, patterns: dict | None) -> None:
    """Write what was redacted into the data card, and how into the text or table spec
    (preprocess.json), so inputs at prediction time can be redacted the same way."""
    bundle.card["pii_redacted"] = counts
    settings = detector(kinds, patterns).settings()
    if bundle.spec.text is not None:
        bundle.spec.text["redact_pii"] = settings
    elif bundle.spec.table is not None:
        bundle.spec.table["redact_pii"] = {**settings, "columns": list(counts)}
