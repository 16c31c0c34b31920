"""Ed25519 keys for signing run manifests (`danlu keygen`, `danlu sign --key`, `danlu verify
--pubkey`): generating a pair, loading either half with one clear line per way a key file can
be wrong, and the fingerprint that names a key in messages. Uses the `cryptography` package.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from danlu.errors import ConfigError
from danlu.rundir import atomic_write_bytes

PASSPHRASE_ENV = "DANLU_KEY_PASSPHRASE"


def keygen(path: str | Path, *, force: bool = False) -> dict[str, str]:
    """Write an Ed25519 private key to PATH (PKCS8 PEM, mode 0600) and its public key to
    PATH.pub (SubjectPublicKeyInfo PEM); return both paths and the key's fingerprint."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private, public = Path(path), Path(f"{path}.pub")
    for p in (private, public):
        if p.exists() and not force:
            raise ConfigError(f"'{p}' already exists", fix="choose another --out, or --force")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    atomic_write_bytes(private, pem)  # its temporary file is created with mode 0600
    os.chmod(private, 0o600)
    pub = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(public, pub)
    os.chmod(public, 0o644)
    return {
        "private": str(private),
        "public": str(public),
        "fingerprint": fingerprint(key.public_key()),
    }


def fingerprint(public_key: Any) -> str:
    """'ed25519:' + the first 32 hex digits of the SHA-256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization as ser

    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def load_private_key(path: str | Path) -> Any:
    """An Ed25519 private key from a PEM (PKCS8 / OpenSSH) file; encrypted keys take their
    passphrase from $DANLU_KEY_PASSPHRASE. One ConfigError line per way it can be wrong."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data, make = _key_bytes(path, "--key"), "make a key pair with `danlu keygen --out KEY`"
    if b"PUBLIC KEY" in data or data.lstrip().startswith(b"ssh-"):
        raise ConfigError(
            f"--key '{path}' is a public key; signing needs the private key",
            fix="pass the file made by `danlu keygen --out KEY`, not KEY.pub",
        )
    ssh = b"OPENSSH PRIVATE KEY" in data
    load = ser.load_ssh_private_key if ssh else ser.load_pem_private_key
    password = os.environ.get(PASSPHRASE_ENV, "").encode() or None
    try:
        try:
            key = load(data, None)
        except TypeError:  # encrypted
            if password is None:
                raise ConfigError(
                    f"--key '{path}' is encrypted", fix=f"set {PASSPHRASE_ENV} to its passphrase"
                ) from None
            key = load(data, password)
    except (ValueError, UnsupportedAlgorithm):
        what = "its passphrase is wrong" if password and b"ENCRYPTED" in data else _why(data)
        raise ConfigError(
            f"--key '{path}' is not a usable private key ({what})", fix=make
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"--key '{path}' is a {_kind(key)} key; danlu signs with Ed25519 keys", fix=make
        )
    return key


def load_public_key(path: str | Path) -> Any:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) or `ssh-ed25519` file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _key_bytes(path, "--pubkey")
    if b"PRIVATE KEY" in data:
        raise ConfigError(
            f"--pubkey '{path}' is a private key; verifying needs the public key",
            fix="pass KEY.pub (and keep the private key secret)",
        )
    try:
        ssh = data.lstrip().startswith(b"ssh-")
        key = ser.load_ssh_public_key(data.strip()) if ssh else ser.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"--pubkey '{path}' is not a PEM public key ({_why(data)})",
            fix="pass the KEY.pub written by `danlu keygen --out KEY`",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(
            f"--pubkey '{path}' is a {_kind(key)} key; danlu signs with Ed25519",
            fix="pass the KEY.pub written by `danlu keygen --out KEY`",
        )
    return key


def _key_bytes(path: str | Path, option: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{option} '{p}' not found", fix="make a key pair with `danlu keygen --out KEY`"
        )
    if p.stat().st_size > 1 << 16:
        raise ConfigError(f"{option} '{p}' is not a key file (it is over 64 kB)")
    return p.read_bytes()


def _why(data: bytes) -> str:
    return "its key block does not parse" if b"-----BEGIN" in data else "no -----BEGIN block"


def _kind(key: Any) -> str:
    name = type(key).__name__
    return name.removesuffix("PrivateKey").removesuffix("PublicKey").lstrip("_") or name
