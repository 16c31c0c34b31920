"""The summary of a study: the line printed after each trial and the files written at the end.

    STUDY_DIR/best_config.yaml    the best trial's complete config: `danlu train` takes it
    STUDY_DIR/tune_summary.json   every trial (number, state, value, params, seconds, run), the
                                  best one and the parameter importances
    STUDY_DIR/tune_report.html    the same as one self-contained page: the optimization
                                  history, each trial's metric per evaluation (pruned ones in
                                  red) and the parameter importances, drawn with matplotlib

Importances are Optuna's fANOVA (a scikit-learn random forest over the finished trials), seeded
so that a study gives the same figure each time; they need two finished trials. Everything
here reads the Optuna study and the trial records, never a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from danlu.config import apply_overrides, validate
from danlu.evaluate import plots
from danlu.evaluate.report_html import chips, esc, figure, fmt, note, page, pairs, seconds, table
from danlu.rundir import atomic_write_json, atomic_write_text, now
from danlu.tune.space import Param

BEST, SUMMARY, HTML = "best_config.yaml", "tune_summary.json", "tune_report.html"
STATES = ("complete", "pruned", "failed", "interrupted", "running")


def state_of(trial: Any) -> str:
    name = trial.state.name
    if name == "FAIL":
        return "interrupted" if trial.user_attrs.get("interrupted") else "failed"
    return {"COMPLETE": "complete", "PRUNED": "pruned"}.get(name, name.lower())


def row(trial: Any) -> dict[str, Any]:
    """One trial as the table shows it (params as Optuna stores them)."""
    attrs, state = trial.user_attrs, state_of(trial)
    steps = trial.intermediate_values
    last = steps[max(steps)] if steps else None
    why = {
        "pruned": f"at evaluation {(attrs.get('pruned_at') or {}).get('evaluation', len(steps))}",
        "failed": attrs.get("error", ""),
        "interrupted": "interrupted (runs again when the study continues)",
    }.get(state, "")
    return {
        "number": trial.number,
        "state": state,
        "value": trial.value if state == "complete" else None,
        "last": last,
        "params": dict(trial.params),
        "seconds": attrs.get("seconds"),
        "run": attrs.get("run"),
        "evaluations": len(steps),
        "note": why,
    }


def best_trial(study: Any) -> Any | None:
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        return None
    sign = -1.0 if study.direction.name == "MINIMIZE" else 1.0
    return max(done, key=lambda t: (sign * t.value, -t.number))


def trial_line(study: Any, trial: Any, metric: str, budget: int, counted: int) -> str:
    r, best = row(trial), best_trial(study)
    took = f" · {r['seconds']:.1f} s" if r["seconds"] is not None else ""
    head = f"trial {r['number']} {r['state']}"
    if r["state"] == "complete":
        head += f": {metric} {r['value']:.4f}"
    elif r["state"] == "pruned" and r["last"] is not None:
        head += f" {r['note']}: {metric} {r['last']:.4f}"
    elif r["note"]:
        head += f": {r['note']}"
    lead = f" · best {best.value:.4f} (trial {best.number})" if best is not None else ""
    return f"{head}{lead}{took} · {counted}/{budget}"


def write(
    study: Any, params: dict[str, Param], base: dict[str, Any], folder: Path, *,
    metric: str, budget: int, seed: int, stopped: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Write best_config.yaml (when a trial finished), tune_summary.json and the page."""
    rows = [row(t) for t in study.trials]
    best = best_trial(study)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "budget": budget,
        "counts": {s: sum(r["state"] == s for r in rows) for s in STATES},
        "stopped": stopped,
        "best": None,
        "importance": None,
        "trials": rows,
        "written": now(),
    }
    if best is not None:
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "params": {k: params[k].decode(v) for k, v in best.params.items() if k in params},
            "overrides": best.user_attrs.get("overrides", []),
            "run": best.user_attrs.get("run"),
            "config": BEST,
        }
        text = validate(apply_overrides(base, summary["best"]["overrides"]), BEST).to_yaml()
        header = (
            f"# best trial {best.number} of study {study.study_name}: {metric} = {best.value:.6g}"
            f"\n# run: {folder / str(best.user_attrs.get('run'))}\n"
            f"# train it: danlu train {folder / BEST}\n"
        )
        atomic_write_text(folder / BEST, header + text)
    summary["importance"], why = importance(study, seed)
    summary["importance_note"] = why
    atomic_write_json(folder / SUMMARY, summary)
    atomic_write_text(folder / HTML, _page(summary, study, folder))
    return summary


def importance(study: Any, seed: int) -> tuple[dict[str, float] | None, str | None]:
    """fANOVA importances of the parameters over the finished trials (None and why if not)."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(done) < 2:
        return None, "importances need at least two finished trials"
    import optuna

    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError, ImportError) as e:  # e.g. every trial sampled alike
        return None, f"importances not computed ({e})"
    return {k: round(float(v), 6) for k, v in found.items()}, None


# ------------------------------------------------------------------------------ the page


def _page(summary: dict[str, Any], study: Any, folder: Path) -> str:
    metric, best, counts = summary["metric"], summary["best"], summary["counts"]
    items = [("metric", esc(f"{metric} ({summary['direction']})")),
             ("trials", esc(f"{sum(counts.values())} ({counts['complete']} complete, "
                            f"{counts['pruned']} pruned, {counts['failed']} failed)")),
             ("budget", esc(summary["budget"]))]  # fmt: skip
    if best is not None:
        items.append(("best", esc(f"{best['value']:.4f} (trial {best['number']})")))
    header = f"<h1>{esc(summary['study'])} · tune</h1>{chips(items)}"
    sections = [("best", "Best trial", _best_html(best, folder))]
    if plots.available() and summary["trials"]:
        sections.append(("history", "Optimization history",
                         figure(_history, summary, alt="optimization history")))  # fmt: skip
        sections.append(("curves", "Trials per evaluation",
                         figure(_curves, study, metric, alt="metric per evaluation")))  # fmt: skip
    imp = summary["importance"]
    body = figure(_importance, imp, alt="importance") if imp else ""
    sections.append(("importance", "Parameter importance",
                     body + note(esc(summary["importance_note"] or "fANOVA (optuna), seeded"))))  # fmt: skip
    sections.append(("trials", "Trials", _trials_html(summary)))
    return page(f"{summary['study']} · tune", header, sections)


def _best_html(best: dict[str, Any] | None, folder: Path) -> str:
    if best is None:
        return note("no trial finished yet")
    items = [(k, f"<code>{esc(v)}</code>") for k, v in best["params"].items()]
    items.append(("run", f"<code>{esc(folder / str(best['run']))}</code>"))
    command = f"danlu train {folder / BEST}"
    return pairs(items) + f"<p>Train it: <code>{esc(command)}</code></p>"


def _trials_html(summary: dict[str, Any]) -> str:
    rows = summary["trials"]
    keys = list(rows[0]["params"]) if rows else []
    head = ["trial", *(esc(k) for k in keys), esc(summary["metric"]), "state", "time", "note"]
    best = (summary["best"] or {}).get("number")
    body = [
        [str(r["number"]), *(esc(r["params"].get(k, "–")) for k in keys),
         fmt(r["value"] if r["value"] is not None else r["last"]), esc(r["state"]),
         seconds(r["seconds"]), esc(r["note"]) + (" <b>best</b>" if r["number"] == best else "")]
        for r in rows
    ]  # fmt: skip
    return table(head, body) if rows else note("no trials yet")


def _history(summary: dict[str, Any]) -> str:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    rows, minimize = summary["trials"], summary["direction"] == "minimize"
    done = [(r["number"], r["value"]) for r in rows if r["state"] == "complete"]
    cut = [(r["number"], r["last"]) for r in rows if r["state"] == "pruned" and _finite(r["last"])]
    if done:
        ax.scatter(*zip(*done, strict=True), color=plots.BLUE, s=18, label="complete", zorder=3)
        xs, best, line = [], None, []
        for n, v in done:
            best = v if best is None or (v < best if minimize else v > best) else best
            xs.append(n)
            line.append(best)
        ax.step(xs, line, where="post", color=plots.ORANGE, label="best so far")
    if cut:
        ax.scatter(*zip(*cut, strict=True), color=plots.RED, marker="x", s=18,
                   label="pruned (last value)")  # fmt: skip
    ax.set_xlabel("trial")
    ax.set_ylabel(summary["metric"])
    _scale(ax, [v for _, v in done + cut])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return plots.png(plt, fig)


def _curves(study: Any, metric: str) -> str:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    seen: list[float] = []
    for t in study.trials:
        pts = sorted((k, v) for k, v in t.intermediate_values.items() if _finite(v))
        if not pts:
            continue
        seen += [v for _, v in pts]
        pruned = t.state.name == "PRUNED"
        ax.plot(*zip(*pts, strict=True), color=plots.RED if pruned else plots.BLUE,
                alpha=0.7 if pruned else 0.5, lw=1, marker="." if len(pts) < 3 else None)  # fmt: skip
    ax.set_xlabel("evaluation")
    ax.set_ylabel(metric)
    _scale(ax, seen)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("blue: ran to the end · red: pruned", fontsize=8)
    return plots.png(plt, fig)


def _importance(imp: dict[str, float]) -> str:
    plt = plots.pyplot()
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(names) + 0.8))
    ax.barh([plots.short(n, 28) for n in names], [imp[n] for n in names], color=plots.BLUE)
    ax.set_xlabel("importance (fANOVA, share of the variance of the metric)")
    return plots.png(plt, fig)


def _scale(ax: Any, values: list[float]) -> None:
    """A log axis for positive values spread over more than two decades (losses)."""
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
