"""Attributions with Captum: which parts of one input a prediction rests on.

    out = explain_table(model, x, spec, kind="softmax", target=1)            # per column
    out = explain_image(model, pixels, transform, kind="softmax", target=3)  # an (H, W) map
    out = explain_text(model, ids, spec.text, kind="softmax", target=0)      # per token
    out = explain_generation(model, ids, spec.text, pieces=..., decode=...)  # generated × prompt

Classifiers are explained through the probability of the target class (sigmoid heads: of
that class; regression: the value), so scores are in probability units and the integrated
gradients of an input add up to p(input) − p(baseline); the convergence delta is how far
they miss, and a large one (relative to that change) is flagged: raise n_steps.

Baselines: a table row of training means (numeric columns) and no category (one-hot
columns); a black image; a text whose tokens are all UNK (else PAD), special tokens kept. Perturbation methods (feature ablation, LIME, Kernel SHAP, occlusion) replace a
whole feature by its baseline: a table column (its one-hot columns together), a token, a
patch of pixels. Text gradients flow through the token embedding (layer integrated gradients).

A language model continues the prompt greedily; each generated token's log-probability, given
the prompt and the tokens generated before it, is attributed to the prompt tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from danlu.errors import ConfigError
from danlu.evaluate.metrics import probabilities

log = logging.getLogger("danlu")

TABLE_METHODS = ("integrated_gradients", "feature_ablation", "lime", "kernel_shap")
IMAGE_METHODS = ("integrated_gradients", "occlusion")
TEXT_METHODS = ("integrated_gradients", "feature_ablation", "lime", "kernel_shap")
GENERATION_METHODS = ("generation", "feature_ablation")
ATTENTION_FAMILIES = ("gpt", "bert", "seq2seq", "hf")  # Transformers: attention maps
KEPT_TOKENS = ("cls", "sep", "bos", "eos")  # special tokens the text baselines keep
TOLERANCE = 0.05  # |delta| above 5 % of the output's change: not converged
BATCH = 64  # rows per forward pass inside Captum


def methods_for(input: str, task: str, family: str) -> tuple[str, ...]:
    """The methods that fit a model; the first is the default."""
    if input == "table":
        return TABLE_METHODS
    if input == "image":
        return IMAGE_METHODS
    attention = ("attention",) if family in ATTENTION_FAMILIES else ()
    if task in ("classification", "regression"):
        return (*TEXT_METHODS, *attention)
    if task in ("language_modeling", "chat") and family != "bert":
        return (*GENERATION_METHODS, *attention)
    return attention  # a masked LM, a seq2seq model: attention maps only


def _captum() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise ConfigError(
            "explanations need the captum library, which is not installed",
            fix="pip install 'danlu[report]'",
        ) from None
    return captum.attr


# ------------------------------------------------------------------------- scoring


def class_score(model: nn.Module, kind: str, target: int | None) -> Callable[..., torch.Tensor]:
    """inputs → (B,) what is explained: p(target) (softmax, sigmoid) or the value (linear)."""

    def score(x: torch.Tensor) -> torch.Tensor:
        out = model(x).double()  # (B, K); float32 rounds p = 1 - 1e-9 to 1: no change seen
        if kind == "linear":
            return out[:, 0]
        if kind == "softmax":
            return out.softmax(-1)[:, target]
        if kind == "probability":  # an ensemble's averaged probabilities
            return out[:, target]
        p = out.sigmoid()  # (B, K); one logit for two classes: p(class 1)
        if out.shape[1] == 1:
            return p[:, 0] if target == 1 else 1 - p[:, 0]
        return p[:, target]

    return score


@torch.no_grad()
def predicted(model: nn.Module, x: torch.Tensor, kind: str, classes: list[str] | None) -> dict:
    """The model's prediction for one input: label, index and probability (or the value)."""
    out = model(x).float()  # (1, K)
    if kind == "linear":
        return {"value": float(out[0, 0])}
    proba = probabilities(out, kind)[0]  # (C,)
    i = int(proba.argmax())
    names = classes or [str(j) for j in range(len(proba))]
    return {
        "label": names[i],
        "index": i,
        "probability": float(proba[i]),
        "probabilities": {n: float(p) for n, p in zip(names, proba.tolist(), strict=True)},
    }


def convergence(delta: float, change: float, n_steps: int) -> dict[str, Any]:
    """Integrated gradients' completeness check: the scores should add up to the change of
    the output between baseline and input; |delta| is how far they miss."""
    relative = abs(delta) / max(abs(change), 0.01)  # a change of almost nothing: absolute
    out = {
        "convergence_delta": delta,
        "output_change": change,
        "relative_delta": relative,
        "converged": relative <= TOLERANCE,
        "n_steps": n_steps,
    }
    if not out["converged"]:
        out["warning"] = (
            f"integrated gradients did not converge: the scores miss the output's change "
            f"({change:+.4g}) by {delta:+.4g} ({relative:.1%}); raise n_steps (now {n_steps}), "
            f"e.g. --n-steps {4 * n_steps}"
        )
        log.warning(out["warning"])
    return out


def integrated(
    forward: Callable, x: torch.Tensor, baseline: torch.Tensor, n_steps: int, layer=None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(Layer) integrated gradients of forward (B,) at one input → attributions and the
    convergence check. With `layer`, attributions are the layer's (summed over its last dim)."""
    attr = _captum()
    if layer is None:
        method = attr.IntegratedGradients(forward)
    else:
        method = attr.LayerIntegratedGradients(forward, layer)
    with torch.enable_grad():
        scores, delta = method.attribute(
            x,
            baselines=baseline,
            n_steps=n_steps,
            internal_batch_size=BATCH,
            return_convergence_delta=True,
        )
    if layer is not None:
        scores = scores.sum(-1)  # (B, T, D) → (B, T)
    with torch.no_grad():
        change = float(forward(x)[0] - forward(baseline)[0])
    return scores.detach(), convergence(float(delta[0]), change, n_steps)


def perturbed(
    method: str, forward: Callable, x: torch.Tensor, baseline: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Feature ablation, LIME or Kernel SHAP over the features of `mask` (each element of x
    gets its feature's score). Sampling is seeded: the same input gives the same scores."""
    attr = _captum()
    common = {"baselines": baseline, "feature_mask": mask, "perturbations_per_eval": BATCH}
    samples = max(200, 10 * (int(mask.max()) + 1))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if method == "feature_ablation":
            return attr.FeatureAblation(forward).attribute(x, **common)
        if method == "lime":
            lime = attr.Lime(forward, similarity_func=_kept_share)
            return lime.attribute(x, n_samples=samples, **common)
        return attr.KernelShap(forward).attribute(x, n_samples=samples, **common)


def _kept_share(original, perturbed, interpretable, **kwargs) -> torch.Tensor:
    """LIME's sample weight: an exponential kernel on the share of features kept (ids and
    one-hot columns have no meaningful distance of their own)."""
    distance = 1.0 - interpretable.float().mean()
    return torch.exp(-(distance**2) / 0.25**2)


# -------------------------------------------------------------------------- tables


def explain_table(
    model: nn.Module,
    x: torch.Tensor,
    spec: Any,
    *,
    kind: str,
    target: int | None,
    method: str,
    n_steps: int = 50,
) -> dict[str, Any]:
    """One table row (1, F) → a score per source column (one-hot columns summed back)."""
    columns = spec.table["columns"]
    widths = [1 if c["kind"] == "numeric" else len(c["categories"]) for c in columns]
    group = torch.repeat_interleave(torch.arange(len(columns)), torch.tensor(widths))[None]
    baseline = torch.zeros_like(x)  # normalized means; no category
    if not spec.table["normalize"]:
        for j, c in enumerate(columns):
            if c["kind"] == "numeric":
                baseline[0, group[0] == j] = c["mean"]
    forward = class_score(model, kind, target)
    info: dict[str, Any] = {}
    if method == "integrated_gradients":
        attr, info = integrated(forward, x, baseline, n_steps)
        scores = torch.zeros(len(columns)).index_add_(0, group[0], attr[0].float())
    else:
        attr = perturbed(method, forward, x, baseline, group)
        first = torch.tensor([0, *torch.tensor(widths).cumsum(0)[:-1].tolist()])
        scores = attr[0, first].float()  # every column of a group carries its score
    features = [
        {"name": c["name"], "score": float(s)} for c, s in zip(columns, scores, strict=True)
    ]
    return {"features": features, **info}


# -------------------------------------------------------------------------- images


def explain_image(
    model: nn.Module,
    pixels: torch.Tensor,
    transform: Callable | None,
    *,
    kind: str,
    target: int | None,
    method: str,
    n_steps: int = 50,
) -> dict[str, Any]:
    """One image (1, C, H, W) uint8 → an (H, W) map (channels summed) against a black image."""
    prepare = transform or (lambda p: p.float() / 255.0)
    x, baseline = prepare(pixels), prepare(torch.zeros_like(pixels))  # (1, C, H, W)
    forward = class_score(model, kind, target)
    info: dict[str, Any] = {}
    if method == "integrated_gradients":
        attr, info = integrated(forward, x, baseline, n_steps)
    else:  # occlusion: a patch ~1/8 of the side, half-overlapping
        c, h, w = x.shape[1:]
        side = max(1, round(min(h, w) / 8))
        stride = max(1, side // 2)
        with torch.no_grad():
            attr = _captum().Occlusion(forward).attribute(
                x, sliding_window_shapes=(c, side, side), strides=(c, stride, stride),
                baselines=baseline, perturbations_per_eval=BATCH,
            )  # fmt: skip
        info = {"window": side, "stride": stride}
    heat = attr[0].float().sum(0)  # (H, W)
    return {"map": _rounded(heat.tolist()), **info}


# ---------------------------------------------------------------------------- texts


def embedding_layer(model: nn.Module) -> nn.Module:
    """The token embedding of a text model (danlu's own families or a transformers model)."""
    from danlu.models.hf import HFModel, unwrap

    base = unwrap(model)
    if isinstance(base, HFModel):
        return base.net.get_input_embeddings()
    for name in ("tok_emb", "embed"):
        if isinstance(getattr(base, name, None), nn.Embedding):
            return getattr(base, name)
    raise ConfigError(
        f"cannot find the token embedding of this {type(base).__name__} model",
        fix="explain it with method feature_ablation (it needs no gradients)",
    )


def reference_ids(ids: torch.Tensor, text: dict[str, Any], upto: int | None = None):
    """Text baseline: each token (of the first `upto`) replaced by UNK (else PAD), special
    tokens kept. Not PAD first: models mask PAD out, and Captum scores the baseline by running
    the model on these ids, while its path keeps the input's mask."""
    special = text["special_ids"]
    reference = special.get("unk", text.get("pad_id") or 0)
    kept = [special[r] for r in KEPT_TOKENS if r in special]
    swap = ~torch.isin(ids, torch.tensor(kept, dtype=ids.dtype))
    if upto is not None:
        swap[:, upto:] = False
    return torch.where(swap, torch.full_like(ids, reference), ids)


def explain_text(
    model: nn.Module,
    ids: torch.Tensor,
    text: dict[str, Any],
    *,
    kind: str,
    target: int | None,
    method: str,
    n_steps: int = 50,
) -> dict[str, Any]:
    """One token row (1, T) of a classifier → a score per token."""
    score = class_score(model, kind, target)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return score(x.round().long())  # LIME / SHAP mix ids as floats

    baseline = reference_ids(ids, text)
    info: dict[str, Any] = {}
    if method == "integrated_gradients":
        attr, info = integrated(score, ids, baseline, n_steps, embedding_layer(model))
    else:
        mask = torch.arange(ids.shape[1])[None]  # (1, T): each token a feature
        attr = perturbed(method, forward, ids, baseline, mask)
    return {"scores": [float(s) for s in attr[0].float()], **info}


# ----------------------------------------------------------------------- generation


def explain_generation(
    model: nn.Module,
    ids: torch.Tensor,
    text: dict[str, Any],
    *,
    pieces: Callable[[list[int]], list[str]],
    decode: Callable[[list[int]], str],
    method: str = "generation",
    n_steps: int = 50,
    max_new_tokens: int = 20,
    stop_id: int | None = None,
) -> dict[str, Any]:
    """A prompt (1, P) → its greedy continuation, and a (generated × prompt) matrix: how much
    each prompt token adds to each generated token's log-probability."""
    P = ids.shape[1]
    context = getattr(model, "context", None)
    if context is not None and P + max_new_tokens - 1 > context:
        max_new_tokens = max(1, context - P + 1)
        log.info("max_new_tokens → %d (model.context %d)", max_new_tokens, context)
    out = model.generate(ids, None, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=stop_id)
    new = out[0, P:].tolist()
    if stop_id in new:
        new = new[: new.index(stop_id) + 1]  # the stop token is a choice too
    G = len(new)
    full = torch.tensor([ids[0].tolist() + new])  # (1, P + G)
    inputs, targets = full[:, :-1], full[0, P:]  # (1, L), (G,)
    positions = torch.arange(P - 1, P + G - 1)  # (G,) where each target is predicted
    baseline = reference_ids(inputs, text, upto=P)
    info: dict[str, Any] = {}
    if method == "generation":

        def logp(x, positions, targets):  # (N, L) → (N,) log p(target | tokens before)
            logits = model(x).float()  # (N, L, V)
            rows = torch.arange(len(x))
            return logits[rows, positions].log_softmax(-1)[rows, targets]

        layer = embedding_layer(model)
        scores, info = _generation_ig(logp, layer, inputs, baseline, positions, targets, n_steps)
    else:

        def every(x):  # (1, L) → (G,): one output per generated token
            logits = model(x.long()).float()[0]  # (L, V)
            return logits[positions].log_softmax(-1)[torch.arange(G), targets]

        mask = torch.clamp(torch.arange(inputs.shape[1]), max=P)[None]  # generated: one group
        ablation = _captum().FeatureAblation(every)
        with torch.no_grad():
            scores = ablation.attribute(inputs, baselines=baseline, feature_mask=mask)  # (G, L)
    matrix = scores[:, :P].float()  # (G, P)
    peak = matrix.abs().amax(1, keepdim=True).clamp_min(1e-12)
    with torch.no_grad():
        logits = model(inputs).float()[0, positions].log_softmax(-1)  # (G, V)
    tokens = pieces(full[0].tolist())
    return {
        "tokens": tokens[:P],
        "generated_tokens": tokens[P:],
        "generated_text": decode([t for t in new if t != stop_id]),
        "logprobs": [float(v) for v in logits[torch.arange(G), targets]],
        "scores": _rounded(matrix.tolist()),
        "normalized": _rounded((matrix / peak).tolist()),
        **info,
    }


def _generation_ig(logp, layer, inputs, baseline, positions, targets, n_steps):
    """Layer integrated gradients for every generated token at once: row g of a (G, L)
    batch scores token g; its previous generated tokens are the same in input and baseline,
    so only prompt tokens receive scores."""
    G = len(targets)
    method = _captum().LayerIntegratedGradients(logp, layer)
    rows, base = inputs.expand(G, -1), baseline.expand(G, -1)  # (G, L)
    with torch.enable_grad():
        scores, delta = method.attribute(
            rows,
            baselines=base,
            additional_forward_args=(positions, targets),
            n_steps=n_steps,
            internal_batch_size=BATCH,
            return_convergence_delta=True,
        )
    with torch.no_grad():
        change = logp(rows, positions, targets) - logp(base, positions, targets)  # (G,)
    worst = int((delta.abs() / change.abs().clamp_min(0.01)).argmax())
    info = convergence(float(delta[worst]), float(change[worst]), n_steps)
    info["convergence_deltas"] = [float(d) for d in delta]
    return scores.detach().sum(-1), info  # (G, L)


def _rounded(values: Any) -> Any:
    """Nested lists of floats to 6 significant digits (the JSON stays readable)."""
    if isinstance(values, list):
        return [_rounded(v) for v in values]
    return float(f"{values:.6g}")
