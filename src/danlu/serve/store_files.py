"""The files behind the model registry (danlu.serve.store): which files of a run a version
holds, the checks a run passes before it is added, writing content-addressed objects, and
verifying a checkout against its record.

A version holds every file of the run except checkpoints/, tb/, compressed/ and export/ (at any
depth), manifest.json / manifest.sig (they also list checkpoints/ and tb/, so they could not
verify a checkout; the registry's own record of hashes replaces them) and the temporaries of
atomic writes. A symbolic link to a file inside the run is stored as that file's content;
a link leading outside the run, or to a folder, is refused. Relative names are checked to be
plain relative POSIX paths, and every path built from one is checked to stay in its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from danlu.errors import CheckpointError
from danlu.manifest import IntegrityError, require_verified, verify
from danlu.rundir import RunDir, fsync_dir, sha256_file

SKIPPED = frozenset({"checkpoints", "tb", "compressed", "export"})  # folders, at any depth
MANIFESTS = frozenset({"manifest.json", "manifest.sig"})


# ------------------------------------------------------------------------ reading a run


def describe(run: RunDir) -> dict[str, Any]:
    """Task, model type, variant, metrics, lineage and weight files of a complete run;
    CheckpointError when training (or compression) did not finish."""
    from danlu.config import read_yaml

    lineage = run.read("lineage.json") if run.lineage.is_file() else {}
    status = lineage.get("status", "no lineage.json")
    meta = run.read("compression.json") if (run.path / "compression.json").is_file() else None
    unfinished_variant = lineage.get("kind") == "compressed" and meta is None
    if status != "completed" or unfinished_variant:
        why = "no compression.json" if status == "completed" else f"status: {status}"
        raise CheckpointError(
            f"run '{run.path}' is not complete ({why})",
            fix=f"finish it first (`danlu train --resume {run.path}`, or compress it again)",
        )
    cfg = read_yaml(run.config)
    model = cfg.get("model") or {}
    if model.get("type") == "ensemble":  # members (and their members) are runs inside
        found = (run.path / "members").rglob("model.safetensors")
        weights = sorted(p.relative_to(run.path).as_posix() for p in found) or ["members/"]
    else:
        weights = ["model.onnx" if (meta or {}).get("format") == "onnx" else "model.safetensors"]
    for rel in weights:
        if not (run.path / rel).is_file():
            raise CheckpointError(f"run '{run.path}' has no {rel}", fix="train it to the end")
    metrics = run.read("metrics.json") if run.metrics.is_file() else {}
    return {
        "task": str((cfg.get("data") or {}).get("task") or "classification"),
        "model_type": str(model.get("type", "?")),
        "variant": (meta or {}).get("method"),
        "metrics": metrics if isinstance(metrics, dict) else {},
        "lineage": lineage,
        "weights": weights,
    }


def check_manifest(run: Path, trusted_key: str | Path | None) -> str | None:
    """A run with manifest.json must verify (and its signature too when a key is trusted);
    returns the fingerprint of the trusted key that signed it."""
    if trusted_key is not None:
        return require_verified(run, trusted_key)["key"]
    if (run / "manifest.json").is_file():
        verify(run)
    return None


def match_manifest(run: Path, files: dict[str, dict]) -> None:
    """The bytes stored are those the manifest verified (nothing changed in between)."""
    if not (run / "manifest.json").is_file():
        return
    listed = json.loads((run / "manifest.json").read_text())["files"]
    for rel, entry in files.items():
        if rel in listed and listed[rel] != entry:
            raise IntegrityError(f"'{run / rel}' changed while it was being added", fix="retry")


def transient(name: str) -> bool:
    """The temporary name of an atomic write (NAME.tmp, .tmp-*, .NAME.tmp-PID)."""
    return (
        name.endswith(".tmp") or name.startswith(".tmp-") or (name[:1] == "." and ".tmp-" in name)
    )


def run_files(run: Path, *, links: bool = True) -> dict[str, Path]:
    """Relative POSIX path → file, for every file a version holds (see the module doc).
    `links=False` refuses every symbolic link (a checkout holds none)."""
    base, found = run.resolve(), {}
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED and not transient(d))
        for name in [*dirnames, *filenames]:
            path, is_file = here / name, name in filenames
            rel = path.relative_to(base).as_posix()
            if transient(name) or rel in MANIFESTS:
                continue
            outside = not path.resolve().is_relative_to(base)
            if path.is_symlink() and (not is_file or outside or not links):
                raise CheckpointError(
                    f"'{rel}' in '{run}' is a symbolic link to '{os.readlink(path)}'",
                    fix="replace the link with a copy of what it points to",
                )
            if is_file and not path.is_file():
                raise CheckpointError(f"'{rel}' in '{run}' is not a regular file")
            if is_file:
                found[safe_rel(rel)] = path
    return dict(sorted(found.items()))


# -------------------------------------------------------------------------------- paths


def safe_rel(rel: str) -> str:
    """A plain relative POSIX path: no '..', '.', empty part, backslash, NUL or leading '/'."""
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if rel.startswith("/") or "\\" in rel or "\0" in rel or {"", ".", ".."} & set(parts):
        raise IntegrityError(f"file name {rel!r} is not a safe relative path")
    return rel


def under(folder: Path, rel: str) -> Path:
    """folder/rel, checked to resolve inside `folder`."""
    path = folder / safe_rel(rel)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise IntegrityError(f"file name {rel!r} leads outside '{folder}'")
    return path


# ------------------------------------------------------------------------------ objects


def intact(path: Path, digest: str, size: int) -> bool:
    """The file exists with this size and SHA-256 (the size first: it is cheap)."""
    try:
        return path.stat().st_size == size and sha256_file(path) == digest
    except OSError:
        return False


def write_object(src: Path, dest: Path, digest: str) -> None:
    """Copy `src` to `dest` through a temporary file, checking the copy hashes to `digest`;
    the object is made read-only (checkouts hard-link it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != digest:
            raise CheckpointError(f"'{src}' changed while it was being added", fix="add it again")
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


# ---------------------------------------------------------------------------- checkouts


def verify_checkout(
    ref: str,
    files: dict[str, dict],
    folder: Path,
    obj: Callable[[str], Path],
    fixes: tuple[str, str],
) -> None:
    """Every recorded file is in `folder` with its size and SHA-256, and nothing else is;
    IntegrityError names the first difference (and whether the stored object is damaged).
    `obj` maps a hash to its object; `fixes` = (object damaged, checkout damaged)."""
    present = set(run_files(folder, links=False))
    for rel, entry in files.items():
        if rel not in present:
            problem = "is missing"
        elif not intact(under(folder, rel), entry["sha256"], entry["size"]):
            problem = "differs from the registered file (its size or SHA-256 changed)"
        else:
            continue
        damaged = not intact(obj(entry["sha256"]), entry["sha256"], entry["size"])
        raise IntegrityError(
            f"checkout of {ref} failed verification: '{rel}' {problem}"
            + (" and its stored object is damaged" if damaged else ""),
            fix=fixes[0] if damaged else fixes[1],
        )
    extra = sorted(present - files.keys())
    if extra:
        raise IntegrityError(
            f"checkout of {ref} failed verification: '{extra[0]}' was added", fix=fixes[1]
        )
