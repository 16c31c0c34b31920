"""The model registry: versions, stages, the content-addressed store, checkouts verified file
by file, traversal refused, garbage collection, signatures, and concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import danlu
from conftest import tiny_config
from danlu import signing_keys
from danlu.errors import CheckpointError, ConfigError
from danlu.manifest import IntegrityError, sign
from danlu.serve.predictor import Predictor
from danlu.serve.store import STAGES, ModelStore, Version, parse_ref, resolve

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "red", "blue", "green", "big", "small"]
TABLE_FILES = {
    "config.yaml", "data_card.json", "history.jsonl", "lineage.json", "metrics.json",
    "model.safetensors", "preprocess.json", "compress_report.json", "compress_report.html",
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny table classifier (evaluated, so it has metrics.json; with a checkpoints/ folder
    and a dynamic-int8 variant under compressed/) and a tiny text classifier."""
    root = tmp_path_factory.mktemp("store_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DANLU_CACHE", str(root / "cache"))
        rng = np.random.default_rng(0)
        y = np.arange(120) % 3
        pts = np.array([[0, 0], [4, 4], [0, 4]])[y] + rng.normal(0, 0.5, size=(120, 2))
        table = pd.DataFrame(
            {"a": pts[:, 0], "b": pts[:, 1], "kind": np.array(["ant", "bee", "cat"])[y]}
        )
        table.to_csv(root / "blobs.csv", index=False)
        cfg = tiny_config(str(root / "blobs.csv"), data={"label": "kind"})
        tab = danlu.train(cfg, run_dir=root / "tab", show_progress=False).run.path
        danlu.evaluate(tab, "test")
        variants = [{"name": "dynamic-int8", "method": "dynamic_int8"}]
        danlu.compress(tab, {"variants": variants}, measure=False)
        words = random.Random(0)
        rows = []
        for i in range(120):
            text = [words.choice(WORDS) for _ in range(5)] + (["zebra"] if i % 2 else [])
            rows.append({"text": " ".join(text), "label": "yes" if i % 2 else "no"})
        pd.DataFrame(rows).to_csv(root / "texts.csv", index=False)
        cfg = tiny_config(
            str(root / "texts.csv"),
            data={"text": "text", "label": "label",
                  "tokenizer": {"type": "wordpiece", "vocab_size": 60, "min_frequency": 1}},
            model={"type": "rnn", "num_layers": 1, "dim": 16, "hidden_size": 16},
            train={"epochs": 2},
        )  # fmt: skip
        del cfg["model"]["hidden_sizes"]
        text = danlu.train(cfg, run_dir=root / "text", show_progress=False).run.path
        yield {"tab": tab, "text": text, "int8": tab / "compressed" / "dynamic-int8"}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "reg")


def objects(store: ModelStore) -> list[Path]:
    return sorted(p for p in (store.root / "objects").rglob("*") if p.is_file())


def copy_run(src: Path, dest: Path, manifest: bool = True) -> Path:
    shutil.copytree(src, dest)
    if not manifest:
        (dest / "manifest.json").unlink()
    return dest


def flip(path: Path) -> None:
    """Flip one bit in the middle of a file, in place (objects are read-only: allow it)."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    with open(path, "r+b") as f:  # in place: a hard-linked checkout sees it too
        f.write(data)


ROWS = [{"a": 0.1, "b": 0.2}, {"a": 4.0, "b": 3.9}, {"a": 0.0, "b": 4.2}]


# ------------------------------------------------------------------------- round trip


def test_add_records_the_run(store, runs):
    v = store.add(runs["tab"], "blobs")
    assert (v.name, v.version, v.stage, v.task, v.model_type, v.variant) == (
        "blobs", 1, "dev", "classification", "mlp", None,
    )  # fmt: skip
    weights = runs["tab"] / "model.safetensors"
    assert v.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert set(v.files) == TABLE_FILES  # no checkpoints/, compressed/, manifest.json
    assert v.files["model.safetensors"] == {
        "sha256": v.weights_sha256,
        "size": weights.stat().st_size,
    }
    assert v.lineage["status"] == "completed" and v.lineage["run"] == "tab"
    assert (
        v.metrics["test"]["accuracy"]
        == json.loads((runs["tab"] / "metrics.json").read_text())["test"]["accuracy"]
    )
    assert v.source == str(runs["tab"].resolve())
    assert v.created.endswith("+00:00") and v.signer is None
    assert store.versions() == [v] and store.get("blobs:1") == v
    assert (store.root / "registry.sqlite").is_file()
    db = sqlite3.connect(store.root / "registry.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1


def test_versions_increment_and_stage_references(store, runs):
    assert [store.add(runs["tab"], "m").version for _ in range(3)] == [1, 2, 3]
    assert store.get("m").version == 3  # no prod version: the newest
    assert store.promote("m:1", "prod").stage == "prod"
    assert store.promote("m:2", "staging").stage == "staging"
    assert store.get("m").version == 1  # the newest prod version
    assert (store.get("m:prod").version, store.get("m:staging").version) == (1, 2)
    assert store.get("m:dev").version == 3
    assert [v.stage for v in store.versions("m")] == ["prod", "staging", "dev"]
    with pytest.raises(CheckpointError, match=r"model 'm' has no version 7. versions: 1, 2, 3"):
        store.get("m:7")
    store.promote("m:1", "dev")
    with pytest.raises(CheckpointError, match=r"no version in stage prod"):
        store.get("m:prod")
    with pytest.raises(ConfigError, match=r"stage 'live' is not one of dev, staging, prod"):
        store.promote("m:1", "live")
    with pytest.raises(
        CheckpointError, match=r"no model 'other' in registry .*registered models: m"
    ):
        store.get("other")


def test_version_numbers_are_never_reused(store, runs):
    store.add(runs["tab"], "m")
    store.add(runs["tab"], "m")
    assert [v.ref for v in store.remove("m", 2)] == ["m:2"]
    assert store.add(runs["tab"], "m").version == 3
    assert [v.version for v in store.remove("m")] == [1, 3]
    assert store.versions("m") == [] and objects(store) == []
    assert store.add(runs["tab"], "m").version == 4


def test_identical_files_are_stored_once(store, runs):
    first = store.add(runs["tab"], "a")
    stored = objects(store)
    assert len(stored) == len({e["sha256"] for e in first.files.values()})
    store.add(runs["tab"], "a")
    store.add(copy_run(runs["tab"], store.root.parent / "copy"), "b")
    assert objects(store) == stored  # nothing new
    obj = store.root / "objects" / "sha256" / first.weights_sha256[:2] / first.weights_sha256
    assert obj in stored and oct(obj.stat().st_mode & 0o777) == "0o444"


# -------------------------------------------------------------------------- checkouts


def test_checkout_predicts_like_the_run(store, runs):
    store.add(runs["tab"], "blobs")
    run = store.checkout("blobs")
    assert run.path == store.root / "checkouts" / "blobs" / "1"
    assert {p.relative_to(run.path).as_posix() for p in run.path.rglob("*")} == TABLE_FILES
    expected = Predictor.load(runs["tab"]).predict(ROWS)
    pd.testing.assert_frame_equal(Predictor.load(run).predict(ROWS), expected)
    assert store.checkout("blobs:1").path == run.path  # verified again and reused


def test_text_run_and_compressed_variant_check_out_and_predict(store, runs):
    v = store.add(runs["text"], "texts")
    assert "tokenizer.json" in v.files
    texts = ["the cat zebra sat", "a big dog"]
    expected = Predictor.load(runs["text"]).predict(texts)
    pd.testing.assert_frame_equal(Predictor.load(store.checkout("texts")).predict(texts), expected)
    variant = store.add(runs["int8"], "blobs-int8")
    assert variant.variant == "dynamic_int8" and "compression.json" in variant.files
    expected = Predictor.load(runs["int8"]).predict(ROWS)
    pd.testing.assert_frame_equal(
        Predictor.load(store.checkout("blobs-int8")).predict(ROWS), expected
    )


def test_an_ensemble_holds_its_members(store, runs, tmp_path):
    other = copy_run(runs["tab"], tmp_path / "other")
    danlu.ensemble([runs["tab"], other], tmp_path / "ens", evaluate=False)
    v = store.add(tmp_path / "ens", "ens")
    weights = ["members/0/model.safetensors", "members/1/model.safetensors"]
    assert set(weights) <= set(v.files) and v.model_type == "ensemble"
    lines = "".join(f"{w} {v.files[w]['sha256']}\n" for w in weights)
    assert v.weights_sha256 == hashlib.sha256(lines.encode()).hexdigest()
    expected = Predictor.load(tmp_path / "ens").predict(ROWS)
    pd.testing.assert_frame_equal(Predictor.load(store.checkout("ens")).predict(ROWS), expected)


def test_onnx_variant_weights_are_model_onnx(store, runs, tmp_path):
    run = copy_run(runs["int8"], tmp_path / "onnx", manifest=False)
    (run / "model.safetensors").unlink()
    (run / "model.onnx").write_bytes(b"onnx bytes")
    (run / "compression.json").write_text(json.dumps({"method": "onnx", "format": "onnx"}))
    v = store.add(run, "o")
    assert v.variant == "onnx" and v.weights_sha256 == hashlib.sha256(b"onnx bytes").hexdigest()


def test_a_damaged_object_is_named_on_checkout_and_repaired_by_adding_again(store, runs):
    v = store.add(runs["tab"], "blobs")
    digest = v.files["preprocess.json"]["sha256"]
    flip(store.root / "objects" / "sha256" / digest[:2] / digest)
    with pytest.raises(IntegrityError) as e:
        store.checkout("blobs")
    assert "'preprocess.json' differs from the registered file" in e.value.message
    assert "its stored object is damaged" in e.value.message
    assert "danlu registry add" in e.value.fix
    assert not (store.root / "checkouts" / "blobs" / "1").exists()  # nothing half-made
    store.add(runs["tab"], "blobs")  # an intact copy replaces the damaged object
    pd.testing.assert_frame_equal(
        Predictor.load(store.checkout("blobs:1")).predict(ROWS),
        Predictor.load(runs["tab"]).predict(ROWS),
    )


def test_an_altered_checkout_file_is_named(store, runs):
    store.add(runs["tab"], "blobs")
    run = store.checkout("blobs")
    path = run.path / "config.yaml"
    text = path.read_text()
    path.unlink()  # replaced, not edited in place: the stored object stays intact
    path.write_text(text.replace("seed: 0", "seed: 1"))
    with pytest.raises(IntegrityError, match=r"'config.yaml' differs") as e:
        store.checkout("blobs")
    assert "stored object" not in e.value.message
    assert f"delete '{run.path}'" in e.value.fix
    shutil.rmtree(run.path)
    assert store.checkout("blobs").path == run.path  # made again
    (run.path / "extra.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"'extra.json' was added"):
        store.checkout("blobs")
    (run.path / "extra.json").unlink()
    (run.path / "metrics.json").unlink()
    with pytest.raises(IntegrityError, match=r"'metrics.json' is missing"):
        store.checkout("blobs")


# ------------------------------------------------------------------------------ safety

BAD_REFS = [
    "../x", "a/../../b", "/etc/passwd", "x:..", "..\\x", "a\0b", "a" * 65, "x/y", ".hidden",
    "x:0", "x:-1", "x:latest", "x:1/../../..", "C:\\x", "", "x..y", "x\n",
]  # fmt: skip


@pytest.mark.parametrize("ref", BAD_REFS)
def test_traversal_and_odd_references_are_refused(store, runs, ref, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=r"registry reference .* is not valid"):
        parse_ref(ref)
    for call in (store.get, store.checkout, lambda r: store.promote(r, "prod")):
        with pytest.raises(ConfigError, match=r"is not valid"):
            call(ref)
    with pytest.raises(ConfigError, match=r"model name .* is not valid"):
        store.add(runs["tab"], ref)
    with pytest.raises(ConfigError, match=r"is not valid"):
        store.remove(ref)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even the root


def test_a_tampered_database_cannot_lead_outside_the_root(store, runs):
    store.add(runs["tab"], "blobs")
    db = sqlite3.connect(store.root / "registry.sqlite")
    with db:
        db.execute("UPDATE files SET path = '../../evil' WHERE path = 'config.yaml'")
    with pytest.raises(IntegrityError, match=r"'../../evil' is not a safe relative path"):
        store.checkout("blobs")
    with db:
        db.execute(
            "UPDATE files SET path = 'config.yaml', sha256 = '../../x' WHERE path = '../../evil'"
        )
    with pytest.raises(IntegrityError, match=r"records an invalid hash '../../x'"):
        store.checkout("blobs")
    assert not (store.root.parent / "evil").exists()


def test_a_linked_folder_leading_outside_the_root_is_refused(store, runs, tmp_path):
    store.add(runs["tab"], "blobs")
    (tmp_path / "elsewhere").mkdir()
    (store.root / "checkouts").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"is outside the registry root"):
        store.checkout("blobs")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_symbolic_links_in_a_run(store, runs, tmp_path):
    run = copy_run(runs["tab"], tmp_path / "linked", manifest=False)
    (run / "notes.txt").symlink_to(run / "preprocess.json")  # inside: stored as content
    v = store.add(run, "linked")
    assert v.files["notes.txt"] == v.files["preprocess.json"]
    assert not (store.checkout("linked").path / "notes.txt").is_symlink()
    (tmp_path / "secret.txt").write_text("outside")
    (run / "leak.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(CheckpointError, match=r"'leak.txt' in .* is a symbolic link to"):
        store.add(run, "linked")
    assert len(store.versions("linked")) == 1


# ------------------------------------------------------------------- what may be added


def test_an_incomplete_run_is_refused(store, runs, tmp_path):
    run = copy_run(runs["tab"], tmp_path / "running", manifest=False)
    lineage = json.loads((run / "lineage.json").read_text())
    (run / "lineage.json").write_text(json.dumps({**lineage, "status": "interrupted"}))
    with pytest.raises(CheckpointError, match=r"is not complete \(status: interrupted\)"):
        store.add(run, "x")
    (run / "lineage.json").write_text(json.dumps(lineage))
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model.safetensors"):
        store.add(run, "x")
    variant = copy_run(runs["int8"], tmp_path / "variant", manifest=False)
    (variant / "compression.json").unlink()
    with pytest.raises(CheckpointError, match=r"not complete \(no compression.json\)"):
        store.add(variant, "x")
    with pytest.raises(CheckpointError, match=r"has no config.yaml"):
        store.add(tmp_path, "x")
    with pytest.raises(ConfigError, match=r"registry root '.*' is inside run"):
        ModelStore(run / "registry").add(run, "x")
    assert store.versions() == [] and objects(store) == []


def test_a_tampered_run_is_refused(store, runs, tmp_path):
    run = copy_run(runs["tab"], tmp_path / "tampered")
    flip(run / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"'model.safetensors' changed"):
        store.add(run, "x")
    assert store.versions() == []


def test_trusted_key_requires_a_valid_signature(store, runs, tmp_path):
    made = signing_keys.keygen(tmp_path / "keys" / "signer")
    signed = copy_run(runs["tab"], tmp_path / "signed")
    sign(signed, made["private"])
    v = store.add(signed, "s", trusted_key=made["public"])
    assert v.signer == made["fingerprint"]
    assert "manifest.sig" not in v.files
    with pytest.raises(IntegrityError, match=r"not signed"):
        store.add(runs["tab"], "s", trusted_key=made["public"])
    store.add(runs["tab"], "u")
    name, run = resolve("s", store.root, trusted_key=made["public"])
    assert (name, run.path) == ("s", store.root / "checkouts" / "s" / "1")
    with pytest.raises(IntegrityError, match=r"u:1 was registered without a verified signature"):
        resolve("u", store.root, trusted_key=made["public"])


# ------------------------------------------------------------------ removal and resolve


def test_remove_collects_garbage_but_keeps_shared_objects(store, runs, tmp_path):
    other = copy_run(runs["tab"], tmp_path / "other", manifest=False)
    (other / "history.jsonl").write_text('{"step": 1}\n')
    a, b = store.add(runs["tab"], "a"), store.add(other, "b")
    store.checkout("a")
    shared = {e["sha256"] for e in a.files.values()} & {e["sha256"] for e in b.files.values()}
    assert len(shared) == len(TABLE_FILES) - 1
    assert store.remove("a") == [a]
    assert {p.name for p in objects(store)} == {e["sha256"] for e in b.files.values()}
    assert not (store.root / "checkouts" / "a").exists()
    pd.testing.assert_frame_equal(
        Predictor.load(store.checkout("b")).predict(ROWS),
        Predictor.load(runs["tab"]).predict(ROWS),
    )
    with pytest.raises(CheckpointError, match=r"no model 'a'"):
        store.remove("a")
    with pytest.raises(CheckpointError, match=r"model 'b' has no version 5"):
        store.remove("b", 5)
    store.remove("b")
    assert objects(store) == [] and store.versions() == []


def test_resolve_a_path_or_a_reference(store, runs, monkeypatch, tmp_path):
    name, run = resolve(runs["tab"])
    assert (name, run.path) == ("tab", runs["tab"])
    assert resolve(f"{runs['tab']}/")[0] == "tab"
    with pytest.raises(CheckpointError, match=r"registered models: none"):
        resolve("blobs")
    assert not Path("registry").exists()  # the default root; reading never creates it
    store.add(runs["tab"], "blobs")
    monkeypatch.setenv("DANLU_REGISTRY", str(store.root))
    name, run = resolve("blobs:dev")
    assert (name, run.path) == ("blobs", store.root / "checkouts" / "blobs" / "1")
    for ref in ("nothing", "runs/missing", "../x", tmp_path, "a\0b"):
        with pytest.raises(CheckpointError) as e:
            resolve(ref)
        assert "is neither a run directory" in e.value.message
        assert "registered models: blobs" in e.value.fix


def test_reading_an_empty_registry_creates_nothing(tmp_path):
    store = ModelStore(tmp_path / "none")
    assert store.versions() == [] and store.names() == []
    with pytest.raises(CheckpointError, match=r"registered models: none"):
        store.get("x")
    assert not store.root.exists()


def test_a_newer_schema_is_refused(store, runs):
    store.add(runs["tab"], "blobs")
    with sqlite3.connect(store.root / "registry.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(CheckpointError, match=r"has schema 99; this danlu reads 1"):
        store.versions()


# --------------------------------------------------------------------------- concurrency


def test_concurrent_adds_from_threads_and_processes(store, runs):
    errors: list[BaseException] = []

    def add_some() -> None:
        try:
            for _ in range(3):
                store.add(runs["tab"], "busy")
        except BaseException as e:  # reported below
            errors.append(e)

    code = (
        "import sys; from danlu.serve.store import ModelStore\n"
        "s = ModelStore(sys.argv[1])\n"
        "for _ in range(3): s.add(sys.argv[2], 'busy')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(store.root), str(runs["tab"])])
        for _ in range(2)
    ]
    threads = [threading.Thread(target=add_some) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert errors == []
    versions = store.versions("busy")
    assert [v.version for v in versions] == list(range(1, 16))
    assert len({v.weights_sha256 for v in versions}) == 1
    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(store.checkout("busy:15").path))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert made == [store.root / "checkouts" / "busy" / "15"] * 3
    assert [p.name for p in made[0].parent.iterdir()] == ["15"]  # no temporaries left
    assert not [p for p in (store.root / "objects").rglob(".tmp-*")]


def test_version_fields_and_stages_are_as_documented():
    assert STAGES == ("dev", "staging", "prod")
    names = [f for f in Version.__dataclass_fields__]
    assert names[:12] == [
        "name", "version", "stage", "weights_sha256", "created", "source", "task",
        "model_type", "variant", "metrics", "lineage", "files",
    ]  # fmt: skip
