"""Run-directory integrity: manifest.json, Ed25519 signatures, and every kind of tampering."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import danlu
import danlu.cli_integrity  # (registers keygen, sign and verify)
from conftest import tiny_config
from danlu import manifest as mf
from danlu import signing_keys as keys
from danlu.cli import app
from danlu.errors import CheckpointError, ConfigError
from danlu.manifest import IntegrityError
from danlu.rundir import atomic_write_json, save_safetensors

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FILES = [
    "checkpoints/step-2/model.safetensors",
    "checkpoints/step-2/state.json",
    "config.yaml",
    "metrics.json",
    "model.safetensors",
    "sub/notes.txt",
]


def fake_run(root: Path) -> Path:
    """A run folder as stages leave it (no training): config, weights, metrics, a checkpoint."""
    g = torch.Generator().manual_seed(0)
    (root / "sub").mkdir(parents=True)
    (root / "config.yaml").write_text("name: fake\nseed: 0\nmodel: {type: mlp}\n")
    save_safetensors(root / "model.safetensors", {"w": torch.randn(8, 4, generator=g)})
    atomic_write_json(root / "metrics.json", {"test": {"accuracy": 0.75}})
    (root / "sub" / "notes.txt").write_text("a note\n")
    save_safetensors(root / "checkpoints/step-2/model.safetensors", {"w": torch.zeros(3)})
    atomic_write_json(root / "checkpoints/step-2/state.json", {"step": 2})
    return root


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return fake_run(tmp_path / "run")


@pytest.fixture
def key(tmp_path: Path) -> tuple[Path, Path]:
    made = keys.keygen(tmp_path / "keys" / "signer")
    return Path(made["private"]), Path(made["public"])


@pytest.fixture
def signed(run: Path, key: tuple[Path, Path]) -> Path:
    mf.sign(run, key[0])
    return run


def flip(path: Path, at: int | None = None) -> None:
    """Flip the lowest bit of one byte (the middle one by default)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, ANSI.sub("", r.stdout), ANSI.sub("", r.stderr)


# ---------------------------------------------------------------------------------- manifest


def test_manifest_lists_every_file_with_size_and_sha256(run: Path) -> None:
    (run / ".metrics.json.x1y2.tmp").write_text("half-written")  # an atomic write in progress
    m = mf.write_manifest(run)
    assert list(m["files"]) == FILES  # sorted POSIX paths, temporaries and manifest left out
    for rel, entry in m["files"].items():
        data = (run / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert m["total_bytes"] == sum(e["size"] for e in m["files"].values())
    assert (m["algorithm"], m["format"], m["file_count"]) == ("sha256", "danlu-manifest/1", 6)
    assert m["danlu_version"] == danlu.__version__ and m["created"].startswith("20")
    on_disk = json.loads((run / "manifest.json").read_text())
    assert on_disk["files"] == m["files"] and len(on_disk["self_sha256"]) == 64
    assert mf.verify(run)["summary"].startswith(f"6 files, {mf.human_size(m['total_bytes'])}")
    assert mf.verify(run)["summary"].endswith("verified; not signed")


def test_sign_then_verify_names_the_signer(signed: Path, key: tuple[Path, Path]) -> None:
    result = mf.verify(signed, key[1])
    fp = keys.fingerprint(keys.load_public_key(key[1]))
    assert result["signature"] == "valid" and result["key"] == fp
    assert re.fullmatch(r"ed25519:[0-9a-f]{32}", fp)
    assert result["summary"].endswith(f"verified; signature by {fp} valid")
    unchecked = mf.verify(signed)  # no key given: the signature is never trusted on its own
    assert unchecked["signature"] == "not checked"
    assert "not checked (pass --pubkey to check it)" in unchecked["summary"]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("name", [*FILES, "manifest.json", "manifest.sig"])
def test_flipping_any_byte_of_any_file_is_detected(
    signed: Path, key: tuple[Path, Path], name: str, where: str
) -> None:
    path = signed / name
    size = path.stat().st_size
    flip(path, {"first": 0, "middle": size // 2, "last": size - 1}[where])
    for pubkey in (key[1], None):
        with pytest.raises(IntegrityError, match="failed verification") as e:
            mf.verify(signed, pubkey)
        if name in FILES:
            assert f"'{name}' changed (its SHA-256 differs); 1 file differs in total" in str(
                e.value
            )
        else:
            assert name in str(e.value)


def test_missing_and_added_files_and_the_total_count(signed: Path) -> None:
    (signed / "metrics.json").unlink()
    with pytest.raises(IntegrityError, match=r"'metrics.json' is missing; 1 file differs"):
        mf.verify(signed)
    (signed / "sub" / "extra.bin").write_bytes(b"\x00")
    (signed / "config.yaml").write_text("name: evil\n")
    flip(signed / "model.safetensors")
    with pytest.raises(IntegrityError) as e:
        mf.verify(signed)
    msg = str(e.value)
    assert "failed verification: 'config.yaml' changed (38 → 11 bytes); 4 files differ in " in msg
    assert "(2 changed, 1 missing, 1 added)" in msg and "\n" not in msg
    assert e.value.problems == [
        "'config.yaml' changed (38 → 11 bytes)",
        "'model.safetensors' changed (its SHA-256 differs)",
        "'metrics.json' is missing",
        "'sub/extra.bin' was added (it is not in manifest.json)",
    ]
    assert isinstance(e.value, CheckpointError)


def test_a_consistently_edited_manifest_is_caught_only_by_the_signature(
    signed: Path, key: tuple[Path, Path]
) -> None:
    flip(signed / "model.safetensors")  # the attacker swaps weights and fixes the manifest
    m = json.loads((signed / "manifest.json").read_text())
    m["files"]["model.safetensors"]["sha256"] = mf.sha256_file(signed / "model.safetensors")
    (signed / "manifest.json").write_bytes(mf._seal(m))
    with pytest.raises(IntegrityError, match=r"manifest.sig does not belong to this manifest.json"):
        mf.verify(signed)
    sig = json.loads((signed / "manifest.sig").read_text())  # and fixes the signature file too
    sig["manifest_sha256"] = hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    (signed / "manifest.sig").write_bytes(mf._seal(sig))
    assert mf.verify(signed)["signature"] == "not checked"  # without a key nothing can tell
    with pytest.raises(IntegrityError, match=r"the signature in manifest.sig is not valid for"):
        mf.verify(signed, key[1])


def test_a_swapped_signature_and_a_wrong_key(
    signed: Path, key: tuple[Path, Path], tmp_path: Path
) -> None:
    other = fake_run(tmp_path / "other")
    (other / "metrics.json").write_text('{"test": {"accuracy": 0.99}}\n')
    mf.sign(other, key[0])
    shutil.copy(other / "manifest.sig", signed / "manifest.sig")  # a signature of another run
    with pytest.raises(IntegrityError, match=r"does not belong to this manifest.json"):
        mf.verify(signed, key[1])
    mf.sign(signed, key[0])
    stranger = keys.keygen(tmp_path / "stranger")
    with pytest.raises(IntegrityError) as e:
        mf.verify(signed, stranger["public"])
    fp = keys.fingerprint(keys.load_public_key(key[1]))
    assert f"manifest.sig was made by key {fp}, not by the given --pubkey " in str(e.value)
    assert f"{stranger['fingerprint']}; every file matches the manifest" in str(e.value)
    assert f"pass the public key whose fingerprint is {fp}" in str(e.value)
    mf.sign(signed, stranger["private"])  # signed by someone else than the trusted key
    with pytest.raises(IntegrityError, match=f"made by key {stranger['fingerprint']}"):
        mf.verify(signed, key[1])


def test_unsigned_or_unmanifested_runs(run: Path, key: tuple[Path, Path]) -> None:
    with pytest.raises(
        IntegrityError,
        match=r"failed verification: it has no manifest.json; its files cannot be checked. write one with `danlu sign",
    ):
        mf.verify(run)
    mf.write_manifest(run)
    with pytest.raises(IntegrityError, match=r"it is not signed \(no manifest.sig\)"):
        mf.verify(run, key[1])
    with pytest.raises(ConfigError, match="must be signed, but no trusted public key"):
        mf.require_verified(run, None)
    mf.sign(run, key[0])
    assert mf.require_verified(run, key[1])["signature"] == "valid"
    (run / "sub" / "notes.txt").write_text("changed\n")
    with pytest.raises(IntegrityError, match=r"'sub/notes.txt' changed"):
        mf.require_verified(run, key[1])
    with pytest.raises(CheckpointError, match="run directory 'nope' not found"):
        mf.verify("nope")


def test_exclude_globs_are_recorded_and_guarded(run: Path, key: tuple[Path, Path]) -> None:
    signed = mf.sign(run, key[0], exclude=["checkpoints/"])
    assert signed["files"] == 4
    flip(run / "checkpoints/step-2/model.safetensors")  # not covered, by request
    result = mf.verify(run, key[1])
    assert result["summary"].endswith("valid; not covered: checkpoints/")
    assert list(mf.write_manifest(run)["files"]) == FILES[2:]  # None keeps the recorded globs
    (run / "linked").symlink_to(run / "sub", target_is_directory=True)
    with pytest.raises(IntegrityError, match=r"'.*linked' is a symbolic link to a folder"):
        mf.write_manifest(run)
    assert "linked/notes.txt" not in mf.write_manifest(run, exclude=["linked"])["files"]
    for bad in ("*.safetensors", "*", "../x"):
        with pytest.raises(ConfigError, match=f"exclude glob '{re.escape(bad)}'"):
            mf.write_manifest(run, exclude=[bad])


def test_update_manifest_writes_a_full_one_for_a_run_without(run: Path) -> None:
    assert list(mf.update_manifest(run, ["metrics.json"])["files"]) == FILES
    assert list(mf.update_manifest(run, ["checkpoints"])["files"]) == FILES


def test_update_manifest_repins_only_what_a_verb_wrote(
    signed: Path, key: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    flip(signed / "model.safetensors")  # tampering between two verbs...
    atomic_write_json(signed / "metrics.json", {"test": {"accuracy": 0.8}})  # ...then `evaluate`
    (signed / "sub" / "plot.png").write_bytes(b"png")
    with caplog.at_level(logging.WARNING, logger="danlu"):
        m = mf.update_manifest(signed, ["metrics.json", signed / "sub"])
    assert "was signed: its signature no longer matches" in caplog.text
    assert "sub/plot.png" in m["files"]
    with pytest.raises(IntegrityError) as e:
        mf.verify(signed)
    assert e.value.problems == [
        "manifest.sig does not belong to this manifest.json (one of them was changed after signing)",
        "'model.safetensors' changed (its SHA-256 differs)",  # still caught: not re-pinned
    ]
    with pytest.raises(ConfigError, match="is not inside run"):
        mf.update_manifest(signed, ["../elsewhere.txt"])
    again = mf.sign(signed, key[0])
    assert again["changed_since_previous"] == ["model.safetensors"]


# -------------------------------------------------------------------------------------- keys


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    made = keys.keygen(tmp_path / "k")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k.pub").stat().st_mode) == 0o644
    assert (tmp_path / "k").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert made["fingerprint"] == keys.fingerprint(
        keys.load_private_key(tmp_path / "k").public_key()
    )
    with pytest.raises(ConfigError, match=r"'.*k' already exists. choose another --out"):
        keys.keygen(tmp_path / "k")
    assert keys.keygen(tmp_path / "k", force=True)["fingerprint"] != made["fingerprint"]


def write_key(path: Path, key, *, public: bool = False, fmt: str = "pem", password=None) -> Path:
    from cryptography.hazmat.primitives import serialization as ser

    if public:
        path.write_bytes(
            key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
            if fmt == "ssh"
            else key.public_key().public_bytes(
                ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path
    enc = ser.BestAvailableEncryption(password) if password else ser.NoEncryption()
    form = ser.PrivateFormat.OpenSSH if fmt == "ssh" else ser.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(ser.Encoding.PEM, form, enc))
    return path


def test_key_file_errors_are_one_line_each(
    signed: Path, tmp_path: Path, key: tuple[Path, Path]
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "junk").write_text("hello\n")
    cases = [
        (keys.load_private_key, tmp_path / "absent", "--key '.*absent' not found"),
        (keys.load_private_key, tmp_path / "junk", "--key '.*junk' is not a usable private key"),
        (keys.load_private_key, key[1], "is a public key; signing needs the private key"),
        (keys.load_private_key, write_key(tmp_path / "rsa", rsa_key), "is a RSA key; danlu signs"),
        (keys.load_public_key, tmp_path / "absent", "--pubkey '.*absent' not found"),
        (keys.load_public_key, tmp_path / "junk", "--pubkey '.*junk' is not a PEM public key"),
        (keys.load_public_key, key[0], "is a private key; verifying needs the public key"),
        (keys.load_public_key, write_key(tmp_path / "r.pub", rsa_key, public=True), "is a RSA key"),
    ]
    for load, path, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            load(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"--key '.*' not found"):  # fails before any hashing
        mf.sign(signed, tmp_path / "absent")


def test_encrypted_and_openssh_keys(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    k = ed25519.Ed25519PrivateKey.generate()
    locked = write_key(tmp_path / "locked", k, password=b"s3cret")
    with pytest.raises(ConfigError, match=r"is encrypted. set DANLU_KEY_PASSPHRASE"):
        mf.sign(run, locked)
    monkeypatch.setenv("DANLU_KEY_PASSPHRASE", "wrong")
    with pytest.raises(ConfigError, match="not a usable private key \\(its passphrase is wrong"):
        mf.sign(run, locked)
    monkeypatch.setenv("DANLU_KEY_PASSPHRASE", "s3cret")
    mf.sign(run, locked)
    ssh_pub = write_key(tmp_path / "id.pub", k, public=True, fmt="ssh")
    assert ssh_pub.read_text().startswith("ssh-ed25519 ")
    assert mf.verify(run, ssh_pub)["signature"] == "valid"
    monkeypatch.delenv("DANLU_KEY_PASSPHRASE")
    mf.sign(run, write_key(tmp_path / "id", k, fmt="ssh"))
    assert mf.verify(run, ssh_pub)["key"] == keys.fingerprint(k.public_key())


# --------------------------------------------------------------------------------------- CLI


def test_cli_keygen_sign_verify(run: Path, tmp_path: Path) -> None:
    code, out, _ = cli("keygen", "--out", tmp_path / "cli_key")
    assert code == 0 and "(private, keep it secret)" in out
    fp = re.search(r"fingerprint: (ed25519:[0-9a-f]{32})", out).group(1)
    code, out, _ = cli("sign", run, "--key", tmp_path / "cli_key", "--exclude", "sub/")
    assert code == 0 and f"signed {run}: 5 files" in out and f"key {fp}" in out
    code, out, _ = cli("verify", run, "--pubkey", tmp_path / "cli_key.pub")
    assert code == 0
    assert out.strip().endswith(f"verified; signature by {fp} valid; not covered: sub/")
    code, out, _ = cli("verify", run)
    assert code == 0 and f"signature by {fp} not checked (pass --pubkey" in out

    flip(run / "metrics.json", 5)
    (run / "new.txt").write_text("x")
    code, out, err = cli("verify", run, "--pubkey", tmp_path / "cli_key.pub")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: run '{run}' failed verification: 'metrics.json' changed")
    assert "2 files differ in total (1 changed, 0 missing, 1 added)" in err
    code, out, err = cli("verify", run, "--list")
    assert (
        code == 2
        and out.split("\n")[1].strip() == "'new.txt' was added (it is not in manifest.json)"
    )

    code, out, err = cli("sign", run, "--key", tmp_path / "cli_key.pub")
    assert code == 2 and err.count("\n") == 1 and "is a public key; signing needs" in err
    code, _, err = cli("verify", run, "--pubkey", tmp_path / "cli_key")
    assert code == 2 and "is a private key; verifying needs the public key" in err
    code, out, _ = cli("sign", run, "--key", tmp_path / "cli_key")
    assert code == 0 and "2 changed since the previous manifest" in out and "  new.txt" in out
    assert cli("verify", run, "--pubkey", tmp_path / "cli_key.pub")[0] == 0


# ---------------------------------------------------------------------------------- real run


def test_a_real_trained_run_signs_verifies_and_catches_a_flip_in_every_file(
    blobs_csv: Path, tmp_path: Path, key: tuple[Path, Path]
) -> None:
    cfg = tiny_config(
        str(blobs_csv), data={"label": "kind"}, train={"epochs": 2, "checkpoint_every": 5}
    )
    run = danlu.train(cfg, run_dir=tmp_path / "real", show_progress=False).run.path
    signed = mf.sign(run, key[0])
    files = json.loads((run / "manifest.json").read_text())["files"]
    core = ["config.yaml", "lineage.json", "data_card.json", "model.safetensors", "history.jsonl"]
    assert set(core) <= set(files) and any(f.startswith("checkpoints/step-") for f in files)
    assert signed["files"] == len(files) and mf.verify(run, key[1])["signature"] == "valid"
    for name in [*files, "manifest.json", "manifest.sig"]:
        copy = tmp_path / "copy"
        shutil.copytree(run, copy)
        flip(copy / name)
        with pytest.raises(IntegrityError) as e:
            mf.verify(copy, key[1])
        expected = f"'{name}' changed" if name in files else name
        assert f"run '{copy}' failed verification: {expected}" in str(e.value)
        shutil.rmtree(copy)
