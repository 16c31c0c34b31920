"""Table checks on the raw frame (before the missing-value policy): missing values per column,
constant and ID-like columns, and a label column that is an ID (a blocker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from danlu.data.check import CheckReport


def looks_like_id(values: pd.Series) -> bool:
    """Unique per row, none missing, and either monotone integers or strings (names, keys)."""
    n = len(values)
    if n < 20 or values.isna().any() or values.nunique() != n:
        return False
    if pd.api.types.is_bool_dtype(values):
        return False
    if pd.api.types.is_numeric_dtype(values):
        v = values.to_numpy(np.float64)
        integer = bool(np.all(np.mod(v, 1) == 0))
        return integer and (values.is_monotonic_increasing or values.is_monotonic_decreasing)
    return True


def table_checks(report: CheckReport, raw: Any, spec: Any, card: dict[str, Any]) -> None:
    label = spec.label
    names = [c["name"] for c in spec.table["columns"]]
    frames = [raw.frame] + ([raw.test_frame] if raw.test_frame is not None else [])
    whole = pd.concat([f[[*names, label]] for f in frames], ignore_index=True)
    n = len(whole)
    missing = {c: int(k) for c, k in whole.isna().sum().items() if k}
    report.stats["missing"] = {"rows": n, "per_column": missing, "policy": spec.table["missing"]}
    for c, k in missing.items():
        share = k / n
        what = "label column" if c == label else "column"
        level = "warning" if share > 0.5 or c == label else "info"
        action = f"data.missing: {spec.table['missing']} handles them (or drop, mean, constant)"
        if share > 0.5 and c != label:
            action = f"drop it: data.columns.{c}: ignore"
        report.add(
            level, "missing_values", f"{what} '{c}' has {k} missing values ({share:.0%})", action
        )
    if card.get("rows_dropped"):
        report.add(
            "info",
            "rows_dropped",
            f"{card['rows_dropped']} rows with missing values dropped",
            "use data.missing: mean to keep them",
        )
    constant = [c for c in names if whole[c].nunique(dropna=True) <= 1]
    ids = [c for c in names if c not in constant and looks_like_id(raw.frame[c])]
    report.stats["columns"] = {"constant": constant, "id_like": ids}
    for c in constant:
        report.add(
            "warning",
            "constant_column",
            f"column '{c}' is constant",
            f"drop it: data.columns.{c}: ignore",
        )
    for c in ids:
        report.add(
            "warning",
            "id_column",
            f"column '{c}' looks like a row ID (a distinct value in every row)",
            f"drop it: data.columns.{c}: ignore (a model can memorize IDs, not learn from them)",
        )
    label_values = raw.frame[label].dropna()
    many = spec.task == "classification" and len(label_values) >= 20
    many = many and label_values.nunique() > len(label_values) / 2
    if many or (spec.task == "regression" and looks_like_id(raw.frame[label])):
        report.add(
            "blocker",
            "label_is_id",
            f"label column '{label}' looks like an ID: {label_values.nunique()} distinct values "
            f"in {len(label_values)} rows",
            "set data.label to the column holding the target (and data.task if it is numeric)",
        )
