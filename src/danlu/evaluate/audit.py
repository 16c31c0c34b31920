"""Privacy audit: can a membership-inference attack tell the run's training examples from
held-out ones? Results go to RUN/audit.json and RUN/audit.html.

The loss attack (Yeom et al. 2018) rests on one fact: a model fits the examples it trained on
better. Equal-sized, seeded samples of the training split (members) and of a held-out split
(non-members) are scored by -loss; the attack's ROC-AUC (0.5 = no leakage), the membership
advantage max(TPR - FPR) and the TPR at a low FPR say how much leaks. Losses come from the
model's outputs through torch.nn.functional: cross-entropy for classifiers (an ensemble's
averaged probabilities too), squared error for regressors, mean token cross-entropy per
sequence for language models (a corpus is cut into the blocks evaluation walks).

The shadow attack (Shokri et al. 2017, `shadow=K`) trains K models of the run's config on
random halves of the audited pool and fits, per class, a logistic attack on their log-losses
(member or not); that attack then scores the run's own losses. Shadow models are trained by a
`trainer` passed in (evaluate never imports train): danlu.cli_audit.fit_shadow.

    result = audit(RunDir.open("runs/xor"), samples=500)
    result["loss"]["auc"], result["interpretation"]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from danlu import models
from danlu.data import BlockLoader, DataBundle, DataSpec, Split, TokenSplit
from danlu.device import resolve_device
from danlu.errors import ConfigError, DataError
from danlu.evaluate.audit_html import audit_page, dp_summary, interpretation, loss_summary
from danlu.evaluate.run import build_data, load_model
from danlu.evaluate.tokens import IGNORE, objective_name, token_outputs
from danlu.models import compressed
from danlu.models.compressed import place
from danlu.models.ensemble import probabilities
from danlu.rundir import RunDir, atomic_write_text, now

MIN_SIDE = 20  # examples per side below which an AUC says nothing
LOW_FPR = (0.01, 0.001)
SHADOW_TASKS = ("classification", "regression", "language_modeling")
Part = Split | TokenSplit
Trainer = Callable[..., torch.nn.Module]  # (cfg, bundle, *, steps, seed) -> trained model


def audit(
    run: str | Path | RunDir,
    *,
    split: str | None = None,
    samples: int = 2000,
    shadow: int = 0,
    seed: int = 0,
    shadow_steps: int | None = None,
    trainer: Trainer | None = None,
) -> dict[str, Any]:
    """Attack the run's model with `samples` training examples (members) against as many of
    `split` (non-members; default test, else val), plus `shadow` shadow models trained by
    `trainer` for `shadow_steps` each (default: the run's passes over its data). Writes
    RUN/audit.json and RUN/audit.html and returns what audit.json holds."""
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    if samples < MIN_SIDE:
        raise ConfigError(
            f"--samples {samples}: the audit needs at least {MIN_SIDE} examples per side",
            fix="use --samples 2000 (the default) or any value from 20",
        )
    if shadow < 0:
        raise ConfigError(f"--shadow {shadow} must be 0 or more", fix="use --shadow 0 or 2")
    model, cfg, spec, kind = load_model(run)
    if shadow:
        _check_shadow(run, cfg, spec, trainer)
    bundle = build_data(cfg, run)
    lineage = run.read("lineage.json") if run.lineage.is_file() else {}
    _check_data(run, cfg, bundle, lineage)
    held = _held_out(run, bundle, split)
    n = min(samples, _count(bundle.splits["train"], spec), _count(bundle.splits[held], spec))
    if n < MIN_SIDE:
        raise DataError(
            f"run '{run.path}' has {n} examples on the smaller side (train or {held}); the "
            f"audit needs at least {MIN_SIDE} members and {MIN_SIDE} non-members",
            fix="audit a run with more data (or a larger held-out split: data.split.test)",
        )
    rng = np.random.default_rng(seed)
    parts = [_sample(bundle.splits[s], spec, n, rng) for s in ("train", held)]
    objective = objective_name(cfg.train.objective, spec.task, models.family(model, cfg.model.type))
    scorer = Scorer(cfg, spec, kind, objective)
    member, non = (scorer(model, p) for p in parts)
    result: dict[str, Any] = {
        "run": str(lineage.get("run") or run.path.name),
        "written": now(),
        "split": held,
        "task": spec.task,
        "loss_kind": scorer.loss_kind,
        "seed": seed,
        "sizes": {
            "members": n,
            "non_members": n,
            "train": _count(bundle.splits["train"], spec),
            held: _count(bundle.splits[held], spec),
        },
        "loss": attack_metrics(-member, -non, negate=True),
        "losses": loss_summary(member, non),
    }
    if shadow:
        steps = shadow_steps or _shadow_steps(cfg, lineage, n, result["sizes"]["train"])
        result["shadow"] = shadow_attack(
            cfg, spec, scorer, parts, (member, non), trainer, k=shadow, steps=steps, seed=seed
        )
    if isinstance(lineage.get("privacy"), dict):
        result["privacy"] = dp_summary(lineage["privacy"])
    result["interpretation"] = interpretation(result)
    run.write("audit.json", result)
    atomic_write_text(run.path / "audit.html", audit_page(result))
    return result


# ----------------------------------------------------------------------- checks and data


def _check_shadow(run: RunDir, cfg: Any, spec: DataSpec, trainer: Trainer | None) -> None:
    made = "an ensemble" if cfg.model.type == "ensemble" else None
    if (run.path / compressed.META).is_file():
        made = "a compressed variant"
    if made:
        raise ConfigError(
            f"--shadow: run '{run.path}' is {made}, and shadow models retrain a run's config",
            fix="use --shadow 0 here, or audit the run(s) it was made from with --shadow",
        )
    if spec.task not in SHADOW_TASKS:
        raise ConfigError(
            f"--shadow: shadow models cover {', '.join(SHADOW_TASKS)} runs, and run "
            f"'{run.path}' is a {spec.task} run",
            fix="use --shadow 0 (the loss attack)",
        )
    if trainer is None:
        raise ConfigError(
            "audit(shadow=K) needs a trainer for the shadow models (evaluate does not train)",
            fix="call danlu.audit, or pass trainer=danlu.cli_audit.fit_shadow",
        )


def _check_data(run: RunDir, cfg: Any, bundle: DataBundle, lineage: dict) -> None:
    recorded = lineage.get("data_hash")
    if recorded and recorded != bundle.content_hash:
        raise DataError(
            f"the data of '{cfg.data.dataset}' changed since run '{run.path}' was trained "
            f"(content hash {bundle.content_hash[:12]}, trained on {recorded[:12]}): the "
            "training split is no longer the model's members",
            fix="audit with the original data",
        )


def _held_out(run: RunDir, bundle: DataBundle, split: str | None) -> str:
    sizes = {s: len(bundle.splits.get(s, [])) for s in ("train", "val", "test")}
    if split not in (None, "val", "test"):
        raise ConfigError(f"--split {split!r} is not a held-out split", fix="use test or val")
    held = split or ("test" if sizes["test"] else "val")
    missing = "training" if not sizes["train"] else None if sizes[held] else f"'{held}'"
    if missing and split is None and sizes["train"]:
        missing = "held-out (test or val)"
    if missing:
        raise DataError(
            f"run '{run.path}' has no {missing} examples to attack (split sizes {sizes})",
            fix="audit a run trained with a held-out split (data.split.test: 0.2)",
        )
    return held


def _blocks(part: TokenSplit, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the blocks evaluation walks over a corpus split."""
    t = spec.text
    walk = BlockLoader(part, 1, t["block_size"], order="sequential", pack=t["pack"])
    if not t["pack"]:
        return walk.piece_starts, walk.piece_lengths
    starts = np.arange(walk.blocks, dtype=np.int64) * t["block_size"]
    return starts, np.minimum(t["block_size"] + 1, len(part) - starts)


def _count(part: Part, spec: DataSpec) -> int:
    return len(_blocks(part, spec)[0]) if isinstance(part, TokenSplit) else len(part)


def _documents(part: TokenSplit, starts: np.ndarray, lengths: np.ndarray) -> TokenSplit:
    """A corpus whose documents are the given blocks (one example each)."""
    tokens = [part.tokens[s : s + n] for s, n in zip(starts, lengths, strict=True)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenSplit(np.concatenate(tokens), offsets)


def _sample(part: Part, spec: DataSpec, n: int, rng: np.random.Generator) -> Part:
    if isinstance(part, TokenSplit):
        starts, lengths = _blocks(part, spec)
        pick = np.sort(rng.choice(len(starts), n, replace=False))
        return _documents(part, starts[pick], lengths[pick])
    return part.take(np.sort(rng.choice(len(part), n, replace=False)))


def _select(part: Part, keep: np.ndarray) -> Part:
    if isinstance(part, TokenSplit):
        return _documents(part, part.offsets[:-1][keep], np.diff(part.offsets)[keep])
    return part.take(np.nonzero(keep)[0])


def _concat(a: Part, b: Part) -> Part:
    if isinstance(a, TokenSplit) and isinstance(b, TokenSplit):
        offsets = np.concatenate([a.offsets, b.offsets[1:] + len(a.tokens)])
        return TokenSplit(np.concatenate([a.tokens, b.tokens]), offsets)
    assert isinstance(a, Split) and isinstance(b, Split)
    return Split(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), np.concatenate([a.index, b.index]))


# ---------------------------------------------------------------------- per-example losses


class Scorer:
    """Per-example losses of a model on a part (one value per row or block, in order)."""

    def __init__(self, cfg: Any, spec: DataSpec, kind: str, objective: str) -> None:
        self.spec, self.kind, self.objective = spec, kind, objective
        self.mlm = cfg.train.mlm_probability
        self.size = cfg.evaluate.batch_size or cfg.train.eval_batch_size or 2 * cfg.train.batch_size
        self.loss_kind = "mean token cross-entropy"
        if objective == "supervised":
            self.loss_kind = "squared error" if spec.task == "regression" else "cross-entropy"

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, part: Part) -> np.ndarray:
        dev = place(model.eval(), resolve_device("auto"))
        out = []
        for batch in self._loader(part, str(dev)).epoch(0):
            if self.objective == "supervised":
                out.append(supervised_losses(model(batch.x), batch.y, self.spec.task, self.kind))
                continue
            logits, targets = token_outputs(
                model,
                self.objective,
                batch.x,
                batch.y,
                text=self.spec.text,
                mlm_probability=self.mlm,
            )
            out.append(token_losses(logits, targets))
        return torch.cat(out).double().cpu().numpy()

    def _loader(self, part: Part, device: str) -> Any:
        if isinstance(part, TokenSplit):  # one block per document, its padded targets ignored
            t = self.spec.text
            return BlockLoader(
                part,
                self.size,
                t["block_size"],
                order="sequential",
                pack=False,
                pad_id=t["pad_id"],
                device=device,
            )
        return DataBundle({"part": part}, self.spec, {}, "").loader(
            "part", self.size, device=device
        )


def supervised_losses(outputs: torch.Tensor, y: torch.Tensor, task: str, kind: str) -> torch.Tensor:
    """(N,) squared error (regression) or cross-entropy of the true class."""
    outputs = outputs.float()
    if task == "regression":
        n = len(y)
        return (outputs.reshape(n, -1) - y.float().reshape(n, -1)).pow(2).mean(1)
    if kind == "softmax":
        return F.cross_entropy(outputs, y.long(), reduction="none")
    if kind == "sigmoid" and outputs.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(outputs[:, 0], y.float(), reduction="none")
    p = probabilities(outputs, kind).gather(1, y.long()[:, None])[:, 0]  # (N,)
    return -torch.log(p.clamp_min(1e-12))


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) mean cross-entropy over each row's counted tokens (NaN for a row with none)."""
    nll = F.cross_entropy(
        logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape[0], -1)  # (B, T), 0 where ignored
    count = (targets != IGNORE).reshape(targets.shape[0], -1).sum(1)
    return torch.where(count > 0, nll.sum(1) / count.clamp_min(1), torch.nan)


# ----------------------------------------------------------------------------- attacks


def attack_metrics(
    member: np.ndarray, non_member: np.ndarray, *, negate: bool = False
) -> dict[str, Any]:
    """AUC (with a Hanley-McNeil 95 % interval), advantage, TPR at low FPR and a ROC curve of
    an attack scoring members higher; non-finite scores are left out. The threshold is the
    best advantage's score (its negation with `negate`: the loss at or below which a loss
    attack says "member")."""
    from sklearn.metrics import roc_auc_score, roc_curve

    member, non_member = member[np.isfinite(member)], non_member[np.isfinite(non_member)]
    n1, n0 = len(member), len(non_member)
    truth = np.r_[np.ones(n1), np.zeros(n0)]
    scores = np.r_[member, non_member]
    auc = float(roc_auc_score(truth, scores))
    fpr, tpr, thresholds = roc_curve(truth, scores)
    best = int(np.argmax(tpr - fpr))
    threshold = float(-thresholds[best] if negate else thresholds[best])
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = math.sqrt(
        (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    )
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 201)).round().astype(int))
    return {
        "auc": round(auc, 4),
        "auc_ci95": [round(max(0.0, auc - 1.96 * se), 4), round(min(1.0, auc + 1.96 * se), 4)],
        "advantage": round(float(tpr[best] - fpr[best]), 4),
        "threshold": threshold if math.isfinite(threshold) else None,
        "tpr_at_fpr": {
            str(t): round(float(tpr[fpr <= t].max()), 4) for t in LOW_FPR if n0 * t >= 1
        },
        "roc": {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()},
        "members": n1,
        "non_members": n0,
    }


def shadow_attack(
    cfg: Any,
    spec: DataSpec,
    scorer: Scorer,
    parts: list[Part],
    target: tuple[np.ndarray, np.ndarray],
    trainer: Trainer,
    *,
    k: int,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    """Shokri et al.: K shadows on random halves of the pool (members + non-members), then a
    logistic attack per class on log-loss, applied to the run's own losses."""
    from sklearn.linear_model import LogisticRegression

    pool = _concat(*parts)
    n = len(target[0]) + len(target[1])
    classes = pool.y.numpy() if spec.task == "classification" else np.zeros(n, dtype=np.int64)
    feats, labels = [], []
    for i in range(k):
        inside = np.zeros(n, dtype=bool)
        inside[np.random.default_rng([seed, 1, i]).choice(n, n // 2, replace=False)] = True
        half = DataBundle({"train": _select(pool, inside)}, spec, {}, "")
        shadow = trainer(cfg, half, steps=steps, seed=seed + 1 + i)
        feats.append(_feature(scorer(shadow, pool)))
        labels.append(inside)
    x, y, group = np.concatenate(feats), np.concatenate(labels), np.tile(classes, k)
    own = _feature(np.concatenate(target))
    scores = np.full(n, np.nan)
    for c in np.unique(classes):
        rows = (group == c) & np.isfinite(x)
        if len(np.unique(y[rows])) < 2:  # a class with one side only: all classes together
            rows = np.isfinite(x)
        attack = LogisticRegression().fit(x[rows, None], y[rows])
        mine = (classes == c) & np.isfinite(own)
        scores[mine] = attack.predict_proba(own[mine, None])[:, 1]
        if attack.coef_[0, 0] >= 0:  # shadows' members had higher losses: no signal, a guess
            scores[mine] = y[rows].mean()
    m = len(target[0])
    metrics = attack_metrics(scores[:m], scores[m:])
    del metrics["threshold"]  # a probability per class, not one loss
    return {
        **metrics,
        "models": k,
        "steps": steps,
        "train_size": n // 2,
        "attack": "logistic regression on log-loss, one per class"
        if spec.task == "classification"
        else "logistic regression on log-loss (one calibrated threshold)",
    }


def _feature(loss: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(loss, 1e-12))


def _shadow_steps(cfg: Any, lineage: dict, n: int, n_train: int) -> int:
    """As many passes over a shadow's half as the run made over its training split."""
    steps = lineage.get("steps") or cfg.train.max_steps or 100
    return max(1, round(steps * n / max(n_train, 1)))
