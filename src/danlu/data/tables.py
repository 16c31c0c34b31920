"""Tables: CSV, Parquet and JSONL files with declared or inferred column types.

A column is numeric, categorical (one-hot encoded) or ignored; types not declared in
`data.columns` are inferred. Missing values follow `data.missing`: error, drop, mean (numeric
columns get the training mean, categorical ones the training mode) or constant. Everything
fitted (means, standard deviations, categories) comes from the training split only and is
saved with the run, so `predict` transforms new rows exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from danlu.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq", ".csv.gz", ".tsv.gz", ".jsonl")
MAX_CATEGORIES = 200


@dataclass
class RawTable:
    frame: pd.DataFrame
    origin: str
    label: str | None = None
    task: str | None = None
    test_frame: pd.DataFrame | None = None


def is_table(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in TABLE_SUFFIXES)


def read_table(path: str | Path, *, encoding_errors: str = "strict") -> pd.DataFrame:
    """CSV/TSV/TXT (pandas), Parquet, or JSONL (.jsonl, .ndjson; `encoding_errors` applies)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' not found", fix="check data.dataset")
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".ndjson")):
            frame = read_jsonl(path, encoding_errors)
        elif name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        else:
            sep = "\t" if ".tsv" in name else None if name.endswith(".txt") else ","
            frame = pd.read_csv(path, sep=sep, engine="python" if sep is None else "c")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        raise DataError(f"cannot read table '{path}': {str(e).splitlines()[0]}") from None
    if frame.empty:
        raise DataError(f"table '{path}' has no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.reset_index(drop=True)


def read_jsonl(path: Path, encoding_errors: str = "strict") -> pd.DataFrame:
    """One JSON object per line ({"text": ..., "label": ...}); blank lines are skipped."""
    records = []
    with path.open("rb") as f:
        offset = 0
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8", encoding_errors)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"'{path}', line {number}: the bytes at offset {offset + e.start} "
                    f"({raw[e.start : e.start + 4].hex(' ')}) are not valid UTF-8",
                    fix="convert the file to UTF-8, or set data.encoding_errors: replace",
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line.removeprefix("\ufeff") if number == 1 else line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"'{path}', line {number}: not valid JSON ({e.msg}, column {e.colno})",
                    fix="each line must hold one JSON object",
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"'{path}', line {number}: expected a JSON object {{...}}, got "
                    f"{type(record).__name__}",
                    fix='write one object per line, e.g. {"text": "...", "label": "..."}',
                )
            records.append(record)
    return pd.DataFrame.from_records(records)


def row_name(frame: pd.DataFrame, index: Any) -> str:
    """Rows are named by their 1-based position among the data rows of the file."""
    return f"row {int(index) + 1}"


# ------------------------------------------------------------------------ column typing


@dataclass
class Column:
    name: str
    kind: str  # numeric | categorical
    mean: float = 0.0
    std: float = 1.0
    fill: Any = None
    categories: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return 1 if self.kind == "numeric" else len(self.categories)


def check_label(frame: pd.DataFrame, label: str | None, origin: str) -> str:
    if label is None:
        raise DataError(
            f"{origin}: data.label is not set",
            fix=f"name the label column; columns found: {', '.join(map(str, frame.columns))}",
        )
    if label not in frame.columns:
        raise DataError(
            f"{origin}: label column '{label}' not found",
            fix=f"set data.label to one of the columns found: {', '.join(map(str, frame.columns))}",
        )
    return label


def feature_columns(
    frame: pd.DataFrame,
    label: str,
    features: list[str] | None,
    declared: dict[str, str],
    origin: str,
) -> list[str]:
    for name in [*(features or []), *declared]:
        if name not in frame.columns:
            raise DataError(
                f"{origin}: column '{name}' named in the config not found",
                fix=f"columns found: {', '.join(map(str, frame.columns))}",
            )
    names = features or [c for c in frame.columns if c != label]
    names = [c for c in names if declared.get(c) != "ignore" and c != label]
    if not names:
        raise DataError(f"{origin}: no feature columns left besides the label '{label}'")
    return names


def infer_kind(values: pd.Series, declared: str | None, origin: str) -> str:
    """numeric or categorical; a mostly-numeric column with stray text is an error."""
    if declared:
        kind = declared
    elif pd.api.types.is_bool_dtype(values):
        kind = "categorical"
    elif pd.api.types.is_numeric_dtype(values):
        kind = "numeric"
    else:
        present = values.dropna()
        parsed = pd.to_numeric(present, errors="coerce")
        kind = "numeric" if len(present) and parsed.notna().mean() >= 0.9 else "categorical"
    if kind == "numeric":
        numeric_or_error(values, origin)
    return kind


def numeric_or_error(values: pd.Series, origin: str) -> pd.Series:
    parsed = pd.to_numeric(values, errors="coerce")
    bad = parsed.isna() & values.notna()
    if bad.any():
        i = bad.idxmax()
        raise DataError(
            f"{origin}: {row_name(values, i)}, column '{values.name}': value {values[i]!r} is "
            "not a number but the column is numeric",
            fix=f"fix the value, or declare data.columns.{values.name}: categorical",
        )
    infinite = np.isinf(parsed.to_numpy(dtype="float64", na_value=np.nan))
    if infinite.any():  # "inf" parses, then turns every mean, scale and loss into NaN
        i = parsed.index[int(infinite.argmax())]
        shown = repr(values[i]) if isinstance(values[i], str) else f"{float(values[i])}"
        raise DataError(
            f"{origin}: {row_name(values, i)}, column '{values.name}': value {shown} is "
            f"infinite ({int(infinite.sum())} infinite in that column)",
            fix="replace it with a finite number, or leave the cell empty (data.missing "
            "decides what an empty cell becomes)",
        )
    return parsed.astype("float64")


def missing_or_error(frame: pd.DataFrame, columns: list[str], origin: str) -> None:
    for c in columns:
        missing = frame[c].isna()
        if missing.any():
            i = missing.idxmax()
            raise DataError(
                f"{origin}: {row_name(frame, i)}, column '{c}' is missing a value "
                f"({int(missing.sum())} missing in that column)",
                fix="set data.missing to drop, mean or constant (with data.fill_value)",
            )


# --------------------------------------------------------------------- preprocessor


@dataclass
class TablePreprocessor:
    """Raw table rows → float32 feature matrix; fitted on the training split."""

    columns: list[Column]
    missing: str = "error"
    normalize: bool = True

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        names: list[str],
        declared: dict[str, str],
        missing: str,
        fill_value: Any,
        normalize: bool,
        origin: str,
    ) -> TablePreprocessor:
        columns = []
        for name in names:
            kind = infer_kind(frame[name], declared.get(name), origin)
            if kind == "numeric":
                values = numeric_or_error(frame[name], origin)
                mean = float(values.mean()) if values.notna().any() else 0.0
                std = float(values.std(ddof=0)) if values.notna().sum() > 1 else 1.0
                fill = mean if missing == "mean" else _number(fill_value, name)
                col = Column(name, kind, mean, std if std > 1e-12 else 1.0, fill)
            else:
                values = frame[name].dropna().map(_label_text)
                cats = sorted(values.unique().tolist())
                if len(cats) > MAX_CATEGORIES:
                    raise DataError(
                        f"{origin}: column '{name}' has {len(cats)} distinct values, too many "
                        f"for a categorical column (max {MAX_CATEGORIES})",
                        fix=f"declare data.columns.{name}: ignore (or numeric if it is a number)",
                    )
                mode = values.mode().iloc[0] if len(values) else str(fill_value)
                fill = mode if missing == "mean" else str(fill_value)
                if missing in ("mean", "constant") and fill not in cats:
                    cats.append(fill)
                col = Column(name, kind, fill=fill, categories=cats)
            columns.append(col)
        return cls(columns, missing, normalize)

    @property
    def feature_names(self) -> list[str]:
        out = []
        for c in self.columns:
            out += [c.name] if c.kind == "numeric" else [f"{c.name}={v}" for v in c.categories]
        return out

    def transform(self, frame: pd.DataFrame, origin: str) -> np.ndarray:
        missing_cols = [c.name for c in self.columns if c.name not in frame.columns]
        if missing_cols:
            raise DataError(
                f"{origin}: missing feature column(s) {', '.join(missing_cols)}",
                fix=f"the model expects columns: {', '.join(c.name for c in self.columns)}",
            )
        if self.missing == "error":
            missing_or_error(frame, [c.name for c in self.columns], origin)
        parts = []
        for c in self.columns:
            if c.kind == "numeric":
                v = numeric_or_error(frame[c.name], origin).fillna(c.fill).to_numpy()
                parts.append(((v - c.mean) / c.std if self.normalize else v)[:, None])
            else:
                v = (
                    frame[c.name]
                    .map(_label_text, na_action="ignore")
                    .where(frame[c.name].notna(), c.fill)
                )
                lookup = {cat: i for i, cat in enumerate(c.categories)}
                codes = v.map(lookup).fillna(-1).to_numpy(np.int64)  # unseen → -1 → all zeros
                onehot = np.zeros((len(frame), len(c.categories)))
                known = codes >= 0
                onehot[np.nonzero(known)[0], codes[known]] = 1.0
                parts.append(onehot)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing": self.missing,
            "normalize": self.normalize,
            "columns": [asdict(c) for c in self.columns],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TablePreprocessor:
        return cls([Column(**c) for c in d["columns"]], d["missing"], d["normalize"])


def _number(value: Any, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(
            f"data.fill_value {value!r} is not a number but column '{column}' is numeric",
            fix="use a numeric data.fill_value, or data.missing: mean",
        ) from None


# ----------------------------------------------------------------------------- labels


def encode_labels(
    values: pd.Series, task: str, origin: str, classes: list[str] | None = None
) -> tuple[np.ndarray, list[str] | None]:
    """Class ids (with sorted class names) for classification, floats for regression."""
    if values.isna().any():
        i = values.isna().idxmax()
        raise DataError(
            f"{origin}: {row_name(values, i)} has no value in label column '{values.name}'",
            fix="fill or remove that row (data.missing: drop removes rows with missing values)",
        )
    if task == "regression":
        return numeric_or_error(values, origin).to_numpy(np.float32), None
    if classes is None:
        uniq = values.unique()
        numeric = pd.api.types.is_numeric_dtype(values)
        classes = [_label_text(v) for v in (sorted(uniq) if numeric else sorted(map(str, uniq)))]
    lookup = {c: i for i, c in enumerate(classes)}
    text = values.map(_label_text)
    unknown = ~text.isin(lookup.keys())
    if unknown.any():
        i = unknown.idxmax()
        raise DataError(
            f"{origin}: {row_name(values, i)} has label {values[i]!r}, not one of the classes "
            f"seen in training ({', '.join(classes[:20])})"
        )
    return text.map(lookup).to_numpy(np.int64), classes


def _label_text(v: Any) -> str:
    """A value as category text; 3.0 (an int column with holes reads as float) is '3'."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)
