"""The model registry's metadata (danlu.serve.store): one SQLite file, ROOT/registry.sqlite.

    names     (name, last)                        the last version number given: never reused
    versions  (name, version, stage, ..., signer) one row per version; JSON in metrics, lineage
    files     (name, version, path, sha256, size) what each version holds

Every operation runs in one transaction on its own connection (so threads and processes
share the file safely): `BEGIN IMMEDIATE` when writing, which takes SQLite's write lock at the
start, so two adds never draw the same version number. The journal is WAL (readers do not
block the writer). The schema's version is PRAGMA user_version; a newer one is refused.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from danlu.errors import CheckpointError

SCHEMA = 1
FIELDS = (
    "name", "version", "stage", "weights_sha256", "created", "source", "task", "model_type",
    "variant", "metrics", "lineage", "signer",
)  # fmt: skip
JSON = ("metrics", "lineage")
TABLES = """
CREATE TABLE names (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
CREATE TABLE versions (name TEXT NOT NULL, version INTEGER NOT NULL, stage TEXT NOT NULL,
  weights_sha256 TEXT NOT NULL, created TEXT NOT NULL, source TEXT NOT NULL, task TEXT NOT NULL,
  model_type TEXT NOT NULL, variant TEXT, metrics TEXT NOT NULL, lineage TEXT NOT NULL,
  signer TEXT, PRIMARY KEY (name, version));
CREATE TABLE files (name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL,
  sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (name, version, path));
CREATE INDEX files_by_hash ON files (sha256)
"""


@contextlib.contextmanager
def transaction(path: Path, write: bool = False) -> Iterator[sqlite3.Connection | None]:
    """A connection inside one transaction, committed when the block ends (rolled back on an
    error); None when reading a registry that holds nothing yet."""
    if not write and not path.is_file():
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        schema = db.execute("PRAGMA user_version").fetchone()[0]
        if schema > SCHEMA:
            raise CheckpointError(
                f"registry '{path.parent}' has schema {schema}; this danlu reads {SCHEMA}",
                fix="upgrade danlu",
            )
        if schema == 0 and write:
            for statement in TABLES.strip().split(";\n"):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA}")
        yield db if schema or write else None
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def next_version(db: sqlite3.Connection, name: str) -> int:
    db.execute("INSERT OR IGNORE INTO names VALUES (?, 0)", (name,))
    db.execute("UPDATE names SET last = last + 1 WHERE name = ?", (name,))
    return db.execute("SELECT last FROM names WHERE name = ?", (name,)).fetchone()[0]


def insert(db: sqlite3.Connection, row: dict[str, Any], files: dict[str, dict]) -> None:
    values = [json.dumps(row[f], default=str) if f in JSON else row[f] for f in FIELDS]
    marks = ", ".join("?" * len(FIELDS))
    db.execute(f"INSERT INTO versions ({', '.join(FIELDS)}) VALUES ({marks})", values)
    db.executemany(
        "INSERT INTO files VALUES (?, ?, ?, ?, ?)",
        [(row["name"], row["version"], rel, e["sha256"], e["size"]) for rel, e in files.items()],
    )


def select(db: sqlite3.Connection, name: str | None) -> list[dict[str, Any]]:
    """Rows of versions (of one name), oldest first, each with "files": {path: entry}."""
    where, args = ("WHERE name = ?", (name,)) if name is not None else ("", ())
    query = f"SELECT {', '.join(FIELDS)} FROM versions {where} ORDER BY name, version"
    rows = [dict(zip(FIELDS, r, strict=True)) for r in db.execute(query, args)]
    held: dict[tuple[str, int], dict[str, dict]] = {}
    query = f"SELECT name, version, path, sha256, size FROM files {where} ORDER BY path"
    for n, v, path, digest, size in db.execute(query, args):
        held.setdefault((n, v), {})[path] = {"sha256": digest, "size": size}
    for row in rows:
        row.update({f: json.loads(row[f]) for f in JSON})
        row["files"] = held.get((row["name"], row["version"]), {})
    return rows


def set_stage(db: sqlite3.Connection, name: str, version: int, stage: str) -> bool:
    query = "UPDATE versions SET stage = ? WHERE name = ? AND version = ?"
    return db.execute(query, (stage, name, version)).rowcount == 1


def delete(db: sqlite3.Connection, name: str, version: int) -> None:
    for table in ("versions", "files"):
        db.execute(f"DELETE FROM {table} WHERE name = ? AND version = ?", (name, version))


def hashes(db: sqlite3.Connection) -> set[str]:
    """Every object some version holds."""
    return {row[0] for row in db.execute("SELECT DISTINCT sha256 FROM files")}
