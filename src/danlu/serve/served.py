"""One model the server holds: its run loaded once, what it takes, what it answers.

The server keeps a `ServedModel` per name. A classifier or regressor answers through
`Predictor` (the same one the CLI and Python API use), a language model through `Generator`.
Request items are checked here, before they join a batch, so a bad input is answered 422
naming its field and never fails the other requests it would have been batched with.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from danlu.errors import ServeError
from danlu.rundir import RunDir

GENERATING_TASKS = ("language_modeling", "chat", "seq2seq")


@dataclass
class ServedModel:
    name: str
    run: RunDir
    predictor: Any = None  # danlu.serve.predictor.Predictor (classifiers, regressors)
    generator: Any = None  # danlu.serve.generate.Generator (language models)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def load(cls, name: str, run: RunDir, device: str = "auto") -> ServedModel:
        from danlu.serve.predictor import Predictor

        task = run.read("preprocess.json")["task"]
        if task in GENERATING_TASKS:
            from danlu.serve.generate import Generator

            return cls(name, run, generator=Generator(run, device))
        return cls(name, run, predictor=Predictor(run))

    # ------------------------------------------------------------------ description

    @property
    def spec(self) -> Any:
        return (self.generator or self.predictor).spec

    @property
    def kind(self) -> str:
        if self.generator is not None:
            return "generator"
        return "regressor" if self.spec.task == "regression" else "classifier"

    def card(self, info: bool = False) -> dict[str, Any]:
        """The model's entry in /v1/models (OpenAI's fields first, then danlu's)."""
        spec = self.spec
        entry = {"id": self.name, "object": "model", "created": self.created}
        entry |= {"owned_by": "danlu", "task": spec.task, "input": spec.input, "kind": self.kind}
        if info:
            entry["info"] = self.info()
        return entry

    def info(self) -> dict[str, Any]:
        spec, run = self.spec, self.run
        lineage = run.read("lineage.json") if (run.path / "lineage.json").is_file() else {}
        keep = ("run", "status", "config_hash", "data_hash", "started", "ended", "parameters")
        keep += ("trainable_parameters", "device", "precision", "steps", "parent")
        scores = run.read("metrics.json") if (run.path / "metrics.json").is_file() else {}
        split = "test" if "test" in scores else next(iter(scores), None)
        compression = run.path / "compression.json"
        image = None
        if spec.image is not None:
            c, h, w = spec.input_shape
            image = {"channels": c, "height": h, "width": w}
        return {
            "classes": spec.class_names,
            "features": self.features(),
            "image": image,
            "metrics": _finite(scores.get(split) or {}),
            "metrics_split": split,
            "lineage": {k: lineage[k] for k in keep if k in lineage},
            "variant": run.read("compression.json").get("method")
            if compression.is_file()
            else None,
        }

    def features(self) -> list[dict[str, Any]] | None:
        if self.spec.table is None:
            return None
        out = []
        for col in self.spec.table["columns"]:
            if col["kind"] == "numeric":
                out.append({"name": col["name"], "type": "number"})
            else:
                out.append({"name": col["name"], "type": "category", "values": col["categories"]})
        return out

    # ------------------------------------------------------------------ request items

    def items(self, inputs: list[Any]) -> list[Any]:
        """Request inputs → what Predictor.predict takes, checked one by one (422 on the first
        bad one, naming it as `inputs.<i>`)."""
        if not inputs:
            raise ServeError("inputs is empty", fix="send at least one input") from None
        convert = {"text": _text, "image": self._image, "table": self._row}[self.spec.input]
        return [convert(i, item) for i, item in enumerate(inputs)]

    def _image(self, i: int, item: Any) -> np.ndarray:
        if not isinstance(item, str):
            raise _bad(i, f"is a {_type(item)}; an image model takes base64-encoded image files")
        data = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(i, "is not valid base64") from None
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(raw)) as img:
                mode = "L" if self.spec.input_shape[0] == 1 else "RGB"
                return np.asarray(img.convert(mode))
        except (UnidentifiedImageError, OSError):
            raise _bad(i, "is not an image file PIL can read (PNG, JPEG, BMP, ...)") from None

    def _row(self, i: int, item: Any) -> dict[str, Any]:
        if not isinstance(item, dict):
            raise _bad(i, f"is a {_type(item)}; a table model takes objects {{column: value}}")
        for col in self.spec.table["columns"]:
            name = col["name"]
            if name not in item:
                raise ServeError(
                    f"inputs.{i} has no column '{name}'",
                    fix="send every feature column (null for a missing value)",
                )
            value = item[name]
            if value is None:
                continue  # filled as in training
            if col["kind"] == "numeric" and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ServeError(
                    f"inputs.{i}.{name} must be a number, got {value!r}",
                    fix=f"send {name} as a JSON number",
                )
        return item


def _text(i: int, item: Any) -> str:
    if not isinstance(item, str):
        raise _bad(i, f"is a {_type(item)}; a text model takes strings")
    if not item.strip():
        raise _bad(i, "is an empty text")
    return item


def _bad(i: int, what: str) -> ServeError:
    return ServeError(f"inputs.{i} {what}", fix="see GET /v1/models/<name> for the input kind")


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json without NaN / infinities (JSON has no such numbers)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
    return out


def rows_to_predictions(frame: Any, regression: bool) -> list[dict[str, Any]]:
    """Predictor.predict's table → one JSON object per input."""
    if regression:
        return [{"prediction": float(v)} for v in frame["prediction"]]
    probs = [c for c in frame.columns if c.startswith("prob_")]
    out = []
    for rec in frame.to_dict("records"):
        out.append(
            {
                "label": str(rec["label"]),
                "confidence": float(rec["confidence"]),
                "probabilities": {c[5:]: float(rec[c]) for c in probs},
            }
        )
    return out
