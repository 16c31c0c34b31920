"""Predictor: load a run once, predict on raw inputs. The CLI, the Python API and the server
all call it, so a prediction is the same wherever it is asked for.

    p = Predictor.load("runs/fashion_cnn")
    p.predict("shoe.png")                    # one image file
    p.predict("photos/")                     # every image under a folder
    p.predict(pd.read_csv("rows.csv"))       # table rows with the training feature columns
    p.prepare("shoe.png").x                  # the model's input for it: (1, C, H, W) uint8

`prepare` and `predict` share one path: `collect` sorts raw inputs into table rows, images or
texts (with a name for each), `tensor` turns them into what the model takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu import models
from danlu.data.images import IMAGE_SUFFIXES, image_files
from danlu.data.tables import TablePreprocessor, is_table, read_table
from danlu.errors import DataError
from danlu.evaluate.metrics import probabilities
from danlu.evaluate.run import load_model
from danlu.models.compressed import device_of
from danlu.rundir import RunDir

KEYS = {"rows": "row", "images": "input", "texts": "text"}  # the results' first column
CAUSAL_TASKS = ("language_modeling", "chat")


@dataclass
class Inputs:
    """Raw inputs sorted by kind: table rows (a DataFrame), images (files, arrays) or texts."""

    kind: str  # rows | images | texts
    items: Any  # DataFrame | list
    names: list[str]
    origin: str = "input"
    start: int = 0  # where items[0] sits among all the inputs (for messages)

    def __len__(self) -> int:
        return len(self.items)

    def part(self, start: int, stop: int) -> Inputs:
        items = self.items.iloc[start:stop] if self.kind == "rows" else self.items[start:stop]
        return Inputs(self.kind, items, self.names[start:stop], self.origin, self.start + start)


@dataclass
class Prepared:
    """Raw inputs as the model takes them (before the run's `transform`), with their names."""

    x: torch.Tensor  # (N, F) float32 features | (N, C, H, W) uint8 pixels | (N, T) token ids
    names: list[str]  # one per input: row number, file name, or the text (shortened)
    kind: str  # rows | images | texts
    features: list[str] | None = None  # rows: the model's input columns ("colour=red")
    tokens: list[list[str]] | None = None  # texts: each id of x as text (pads included)
    mask: torch.Tensor | None = None  # texts: (N, T) bool, True = a real token
    stop_id: int | None = None  # language models: the token that ends a continuation


class Predictor:
    def __init__(self, run: RunDir, batch_size: int = 256) -> None:
        self.run = run
        self.model, self.cfg, self.spec, self.kind = load_model(run)
        self.transform = self.spec.transform()
        self.batch_size = batch_size

    @classmethod
    def load(cls, run: str | Path | RunDir) -> Predictor:
        return cls(run if isinstance(run, RunDir) else RunDir.open(run))

    @property
    def generates(self) -> bool:
        """A causal language model (its texts are prompts to continue), not a masked one."""
        family = models.family(self.model, self.cfg.model.type)
        return self.spec.task in CAUSAL_TASKS and family != "bert"

    # ------------------------------------------------------------------------ inputs

    def predict(self, inputs: Any) -> pd.DataFrame:
        """Table rows (DataFrame, dict, list of dicts, CSV/Parquet path), images (file,
        folder, list of files, arrays) or texts → one row per input with the prediction."""
        raw = self.collect(inputs)
        if raw.kind == "texts":
            self._check_predicts_texts()
            if not raw.items:
                regression = self.spec.task == "regression"
                return pd.DataFrame(columns=["text", "prediction" if regression else "label"])
        step = max(len(raw), 1) if raw.kind == "rows" else self.batch_size  # rows: one pass
        outputs = [
            self.outputs(self.tensor(raw.part(i, i + step)))
            for i in range(0, max(len(raw), 1), step)  # no inputs still give (0, K)
        ]
        return self._results(torch.cat(outputs), raw.names, KEYS[raw.kind])

    def prepare(self, inputs: Any) -> Prepared:
        """The model's input for raw inputs, as `predict` builds it, with names, the feature
        columns of tables and each token of texts. A language model's prompts are encoded as
        `generate` encodes them (left-padded, after EOS, the last model.context tokens)."""
        raw = self.collect(inputs)
        if raw.kind == "texts" and self.generates:
            return self._prompts(raw)
        out = Prepared(self.tensor(raw), raw.names, raw.kind)
        if raw.kind == "rows":
            out.features = TablePreprocessor.from_dict(self.spec.table).feature_names
        if raw.kind == "texts":
            out.mask = out.x != self.spec.text["pad_id"]
            out.tokens = [self.pieces(row) for row in out.x.tolist()]
        return out

    def collect(self, inputs: Any) -> Inputs:
        """Sort raw inputs by kind; reading table files, listing image folders."""
        if self.spec.input == "text":
            return self._texts(inputs)
        if isinstance(inputs, pd.DataFrame):
            return self._rows(inputs)
        if isinstance(inputs, dict):
            return self._rows(pd.DataFrame([inputs]))
        if isinstance(inputs, (str, Path)):
            return self._path(Path(inputs))
        if isinstance(inputs, np.ndarray) and self.spec.input == "image":
            items = list(inputs) if _image_batch(inputs) else [inputs]
            return Inputs("images", items, [f"array[{i}]" for i in range(len(items))])
        if isinstance(inputs, list) and not inputs and self.spec.table is not None:
            columns = [c["name"] for c in self.spec.table["columns"]]
            return self._rows(pd.DataFrame(columns=columns))  # no rows: an empty result
        if isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs):
            return self._rows(pd.DataFrame(inputs))
        if isinstance(inputs, list) and all(isinstance(i, (str, Path, np.ndarray)) for i in inputs):
            names = [
                f"array[{i}]" if isinstance(x, np.ndarray) else str(x) for i, x in enumerate(inputs)
            ]
            return Inputs("images", list(inputs), names)
        raise DataError(
            f"cannot predict on {type(inputs).__name__} input",
            fix="pass table rows (DataFrame, dicts, a CSV file) or images (files, a folder)",
        )

    def _texts(self, inputs: Any) -> Inputs:
        """A text, a list of texts, a DataFrame / CSV / Parquet file with the text column."""
        column = self.cfg.data.text or "text"
        if isinstance(inputs, (str, Path)) and is_table(Path(inputs)) and Path(inputs).is_file():
            inputs = read_table(Path(inputs))
        if isinstance(inputs, pd.DataFrame):
            if column not in inputs.columns:
                raise DataError(
                    f"the input table has no text column '{column}' (columns: "
                    f"{', '.join(map(str, inputs.columns))})",
                    fix=f"name the column '{column}', as in training",
                )
            inputs = inputs[column].astype(str).tolist()
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise DataError(
                f"a text model predicts on texts, got {type(inputs).__name__}",
                fix="pass a string, a list of strings, or a table with the text column",
            )
        return Inputs("texts", inputs, [t if len(t) <= 60 else t[:57] + "..." for t in inputs])

    def _check_predicts_texts(self) -> None:
        if self.spec.task not in ("classification", "regression"):
            raise DataError(
                f"run '{self.run.path}' is a {self.spec.task} model; `predict` is for "
                "classification and regression",
                fix=f"use `danlu generate {self.run.path} --prompt ...`",
            )

    def _path(self, path: Path) -> Inputs:
        if path.is_dir():
            files = image_files(path)
            if not files:
                raise DataError(
                    f"folder '{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)})"
                )
            return Inputs("images", files, [str(f) for f in files])
        if not path.exists():
            raise DataError(f"input '{path}' not found")
        if is_table(path):
            return self._rows(read_table(path), origin=str(path))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return Inputs("images", [path], [str(path)])
        raise DataError(
            f"input '{path}' is neither a table (.csv, .parquet) nor an image ({', '.join(IMAGE_SUFFIXES)})"
        )

    @staticmethod
    def _rows(frame: pd.DataFrame, origin: str = "input") -> Inputs:
        return Inputs("rows", frame, [str(i + 1) for i in range(len(frame))], origin)

    # ------------------------------------------------------------------- model inputs

    def tensor(self, raw: Inputs) -> torch.Tensor:
        """Sorted raw inputs → the model's input (before `transform`)."""
        raw = self.redacted(raw)
        if raw.kind == "rows":
            return self.spec.table_features(raw.items, raw.origin)  # (N, F)
        if raw.kind == "images":
            return self.spec.image_pixels(raw.items)  # (N, C, H, W) uint8
        ids = self.encoder.encode_batch(raw.items, first_index=raw.start).ids
        return torch.from_numpy(ids)  # (N, T)

    def redacted(self, raw: Inputs) -> Inputs:
        """Inputs with PII replaced as in training (`data.redact_pii`), so a model never sees
        at prediction what it was kept from at training."""
        section = self.spec.table if raw.kind == "rows" else self.spec.text
        settings = (section or {}).get("redact_pii")
        if not settings or raw.kind == "images":
            return raw
        from danlu.data.pii import detector

        clean = detector(settings["kinds"], settings["patterns"]).redact
        if raw.kind == "texts":
            return Inputs(
                raw.kind, [clean(t)[0] for t in raw.items], raw.names, raw.origin, raw.start
            )
        rows = raw.items.copy()
        for col in settings.get("columns", []):
            if col in rows and rows[col].dtype == object:
                rows[col] = rows[col].map(lambda v: clean(v)[0] if isinstance(v, str) else v)
        return Inputs(raw.kind, rows, raw.names, raw.origin, raw.start)

    @cached_property
    def encoder(self) -> Any:
        from danlu.data.tokenize import TextEncoder

        text = self.spec.text
        return TextEncoder.load(
            self.run.tokenizer, max_length=text["max_length"], truncation=text["truncation"]
        )

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token of a row as the text it adds (decoding one more token at a time, so
        word-start markers and multi-byte characters come out as in the whole text);
        special tokens (and tokens that add nothing) by their name."""
        out, before = [], ""
        for i in range(len(ids)):
            text = self.encoder.decode(ids[: i + 1])
            piece = text[len(before) :] if text.startswith(before) else text
            out.append(piece or (self.encoder.tokenizer.id_to_token(ids[i]) or ""))
            before = text
        return out

    def _prompts(self, raw: Inputs) -> Prepared:
        from danlu.models.sampling import left_pad
        from danlu.serve.generate import chat_prompts, prompt_ids

        texts, end = self.redacted(raw).items, None
        if self.spec.task == "chat":
            texts, end = chat_prompts(self.run, self.spec, texts)
        context = getattr(self.model, "context", None)
        rows, stop = prompt_ids(
            self.encoder, texts, end=end, separate=self.spec.task != "chat", context=context
        )
        ids, mask = left_pad(rows, self.model.pad_id)  # (N, T)
        tokens = [self.pieces(row) for row in ids.tolist()]
        return Prepared(ids, raw.names, raw.kind, tokens=tokens, mask=mask, stop_id=stop)

    # ----------------------------------------------------------------------- outputs

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        device = device_of(self.model)
        out = []
        for i in range(0, max(len(x), 1), self.batch_size):  # an empty x still gives (0, K)
            part = x[i : i + self.batch_size].to(device)
            if self.transform is not None:
                part = self.transform(part)
            out.append(self.model(part).float().cpu())
        return torch.cat(out)

    def _results(self, outputs: torch.Tensor, names: list[str], key: str) -> pd.DataFrame:
        frame = pd.DataFrame({key: names})
        if self.spec.task == "regression":
            frame["prediction"] = outputs.reshape(-1).numpy()
            return frame
        proba = probabilities(outputs, self.kind).numpy()
        classes = self.spec.class_names
        frame["label"] = [classes[i] for i in proba.argmax(axis=1)]
        frame["confidence"] = proba.max(axis=1)
        for j, name in enumerate(classes):
            frame[f"prob_{name}"] = proba[:, j]
        return frame


def _image_batch(arr: np.ndarray) -> bool:
    """(N, C, H, W) or (N, H, W) is a batch; (H, W), (C, H, W) and (H, W, C) are one image."""
    if arr.ndim == 4:
        return True
    return arr.ndim == 3 and arr.shape[0] not in (1, 3) and arr.shape[-1] not in (1, 3)
