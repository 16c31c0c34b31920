"""Text sources: labelled documents, corpora for language modelling, and parallel pairs.

Readers return one of three raw shapes, which `prepare` turns into splits of token ids:

- RawText: one document per example with a label (classification / regression), e.g. a CSV
  with text and label columns, the Orange .tab tables (R8, R52, 20 Newsgroups, tweets), the
  fortune files labelled by language or category;
- RawCorpus: documents for language modelling, re-iterable so a corpus larger than memory
  streams (plain-text files, folders, globs, the Bible as prose);
- RawPairs: aligned source/target texts for seq2seq (the English–Spanish verses).

All files are read as UTF-8 (a leading BOM is dropped). Undecodable bytes are a DataError
naming the file and byte offset unless `data.encoding_errors: replace` (then they read as
U+FFFD). SWORD Bible modules are read by `sword.py`, `hf:NAME` datasets by `hf.py`.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from danlu.data.tables import read_table
from danlu.errors import DataError

CHUNK = 1 << 20


@dataclass
class RawText:
    """Labelled documents; `test_*` hold the dataset's official test split, if it has one."""

    texts: list[str]
    labels: np.ndarray  # raw label values (str or numbers), one per text
    origin: str  # file / folder / built-in description, for messages
    text_name: str = "text"  # the column (or field) the texts came from
    label_name: str = "label"
    task: str | None = None  # a built-in's own task
    test_texts: list[str] | None = None
    test_labels: np.ndarray | None = None
    columns: pd.DataFrame | None = None  # the source table's other columns, row by row


@dataclass
class RawCorpus:
    """Documents for language modelling, produced on demand (a corpus may exceed memory)."""

    documents: Callable[[], Iterator[str]]  # a fresh iterator over the documents each call
    origin: str
    content_hash: str  # SHA-256 of the source bytes (the token cache key starts here)
    size_bytes: int


@dataclass
class RawPairs:
    """Aligned (source, target) texts for seq2seq; `keys` say where each pair came from."""

    sources: list[str]
    targets: list[str]
    origin: str
    keys: list[str] | None = None  # e.g. "Gen.1.1"
    unmatched: dict[str, int] | None = None  # rows a join dropped, e.g. {"source": 6381}


# ------------------------------------------------------------------------------ decoding


def decode(data: bytes, where: str, errors: str = "strict", offset: int = 0) -> str:
    """UTF-8 → str; `offset` is where `data` starts in the file (for the message)."""
    try:
        text = data.decode("utf-8", _errors(errors))
    except UnicodeDecodeError as e:
        raise _undecodable(where, offset + e.start, e.object[e.start : e.start + 4]) from None
    return text[1:] if offset == 0 and text.startswith("\ufeff") else text


def decode_file(path: Path, errors: str = "strict") -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read '{path}': {e.strerror or e}") from None
    return decode(gzip.decompress(data) if path.name.endswith(".gz") else data, str(path), errors)


def _errors(errors: str) -> str:
    if errors not in ("strict", "replace"):
        raise DataError(f"data.encoding_errors is '{errors}'", fix="use strict or replace")
    return errors


def _undecodable(where: str, offset: int, bad: bytes) -> DataError:
    return DataError(
        f"'{where}': the bytes at offset {offset} ({bad.hex(' ')}) are not valid UTF-8",
        fix="convert the file to UTF-8, or set data.encoding_errors: replace to read "
        "undecodable bytes as U+FFFD",
    )


# ------------------------------------------------------------------------ text tables


def read_text_table(path: str | Path, encoding_errors: str = "strict") -> pd.DataFrame:
    """CSV/TSV (decoded here, so a bad byte is named by offset), JSONL, Parquet, Orange .tab."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".tab"):
        return read_orange_tab(path, encoding_errors)
    if not name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt")) or not path.is_file():
        return read_table(path, encoding_errors=encoding_errors)  # JSONL, Parquet, not found
    content = decode_file(path, encoding_errors)
    sep = "\t" if ".tsv" in name else None if name.endswith(".txt") else ","
    try:
        frame = pd.read_csv(io.StringIO(content), sep=sep, engine="python" if sep is None else "c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(f"cannot read table '{path}': {str(e).splitlines()[0]}") from None
    if frame.empty:
        raise DataError(f"table '{path}' has no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def text_table(
    frame: pd.DataFrame,
    origin: str,
    *,
    text: str = "text",
    label: str = "label",
    target: str | None = None,
    task: str | None = None,
) -> RawText | RawPairs:
    """A table with a text column and a label column (or a target text column: pairs)."""
    need_columns(frame, origin, text=text, **({"target": target} if target else {"label": label}))
    if target is not None:
        return make_pairs(
            texts_of(frame[text]), texts_of(frame[target]), origin, names=(text, target)
        )
    texts = texts_of(frame[text])
    _no_empty(texts, origin, f"column '{text}'")
    values = frame[label]
    missing = values.isna() | values.map(lambda v: isinstance(v, str) and not v.strip())
    if missing.any():
        i = int(np.argmax(missing.to_numpy()))
        raise DataError(
            f"{origin}: row {i + 1} has no value in label column '{label}' "
            f"({int(missing.sum())} rows without a label)",
            fix="fill in the labels or drop those rows from the file",
        )
    others = frame.drop(columns=[text]).reset_index(drop=True)
    return RawText(texts, values.to_numpy(), origin, text, label, task, columns=others)


def make_pairs(
    sources: list[str],
    targets: list[str],
    origin: str,
    keys: list[str] | None = None,
    names: tuple[str, str] = ("source", "target"),
) -> RawPairs:
    """Checks that the two sides align: same length, no side empty."""
    if len(sources) != len(targets):
        raise DataError(
            f"{origin}: {len(sources)} {names[0]} texts but {len(targets)} {names[1]} texts",
            fix="every source needs exactly one target",
        )
    for side, texts in zip(names, (sources, targets), strict=True):
        _no_empty(texts, origin, f"{side} side", keys, "the pairs do not align: ")
    return RawPairs(sources, targets, origin, keys)


def need_columns(frame: pd.DataFrame, origin: str, **roles: str) -> None:
    for role, column in roles.items():
        if column not in frame.columns:
            found = ", ".join(map(str, frame.columns))
            raise DataError(
                f"{origin}: {role} column '{column}' not found (columns found: {found})",
                fix=f"set data.{role} to one of the columns found",
            )


def texts_of(values: pd.Series) -> list[str]:
    """Cells as text; a missing cell (None, NaN, NA) is an empty text."""
    return ["" if v is None or (np.ndim(v) == 0 and pd.isna(v)) else str(v) for v in values]


def _no_empty(texts: list[str], origin: str, what: str, keys=None, prefix: str = "") -> None:
    """Rows are named by their 1-based position among the data rows (or by their key)."""
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        where = keys[empty[0]] if keys else f"row {empty[0] + 1}"
        raise DataError(
            f"{origin}: {prefix}{where} has an empty {what} ({len(empty)} empty of {len(texts)})",
            fix="drop the empty documents from the file",
        )


# ----------------------------------------------------------------------- Orange .tab


def read_orange_tab(path: str | Path, encoding_errors: str = "strict") -> pd.DataFrame:
    """Orange's tab format: names, types and flags rows, then data; every value is a str.

    R8/R52/20NG have one blank row after the header (R52-train: a row of empty fields), the
    election tweets none: blank rows right after the header are skipped. Fields are split on
    tabs only (QUOTE_NONE, so a stray quote cannot swallow lines); a field wholly in double
    quotes is CSV-quoted text (the tweets use "" for a quote inside) and is unquoted.
    """
    path = Path(path)
    csv.field_size_limit(2**31 - 1)  # a 20NG post can exceed the 128 KiB default
    lines = io.StringIO(decode_file(path, encoding_errors), newline="")
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    if len(rows) < 3 or not any(rows[0]):
        raise DataError(f"'{path}' lacks Orange's three header rows (names, types, flags)")
    (names, types, flags), data = rows[:3], rows[3:]
    while data and not any(f.strip() for f in data[0]):
        data.pop(0)
    width = len(names)
    for i, row in enumerate(data):
        if len(row) > width and any(row[width:]):
            raise DataError(f"'{path}': data row {i + 1} has {len(row)} fields, header {width}")
        data[i] = [_unquote(f) for f in row[:width]] + [""] * (width - len(row))
    if not data:
        raise DataError(f"Orange file '{path}' has no data rows")
    frame = pd.DataFrame(data, columns=[n.strip() for n in names], dtype=object)
    frame.attrs["orange"] = {"types": types, "flags": flags}
    return frame


def _unquote(field: str) -> str:
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def orange_columns(frame: pd.DataFrame) -> tuple[str, str]:
    """The text column (Text or Content) and the label (Category, Author or the class flag)."""
    flags = frame.attrs.get("orange", {}).get("flags", [])
    cols = frame.columns
    flagged = [c for c, f in zip(cols, flags, strict=False) if "class" in f.split()]
    text = next((c for c in ("Text", "Content") if c in cols), "Text")
    return text, next((c for c in ("Category", "Author", *flagged) if c in cols), "Category")


# ---------------------------------------------------------------------------- fortunes

FORTUNE_SEP = re.compile(r"^%[ \t]*$", re.M)  # es/arte.fortunes also uses "% " lines


def fortune_files(root: str | Path) -> dict[str, list[Path]]:
    """English <root>/<category>, German <root>/de/*, Spanish <root>/es/*.fortunes.

    Skips the strfile indexes (*.dat), the *.u8 links and every other symlink (they point at
    files already listed), and sub-folders such as es/off/ (offensive fortunes).
    """
    root = Path(root)
    found = {"en": root / "*", "de": root / "de" / "*", "es": root / "es" / "*.fortunes"}

    def keep(p: Path) -> bool:
        return p.is_file() and not p.is_symlink() and not p.name.endswith((".dat", ".u8"))

    return {lang: sorted(filter(keep, map(Path, glob.glob(str(g))))) for lang, g in found.items()}


def fortune_entries(path: Path, encoding_errors: str = "strict") -> list[str]:
    """Entries are separated by a line holding only '%'; blank entries are dropped."""
    content = decode_file(path, encoding_errors).replace("\r\n", "\n")
    return [e.strip("\n") for e in FORTUNE_SEP.split(content) if e.strip()]


def read_fortunes(
    root: str | Path, by: str = "language", encoding_errors: str = "strict"
) -> RawText:
    """Fortunes labelled by language (en/de/es) or by category (file name; de/, es/ prefixed).

    The Debian files (fortunes 1.99.1, fortunes-de 0.35, fortunes-es 1.36: 116 files) all decode
    as UTF-8; none is latin-1. Exact duplicates are kept as the files have them (86 English, 111
    German; one English quote sits in de/): finding them is the data check's job.
    """
    if by not in ("language", "category"):
        raise DataError(f"fortunes can be labelled by language or category, not '{by}'")
    texts, labels = [], []
    for lang, files in fortune_files(root).items():
        for path in files:
            entries = fortune_entries(path, encoding_errors)
            category = path.name.removesuffix(".fortunes")
            label = lang if by == "language" else category if lang == "en" else f"{lang}/{category}"
            texts += entries
            labels += [label] * len(entries)
    if not texts:
        raise DataError(f"no fortune files found under '{root}'", fix="check the folder")
    return RawText(texts, np.array(labels), f"fortunes in {root}", "fortune", by, "classification")


# ----------------------------------------------------------------------- plain corpora


def read_corpus(
    source: str | Path,
    pattern: str = "*.txt",
    unit: str = "paragraph",
    encoding_errors: str = "strict",
) -> RawCorpus:
    """A text file, a folder (recursive, `pattern`) or a glob → documents streamed from disk.

    unit="paragraph" (default): one document per blank-line-separated paragraph, its lines
    joined with "\\n"; files are read line by line, so memory is bounded by the longest
    paragraph. unit="file": one document per file. Building the corpus reads every byte once to
    hash it (SHA-256 over sorted relative path + bytes) and, in strict mode, to check it decodes:
    a bad byte is reported now (file and offset), not in the middle of training.
    """
    if unit not in ("paragraph", "file"):
        raise DataError(f"corpus unit '{unit}' is not paragraph or file")
    files, base = _corpus_files(str(source), pattern)
    errors = _errors(encoding_errors)
    digest, size = hashlib.sha256(), 0
    for path in files:
        rel = path.relative_to(base).as_posix() if base else path.as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0".encode())
        size += _hash_and_check(path, digest, errors == "strict")

    def documents() -> Iterator[str]:
        for path in files:
            if unit == "file":
                if text := decode_file(path, errors).strip("\n"):
                    yield text
            else:
                yield from _paragraphs(path, errors)

    return RawCorpus(documents, f"{source} ({len(files)} files)", digest.hexdigest(), size)


def _corpus_files(source: str, pattern: str) -> tuple[list[Path], Path | None]:
    path = Path(source).expanduser()
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob(pattern) if p.is_file())
        where, base = f"folder '{path}' has no files matching {pattern}", path
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        where = f"no files match '{source}'"
        base = Path(os.path.commonpath([p.parent for p in files])) if files else None
    if not files:
        raise DataError(f"text corpus: {where}", fix="check data.dataset")
    return files, base


def _hash_and_check(path: Path, digest, check: bool) -> int:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    pos, pending = 0, 0
    with path.open("rb") as f:
        try:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                if check:
                    pending = len(decoder.getstate()[0])  # a character split across chunks
                    decoder.decode(chunk)
                pos += len(chunk)
            pending = len(decoder.getstate()[0])
            decoder.decode(b"", final=check)
        except UnicodeDecodeError as e:
            bad = e.object[e.start : e.start + 4]
            raise _undecodable(str(path), pos - pending + e.start, bad) from None
    return pos


def _paragraphs(path: Path, errors: str) -> Iterator[str]:
    lines: list[str] = []
    with path.open("rb") as f:
        offset = 0
        for raw in f:
            line = decode(raw, str(path), errors, offset).rstrip("\r\n")
            offset += len(raw)
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def corpus_from_texts(texts: Iterable[str], origin: str) -> RawCorpus:
    """A corpus over texts already in memory (a table's text column, an HF dataset)."""
    docs = [t for t in texts if t.strip()]
    digest, size = hashlib.sha256(), 0
    for t in docs:
        data = t.encode()
        digest.update(f"{len(data)}\0".encode() + data)
        size += len(data)
    return RawCorpus(lambda: iter(docs), origin, digest.hexdigest(), size)
