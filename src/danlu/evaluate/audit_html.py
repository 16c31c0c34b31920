"""How a privacy audit reads: the loss histograms and DP bound audit.json keeps, the one-line
interpretation, the figure (member vs non-member loss histograms and the attacks' ROC
curves), the section report.html can embed, and the audit.html page (built with the report's
page helpers: inline CSS, no script).

    section_id, title, body = report_section(read_json(run.path / "audit.json"))
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from danlu.evaluate.report_html import chips, esc, figure, fmt, note, page, pairs, table

ATTACKS = {"loss": "loss threshold", "shadow": "shadow models"}


def loss_summary(member: np.ndarray, non: np.ndarray, bins: int = 30) -> dict[str, Any]:
    """Mean and median per side, and a shared histogram over the 0.5–99.5 % quantiles (the
    end bins hold the tails): log-spaced when the losses span more than two decades, as
    memorized examples' do."""
    both = np.r_[member, non]
    both = both[np.isfinite(both)]
    top = float(np.quantile(both, 0.995))
    positive = both[both > 0]  # a float32 cross-entropy of a sure prediction is 0 exactly
    lo = float(np.quantile(positive, 0.005)) if len(positive) else 0.0
    log = lo > 0 and top > 100 * lo
    edges = np.geomspace(lo, top, bins + 1) if log else np.linspace(min(lo, 0.0), top, bins + 1)
    if top <= edges[0]:  # all losses equal
        edges = np.linspace(edges[0], edges[0] + 1.0, bins + 1)

    def side(v: np.ndarray) -> dict[str, Any]:
        v = v[np.isfinite(v)]
        counts = np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0]
        return {"mean": float(v.mean()), "median": float(np.median(v)), "counts": counts.tolist()}

    scale = "log" if log else "linear"
    return {
        "members": side(member),
        "non_members": side(non),
        "edges": edges.tolist(),
        "scale": scale,
    }


def dp_summary(privacy: dict[str, Any]) -> dict[str, Any]:
    """ε, δ and the advantage (TPR − FPR) no attack can beat under (ε, δ)-DP:
    (e^ε − 1 + 2δ) / (e^ε + 1), from the hypothesis-testing view of DP (Kairouz et al. 2015)."""
    eps, delta = privacy.get("epsilon"), privacy.get("delta") or 0.0
    out = {"epsilon": eps, "delta": delta}
    if isinstance(eps, (int, float)) and eps < 50:
        bound = (math.expm1(eps) + 2 * delta) / (math.exp(eps) + 1)
        out["advantage_bound"] = round(min(1.0, bound), 4)
    return out


# ---------------------------------------------------------------------------- how it reads


def interpretation(result: dict[str, Any]) -> str:
    """One sentence: what the loss attack's AUC says, against chance and a DP bound."""
    a = result["loss"]
    auc, (lo, hi), n = a["auc"], a["auc_ci95"], a["members"]
    head = f"AUC 0.50 = no leakage; {auc:.2f} here"
    if lo <= 0.5 <= hi:
        text = (
            f"{head} is within chance for {n} examples per side: the attack cannot tell "
            "training from held-out examples by their loss"
        )
    elif auc < 0.5:
        text = (
            f"{head}: held-out examples have lower losses than training ones (training-time "
            "dropout or augmentation, or splits that differ), which is not leakage"
        )
    else:
        level = "weakly" if auc < 0.6 else "clearly" if auc < 0.75 else "strongly"
        text = (
            f"{head}: the model's losses {level} separate training from held-out examples "
            f"(advantage {a['advantage']:.2f}: the best threshold's TPR − FPR)"
        )
    p = result.get("privacy") or {}
    if p.get("advantage_bound", 1.0) < 0.995:
        bound = p["advantage_bound"]
        text += f"; DP training (ε {p['epsilon']:.3g}) bounds the advantage by {bound:.2f}"
    elif isinstance(p.get("epsilon"), (int, float)):
        text += f"; DP training at ε {p['epsilon']:.3g} is too weak to bound the advantage"
    elif auc >= 0.6 and lo > 0.5:
        text += "; more data, regularization or DP training (train.privacy) lower it"
    return text + "."


def loss_figure(result: dict[str, Any]) -> str:
    """Member vs non-member loss histograms, and the attacks' ROC curves."""
    from danlu.evaluate.plots import BLUE, GREY, ORANGE, png, pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.3))
    h = result["losses"]
    sides = (("members", BLUE, "train (members)"), ("non_members", ORANGE, "non-members"))
    for side, colour, label in sides:
        if side == "non_members":
            label = f"{result['split']} ({label})"
        left.stairs(h[side]["counts"], h["edges"], fill=True, alpha=0.45, color=colour, label=label)
    left.set(xlabel=f"per-example {result['loss_kind']}", ylabel="examples", title="losses")
    left.set_xscale(h.get("scale", "linear"))
    right.plot([0, 1], [0, 1], color=GREY, lw=0.8, ls="--")
    for name, colour in (("loss", BLUE), ("shadow", ORANGE)):
        if name in result:
            roc, auc = result[name]["roc"], result[name]["auc"]
            label = f"{ATTACKS[name]} (AUC {auc:.3f})"
            right.plot(roc["fpr"], roc["tpr"], color=colour, label=label)
    right.set(xlabel="false positive rate", ylabel="true positive rate", title="attack ROC")
    for ax in (left, right):
        ax.legend(frameon=False, fontsize=7)
        ax.grid(alpha=0.25)
    fig.tight_layout()
    return png(plt, fig)


def _attack_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in ("loss", "shadow"):
        if name not in result:
            continue
        a = result[name]
        lo, hi = a["auc_ci95"]
        low = [fmt(a["tpr_at_fpr"].get(t)) for t in ("0.01", "0.001")]
        auc = f"<b>{fmt(a['auc'])}</b> <span class='ci'>{fmt(lo)}–{fmt(hi)}</span>"
        rows.append([esc(ATTACKS[name]), auc, fmt(a["advantage"]), *low])
    return rows


def report_section(result: dict[str, Any]) -> tuple[str, str, str]:
    """(id, title, html) of an audit: for audit.html and for a section of report.html."""
    head = ["attack", "AUC (95 % CI)", "advantage", "TPR at FPR 1 %", "TPR at FPR 0.1 %"]
    body = f"<p class='headline'>{esc(result['interpretation'])}</p>"
    body += table(head, _attack_rows(result), cls="num")
    h = result["losses"]
    items = [
        (
            "mean loss",
            f"members {fmt(h['members']['mean'])}, non-members "
            f"{fmt(h['non_members']['mean'])} ({esc(result['loss_kind'])})",
        ),
        (
            "examples",
            f"{fmt(result['loss']['members'])} from train (members), "
            f"{fmt(result['loss']['non_members'])} from {esc(result['split'])} "
            f"(non-members), seed {result['seed']}",
        ),
    ]
    p = result.get("privacy")
    if p:
        bound = f" (no attack's advantage exceeds {fmt(p['advantage_bound'])})"
        dp = f"ε = {fmt(p['epsilon'])}, δ = {fmt(p['delta'])}"
        items.insert(0, ("DP guarantee", dp + (bound if "advantage_bound" in p else "")))
    s = result.get("shadow")
    if s:
        items.append(
            (
                "shadow models",
                f"{s['models']} × {fmt(s['steps'])} steps on "
                f"{fmt(s['train_size'])} examples; {esc(s['attack'])}",
            )
        )
    body += pairs(items) + figure(loss_figure, result, alt="member and non-member losses")
    body += note(
        "Loss-threshold membership inference (Yeom et al. 2018): an example is called a "
        "training member when its loss is below a threshold. AUC 0.5 and advantage 0 mean the "
        "losses say nothing about membership; AUC 1 means every member is found. TPR at a low "
        "FPR is shown when the held-out sample has at least 1/FPR examples."
    )
    return "privacy-audit", "Privacy audit", body


def audit_page(result: dict[str, Any]) -> str:
    """RUN/audit.html."""
    a = result["loss"]
    badges = [
        ("task", esc(result["task"])),
        ("attack AUC", fmt(a["auc"])),
        ("advantage", fmt(a["advantage"])),
    ]
    if result.get("privacy"):
        badges.append(("ε", fmt(result["privacy"]["epsilon"])))
    header = f"<h1>Privacy audit: {esc(result['run'])}</h1>" + chips(badges)
    return page(f"{result['run']} privacy audit", header, [report_section(result)])
