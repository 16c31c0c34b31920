"""The request log: every served input, summarized, in rolling JSONL files for `danlu monitor`.

    log = RequestLog("logs/")                       # requests-000001.jsonl, -000002, ...
    for summary, out in zip(summarize(predictor, raw), outputs):
        log.append(record("fashion", "/v1/predict", summary, out, latency_ms=3.2))
    recent = list(log.read(since=time.time() - 3600))

A summary keeps what drift monitoring compares with the training data and never the raw input:
a table row's feature values; a text's length in characters and tokens, its unknown-token
rate and a bag of at most 32 distinct token ids (sorted, so the words' order is gone; a long
text keeps the ids with the smallest multiplicative hash, a consistent sample across texts,
which vocabulary shift needs); an image's size and the mean and std of the pixels the model
sees. `danlu.serve.drift` builds the training reference with these same functions.

One writer per folder (a lock serializes threads). Each append is one line, flushed; a crash
leaves at most a partial last line, which readers skip and the next writer seals off.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from danlu.errors import ConfigError

FILE = re.compile(r"^requests-(\d{6,})\.jsonl$")
MAX_IDS = 32  # token ids kept per text
OUTPUT_KEYS = ("label", "confidence", "prediction", "finish_reason", "completion_tokens")


class RequestLog:
    """Rolling JSONL files in `folder`: a new file once one reaches `max_bytes`, the oldest
    deleted beyond `keep_files`. Thread-safe; the folder is created on the first append."""

    def __init__(
        self, folder: str | Path, max_bytes: int = 64 * 2**20, keep_files: int = 8
    ) -> None:
        if max_bytes < 1 or keep_files < 1:
            raise ConfigError(
                f"request log: max_bytes ({max_bytes}) and keep_files ({keep_files}) must be "
                "at least 1",
                fix="use positive values",
            )
        self.folder = Path(folder)
        self.max_bytes, self.keep_files = max_bytes, keep_files
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self._number, self._size = 0, 0

    def files(self) -> list[Path]:
        """The log files, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    # -------------------------------------------------------------------------- writing

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(_plain(record), ensure_ascii=False, separators=(",", ":"))
        data = (line + "\n").encode("utf-8")
        with self._lock:
            f = self._file or self._open()
            f.write(data)
            f.flush()
            self._size += len(data)
            if self._size >= self.max_bytes:
                self._rotate()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> RequestLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> BinaryIO:
        """Continue the newest file (sealing a crash's partial line), or start the first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        files = self.files()
        self._number = int(FILE.match(files[-1].name).group(1)) if files else 1
        path = self._path(self._number)
        size = path.stat().st_size if path.is_file() else 0
        if size >= self.max_bytes:
            self._number += 1
            path, size = self._path(self._number), 0
        self._file = path.open("ab")
        if size and not _ends_with_newline(path):
            self._file.write(b"\n")  # the partial line stays alone: readers skip it
            size += 1
        self._size = size
        return self._file

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._number += 1
        self._file, self._size = self._path(self._number).open("ab"), 0
        for old in self.files()[: -self.keep_files]:
            old.unlink(missing_ok=True)

    def _path(self, number: int) -> Path:
        return self.folder / f"requests-{number:06d}.jsonl"

    # -------------------------------------------------------------------------- reading

    def read(self, since: float | None = None, limit: int | None = None) -> Iterator[dict]:
        """Records oldest first; `since` (a time.time() value) keeps the later ones, `limit`
        the newest `limit` of them. Lines that are not a JSON object (a crash's partial last
        line) are skipped."""
        records = self._records(since)
        if limit is None:
            yield from records
        else:
            yield from deque(records, maxlen=max(limit, 0))

    def _records(self, since: float | None) -> Iterator[dict]:
        for path in self.files():
            try:
                if since is not None and path.stat().st_mtime < since:
                    continue  # written to last before `since`: every record is older
                with path.open("rb") as f:
                    lines = f.readlines()
            except FileNotFoundError:  # rotated away while we listed
                continue
            for raw in lines:
                rec = _parse(raw)
                if rec is None:
                    continue
                t = rec.get("t")
                if since is not None and not (isinstance(t, (int, float)) and t >= since):
                    continue
                yield rec


def record(
    model: str, endpoint: str, summary: dict[str, Any], output: dict[str, Any], latency_ms: float
) -> dict[str, Any]:
    """One log line: what the server appends per served input. `output` may be the whole
    prediction: only label, confidence, prediction (and a generation's finish_reason,
    completion_tokens) are kept."""
    return {
        "t": round(time.time(), 3),
        "model": model,
        "endpoint": endpoint,
        "input": summary,
        "output": {k: output[k] for k in OUTPUT_KEYS if k in output},
        "latency_ms": round(float(latency_ms), 3),
    }


# ------------------------------------------------------------------------------ summaries


def summarize(predictor: Any, raw_inputs: Any) -> list[dict[str, Any]]:
    """One compact summary per input of `raw_inputs` (danlu.serve.predictor.Inputs, or what
    Predictor.collect takes), made from what the model sees (after PII redaction, as in
    training)."""
    if not (hasattr(raw_inputs, "kind") and hasattr(raw_inputs, "items")):
        raw_inputs = predictor.collect(raw_inputs)
    raw = predictor.redacted(raw_inputs)
    if raw.kind == "rows":
        return row_summaries(raw.items, [c["name"] for c in predictor.spec.table["columns"]])
    if raw.kind == "texts":
        return text_summaries(predictor.encoder, raw.items)
    pixels = predictor.spec.image_pixels(raw.items).numpy()  # (N, C, H, W) uint8
    stats = pixel_stats(pixels)
    return [
        {"kind": "image", **dict(zip(("height", "width", "channels"), image_shape(item), strict=True)),
         "mean": round(m, 4), "std": round(s, 4)}
        for item, (m, s) in zip(raw.items, stats, strict=True)
    ]  # fmt: skip


def row_summaries(frame: Any, columns: list[str]) -> list[dict[str, Any]]:
    """Table rows → {"kind": "table", "values": {column: number | text | None}}."""
    present = [c for c in columns if c in frame.columns]
    return [
        {"kind": "table", "values": {c: _value(v) for c, v in zip(present, row, strict=True)}}
        for row in frame[present].itertuples(index=False, name=None)
    ]


def text_summaries(encoder: Any, texts: list[str]) -> list[dict[str, Any]]:
    """Texts → characters, tokens (untruncated, no special tokens), the fraction of unknown
    tokens and a sorted bag of at most MAX_IDS distinct token ids."""
    unk = encoder.unk_id
    out = []
    for text, ids in zip(texts, encoder.encode_ids(list(texts)), strict=True):
        n = len(ids)
        unknown = sum(1 for i in ids if i == unk) if unk is not None else 0
        out.append(
            {"kind": "text", "chars": len(text), "tokens": n,
             "unk": round(unknown / n, 4) if n else 0.0, "ids": token_bag(ids)}
        )  # fmt: skip
    return out


def token_bag(ids: Iterable[int]) -> list[int]:
    """At most MAX_IDS distinct ids, sorted; from many, those with the smallest hash."""
    distinct = set(ids)
    if len(distinct) > MAX_IDS:
        distinct = set(sorted(distinct, key=lambda i: (i * 2654435761) & 0xFFFFFFFF)[:MAX_IDS])
    return sorted(distinct)


def pixel_stats(pixels: np.ndarray, chunk: int = 4096) -> list[tuple[float, float]]:
    """(N, C, H, W) pixels → (mean, std) of each image's values, on the 0–255 scale."""
    out: list[tuple[float, float]] = []
    flat = pixels.reshape(len(pixels), -1)
    for i in range(0, len(flat), chunk):
        part = flat[i : i + chunk].astype(np.float64)
        out += list(zip(part.mean(axis=1).tolist(), part.std(axis=1).tolist(), strict=True))
    return out


def image_shape(item: Any) -> tuple[int, int, int]:
    """(height, width, channels) of an image file or array as received, before resizing."""
    if isinstance(item, (str, Path)):
        from PIL import Image

        with Image.open(item) as im:
            return im.height, im.width, len(im.getbands())
    arr = np.asarray(item)
    if arr.ndim == 2:
        return arr.shape[0], arr.shape[1], 1
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # (C, H, W)
        return arr.shape[1], arr.shape[2], arr.shape[0]
    return arr.shape[0], arr.shape[1], arr.shape[2]


# -------------------------------------------------------------------------------- helpers


def _value(v: Any) -> float | str | None:
    """A cell as JSON: numbers as floats, missing as None, anything else as text."""
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return str(v)


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays → Python; NaN / infinities → None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _parse(raw: bytes) -> dict | None:
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
