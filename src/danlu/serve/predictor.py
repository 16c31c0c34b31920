"""Predictor: load a run once, predict on raw inputs. The CLI, the Python API and the server
all call it, so a prediction is the same wherever it is asked for.

    p = Predictor.load("runs/fashion_cnn")
    p.predict("shoe.png")                    # one image file
    p.predict("photos/")                     # every image under a folder
    p.predict(pd.read_csv("rows.csv"))       # table rows with the training feature columns
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from danlu.data.images import IMAGE_SUFFIXES, image_files
from danlu.data.tables import is_table, read_table
from danlu.errors import DataError
from danlu.evaluate.metrics import probabilities
from danlu.evaluate.run import load_model
from danlu.rundir import RunDir


class Predictor:
    def __init__(self, run: RunDir, batch_size: int = 256) -> None:
        self.run = run
        self.model, self.cfg, self.spec, self.kind = load_model(run)
        self.transform = self.spec.transform()
        self.batch_size = batch_size

    @classmethod
    def load(cls, run: str | Path | RunDir) -> Predictor:
        return cls(run if isinstance(run, RunDir) else RunDir.open(run))

    # ------------------------------------------------------------------------ inputs

    def predict(self, inputs: Any) -> pd.DataFrame:
        """Table rows (DataFrame, dict, list of dicts, CSV/Parquet path) or images (file,
        folder, list of files, arrays) → one row per input with the prediction."""
        if self.spec.input == "text":
            return self.predict_text_input(inputs)
        if isinstance(inputs, pd.DataFrame):
            return self.predict_rows(inputs)
        if isinstance(inputs, dict):
            return self.predict_rows(pd.DataFrame([inputs]))
        if isinstance(inputs, (str, Path)):
            return self.predict_path(Path(inputs))
        if isinstance(inputs, np.ndarray) and self.spec.input == "image":
            items = list(inputs) if _image_batch(inputs) else [inputs]
            return self.predict_images(items, [f"array[{i}]" for i in range(len(items))])
        if isinstance(inputs, list) and not inputs and self.spec.table is not None:
            columns = [c["name"] for c in self.spec.table["columns"]]
            return self.predict_rows(pd.DataFrame(columns=columns))  # no rows: an empty result
        if isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs):
            return self.predict_rows(pd.DataFrame(inputs))
        if isinstance(inputs, list) and all(isinstance(i, (str, Path, np.ndarray)) for i in inputs):
            names = [
                f"array[{i}]" if isinstance(x, np.ndarray) else str(x) for i, x in enumerate(inputs)
            ]
            return self.predict_images(list(inputs), names)
        raise DataError(
            f"cannot predict on {type(inputs).__name__} input",
            fix="pass table rows (DataFrame, dicts, a CSV file) or images (files, a folder)",
        )

    def predict_text_input(self, inputs: Any) -> pd.DataFrame:
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
        return self.predict_texts(inputs)

    def predict_texts(self, texts: list[str]) -> pd.DataFrame:
        if self.spec.task not in ("classification", "regression"):
            raise DataError(
                f"run '{self.run.path}' is a {self.spec.task} model; `predict` is for "
                "classification and regression",
                fix=f"use `danlu generate {self.run.path} --prompt ...`",
            )
        from danlu.data.tokenize import TextEncoder

        text = self.spec.text
        encoder = TextEncoder.load(
            self.run.tokenizer, max_length=text["max_length"], truncation=text["truncation"]
        )
        if not texts:
            regression = self.spec.task == "regression"
            return pd.DataFrame(columns=["text", "prediction" if regression else "label"])
        outputs = []
        for i in range(0, len(texts), self.batch_size):
            ids = encoder.encode_batch(texts[i : i + self.batch_size], first_index=i).ids
            outputs.append(self.outputs(torch.from_numpy(ids)))
        names = [t if len(t) <= 60 else t[:57] + "..." for t in texts]
        return self._results(torch.cat(outputs), names, "text")

    def predict_path(self, path: Path) -> pd.DataFrame:
        if path.is_dir():
            files = image_files(path)
            if not files:
                raise DataError(
                    f"folder '{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)})"
                )
            return self.predict_images(files, [str(f) for f in files])
        if not path.exists():
            raise DataError(f"input '{path}' not found")
        if is_table(path):
            frame = read_table(path)
            out = self.predict_rows(frame, origin=str(path))
            return out
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return self.predict_images([path], [str(path)])
        raise DataError(
            f"input '{path}' is neither a table (.csv, .parquet) nor an image ({', '.join(IMAGE_SUFFIXES)})"
        )

    def predict_rows(self, frame: pd.DataFrame, origin: str = "input") -> pd.DataFrame:
        x = self.spec.table_features(frame, origin)
        return self._results(self.outputs(x), [str(i + 1) for i in range(len(frame))], "row")

    def predict_images(self, items: list[Any], names: list[str]) -> pd.DataFrame:
        outputs = [self.outputs(self.spec.image_pixels([]))]  # (0, K): no inputs, no rows
        for i in range(0, len(items), self.batch_size):
            pixels = self.spec.image_pixels(items[i : i + self.batch_size])
            outputs.append(self.outputs(pixels))
        return self._results(torch.cat(outputs), names, "input")

    # ----------------------------------------------------------------------- outputs

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
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
