"""What an evaluation keeps for the report besides numbers: the inputs of the worst errors,
the prediction surface of a 2-feature classifier, and sample generations of a language model.

Each function reads the model and the data bundle already loaded by `evaluate_run` and
returns plain JSON values for metrics.json.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch

from danlu.data.check_rows import describe_row, split_inputs
from danlu.evaluate.metrics import probabilities

SNIPPET = 500  # characters of a text input kept with a worst error
GRID = 100  # decision-surface resolution per axis
POINTS = 2000  # examples drawn over the surface


def png_base64(image: np.ndarray) -> str:
    """(C, H, W) or (H, W) uint8 → a base64 PNG (nearest-neighbour upscaled when tiny)."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.transpose(a[:3], (1, 2, 0))
    img = Image.fromarray(a.astype(np.uint8))
    if max(img.size) < 64:
        scale = max(1, 64 // max(img.size))
        img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    return v if isinstance(v, (int, str)) or v is None else str(v)


def worst_inputs(bundle: Any, split: str, worst: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds where each worst example came from and its input: a text snippet, the table row's
    values or an image thumbnail."""
    if not worst:
        return worst
    kind, inputs = split_inputs(bundle)
    part = inputs.get(split)
    for w in worst:
        pos = w["position"]
        w["where"] = describe_row(bundle, split, pos)["where"]
        if part is None:
            continue
        if kind == "text":
            text = part[pos]
            w["input"] = {
                "kind": "text",
                "text": text[:SNIPPET] + ("…" if len(text) > SNIPPET else ""),
            }
        elif kind == "table" and hasattr(part, "iloc"):
            row = part.iloc[pos]
            w["input"] = {"kind": "row", "values": {str(k): _json_value(v) for k, v in row.items()}}
        elif kind == "image":
            w["input"] = {"kind": "image", "png": png_base64(part[pos])}
    return worst


@torch.no_grad()
def decision_surface(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Any, kind: str, device: str
) -> dict[str, Any] | None:
    """The predicted class and probability over a grid spanning a 2-feature split (in the
    model's input space), with the split's examples: the XOR picture."""
    if spec.task != "classification" or spec.input != "table" or x.ndim != 2 or x.shape[1] != 2:
        return None
    lo, hi = x.min(0).values.float(), x.max(0).values.float()
    pad = (hi - lo).clamp_min(1e-6) * 0.1
    xs = torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), GRID)
    ys = torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), GRID)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).to(device)
    proba = probabilities(model(grid), kind).cpu()
    pred = proba.argmax(1)
    shown = proba[:, -1] if proba.shape[1] == 2 else proba.max(1).values
    columns = [c["name"] for c in (spec.table or {}).get("columns", [])]
    names = columns if len(columns) == 2 else ["feature 0", "feature 1"]
    take = np.random.default_rng(0).permutation(len(y))[:POINTS]
    return {
        "features": names,
        "xs": [round(float(v), 5) for v in xs],
        "ys": [round(float(v), 5) for v in ys],
        "proba": proba_grid(shown),
        "predicted": pred.view(GRID, GRID).tolist(),
        "points": {
            "x": [round(float(v), 5) for v in x[take, 0]],
            "y": [round(float(v), 5) for v in x[take, 1]],
            "label": [int(v) for v in y[take]],
        },
    }


def proba_grid(values: torch.Tensor) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in values.view(GRID, GRID)]


@torch.no_grad()
def lm_samples(
    model: torch.nn.Module,
    loader: Any,
    encoder: Any,
    *,
    count: int = 3,
    prompt_tokens: int = 24,
    new_tokens: int = 48,
    seed: int = 0,
) -> list[dict[str, str]]:
    """A few continuations of held-out text (temperature 0.8, top-k 40, seeded), next to the
    text that really followed."""
    if not hasattr(model, "generate") or encoder is None:
        return []
    out: list[dict[str, str]] = []
    for batch in loader.epoch(0):
        gen = torch.Generator(batch.x.device)
        for row in range(min(len(batch.x), count - len(out))):
            ids = batch.x[row : row + 1, :prompt_tokens]
            following = batch.x[row, prompt_tokens : prompt_tokens + new_tokens].tolist()
            if ids.shape[1] < 4:
                continue
            generated = model.generate(
                ids, max_new_tokens=new_tokens, temperature=0.8, top_k=40,
                generator=gen.manual_seed(seed + len(out)),
            )  # fmt: skip
            out.append(
                {
                    "prompt": encoder.decode(ids[0].tolist()),
                    "reference": encoder.decode(following),
                    "generated": encoder.decode(generated[0, ids.shape[1] :].tolist()),
                }
            )
        if len(out) >= count:
            break
    return out
