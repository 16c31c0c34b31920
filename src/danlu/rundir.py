"""The run directory: the contract between stages.

    runs/<name>/
      config.yaml        the resolved, validated config (never mutated after validation)
      lineage.json       data content hash, code version, package versions, seed, host, times
      data_card.json     schema, sizes, splits, class balance, quality findings
      preprocess.json    what turns raw inputs into model inputs (columns, statistics, classes)
      tokenizer.json     text runs: the tokenizer (Hugging Face tokenizers format)
      hf/                model.type hf: the checkpoint's config.json (the architecture)
      chat/              data.task chat: the tokenizer with its chat template and special tokens
      model.safetensors  the weights to use (best by the monitored metric)
      checkpoints/       step-N/ (model, optimizer, scheduler, RNG, data position), atomic
      history.jsonl      one JSON line per logged step
      metrics.json       evaluation results, by split
      tb/                TensorBoard event files

Every file is written atomically (temporary file, fsync, rename), so a crash never leaves a
half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from danlu.config import Config, validate
from danlu.errors import CheckpointError, ConfigError

PACKAGES = ("danlu", "torch", "numpy", "pydantic", "safetensors", "pandas", "scikit-learn")


# ------------------------------------------------------------------------- atomic writes


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def save_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None):
    """Save tensors atomically as safetensors (contiguous CPU copies)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path}' is unreadable ({e})") from None


def sha256_file(path: Path, h: Any = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staged(target: Path):
    """Build a run folder in a temporary sibling and rename it into place only when the
    block finishes: a crash leaves no half-written run that looks complete."""
    import shutil

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, target)
    fsync_dir(target.parent)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ run dirs


class RunDir:
    """A run directory on disk; stages read and write it only through these names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    lineage = property(lambda self: self.path / "lineage.json")
    data_card = property(lambda self: self.path / "data_card.json")
    preprocess = property(lambda self: self.path / "preprocess.json")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    weights = property(lambda self: self.path / "model.safetensors")
    hf_config = property(lambda self: self.path / "hf")
    chat_tokenizer = property(lambda self: self.path / "chat")
    checkpoints = property(lambda self: self.path / "checkpoints")
    history = property(lambda self: self.path / "history.jsonl")
    metrics = property(lambda self: self.path / "metrics.json")
    tb = property(lambda self: self.path / "tb")

    def __repr__(self) -> str:
        return f"RunDir('{self.path}')"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, cfg: Config, run_dir: str | Path | None = None) -> RunDir:
        """A new, empty run folder: `run_dir` as given, or <runs_dir>/<name>[-N] on a clash."""
        if run_dir is not None:
            path = Path(run_dir)
            if path.exists() and any(path.iterdir()):
                raise ConfigError(
                    f"run directory '{path}' already exists and is not empty",
                    fix=f"pass --resume {path} to continue it, or choose another --run-dir",
                )
        else:
            root = Path(cfg.runs_dir)
            path, n = root / cfg.name, 1
            while path.exists():
                n += 1
                path = root / f"{cfg.name}-{n}"
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_text(run.config, cfg.to_yaml())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not run.path.is_dir():
            raise CheckpointError(
                f"run directory '{path}' not found",
                fix="pass a folder made by `danlu train` (see the runs/ folder)",
            )
        if not run.config.is_file():
            raise CheckpointError(
                f"'{path}' is not a danlu run: it has no config.yaml",
                fix="pass a folder made by `danlu train`",
            )
        return run

    def load_config(self) -> Config:
        from danlu.config import read_yaml

        return validate(read_yaml(self.config), str(self.config))

    def read(self, name: str) -> Any:
        return read_json(self.path / name)

    def write(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def update_metrics(self, split: str, values: dict[str, Any]) -> dict[str, Any]:
        """Merge one split's results into metrics.json."""
        current = read_json(self.metrics) if self.metrics.is_file() else {}
        current[split] = values
        atomic_write_json(self.metrics, current)
        return current

    def require_weights(self) -> Path:
        if not self.weights.is_file():
            raise CheckpointError(
                f"run '{self.path}' has no model.safetensors (training did not finish a step)",
                fix=f"resume it with `danlu train --resume {self.path}`",
            )
        return self.weights


# ------------------------------------------------------------------------------- lineage


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def code_version() -> dict[str, Any]:
    """The git commit of danlu's source tree when it is a checkout (and whether it is dirty)."""
    src = Path(__file__).resolve().parent
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(src), *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()

        return {
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}


def start_lineage(run: RunDir, cfg: Config, *, data_hash: str, extra: dict[str, Any]) -> dict:
    lineage = {
        "run": run.path.name,
        "status": "running",
        "seed": cfg.seed,
        "data_hash": data_hash,
        "config_hash": hashlib.sha256(cfg.to_yaml().encode()).hexdigest(),
        "code": code_version(),
        "packages": package_versions(),
        "host": {
            "hostname": socket.gethostname(),
            "user": _user(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "command": sys.argv,
        "started": now(),
        "ended": None,
        **extra,
    }
    run.write("lineage.json", lineage)
    return lineage


def update_lineage(run: RunDir, **fields: Any) -> dict:
    lineage = run.read("lineage.json") if run.lineage.is_file() else {}
    lineage.update(fields)
    run.write("lineage.json", lineage)
    return lineage


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
