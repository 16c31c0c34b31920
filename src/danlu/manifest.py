"""Integrity of run directories: manifest.json (size + SHA-256 of every file) and Ed25519
signatures (manifest.sig) made with the `cryptography` package.

    write_manifest(run)             list every file of the run with its size and SHA-256
    update_manifest(run, paths)     re-pin only what a later verb wrote; the rest stays pinned
    signing_keys.keygen(path)       PATH (private, PKCS8 PEM, mode 0600) + PATH.pub (public PEM)
    sign(run, key)                  rewrite the manifest, sign its exact bytes → manifest.sig
    verify(run, pubkey=None)        re-hash everything; IntegrityError names the first problem
    require_verified(run, pubkey)   the gate for the registry and the server

Design. Both JSON files are written in one canonical form (sorted keys, indent 2, ASCII) and
carry the SHA-256 of their own content ("self_sha256"): any byte changed by accident or by
hand is caught without a key, while a deliberate edit that recomputes the digests is caught
only by the signature. The signature covers a domain tag plus the exact bytes of
manifest.json, and is trusted only against a public key the user supplies: the fingerprint in
manifest.sig just names the key that signed, so a wrong key is reported as such.
Everything under the run is covered, checkpoints/ and tb/ included (a checkpoint is loadable
weights; tb/ holds the training curves). Always left out: manifest.json and manifest.sig at
the top, and the temporary names of atomic writes (".NAME.*.tmp", ".NAME.tmp-PID"). `exclude`
globs leave out more (fnmatch on the relative POSIX path, "*" crosses "/", a pattern naming a
folder covers all under it); they are recorded so verify skips the same files and says so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from importlib import metadata
from pathlib import Path
from typing import Any

from danlu.errors import CheckpointError, ConfigError
from danlu.rundir import atomic_write_bytes, now, sha256_file
from danlu.signing_keys import fingerprint, load_private_key, load_public_key

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
FORMAT, SIG_FORMAT = "danlu-manifest/1", "danlu-signature/1"
DOMAIN = b"danlu-manifest-signature/1\n"  # signed bytes = DOMAIN + manifest.json
PROTECTED = (
    "config.yaml",
    "model.safetensors",
    "lineage.json",
    "preprocess.json",
    "tokenizer.json",
)
log = logging.getLogger("danlu")


class IntegrityError(CheckpointError):
    """A run directory does not match its manifest or signature; `problems` lists them all."""

    def __init__(self, message: str, *, fix: str | None = None, problems: Sequence[str] = ()):
        super().__init__(message, fix=fix)
        self.problems = list(problems)


# ------------------------------------------------------------------------------- manifests


def write_manifest(run_path: str | Path, exclude: Sequence[str] | None = None) -> dict[str, Any]:
    """Write RUN/manifest.json covering every file under the run and return it. `exclude`
    None keeps the globs of the previous manifest (none for a first one)."""
    root = _root(run_path)
    globs = _globs(root, exclude)
    _warn_if_signed(root)
    return _write(root, _files(root, globs), globs)


def update_manifest(run_path: str | Path, paths: Iterable[str | Path]) -> dict[str, Any]:
    """Re-pin only `paths` (files or folders, relative to the run or inside it) in the existing
    manifest, so a verb that writes metrics.json or report.html does not bless other changes.
    Writes a full manifest when the run has none yet."""
    root = _root(run_path)
    if not (root / MANIFEST).is_file():
        return write_manifest(root)
    manifest = _load_manifest(root)[1]
    files, exclude = dict(manifest["files"]), manifest["exclude"]
    for p in paths:
        rel = _relative(root, p)
        files = {k: v for k, v in files.items() if k != rel and not k.startswith(rel + "/")}
        target = root / rel
        if target.is_dir():
            files |= _files(root, exclude, target)
        elif target.is_file() and not _skipped(rel, exclude):
            files[rel] = _entry(root, rel)
    _warn_if_signed(root)
    return _write(root, files, exclude)


def _write(root: Path, files: dict[str, dict], exclude: list[str]) -> dict[str, Any]:
    files = dict(sorted(files.items()))
    manifest = {
        "format": FORMAT,
        "algorithm": "sha256",
        "danlu_version": _version(),
        "created": now(),
        "exclude": exclude,
        "file_count": len(files),
        "total_bytes": sum(e["size"] for e in files.values()),
        "files": files,
    }
    atomic_write_bytes(root / MANIFEST, _seal(manifest))
    return manifest


def _warn_if_signed(root: Path) -> None:
    if (root / SIGNATURE).is_file():
        log.warning("%s was signed: its signature no longer matches; sign it again", root)


def _files(root: Path, exclude: Sequence[str], top: Path | None = None) -> dict[str, dict]:
    return {rel: _entry(root, rel) for rel in _walk(root, exclude, top)}


def _walk(root: Path, exclude: Sequence[str], top: Path | None = None) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(top or root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not _skipped(_rel(root, here / d), exclude)]
        for d in dirnames:
            if (here / d).is_symlink():  # os.walk would skip it silently
                raise IntegrityError(
                    f"'{here / d}' is a symbolic link to a folder: a manifest covers real files",
                    fix="copy the folder into the run, or exclude it",
                )
        found += [r for n in filenames if not _skipped(r := _rel(root, here / n), exclude)]
    return sorted(found)


def _entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    try:
        return {"sha256": sha256_file(path), "size": path.stat().st_size}
    except OSError as e:
        raise IntegrityError(f"cannot read '{path}' ({e.strerror or e})") from None


def _skipped(rel: str, exclude: Sequence[str]) -> bool:
    if rel in (MANIFEST, SIGNATURE):
        return True
    parts = rel.split("/")
    if any(p.startswith(".") and (p.endswith(".tmp") or ".tmp-" in p) for p in parts):
        return True  # atomic-write temporaries
    return any(fnmatchcase(rel, g) or fnmatchcase(rel, g.rstrip("/") + "/*") for g in exclude)


def _globs(root: Path, exclude: Sequence[str] | None) -> list[str]:
    if exclude is None:
        try:
            return _load_manifest(root)[1]["exclude"]
        except IntegrityError:
            return []
    globs = [str(g) for g in exclude]
    for g in globs:
        if not g.strip() or g.startswith("/") or ".." in g.split("/"):
            raise ConfigError(
                f"exclude glob {g!r} is not a relative path pattern",
                fix="use patterns like 'checkpoints/' or 'tb/*'",
            )
        hit = next((n for n in PROTECTED if _skipped(n, [g])), None)
        if hit:
            raise ConfigError(
                f"exclude glob {g!r} would leave {hit} unverified",
                fix="exclude only optional files such as 'checkpoints/' or 'tb/'",
            )
    return globs


# ------------------------------------------------------------------------- canonical JSON


def _canonical(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode()


def _seal(obj: dict[str, Any]) -> bytes:
    body = {k: v for k, v in obj.items() if k != "self_sha256"}
    return _canonical({**body, "self_sha256": hashlib.sha256(_canonical(body)).hexdigest()})


def _unseal(path: Path, raw: bytes) -> dict[str, Any]:
    """Parse a sealed file, refusing any byte that danlu did not write."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise IntegrityError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or _seal(obj) != raw:
        raise IntegrityError(f"{path.name} was edited after danlu wrote it (its digest differs)")
    return obj


def _load_manifest(root: Path) -> tuple[bytes, dict[str, Any]]:
    """The exact bytes of RUN/manifest.json and their content, checked."""
    path = root / MANIFEST
    if not path.is_file():
        raise IntegrityError(
            f"it has no {MANIFEST}",
            fix=f"write one with `danlu sign {root} --key KEY` (keys: `danlu keygen`)",
        )
    raw = path.read_bytes()
    m = _unseal(path, raw)
    files = m.get("files")
    ok = m.get("format") == FORMAT and m.get("algorithm") == "sha256"
    ok = ok and isinstance(files, dict) and isinstance(m.get("exclude"), list)
    if not ok or not all(_valid_entry(k, v) for k, v in files.items()):
        raise IntegrityError(f"{MANIFEST} is not a {FORMAT} manifest")
    return raw, m


def _valid_entry(rel: Any, e: Any) -> bool:
    return (
        isinstance(rel, str)
        and not rel.startswith("/")
        and ".." not in rel.split("/")
        and isinstance(e, dict)
        and isinstance(e.get("size"), int)
        and isinstance(e.get("sha256"), str)
    )


# ------------------------------------------------------------------------ sign and verify


def sign(
    run_path: str | Path, key_path: str | Path, exclude: Sequence[str] | None = None
) -> dict[str, Any]:
    """Rewrite RUN/manifest.json, sign its exact bytes with the Ed25519 private key at
    `key_path` and write RUN/manifest.sig. Returns the counts, the key's fingerprint and the
    files that changed since the previous manifest."""
    root = _root(run_path)
    key = load_private_key(key_path)
    try:
        previous: dict[str, Any] | None = _load_manifest(root)[1]["files"]
    except IntegrityError:
        previous = None
    globs = _globs(root, exclude)
    manifest = _write(root, _files(root, globs), globs)
    raw = (root / MANIFEST).read_bytes()
    fp = fingerprint(key.public_key())
    record = {
        "format": SIG_FORMAT,
        "algorithm": "ed25519",
        "key": fp,
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "signature": base64.b64encode(key.sign(DOMAIN + raw)).decode("ascii"),
        "signed": now(),
    }
    atomic_write_bytes(root / SIGNATURE, _seal(record))
    files = manifest["files"]
    changed = [
        k
        for k in sorted(files.keys() | (previous or {}).keys())
        if previous is not None and previous.get(k) != files.get(k)
    ]
    return {
        "run": str(root),
        "files": manifest["file_count"],
        "bytes": manifest["total_bytes"],
        "fingerprint": fp,
        "changed_since_previous": changed,
    }


def verify(run_path: str | Path, pubkey: str | Path | None = None) -> dict[str, Any]:
    """Re-hash every file of the run against manifest.json and, when `pubkey` is given, check
    manifest.sig against that key (the only key trusted). Raises IntegrityError naming the
    first problem and how many files differ; returns counts and a one-line summary."""
    root = _root(run_path)
    key = load_public_key(pubkey) if pubkey is not None else None
    try:
        raw, manifest = _load_manifest(root)
    except IntegrityError as e:
        raise IntegrityError(
            f"run '{root}' failed verification: {e.message}; its files cannot be checked",
            fix=e.fix or f"restore {MANIFEST} from a trusted copy, or sign the run again",
            problems=[e.message],
        ) from None
    status, fp, problems = _signature(root, raw, key)
    diff = _compare(root, manifest)
    fix = (
        f"restore the run from a trusted copy; if the change is intended, sign it again with "
        f"`danlu sign {root} --key KEY` (`danlu verify {root} --list` lists every difference)"
    )
    problems += [(p, fix) for p in diff["problems"]]
    if problems:
        n = len(diff["problems"])
        counts = ", ".join(f"{len(diff[k])} {k}" for k in ("changed", "missing", "added"))
        total = f"{n} file{'' if n == 1 else 's'} differ{'s' if n == 1 else ''} in total ({counts})"
        raise IntegrityError(
            f"run '{root}' failed verification: {problems[0][0]}"
            + (f"; {total}" if n else "; every file matches the manifest"),
            fix=problems[0][1],
            problems=[p for p, _ in problems],
        )
    signature = {
        "valid": f"signature by {fp} valid",
        "unsigned": "not signed",
        "not checked": f"signature by {fp} not checked (pass --pubkey to check it)",
    }
    n, total = len(manifest["files"]), sum(e["size"] for e in manifest["files"].values())
    summary = f"{n} files, {human_size(total)} verified; {signature[status]}"
    if manifest["exclude"]:
        summary += f"; not covered: {', '.join(manifest['exclude'])}"
    return {
        "run": str(root),
        "files": n,
        "bytes": total,
        "signature": status,
        "key": fp,
        "exclude": manifest["exclude"],
        "created": manifest["created"],
        "summary": summary,
    }


def require_verified(run_path: str | Path, pubkey: str | Path | None) -> dict[str, Any]:
    """The gate for the registry and the server when signing is required: the run must verify
    against the trusted public key, or IntegrityError / ConfigError is raised."""
    if pubkey is None:
        raise ConfigError(
            f"run '{run_path}' must be signed, but no trusted public key is configured",
            fix="configure the signer's public key (KEY.pub made by `danlu keygen`)",
        )
    return verify(run_path, pubkey)


def _signature(root: Path, raw: bytes, key: Any) -> tuple[str, str | None, list[tuple[str, str]]]:
    """(status, signer fingerprint, problems) of manifest.sig for these manifest bytes."""
    from cryptography.exceptions import InvalidSignature

    resign = f"sign it again with `danlu sign {root} --key KEY`"
    path = root / SIGNATURE
    if not path.is_file() and key is None:
        return "unsigned", None, []
    if not path.is_file():
        first = f"sign it with `danlu sign {root} --key KEY`"
        return "missing", None, [(f"it is not signed (no {SIGNATURE})", first)]
    try:
        sig = _unseal(path, path.read_bytes())
    except IntegrityError as e:
        return "damaged", None, [(e.message, resign)]
    if sig.get("format") != SIG_FORMAT or not all(
        isinstance(sig.get(k), str) for k in ("key", "manifest_sha256", "signature")
    ):
        return "damaged", None, [(f"{SIGNATURE} is not a {SIG_FORMAT} signature", resign)]
    fp, problems = sig["key"], []
    given = fingerprint(key) if key is not None else fp
    if given != fp:
        problems.append(
            (
                f"{SIGNATURE} was made by key {fp}, not by the given --pubkey {given}",
                f"pass the public key whose fingerprint is {fp}",
            )
        )
    if sig["manifest_sha256"] != hashlib.sha256(raw).hexdigest():
        problems.append(
            (
                f"{SIGNATURE} does not belong to this {MANIFEST} (one of them was "
                "changed after signing)",
                resign,
            )
        )
    if key is None or given != fp:
        return ("not checked" if not problems else "invalid"), fp, problems
    try:
        key.verify(base64.b64decode(sig["signature"], validate=True), DOMAIN + raw)
    except (InvalidSignature, ValueError):
        problems.append((f"the signature in {SIGNATURE} is not valid for {MANIFEST}", resign))
    return ("valid" if not problems else "invalid"), fp, problems


def _compare(root: Path, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Changed, missing and added files; `problems` describes them, changed ones first."""
    listed, present = manifest["files"], set(_walk(root, manifest["exclude"]))
    diff: dict[str, list[str]] = {"changed": [], "missing": [], "added": [], "problems": []}
    how = {}
    for rel in sorted(listed.keys() & present):
        if (got := _entry(root, rel)) != (want := listed[rel]):
            diff["changed"].append(rel)
            same = got["size"] == want["size"]
            how[rel] = "its SHA-256 differs" if same else f"{want['size']} → {got['size']} bytes"
    diff["missing"] = sorted(listed.keys() - present)
    diff["added"] = sorted(present - listed.keys())
    diff["problems"] = [
        *(f"'{rel}' changed ({how[rel]})" for rel in diff["changed"]),
        *(f"'{rel}' is missing" for rel in diff["missing"]),
        *(f"'{rel}' was added (it is not in {MANIFEST})" for rel in diff["added"]),
    ]
    return diff


# ------------------------------------------------------------------------------- helpers


def _root(run_path: str | Path) -> Path:
    root = Path(run_path)
    if not root.is_dir():
        raise CheckpointError(f"run directory '{root}' not found", fix="pass a run folder")
    return root


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _relative(root: Path, p: str | Path) -> str:
    """A path given relative to the run, or absolute / starting with the run's own path."""
    p = Path(p)
    if p.is_absolute() or p.is_relative_to(root):
        try:
            p = p.resolve().relative_to(root.resolve())
        except ValueError:
            raise ConfigError(f"'{p}' is not inside run '{root}'") from None
    if ".." in p.parts:
        raise ConfigError(f"'{p}' is not inside run '{root}'")
    return p.as_posix()


def _version() -> str:
    try:
        return metadata.version("danlu")
    except metadata.PackageNotFoundError:
        return "unknown"


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable
