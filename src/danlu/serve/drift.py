"""Drift: do the inputs and predictions a served model sees still look like its training data?

    ref = reference(RunDir.open("runs/x"))        # cached in the run as drift_reference.json
    report = compare(ref, RequestLog("logs/").read())
    report.status                                   # ok | warn | drift | not enough
    gauges(report)                                  # {"psi:a": 0.03, "ks:a": 0.08, "drift": 0.0}

The reference profiles a seeded sample (at most 20,000) of the run's training split with the
summary functions of the request log (danlu.serve.requestlog), so live and training numbers
share one definition; it is rebuilt from the run's config as `danlu evaluate` does and cached
under the data hash of lineage.json. Checks: per numeric feature PSI (quantile bins of the
reference, 2-10 of them so ~25 values of either side fill each; shares floored at 1e-4) and the two-sample
Kolmogorov-Smirnov test; per categorical feature PSI with unseen categories in one bucket; for
text the length in characters and tokens, the unknown-token rate and the vocabulary shift (the
Jensen-Shannon divergence of token frequencies beyond what sampling alone gives); for images
the pixel mean and std and the share of other sizes; the predicted class mix against the
training labels (PSI, chi-square) or predictions against training targets; the confidence
against the validation split's and its trend across the window (danlu.serve.drift_checks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from danlu.errors import CheckpointError, DataError
from danlu.rundir import RunDir, atomic_write_json, now, read_json
from danlu.serve.drift_checks import (
    Check,
    Thresholds,
    category_check,
    features,
    numeric_checks,
    output_checks,
    size_check,
    text_checks,
    worst,
)
from danlu.serve.requestlog import pixel_stats, row_summaries, text_summaries

__all__ = ["Check", "DriftReport", "Thresholds", "compare", "gauges", "reference"]

VERSION = 1
REFERENCE = "drift_reference.json"
MAX_EXAMPLES = 20_000  # training examples profiled
SAMPLE = 5_000  # values kept per numeric feature (quantile bins, KS)


@dataclass
class DriftReport:
    status: str  # ok | warn | drift | not enough
    message: str
    live: int
    reference: int
    checks: list[Check] = field(default_factory=list)
    window: tuple[float, float] | None = None  # first and last record time
    since: float | None = None  # drift: when the drifting stretch began
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def drifted(self) -> list[Check]:
        return [c for c in self.checks if c.status == "drift"]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["window"] = [iso(t) for t in self.window] if self.window else None
        out["since"] = iso(self.since) if self.since else None
        out["gauges"] = gauges(self)
        return out


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------- reference


def reference(run: RunDir, refresh: bool = False, cache: Path | None = None) -> dict[str, Any]:
    """The run's training profile, read from `cache` (default RUN/drift_reference.json) when
    it was made for the data hash in lineage.json; else built (`build_reference`) and written
    there atomically. Written into the run, it is pinned in the run's manifest.json, so
    `danlu verify` still passes; a signed run is left untouched (pass `cache` for it and for
    registry checkouts, which must hold exactly the registered files)."""
    key = (run.read("lineage.json") if run.lineage.is_file() else {}).get("data_hash")
    path = cache or run.path / REFERENCE
    if key and path.is_file() and not refresh:
        try:
            cached = read_json(path)
        except CheckpointError:  # unreadable: build it again
            cached = {}
        if cached.get("data_hash") == key and cached.get("version") == VERSION:
            return cached
    profile = build_reference(run)
    if key and profile["data_hash"] != key:
        raise DataError(
            f"the data of run '{run.path}' changed since it was trained (content hash "
            f"{profile['data_hash'][:12]}, trained on {key[:12]})",
            fix="monitor against the original training data (restore data.dataset's file)",
        )
    if cache is None and (run.path / "manifest.sig").is_file():
        return profile  # a new file would break the run's signature: not cached
    atomic_write_json(path, profile)
    if cache is None and (run.path / "manifest.json").is_file():
        from danlu.manifest import update_manifest

        update_manifest(run.path, [path])
    return profile


def build_reference(run: RunDir) -> dict[str, Any]:
    from danlu.data.spec import DataSpec
    from danlu.evaluate.run import build_data

    spec = DataSpec.from_dict(run.read("preprocess.json"))
    if spec.task not in ("classification", "regression"):
        raise DataError(
            f"run '{run.path}' is a {spec.task} model; drift monitoring compares the inputs "
            "and predictions of classifiers and regressors",
            fix="monitor a classification or regression run",
        )
    cfg = run.load_config()
    bundle = build_data(cfg, run)
    train = bundle.splits["train"]
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.permutation(len(train))[:MAX_EXAMPLES])
    profile: dict[str, Any] = {
        "version": VERSION, "data_hash": bundle.content_hash, "run": run.path.name,
        "input": spec.input, "task": spec.task, "created": now(), "examples": len(rows),
        "columns": {}, "numeric": {}, "categorical": {}, "text": None, "image": None,
    }  # fmt: skip
    index = train.index[rows]
    if spec.input == "table":
        profile["columns"] = {c["name"]: c["kind"] for c in spec.table["columns"]}
        summaries = row_summaries(bundle.raw.frame.loc[index], list(profile["columns"]))
    elif spec.input == "text":
        from danlu.data.tokenize import TextEncoder

        encoder = TextEncoder.load(run.tokenizer)
        summaries = text_summaries(encoder, [bundle.raw.texts[i] for i in index])
        profile["text"] = _text_profile(summaries, encoder.unk_id)
    else:
        c, h, w = spec.input_shape
        stats = pixel_stats(train.x[rows].numpy())
        summaries = [{"kind": "image", "mean": m, "std": s} for m, s in stats]
        profile["image"] = {"height": h, "width": w, "channels": c}
    numeric, categorical = features(summaries, profile)
    profile["numeric"] = {k: _numeric_profile(v, rng) for k, v in numeric.items()}
    profile["categorical"] = {k: dict(Counter(v)) for k, v in categorical.items()}
    y = train.y[rows].numpy()
    if spec.task == "classification":
        counts = np.bincount(y, minlength=len(spec.class_names)).tolist()
        profile["outputs"] = {"classes": spec.class_names, "counts": counts}
        profile["confidence"] = _held_out_confidence(run, bundle)
    else:
        profile["outputs"] = {"targets": _numeric_profile(y.astype(float), rng)}
    return profile


def _text_profile(summaries: list[dict], unk_id: int | None) -> dict[str, Any]:
    counts = Counter(i for s in summaries for i in s["ids"])
    unk = float(np.mean([s["unk"] for s in summaries])) if unk_id is not None else None
    return {"unk_rate": unk, "token_counts": {str(k): v for k, v in sorted(counts.items())}}


def _numeric_profile(values: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    ok = values[np.isfinite(values)]
    sample = ok if len(ok) <= SAMPLE else rng.choice(ok, SAMPLE, replace=False)
    return {
        "n": len(ok), "missing": int(len(values) - len(ok)),
        "mean": float(ok.mean()) if len(ok) else None, "std": float(ok.std()) if len(ok) else None,
        "sample": [float(f"{v:.6g}") for v in np.sort(sample)],
    }  # fmt: skip


def _held_out_confidence(run: RunDir, bundle: Any) -> dict[str, Any] | None:
    """The model's mean confidence on (the first 500 examples of) its val or test split."""
    from danlu.evaluate.metrics import probabilities
    from danlu.serve.predictor import Predictor

    split = next((s for s in ("val", "test") if len(bundle.splits.get(s, [])) > 0), None)
    if split is None:
        return None
    predictor = Predictor(run)
    proba = probabilities(predictor.outputs(bundle.splits[split].x[:500]), predictor.kind)
    return {"mean": float(proba.max(dim=1).values.mean()), "n": len(proba), "split": split}


# --------------------------------------------------------------------------- compare


def compare(
    reference: dict[str, Any],
    records: Iterable[dict],
    thresholds: Thresholds | None = None,
    token_names: Callable[[int], str] | None = None,
) -> DriftReport:
    """Live log records (those whose input is of the reference's kind) against the reference.
    `token_names` turns token ids into text for the vocabulary check's message."""
    th = thresholds or Thresholds()
    live = sorted((r for r in records if _kind(r) == reference["input"]), key=_time)
    report = DriftReport(
        "not enough", "", len(live), reference["examples"], thresholds=asdict(th),
        window=(_time(live[0]), _time(live[-1])) if live else None,
    )  # fmt: skip
    if len(live) < th.min_samples:
        report.message = f"not enough live samples ({len(live)} < {th.min_samples})"
        return report
    report.checks = run_checks(reference, live, th, token_names)
    report.status = worst(report.checks)
    report.message = _message(report)
    if report.status == "drift":
        report.since = onset(reference, live, th)
    return report


def run_checks(
    reference: dict[str, Any],
    live: list[dict],
    th: Thresholds,
    token_names: Callable[[int], str] | None = None,
) -> list[Check]:
    summaries = [r["input"] for r in live]
    numeric, categorical = features(summaries, reference)
    out: list[Check] = []
    for name, ref in reference["numeric"].items():
        out += numeric_checks(name, ref, numeric[name], th)
    for name, counts in reference["categorical"].items():
        out.append(category_check(f"psi:{name}", counts, categorical[name], th))
    if reference["text"] is not None:
        out += text_checks(reference["text"], summaries, th, token_names)
    if reference["image"] is not None:
        out.append(size_check(reference["image"], summaries, th))
    return out + output_checks(reference, [r.get("output") or {} for r in live], th)


def onset(reference: dict[str, Any], live: list[dict], th: Thresholds) -> float:
    """When the drift began: the start of the run of drifted chunks (equal counts, ≥ 50
    records each) that reaches the window's end, else of the first drifted chunk."""
    k = min(10, len(live) // 50)
    if k < 2:
        return _time(live[0])
    chunks = np.array_split(np.arange(len(live)), k)
    drifted = [worst(run_checks(reference, [live[i] for i in c], th)) == "drift" for c in chunks]
    first = next((i for i, d in enumerate(drifted) if d), 0)
    if drifted[-1]:
        first = len(drifted) - 1
        while first > 0 and drifted[first - 1]:
            first -= 1
    return _time(live[chunks[first][0]])


def gauges(report: DriftReport | dict[str, Any]) -> dict[str, float]:
    """Flat numbers for /metrics: each check's value (and p-value), the verdict, the count.
    `report` may also be its to_dict() form, as `danlu monitor` writes it in drift.json."""
    if isinstance(report, dict):
        checks = [Check(**c) for c in report["checks"]]
        report = DriftReport(report["status"], "", report["live"], 0, checks)
    out = {"drift": float(report.status == "drift"), "live_samples": float(report.live)}
    for c in report.checks:
        out[c.name] = float(c.value)
        if c.p is not None:
            kind, _, subject = c.name.partition(":")
            out[f"{kind}_p:{subject}"] = c.p
    return out


def _kind(r: dict) -> str | None:
    summary = r.get("input")
    return summary.get("kind") if isinstance(summary, dict) else None


def _time(r: dict) -> float:
    t = r.get("t")
    return float(t) if isinstance(t, (int, float)) else 0.0


def _message(report: DriftReport) -> str:
    bad = [c for c in report.checks if c.status == report.status]
    if report.status == "ok":
        return f"no drift in {len(report.checks)} checks on {report.live} live samples"
    named = ", ".join(f"{c.name} {c.value:.3g}" for c in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return f"{report.status}: {named}{more} ({report.live} live samples)"
