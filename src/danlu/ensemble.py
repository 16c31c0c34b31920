"""`danlu ensemble RUN... --out RUN`: a run that averages the predictions of several runs.

    result = ensemble(["runs/cnn", "runs/mlp", "runs/cnn-seed1"], "runs/ens")
    result.metrics["accuracy"], result.metrics["members"]    # and each member's, same split

The members must be runs of one task on the same data, split the same way (same data
config, split seed and content hash) and encoded the same way (same preprocessing and
tokenizer): otherwise their test sets would differ, or one member's test examples would be
another's training examples, and the averaged probabilities would not be comparable. Each
member is copied into the new run (members/<i>/: config, weights, preprocessing, tokenizer),
so the ensemble is self-contained: it evaluates, reports, predicts and serves like any run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danlu import _api_package
from danlu.errors import ConfigError
from danlu.evaluate.run import evaluate_run
from danlu.manifest import write_manifest
from danlu.rundir import (
    RunDir,
    atomic_write_text,
    now,
    sha256_file,
    staged,
    start_lineage,
    update_lineage,
)

_api_package(__name__)  # `danlu.ensemble(runs, out)` calls danlu.api.ensemble

KEPT = ("config.yaml", "preprocess.json", "data_card.json", "lineage.json", "tokenizer.json",
        "model.safetensors")  # fmt: skip
FOLDERS = ("hf", "chat")


@dataclass
class EnsembleResult:
    run: RunDir
    metrics: dict[str, Any]


def ensemble(
    runs: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    overwrite: bool = False,
    evaluate: bool = True,
) -> EnsembleResult:
    if len(runs) < 2:
        raise ConfigError(
            f"an ensemble needs at least 2 runs, got {len(runs)}",
            fix="pass two or more run directories of the same task",
        )
    members = [RunDir.open(r) for r in runs]
    for m in members:
        m.require_weights()
    configs = [m.load_config() for m in members]
    specs = [m.read("preprocess.json") for m in members]
    _check_compatible(members, configs, specs)
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(
            f"'{target}' already exists and is not empty",
            fix="pass another --out folder, or --overwrite",
        )
    if any(target.resolve() == m.path.resolve() for m in members):
        raise ConfigError(f"--out '{target}' is one of the members", fix="pass a new folder")
    first = configs[0]
    raw = first.to_dict()
    raw["name"] = target.name if _valid_name(target.name) else first.name
    raw["data"]["split"]["seed"] = _split_seed(first)
    raw["model"] = {
        "type": "ensemble",
        "members": [f"members/{i}" for i in range(len(members))],
        "weights": weights,
        "sources": [str(m.path) for m in members],
    }
    from danlu import config as config_mod

    cfg = config_mod.validate(raw)
    lineages = [m.read("lineage.json") if m.lineage.is_file() else {} for m in members]
    with staged(target) as tmp:
        atomic_write_text(tmp / "config.yaml", cfg.to_yaml())
        for name in ("preprocess.json", "data_card.json", "tokenizer.json"):
            if (members[0].path / name).is_file():
                shutil.copy2(members[0].path / name, tmp / name)
        if (members[0].path / "chat").is_dir():
            shutil.copytree(members[0].path / "chat", tmp / "chat")
        for i, m in enumerate(members):
            _copy_member(m, tmp / "members" / str(i))
        staged_run = RunDir(tmp)
        start_lineage(
            staged_run,
            cfg,
            data_hash=lineages[0].get("data_hash", ""),
            extra={
                "kind": "ensemble",
                "members": [
                    {
                        "run": str(m.path),
                        "config_hash": lin.get("config_hash"),
                        "weights_sha256": sha256_file(m.weights),
                        "best": lin.get("best"),
                    }
                    for m, lin in zip(members, lineages, strict=True)
                ],
            },
        )
        update_lineage(staged_run, status="completed", ended=now())
        write_manifest(tmp)
    run = RunDir.open(target)
    metrics = evaluate_run(run) if evaluate else {}
    return EnsembleResult(run, metrics)


def _valid_name(name: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None


def _split_seed(cfg: Any) -> int:
    return cfg.data.split.seed if cfg.data.split.seed is not None else cfg.seed


def _copy_member(src: RunDir, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in KEPT:
        if (src.path / name).is_file():
            shutil.copy2(src.path / name, dst / name)
    for folder in FOLDERS:
        if (src.path / folder).is_dir():
            shutil.copytree(src.path / folder, dst / folder)
    if (src.path / "members").is_dir():  # an ensemble of ensembles
        shutil.copytree(src.path / "members", dst / "members")


def _check_compatible(members: list[RunDir], configs: list[Any], specs: list[dict]) -> None:
    """One clear line naming the first member that differs from the first run, and how."""
    base, base_cfg, base_spec = members[0], configs[0], specs[0]
    if base_spec["task"] not in ("classification", "regression"):
        raise ConfigError(
            f"run '{base.path}' is a {base_spec['task']} model; ensembles average class "
            "probabilities or predicted values",
            fix="ensemble classification or regression runs",
        )
    base_data = base_cfg.data.model_dump(exclude={"split"})
    for m, cfg, spec in zip(members[1:], configs[1:], specs[1:], strict=True):
        why = None
        if spec["task"] != base_spec["task"]:
            why = f"is a {spec['task']} model, '{base.path}' a {base_spec['task']} one"
        elif spec.get("class_names") != base_spec.get("class_names"):
            why = (
                f"predicts classes {spec.get('class_names')}, '{base.path}' "
                f"{base_spec.get('class_names')}"
            )
        elif cfg.data.model_dump(exclude={"split"}) != base_data:
            keys = [
                k for k, v in cfg.data.model_dump().items() if base_cfg.data.model_dump()[k] != v
            ]
            why = f"was trained on other data (data.{', data.'.join(keys)} differ)"
        elif cfg.data.split.model_dump(exclude={"seed"}) != base_cfg.data.split.model_dump(
            exclude={"seed"}
        ) or _split_seed(cfg) != _split_seed(base_cfg):
            why = (
                f"splits its data differently (split seed {_split_seed(cfg)} vs "
                f"{_split_seed(base_cfg)}): one member's test examples would be another's "
                "training examples"
            )
        elif spec != base_spec:
            why = "prepares its inputs differently (preprocess.json differs)"
        elif _file_hash(m, "tokenizer.json") != _file_hash(base, "tokenizer.json"):
            why = "uses another tokenizer"
        if why:
            raise ConfigError(
                f"run '{m.path}' cannot join an ensemble with '{base.path}': it {why}",
                fix="ensemble runs trained on the same data and split (set data.split.seed to "
                "one value and vary the run seed for diversity)",
            )


def _file_hash(run: RunDir, name: str) -> str | None:
    path = run.path / name
    return sha256_file(path) if path.is_file() else None
