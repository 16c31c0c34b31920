"""`danlu explain RUN INPUT`: why a run predicts what it predicts for one input.

    result = explain("runs/wine", {"alcohol": 12.1, "ash": 2.3})        # a table row
    result = explain("runs/fashion_cnn", "shoe.png", method="occlusion")  # an image
    result = explain("runs/r8", "oil prices fell", method="attention")   # a text
    result = explain("runs/gpt", "Once upon a", max_new_tokens=10)      # a prompt

The Predictor turns the raw input into the model's input exactly as `predict` does; the
attributions come from danlu.evaluate.explain (Captum) and the page from explain_html. The
result is written to RUN/explanations/<input>-<method>.html and .json (or to --out).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from danlu import models
from danlu.data.images import IMAGE_SUFFIXES
from danlu.data.tables import is_table, read_table
from danlu.errors import ConfigError, DataError
from danlu.evaluate import explain as ex
from danlu.evaluate.explain_attention import attention_maps
from danlu.evaluate.explain_html import render
from danlu.rundir import RunDir, atomic_write_json, atomic_write_text, now
from danlu.serve.predictor import Predictor

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def explain(
    run: str | Path | RunDir,
    inputs: Any,
    *,
    method: str | None = None,
    target: str | int | None = None,
    out: str | Path | None = None,
    n_steps: int = 50,
    row: int = 1,
    max_new_tokens: int = 20,
    head: int | None = None,
) -> dict[str, Any]:
    """Explain one input (a table row as a dict or JSON text, a CSV/Parquet file and `row`,
    an image file or array, a text, a prompt); returns the explanation, with "files"."""
    started = time.perf_counter()
    if n_steps < 1 or max_new_tokens < 1:
        raise ConfigError(
            f"n_steps ({n_steps}) and max_new_tokens ({max_new_tokens}) must be 1 or more",
            fix="use e.g. --n-steps 50 --max-new-tokens 20",
        )
    p = Predictor.load(run)
    spec, model = p.spec, p.model
    family = models.family(model, p.cfg.model.type)
    valid = ex.methods_for(spec.input, spec.task, family)
    method = method or (valid[0] if valid else None)
    if method not in valid:
        inputs_of = "" if spec.input == "text" else f", {spec.input} inputs"
        raise ConfigError(
            f"method '{method}' does not fit run '{p.run.path}' (model {family}, task "
            f"{spec.task}{inputs_of})",
            fix=f"use one of: {', '.join(valid)}",
        )
    raw, name, values = one_input(p, inputs, row)
    prepared = p.prepare(raw)
    x = prepared.x[:1]
    result: dict[str, Any] = {
        "run": str(p.run.path),
        "input": name,
        "kind": "generation" if p.generates else spec.input,
        "method": method,
        "model": family,
        "task": spec.task,
    }
    if result["kind"] != "generation" and spec.task in ("classification", "regression"):
        seen = p.transform(x) if result["kind"] == "image" else x
        result["prediction"] = ex.predicted(model, seen, p.kind, spec.class_names)
        result["target"] = resolve_target(target, spec, result["prediction"])
    elif target is not None:
        raise ConfigError(
            f"--target applies to classification runs; run '{p.run.path}' is a {spec.task} model",
            fix="leave --target out",
        )
    index = (result.get("target") or {}).get("index")
    if method == "attention":
        maps = attention_maps(model, x)  # (L, H, T, T)
        result |= attention_result(maps, prepared.tokens[0], head)
    elif result["kind"] == "table":
        result |= ex.explain_table(
            model, x, spec, kind=p.kind, target=index, method=method, n_steps=n_steps
        )
        for feature in result["features"]:
            feature["value"] = values.get(feature["name"])
    elif result["kind"] == "image":
        result |= ex.explain_image(
            model, x, p.transform, kind=p.kind, target=index, method=method, n_steps=n_steps
        )
    elif result["kind"] == "generation":
        result |= ex.explain_generation(
            model, x, spec.text, pieces=p.pieces, decode=p.encoder.decode, method=method,
            n_steps=n_steps, max_new_tokens=max_new_tokens, stop_id=prepared.stop_id,
        )  # fmt: skip
    else:
        result["tokens"] = prepared.tokens[0]
        result |= ex.explain_text(
            model, x, spec.text, kind=p.kind, target=index, method=method, n_steps=n_steps
        )
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["created"] = now()
    pixels = x[0].numpy() if result["kind"] == "image" else None
    result["files"] = write(result, render(result, pixels), p.run, out)
    return result


def resolve_target(target: str | int | None, spec: Any, prediction: dict) -> dict | None:
    """The class to explain: a label (or its index); default the predicted one."""
    if spec.task == "regression":
        if target is not None:
            raise ConfigError(
                "--target applies to classification runs; this is a regression model",
                fix="leave --target out",
            )
        return None
    names = spec.class_names
    if target is None:
        return {"index": prediction["index"], "label": prediction["label"]}
    if str(target) in names:
        return {"index": names.index(str(target)), "label": str(target)}
    if isinstance(target, int) and 0 <= target < len(names):
        return {"index": target, "label": names[target]}
    raise DataError(
        f"target '{target}' is not a label of this model",
        fix=f"use one of: {', '.join(names)}",
    )


def attention_result(maps: Any, tokens: list[str], head: int | None) -> dict[str, Any]:
    layers, heads = maps.shape[:2]
    if head is not None and not 0 <= head < heads:
        raise ConfigError(
            f"--head {head}: the model has {heads} heads per layer",
            fix=f"choose 0 to {heads - 1}, or leave --head out for the mean over heads",
        )
    chosen = maps.mean(1) if head is None else maps[:, head]  # (L, T, T)
    return {
        "tokens": tokens,
        "layers": int(layers),
        "heads": int(heads),
        "head": head,
        "attention": [[[round(float(v), 5) for v in r] for r in m] for m in chosen.tolist()],
    }


# --------------------------------------------------------------------------- inputs


def one_input(p: Predictor, inputs: Any, row: int) -> tuple[Any, str, dict[str, Any]]:
    """One raw input for the Predictor, its display name and (tables) its column values."""
    if _empty(inputs):
        raise DataError("the input is empty", fix=_what(p))
    if isinstance(inputs, str) and inputs.lstrip().startswith("{"):
        try:
            inputs = json.loads(inputs)
        except json.JSONDecodeError as e:
            raise DataError(
                f"INPUT starts like a JSON row but is not valid JSON ({e.msg}, column {e.colno})",
                fix='quote it whole, e.g. \'{"x1": 0.3, "x2": 1}\'',
            ) from None
        if _empty(inputs):
            raise DataError("the input is empty", fix=_what(p))
    kind = p.spec.input
    if isinstance(inputs, dict):
        bad = {k: v for k, v in inputs.items() if isinstance(v, (dict, list))}
        if bad:
            key = next(iter(bad))
            raise DataError(
                f"column '{key}': value {bad[key]!r} is not a single value",
                fix="give one number or category per column",
            )
        return _one_row(pd.DataFrame([inputs]), 1, "input")
    if isinstance(inputs, pd.DataFrame):
        return _one_row(inputs, row, "input")
    if isinstance(inputs, np.ndarray) and kind == "image":
        _check_array(p, inputs)
        return inputs, "array", {}
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if _is_file(path) and is_table(path):
            return _one_row(read_table(path), row, str(path))
        if kind == "image":
            return _image_file(p, path), str(path), {}
        if kind == "table":
            if is_table(path) or path.suffix.lower() in IMAGE_SUFFIXES:
                raise DataError(f"input '{path}' not found")
            raise DataError(
                f"a text was given, but run '{p.run.path}' is a table model", fix=_what(p)
            )
        if isinstance(inputs, str):
            return inputs, _short(inputs), {}
    raise DataError(f"cannot explain {type(inputs).__name__} input", fix=_what(p))


def _empty(inputs: Any) -> bool:
    if inputs is None:
        return True
    if isinstance(inputs, str):
        return not inputs.strip()
    if isinstance(inputs, (dict, list, tuple, pd.DataFrame, np.ndarray)):
        return len(inputs) == 0
    return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a text too long to be a file name
        return False


def _what(p: Predictor) -> str:
    if p.spec.input == "table":
        cols = [c["name"] for c in p.spec.table["columns"]]
        example = ", ".join(f'"{c}": ...' for c in cols[:3])
        return f"pass a row as JSON ('{{{example}}}') or a CSV/Parquet file; columns: " + ", ".join(
            cols
        )
    if p.spec.input == "image":
        c, h, w = p.spec.input_shape
        return f"pass an image file ({h}×{w}, {c} channel{'s' * (c > 1)})"
    return "pass a text (a prompt for a language model), or a CSV/Parquet file with the text column"


def _one_row(frame: pd.DataFrame, row: int, origin: str) -> tuple[Any, str, dict[str, Any]]:
    if frame.empty:
        raise DataError(f"{origin} has no rows", fix="give a row with the feature columns")
    if not 1 <= row <= len(frame):
        raise DataError(
            f"--row {row}: {origin} has {len(frame)} row{'s' * (len(frame) > 1)}",
            fix=f"choose a row from 1 to {len(frame)}",
        )
    one = frame.iloc[[row - 1]]
    values = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in one.iloc[0].items()}
    name = "row" if origin == "input" else f"{Path(origin).name} row {row}"
    return one, name, values


def _image_file(p: Predictor, path: Path) -> Path:
    """An image file whose size and channels are the model's (predict resizes; an
    explanation is of the pixels the model sees, so it is asked for them)."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        if not path.exists():
            raise DataError(
                f"a text was given, but run '{p.run.path}' is an image model", fix=_what(p)
            )
        raise DataError(f"input '{path}' is not an image ({', '.join(IMAGE_SUFFIXES)})")
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except FileNotFoundError:
        raise DataError(f"image '{path}' not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"image '{path}' is unreadable ({e})") from None
    _check_shape(p, str(path), 1 if mode in GREY_MODES else 3, size[1], size[0])
    return path


def _check_array(p: Predictor, arr: np.ndarray) -> None:
    if arr.ndim == 2:
        c, (h, w) = 1, arr.shape
    elif arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        c, h, w = arr.shape
    elif arr.ndim == 3:
        h, w, c = arr.shape
    else:
        raise DataError(f"an image array must be (H, W) or (H, W, C), got shape {arr.shape}")
    _check_shape(p, "the array", c, h, w)


def _check_shape(p: Predictor, what: str, c: int, h: int, w: int) -> None:
    ec, eh, ew = p.spec.input_shape
    if (c, h, w) != (ec, eh, ew):
        raise DataError(
            f"{what} is {h}×{w} with {c} channel{'s' * (c > 1)}, but the model takes "
            f"{eh}×{ew} with {ec} channel{'s' * (ec > 1)}",
            fix=f"resize / convert it to {eh}×{ew} {'greyscale' if ec == 1 else 'RGB'} "
            "(`danlu predict` does that itself)",
        )


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- outputs


def slug(text: str) -> str:
    """A file-name-safe short form of an input's name."""
    words = re.sub(r"[^0-9A-Za-z]+", "-", Path(text).name if _is_file(Path(text)) else text)
    return words.strip("-").lower()[:40] or "input"


def write(result: dict[str, Any], html: str, run: RunDir, out: str | Path | None) -> dict:
    """Write <base>.html and <base>.json atomically; returns their paths."""
    base_name = f"{slug(result['input'])}-{result['method']}"
    if out is None:
        base = run.path / "explanations" / base_name
    else:
        out = Path(out)
        suffix = out.suffix.lower()
        base = out.with_suffix("") if suffix in (".html", ".json") else out / base_name
    html_path, json_path = base.with_name(base.name + ".html"), base.with_name(base.name + ".json")
    try:
        atomic_write_json(json_path, result)
        atomic_write_text(html_path, html)
    except OSError as e:
        raise DataError(
            f"cannot write the explanation to '{base.parent}': {e.strerror}",
            fix="choose another --out",
        ) from None
    return {"html": str(html_path), "json": str(json_path)}
