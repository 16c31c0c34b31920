"""The model registry: named, numbered versions of run directories.

    ROOT/registry.sqlite              versions, stages and file lists (SQLite, WAL)
    ROOT/objects/sha256/ab/<hex>      every file stored once under its SHA-256, read-only
    ROOT/checkouts/<name>/<version>/  a version materialized as a run directory

Design. A version is a row plus a map "relative path → sha256 + size"; the bytes live in the
content-addressed store, so adding the same run twice stores nothing new. Objects are copied
to a temporary file, checked and renamed into place before the row is inserted in one
`BEGIN IMMEDIATE` transaction; garbage collection deletes objects only while holding the same
write lock, and `add` re-checks its objects under it, so concurrent adds, removes and garbage
collections never leave a version without its bytes. Version numbers are never reused. Names
and references are validated before any path is built, and every path is checked to resolve
inside ROOT. A checkout hard-links (else copies) the objects and re-hashes every file against
the record; any difference is an IntegrityError naming the file. With a trusted key, `add`
requires a valid signature and records the signer, which `resolve` checks. ROOT: the `root`
argument, else $DANLU_REGISTRY, else ./registry. SQLite lives in store_db, what a version
holds and how its files are written and checked in store_files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from danlu.errors import CheckpointError, ConfigError
from danlu.manifest import IntegrityError, require_verified
from danlu.rundir import RunDir, fsync_dir, now, sha256_file
from danlu.serve import store_db
from danlu.serve import store_files as files_

STAGES = ("dev", "staging", "prod")
DB = "registry.sqlite"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REF = re.compile(rf"(?P<name>{NAME.pattern})(?::(?P<spec>[1-9][0-9]{{0,8}}|{'|'.join(STAGES)}))?")
HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Version:
    """One registered version of a model; `files` maps relative path → {"sha256", "size"}."""

    name: str
    version: int
    stage: str
    weights_sha256: str
    created: str  # ISO 8601, UTC
    source: str  # the run directory it was added from
    task: str
    model_type: str
    variant: str | None  # the compression method of a variant
    metrics: dict
    lineage: dict
    files: dict[str, dict]
    signer: str | None = None  # fingerprint of the trusted key whose signature verified at add

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def size(self) -> int:
        return sum(e["size"] for e in self.files.values())


def check_name(name: str) -> str:
    """A model name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"model name {name!r} is not valid",
            fix="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "without '..'",
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | str | None]:
    """'name' → (name, None); 'name:3' → (name, 3); 'name:prod' → (name, 'prod')."""
    m = REF.fullmatch(ref) if isinstance(ref, str) else None
    if m is None or ".." in ref:
        raise ConfigError(
            f"registry reference {ref!r} is not valid",
            fix="use NAME, NAME:VERSION (a number) or NAME:STAGE (dev, staging or prod); "
            "names hold only letters, digits, '.', '_' and '-'",
        )
    spec = m["spec"]
    return m["name"], int(spec) if spec and spec.isdigit() else spec


def _weights_hash(run: Path, files: dict[str, dict], weights: list[str]) -> str:
    """The SHA-256 of the weights file; for an ensemble, of its members' "path hash" lines."""
    missing = [w for w in weights if w not in files]
    if missing:
        raise CheckpointError(f"run '{run}' holds {missing[0]} where the registry skips it")
    if len(weights) == 1:
        return files[weights[0]]["sha256"]
    lines = "".join(f"{w} {files[w]['sha256']}\n" for w in weights)
    return hashlib.sha256(lines.encode()).hexdigest()


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    return stage


class ModelStore:
    """Add, list, promote, remove and check out model versions under one root folder."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root or os.environ.get("DANLU_REGISTRY") or "registry")

    def __repr__(self) -> str:
        return f"ModelStore('{self.root}')"

    # ----------------------------------------------------------------------------- adding

    def add(
        self,
        run: str | Path,
        name: str,
        *,
        stage: str = "dev",
        trusted_key: str | Path | None = None,
    ) -> Version:
        """Record a completed run as the next version of `name`; its files go to the store."""
        check_name(name)
        check_stage(stage)
        rundir = RunDir.open(run)
        if self.root.resolve().is_relative_to(rundir.path.resolve()):
            raise ConfigError(
                f"registry root '{self.root}' is inside run '{rundir.path}'",
                fix="pass --root (or set DANLU_REGISTRY) to a folder outside the run",
            )
        signer = files_.check_manifest(rundir.path, trusted_key)
        facts = files_.describe(rundir)
        sources = files_.run_files(rundir.path)
        files = {rel: self._store(src) for rel, src in sources.items()}
        files_.match_manifest(rundir.path, files)
        digest = _weights_hash(rundir.path, files, facts.pop("weights"))
        with self._db(write=True) as db:
            for rel, entry in files.items():  # a garbage collection may have run meanwhile
                if not self._object(entry["sha256"]).is_file():
                    self._store(sources[rel], entry["sha256"])
            number = store_db.next_version(db, name)
            version = Version(
                name, number, stage, digest, now(), str(rundir.path.resolve()),
                files=files, signer=signer, **facts,
            )  # fmt: skip
            store_db.insert(db, vars(version), files)
        return version

    def _object(self, digest: str) -> Path:
        if not isinstance(digest, str) or not HEX.fullmatch(digest):
            raise IntegrityError(f"registry '{self.root}' records an invalid hash {digest!r}")
        return self._inside(self.root / "objects" / "sha256" / digest[:2] / digest)

    def _store(self, src: Path, expected: str | None = None) -> dict[str, Any]:
        """Copy `src` into the store unless an intact copy is there → {"sha256", "size"}."""
        digest, size = sha256_file(src), src.stat().st_size
        if expected not in (None, digest):
            raise CheckpointError(f"'{src}' changed while it was being added", fix="add it again")
        dest = self._object(digest)
        if not files_.intact(dest, digest, size):
            files_.write_object(src, dest, digest)
        return {"sha256": digest, "size": size}

    # ---------------------------------------------------------------------------- reading

    def versions(self, name: str | None = None) -> list[Version]:
        """Every version (of one model), oldest first."""
        with self._db() as db:
            rows = store_db.select(db, check_name(name) if name is not None else None) if db else []
        for row in rows:
            row["files"] = {files_.safe_rel(rel): e for rel, e in row["files"].items()}
        return [Version(**row) for row in rows]

    def names(self) -> list[str]:
        return sorted({v.name for v in self.versions()})

    def get(self, ref: str) -> Version:
        """A version by reference: NAME (its newest prod version, else its newest version),
        NAME:3, or NAME:STAGE (the newest version in that stage)."""
        name, spec = parse_ref(ref)
        found = self.versions(name)
        if not found:
            listed = ", ".join(self.names()) or "none"
            raise CheckpointError(
                f"no model '{name}' in registry '{self.root}'",
                fix=f"registered models: {listed}; add one with `danlu registry add RUN --name "
                f"{name}`",
            )
        numbers = ", ".join(str(v.version) for v in found)
        if spec is None:
            return ([v for v in found if v.stage == "prod"] or found)[-1]
        hits = [v for v in found if spec in (v.version, v.stage)]
        if not hits and isinstance(spec, int):
            raise CheckpointError(
                f"model '{name}' has no version {spec}", fix=f"versions: {numbers}"
            )
        if not hits:
            raise CheckpointError(
                f"model '{name}' has no version in stage {spec}",
                fix=f"promote one: `danlu registry promote {name}:N --stage {spec}` (N: {numbers})",
            )
        return hits[-1]

    # --------------------------------------------------------------------------- changing

    def promote(self, ref: str, stage: str) -> Version:
        """Move a version to `stage` (dev, staging or prod); other versions keep theirs."""
        version = self.get(ref)
        with self._db(write=True) as db:
            if not store_db.set_stage(db, version.name, version.version, check_stage(stage)):
                raise CheckpointError(f"{version.ref} was removed meanwhile")
        return replace(version, stage=stage)

    def remove(self, name: str, version: int | None = None) -> list[Version]:
        """Remove one version (or all versions) of a model, their checkouts, and the objects
        no other version holds."""
        self.get(name if version is None else f"{name}:{int(version)}")  # exists, or says why
        gone = [v for v in self.versions(name) if version in (None, v.version)]
        with self._db(write=True) as db:
            for v in gone:
                store_db.delete(db, v.name, v.version)
        for v in gone:  # every version gone: the model's whole checkouts folder
            folder = self._checkout_dir(v)
            shutil.rmtree(folder if version is not None else folder.parent, ignore_errors=True)
        self.collect_garbage()
        return gone

    def collect_garbage(self) -> int:
        """Delete objects no version holds (and temporaries older than a day); returns how
        many files were deleted."""
        objects, removed = self.root / "objects" / "sha256", 0
        with self._db(write=True) as db:  # holding the write lock: no add commits meanwhile
            keep = store_db.hashes(db)
            for path in sorted(objects.glob("*/*")) if objects.is_dir() else []:
                if path.name in keep:
                    continue
                with contextlib.suppress(OSError):  # a temporary may be renamed meanwhile
                    if path.name.startswith(".tmp-") and path.stat().st_mtime > time.time() - 86400:
                        continue  # an add in progress
                    self._inside(path).unlink()
                    removed += 1
        return removed

    # -------------------------------------------------------------------------- checkouts

    def checkout(self, ref: str) -> RunDir:
        """The version as a run directory under ROOT/checkouts/<name>/<version>/, every file
        checked against the record (an IntegrityError names the first that differs); an
        existing checkout is verified again and reused."""
        version = self.get(ref)
        target = self._checkout_dir(version)
        if target.is_dir():
            self._verify(version, target, target)
            return RunDir(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{version.version}-"))
        try:
            for rel, entry in version.files.items():
                dest = files_.under(tmp, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                obj = self._object(entry["sha256"])
                if not obj.is_file():
                    raise IntegrityError(
                        f"{version.ref}: the stored copy of '{rel}' is missing",
                        fix=self._fixes(version, target)[0],
                    )
                try:
                    os.link(obj, dest)
                except OSError:  # another file system, or hard links not allowed
                    shutil.copyfile(obj, dest)
            self._verify(version, tmp, target)
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # else a concurrent checkout of this version won
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(target.parent)
        return RunDir(target)

    def _checkout_dir(self, version: Version) -> Path:
        folder = self.root / "checkouts" / check_name(version.name) / str(int(version.version))
        return self._inside(folder)

    def _verify(self, version: Version, folder: Path, shown: Path) -> None:
        fixes = self._fixes(version, shown)
        files_.verify_checkout(version.ref, version.files, folder, self._object, fixes)

    @staticmethod
    def _fixes(version: Version, checkout: Path) -> tuple[str, str]:
        again = f"`danlu registry add {version.source} --name {version.name}`"
        return (
            f"restore the object by adding the run again ({again}), or remove {version.ref}",
            f"delete '{checkout}'; the next checkout makes it again (copy a checkout before "
            "writing into it)",
        )

    # ------------------------------------------------------------------------------ paths

    def _inside(self, path: Path) -> Path:
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ConfigError(f"'{path}' is outside the registry root '{self.root}'")
        return path

    def _db(self, write: bool = False) -> Any:
        return store_db.transaction(self._inside(self.root / DB), write)


# ------------------------------------------------------------------------------- resolve


def resolve(
    ref: str | Path, root: str | Path | None = None, *, trusted_key: str | Path | None = None
) -> tuple[str, RunDir]:
    """(served name, run directory) for a run folder (one with config.yaml) or a registry
    reference (NAME, NAME:VERSION, NAME:STAGE, checked out). With `trusted_key`, a run folder
    must verify against it, and a version must have been added with that key's signature."""
    path = Path(ref)
    try:
        is_run = (path / "config.yaml").is_file()
    except (OSError, ValueError):  # NUL bytes, names too long
        is_run = False
    if is_run:
        if trusted_key is not None:
            require_verified(path, trusted_key)
        return path.resolve().name, RunDir.open(path)
    store = ModelStore(root)
    try:
        name = parse_ref(str(ref))[0]
    except ConfigError:
        name = None
    names = store.names()
    if name not in names:
        raise CheckpointError(
            f"'{ref}' is neither a run directory (a folder with config.yaml) nor a model in "
            f"registry '{store.root}'",
            fix=f"registered models: {', '.join(names) or 'none'}; or pass a folder made by "
            "`danlu train`",
        )
    version = store.get(str(ref))
    if trusted_key is not None:
        _check_signer(version, trusted_key)
    return version.name, store.checkout(version.ref)


def _check_signer(version: Version, trusted_key: str | Path) -> None:
    from danlu.signing_keys import fingerprint, load_public_key

    trusted = fingerprint(load_public_key(trusted_key))
    if version.signer != trusted:
        how = f"by key {version.signer}" if version.signer else "without a verified signature"
        raise IntegrityError(
            f"{version.ref} was registered {how}, not signed by the trusted key {trusted}",
            fix=f"add the signed run again with `danlu registry add {version.source} --name "
            f"{version.name} --trusted-key {trusted_key}`",
        )
