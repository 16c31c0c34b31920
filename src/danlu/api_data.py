"""`danlu data check` and the checks every training runs first (part of the public API).

result = danlu.data_check("configs/fashion_cnn.yaml")   # → runs/fashion_cnn-check/
result.blockers, result.sufficiency["verdict"]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu import data
from danlu.config import Config
from danlu.errors import DataError
from danlu.rundir import atomic_write_text

log = logging.getLogger("danlu")


@dataclass
class DataCheckResult:
    out: Path  # the folder holding data_card.json and data_check.html
    card: dict[str, Any]  # the data card with findings, `check` stats and `sufficiency`

    @property
    def findings(self) -> list[dict[str, str]]:
        return self.card["findings"]

    @property
    def blockers(self) -> list[dict[str, str]]:
        return [f for f in self.findings if f["level"] == "blocker"]

    @property
    def sufficiency(self) -> dict[str, Any] | None:
        return self.card.get("sufficiency")


def data_check(
    config: str | Path | dict[str, Any] | Config,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    sufficiency: bool = True,
    out: str | Path | None = None,
) -> DataCheckResult:
    """Build the data, run every check (label noise too, if data.check.label_noise) and, with
    `sufficiency`, the learning-curve estimate; write data_card.json and data_check.html into
    `out` (default runs/<name>-check/). Blockers are reported, not raised."""
    import json

    from danlu.api import _as_config, seed_everything, with_model_sources
    from danlu.data.check import run_checks
    from danlu.data.check_report import render

    cfg = with_model_sources(_as_config(config, overrides))  # texts as the model will read them
    seed_everything(cfg.seed)
    bundle = data.build(**cfg.data.model_dump(), seed=cfg.seed)
    d = cfg.data
    report = run_checks(
        bundle,
        max_length=d.tokenizer.max_length if d.tokenizer else None,
        label_noise=d.check.label_noise,
        max_rows=d.check.max_rows,
        seed=cfg.seed,
    )
    card = {**bundle.card, "findings": report.findings, "check": report.stats}
    if sufficiency:
        from danlu.tune.sufficiency import estimate

        s = d.sufficiency
        card["sufficiency"] = estimate(
            bundle,
            fractions=s.fractions,
            seeds=s.seeds,
            project_to=s.project_to,
            model=s.model,
            max_steps=s.max_steps,
            model_config=cfg.model.model_dump(),
            train_config=cfg.train.model_dump(),
            seed=cfg.seed,
            progress=lambda line: log.info("learning curve: %s", line),
        )
    folder = Path(out) if out is not None else Path(cfg.runs_dir) / f"{cfg.name}-check"
    atomic_write_text(folder / "data_card.json", json.dumps(card, indent=2, default=str) + "\n")
    atomic_write_text(folder / "data_check.html", render(card))
    return DataCheckResult(folder, card)


def pretraining_checks(bundle: data.DataBundle, cfg: Config) -> None:
    """The cheap data checks (no label noise, no learning curve) before any training: their
    findings go into the run's data card; blockers stop training (on_blockers: stop)."""
    from danlu.data.check import run_checks

    tok = cfg.data.tokenizer
    report = run_checks(bundle, max_length=tok.max_length if tok else None, seed=cfg.seed)
    bundle.card["findings"] = report.findings
    bundle.card["check"] = report.stats
    blockers = report.blockers
    if not blockers:
        return
    if cfg.data.check.on_blockers == "stop":
        listed = "; ".join(f"{f['message']} ({f['action']})" for f in blockers)
        raise DataError(
            f"the data check found {len(blockers)} blocker(s): {listed}",
            fix="fix the data (`danlu data check CONFIG` writes the full report), or set "
            "data.check.on_blockers: warn to train anyway",
        )
    for f in blockers:
        log.warning("data check blocker: %s. %s", f["message"], f["action"])
