"""`danlu pipeline CONFIG`: the stages of the config's `pipeline:` section, in order, on one run.

    result = run_pipeline("configs/quickstart_r8.yaml", serve=False)
    result.records["evaluate"]["summary"]["value"]          # the test accuracy

Design. Every stage is a function of the run directory (`Context` → a small JSON summary) that
calls the public API only: api_data.data_check, api.train, api.evaluate, api_compress.compress,
evaluate.report.write_report, serve.store.ModelStore.add and serve.server.serve. Each stage also
names its inputs (the SHA-256 of the weights it reads, the config keys it depends on); RUN/
pipeline.json records per stage its status (started | done | failed), times, inputs and
summary, written atomically and pinned in the run's manifest so the run still verifies. A stage
is skipped when it is done with the same inputs, so re-running the command skips finished
stages, and a stage whose inputs changed (new weights after a resumed training) runs again.
`serve` always runs (it is a service, not a result).

The run folder is created (config.yaml only, as `danlu train` would) before the first stage, so
pipeline.json and the data check have a home; training is then always `api.train(resume=RUN)`:
from scratch when there is no checkpoint, from the last checkpoint of an interrupted run, and
not at all when the run finished training with the same config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danlu.config import Config
from danlu.config_pipeline import ALIASES, ORDER, PipelineConfig, select_stages
from danlu.config_serve import ServeSettings
from danlu.errors import CheckpointError, ConfigError, DanluError, DataError, ServeError
from danlu.rundir import RunDir, atomic_write_json, now, read_json, sha256_file

log = logging.getLogger("danlu")
STATE = "pipeline.json"
FORMAT = "danlu-pipeline/1"
NOT_TRAINING = ("pipeline", "serve", "compress", "evaluate")  # sections training does not read


@dataclass
class Context:
    """What a stage sees: the run, the config it was made with, the stages' summaries so far."""

    run: RunDir
    config: Config  # validated, with the model's sources filled in (as the run records it)
    settings: PipelineConfig
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage → summary
    previous: dict[str, Any] | None = None  # the record of this stage's last attempt
    say: Callable[[str], None] = log.info
    _hashes: dict[tuple, str | None] = field(default_factory=dict)

    def weights_sha(self, folder: Path) -> str | None:
        """SHA-256 of a run's weights (model.safetensors, else an ONNX variant's model.onnx)."""
        file = next((f for f in (folder / "model.safetensors", folder / "model.onnx")
                     if f.is_file()), None)  # fmt: skip
        if file is None:
            return None
        st = file.stat()
        key = (str(file), st.st_mtime_ns, st.st_size)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(file)
        return self._hashes[key]


@dataclass
class PipelineResult:
    run: RunDir
    stages: list[str]  # the stages this invocation went through, in order
    records: dict[str, dict[str, Any]]  # stage → its pipeline.json record (+ "skipped")
    context: Context


# ------------------------------------------------------------------------------- stages


def data_check(ctx: Context) -> dict[str, Any]:
    from danlu.api_data import data_check as check

    result = check(ctx.config, sufficiency=ctx.settings.data_check.sufficiency,
                   out=ctx.run.path / "data_check")  # fmt: skip
    _pin(ctx.run, [result.out])
    levels = [f["level"] for f in result.findings]
    blockers, warnings = levels.count("blocker"), levels.count("warning")
    if blockers and ctx.config.data.check.on_blockers == "stop":
        listed = "; ".join(f["message"] for f in result.blockers)
        raise DataError(
            f"the data check found {blockers} blocker(s): {listed}",
            fix=f"see {result.out / 'data_check.html'}; fix the data, or set "
            "data.check.on_blockers: warn",
        )
    sizes = result.card.get("sizes", {})
    shown = ", ".join(f"{k} {v:,}" for k, v in sizes.items())
    return {"sizes": sizes, "blockers": blockers, "warnings": warnings,
            "result": f"{shown}; {blockers} blockers, {warnings} warnings"}  # fmt: skip


def train(ctx: Context) -> dict[str, Any]:
    from danlu import api

    cfg, run = _training_config(ctx), ctx.run
    lineage = run.read("lineage.json") if run.lineage.is_file() else {}
    resumed_from = None
    if lineage.get("status") == "completed" and _trained(run.load_config()) == _trained(cfg):
        ctx.say("train: the run already finished training with this config")
    else:
        result = api.train(cfg, resume=run)
        resumed_from = result.fit.resumed_from
        lineage = run.read("lineage.json")
    best = lineage.get("best") or {}
    text = f"{lineage.get('steps')} steps"
    if best.get("value") is not None:
        text += f", best {best['metric']} {best['value']:.4f}"
    if resumed_from is not None:
        text += f" (resumed from step {resumed_from})"
    return {"steps": lineage.get("steps"), "best": best, "resumed_from": resumed_from,
            "train_seconds": lineage.get("train_seconds"), "result": text}  # fmt: skip


def evaluate(ctx: Context) -> dict[str, Any]:
    from danlu import api

    m = api.evaluate(ctx.run, ctx.config.evaluate.split)
    metric = m.get("headline") or next(iter(k for k, v in m.items() if isinstance(v, float)))
    value, count = m.get(metric), m.get("count")
    text = f"{m['split']} {metric} {value:.4f}" + (f" ({count:,} examples)" if count else "")
    return {"split": m["split"], "metric": metric, "value": value, "count": m.get("count"),
            "result": text}  # fmt: skip


def compress(ctx: Context) -> dict[str, Any]:
    from danlu.api_compress import compress as make

    changed = ctx.previous is not None and ctx.previous.get("status") == "done"
    result = make(ctx.run, ctx.config.compress, overwrite=changed)  # new weights: new variants
    t = result.table
    best = next((r for r in t["rows"] if r["name"] == t["recommended"]), None)
    n = len(result.variants)
    text = f"{n} variant{'s' if n != 1 else ''}; recommended: {t['recommended'] or 'none'}"
    if best is not None and best.get("speedup_b32"):
        text += f" ({best['speedup_b32']:.2f}× at batch 32, {best['delta']:+.2f} points)"
    return {"variants": sorted(result.variants), "recommended": t["recommended"],
            "speedup_b32": best and best.get("speedup_b32"), "delta": best and best["delta"],
            "report": str(result.report), "result": text}  # fmt: skip


def report(ctx: Context) -> dict[str, Any]:
    from danlu.evaluate.report import write_report

    path = write_report(ctx.run, ctx.config.evaluate.split)
    return {"report": str(path), "result": str(path)}


def register(ctx: Context) -> dict[str, Any]:
    from danlu.serve.store import ModelStore

    r = ctx.settings.register
    store = ModelStore(r.root)
    v = store.add(registered_run(ctx), registry_name(ctx), stage=r.stage)
    ref = f"{v.name}:{v.version}"
    return {"name": v.name, "version": v.version, "stage": v.stage, "ref": ref,
            "root": str(store.root), "source": v.source, "variant": v.variant,
            "result": f"{ref} ({v.stage}) in {store.root}"}  # fmt: skip


def serve(ctx: Context) -> dict[str, Any]:
    from danlu.serve.server import serve as run_server

    settings, ref = serve_settings(ctx), serve_ref(ctx)
    if settings.port:  # a busy port is one clear line, not a server failing to start
        with socket.socket() as s:
            try:
                s.bind((settings.host, settings.port))
            except OSError as e:
                raise ServeError(
                    f"cannot listen on {settings.host}:{settings.port} ({e.strerror})",
                    fix="pass another port (--port P, or serve.port=P; 0 = any free port)",
                ) from None
    url = f"http://{settings.host}:{settings.port}/" if settings.port else None
    try:
        run_server([ref], settings, announce=ctx.say)
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: the stage ends normally
        ctx.say("serve: stopped")
    return {"ref": ref, "url": url, "result": f"served {ref}" + (f" at {url}" if url else "")}


STAGES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "data_check": data_check, "train": train, "evaluate": evaluate, "compress": compress,
    "report": report, "register": register, "serve": serve,
}  # fmt: skip


# ------------------------------------------------------------------------------- inputs


def inputs(ctx: Context, stage: str) -> dict[str, Any]:
    """What a stage's result depends on; a change makes a finished stage run again."""
    cfg, run = ctx.config.to_dict(), ctx.run
    weights = ctx.weights_sha(run.path)
    if stage == "data_check":
        chosen = {k: cfg[k] for k in ("seed", "data", "model")}
        return {"config": _digest(chosen), "sufficiency": ctx.settings.data_check.sufficiency}
    if stage == "train":
        return {"config": _digest(_trained(ctx.config))}
    if stage in ("evaluate", "report"):
        return {"weights": weights, "split": ctx.config.evaluate.split}
    if stage == "compress":
        return {"weights": weights, "compress": _digest(cfg.get("compress"))}
    if stage == "register":
        target = registered_run(ctx)
        r = ctx.settings.register
        return {"run": str(target), "weights": ctx.weights_sha(target),
                "name": registry_name(ctx), "stage": r.stage, "root": r.root}  # fmt: skip
    return {}


def registered_run(ctx: Context) -> Path:
    """The run the register stage records: the run, or RUN/compressed/VARIANT."""
    variant = ctx.settings.register.variant
    if variant == "recommended":
        path = ctx.run.path / "compress_report.json"
        if not path.is_file():
            raise ConfigError(
                "pipeline.register.variant: recommended needs the compress report, and "
                f"{path} does not exist",
                fix="put compress before register in pipeline.stages",
            )
        variant = read_json(path).get("recommended")
    if variant is None:
        return ctx.run.path
    target = ctx.run.path / "compressed" / variant
    if not (target / "config.yaml").is_file():
        raise CheckpointError(
            f"pipeline.register.variant: {variant} is not a variant of run '{ctx.run.path}' "
            f"({target} not found)",
            fix="list it in the compress: section and run the compress stage first",
        )
    return target


def registry_name(ctx: Context) -> str:
    return ctx.settings.register.name or ctx.config.name


def serve_settings(ctx: Context) -> ServeSettings:
    settings = ctx.config.serve or ServeSettings()
    registered = ctx.results.get("register")
    if registered and settings.registry is None:
        settings = settings.model_copy(update={"registry": registered["root"]})
    return settings


def serve_ref(ctx: Context) -> str:
    """NAME:VERSION when the register stage recorded one (pipeline.serve.model: registered),
    else the folder of the run (or of the variant register names)."""
    registered = ctx.results.get("register")
    if ctx.settings.serve.model == "registered" and registered:
        return registered["ref"]
    return str(registered_run(ctx) if ctx.settings.register.variant else ctx.run.path)


# ------------------------------------------------------------------------------- engine


def run_pipeline(
    config: str | Path | dict[str, Any] | Config,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    run_dir: str | Path | None = None,
    serve: bool = True,
    start: str | None = None,
    only: list[str] | None = None,
    say: Callable[[str], None] = log.info,
    before_serve: Callable[[PipelineResult], None] | None = None,
) -> PipelineResult:
    """Run the config's pipeline stages on RUN (run_dir, default <runs_dir>/<name>). `start`
    runs that stage and every later one again even if done; `only` runs just those (even if
    done); `serve=False` leaves the serve stage out. `before_serve` sees the result so far
    just before the (blocking) serve stage starts."""
    from danlu.api import with_model_sources
    from danlu.config import load

    source = config.to_dict() if isinstance(config, Config) else config
    cfg = with_model_sources(load(source, overrides))
    settings = cfg.pipeline or PipelineConfig()
    stages, forced = select_stages(settings.stages, serve=serve, start=start, only=only)
    run = open_run(cfg, run_dir)
    state = _load_state(run)
    ctx = Context(run, cfg, settings, say=say)
    for name, record in state["stages"].items():
        if record.get("status") == "done":
            ctx.results[name] = record.get("summary", {})
    result = PipelineResult(run, stages, {}, ctx)
    for label in stages:
        if label == "serve" and before_serve is not None:
            before_serve(result)
        result.records[label] = _run_stage(ctx, state, label, label in forced)
    return result


def open_run(cfg: Config, run_dir: str | Path | None) -> RunDir:
    """The run folder of this pipeline, created with its config.yaml when new."""
    path = Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / cfg.name
    if (path / "config.yaml").is_file():
        return RunDir.open(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(
            f"'{path}' exists and is not a danlu run (no config.yaml)",
            fix="pass --run-dir with a new folder, or a run this pipeline made",
        )
    return RunDir.create(cfg, path)


def _run_stage(ctx: Context, state: dict[str, Any], label: str, forced: bool) -> dict[str, Any]:
    name = ALIASES.get(label, label)
    old = state["stages"].get(name)
    record: dict[str, Any] = {"status": "started", "started": now(), "ended": None,
                              "seconds": None, "inputs": None, "summary": {}}  # fmt: skip
    t0 = time.monotonic()
    try:
        record["inputs"] = inputs(ctx, name)
        if old and old.get("status") == "done" and not forced and name != "serve":
            if old.get("inputs") == record["inputs"]:
                ctx.say(f"{label}: done already ({old['summary'].get('result', '')}); skipped")
                ctx.results[name] = old["summary"]
                return {**old, "skipped": True}
            ctx.say(f"{label}: its inputs changed since it ran; running it again")
        state["stages"][name] = record
        _save(ctx.run, state)
        ctx.say(f"{label}: started")
        ctx.previous = old
        summary = STAGES[name](ctx)
    except BaseException as e:
        state["stages"][name] = record
        record.update(status="failed", ended=now(), seconds=round(time.monotonic() - t0, 2),
                      error=_one_line(e))  # fmt: skip
        _save(ctx.run, state)
        raise _stage_error(label, e) from e
    record.update(status="done", ended=now(), seconds=round(time.monotonic() - t0, 2),
                  summary=summary)  # fmt: skip
    _save(ctx.run, state)
    ctx.results[name] = summary
    ctx.say(f"{label}: done in {record['seconds']:.1f}s — {summary.get('result', '')}")
    return {**record, "skipped": False}


def _stage_error(label: str, e: BaseException) -> BaseException:
    """The error to raise: danlu's own names the stage; an interruption stays itself."""
    if isinstance(e, DanluError):
        return type(e)(f"stage {label} failed: {e.message}", fix=e.fix)
    if not isinstance(e, Exception) or type(e).__name__ == "TrainingInterrupted":
        return e
    return DanluError(
        f"stage {label} failed: {_one_line(e)}", fix="run again with --debug for the traceback"
    )


# -------------------------------------------------------------------------------- state


def _load_state(run: RunDir) -> dict[str, Any]:
    path = run.path / STATE
    state = read_json(path) if path.is_file() else {}
    if state.get("format") != FORMAT or not isinstance(state.get("stages"), dict):
        state = {"format": FORMAT, "stages": {}}
    return state


def _save(run: RunDir, state: dict[str, Any]) -> None:
    state["updated"] = now()
    state["stages"] = {k: state["stages"][k] for k in ORDER if k in state["stages"]}
    atomic_write_json(run.path / STATE, state)
    _pin(run, [run.path / STATE])


def _pin(run: RunDir, paths: list[Path]) -> None:
    """Re-pin files the pipeline wrote in a finished run's manifest (none before training)."""
    if (run.path / "manifest.json").is_file():
        from danlu.manifest import update_manifest

        update_manifest(run.path, paths)


def _trained(cfg: Config) -> dict[str, Any]:
    """The part of a config that training reads."""
    return {k: v for k, v in cfg.to_dict().items() if k not in NOT_TRAINING}


def _training_config(ctx: Context) -> Config:
    """The pipeline's config with the run's own non-training sections, so that editing
    compress: or pipeline: does not stop an interrupted training from resuming."""
    from danlu.config import validate

    if not ctx.run.config.is_file():
        return ctx.config
    raw, saved = ctx.config.to_dict(), ctx.run.load_config().to_dict()
    return validate({**raw, **{k: saved.get(k) for k in ("pipeline", "serve", "compress")}})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
