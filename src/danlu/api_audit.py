"""`danlu.audit(run)`: the membership-inference audit of danlu.evaluate.audit, with shadow
models trained here (evaluate may not import train) and the run's manifest updated.

    result = danlu.audit("runs/fashion_cnn")          # loss-threshold attack
    result["loss"]["auc"], result["loss"]["advantage"]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from danlu.manifest import update_manifest
from danlu.rundir import RunDir


def audit(run: str | Path | RunDir, **options: Any) -> dict[str, Any]:
    """See danlu.evaluate.audit.audit for the options (split, samples, shadow, seed)."""
    from danlu.evaluate.audit import audit as attack

    path = run.path if isinstance(run, RunDir) else Path(run)
    result = attack(run, trainer=fit_shadow, **options)
    update_manifest(path, [p for p in (path / "audit.json", path / "audit.html") if p.is_file()])
    return result


def fit_shadow(cfg: Any, bundle: Any, *, steps: int, seed: int) -> torch.nn.Module:
    """A fresh model of the run's config trained `steps` steps on bundle's train split (in a
    throwaway run directory), returned in eval mode."""
    from danlu import models
    from danlu.api import seed_everything
    from danlu.evaluate.metrics import metric_names
    from danlu.rundir import RunDir
    from danlu.train import loop
    from danlu.train.objectives import build_objective

    seed_everything(seed)
    spec, t, model_cfg = bundle.spec, cfg.train, cfg.model.model_dump()
    kind = models.output_kind(spec.task, model_cfg["output"])
    model = models.build_for(model_cfg, spec)
    if model_cfg.get("init_from"):  # a fine-tune starts where its run started
        models.load_backbone(model, RunDir.open(model_cfg["init_from"]).weights, "the base run")
    family = models.family(model, model_cfg["type"])
    model = models.adapt(model, model_cfg)
    objective = build_objective(t.model_dump(), spec, family, kind, bundle)
    private = None
    if t.privacy is not None:  # a DP run's shadows are trained with DP-SGD too
        from danlu.train import privacy

        settings = {**t.model_dump(), "max_steps": steps}
        examples = len(bundle.splits["train"])
        private = privacy.prepare(
            model, train=settings, model_cfg=model_cfg, task=spec.task, examples=examples
        )
    order = "shuffle" if private is None else "poisson"
    loader = bundle.loader("train", t.batch_size, seed=seed, train=True, order=order)
    with tempfile.TemporaryDirectory(prefix="danlu-shadow-") as tmp:
        loop.fit(
            model,
            objective,
            loader,
            None,
            RunDir.create(cfg, Path(tmp) / "shadow"),
            max_steps=steps,
            optimizer=t.optimizer.model_dump(),
            schedule=t.schedule.model_dump(),
            l1=t.l1,
            grad_clip=t.grad_clip,
            grad_accum=t.grad_accum,
            precision=t.precision,
            device=t.device,
            log_every=max(steps, 1),
            checkpoint_every=steps,
            keep_checkpoints=1,
            tensorboard=False,
            metric_names=metric_names(spec.task, spec.num_classes),
            show_progress=False,
            privacy=private,
        )
    return model.eval()
