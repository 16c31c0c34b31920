"""The one schema: every key danlu reads, validated once and frozen.

A config is YAML with one section per stage (`data:`, `model:`, `train:`, `evaluate:`); the
first word of a key names the folder whose code reads it. `load()` reads a file (or a bundled
example by name), applies dotted `key=value` overrides, validates the result and returns a
frozen `Config`. Every problem becomes one ConfigError line naming the full key path, the
value received and what was expected, with a did-you-mean for unknown keys.

    cfg = load("configs/fashion_cnn.yaml", ["train.max_steps=200"])
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from danlu.config_compress import CompressConfig
from danlu.config_errors import describe
from danlu.config_models import (  # noqa: F401  (the whole schema is importable from here)
    BERTConfig,
    CNNConfig,
    FreezeConfig,
    GPTConfig,
    HFConfig,
    LoRAConfig,
    MLPConfig,
    ModelConfig,
    RNNConfig,
    Section,
    Seq2SeqConfig,
)
from danlu.config_pipeline import PipelineConfig
from danlu.config_privacy import PIIConfig, PrivacyConfig
from danlu.config_serve import ServeSettings
from danlu.config_tracking import MLflowConfig
from danlu.config_tune import TuneConfig
from danlu.errors import ConfigError

EXAMPLES_DIR = Path(__file__).parent / "configs"


# ---------------------------------------------------------------------------------- data


class SplitConfig(Section):
    val: float = Field(0.1, ge=0, lt=1, description="fraction of the training data held out")
    test: float | Literal["auto", "official"] = Field(
        "auto",
        description="'official' = the dataset's own test split; a fraction = carve one out; "
        "'auto' = official where the dataset has one, else 0.2",
    )
    stratify: bool = Field(True, description="keep class proportions in every split")
    seed: int | None = Field(None, description="split seed (defaults to the run's seed)")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if isinstance(self.test, float) and not 0 <= self.test < 1:
            raise ValueError(f"test must be a fraction in [0, 1), got {self.test}")
        if isinstance(self.test, float) and self.val + self.test >= 1:
            raise ValueError(f"val + test must leave training data, got {self.val} + {self.test}")
        return self


class ImageConfig(Section):
    resize: tuple[int, int] | None = Field(None, description="[height, width] for every image")
    channels: Literal[1, 3] | None = Field(None, description="1 = grayscale, 3 = RGB")


class AugmentConfig(Section):
    crop_padding: int = Field(0, ge=0, le=16, description="images: random crop after zero padding")
    hflip: bool = Field(False, description="images: random horizontal flip (p = 0.5)")
    rotate: float = Field(0.0, ge=0, le=180, description="images: random rotation in ±degrees")
    token_delete: float = Field(0.0, ge=0, lt=1, description="text: drop each token with p")
    token_swap: float = Field(0.0, ge=0, lt=1, description="text: swap neighbours with p")
    token_mask: float = Field(0.0, ge=0, lt=1, description="text: replace tokens by [MASK]/[UNK]")


class TokenizerConfig(Section):
    type: Literal["bpe", "wordpiece", "unigram", "char", "file", "pretrained"] = Field(
        "bpe",
        description="train bpe/wordpiece/unigram/char on the training text; file = a "
        "tokenizer.json at `path`; pretrained = a checkpoint folder (or hub name) at `path`",
    )
    vocab_size: int = Field(8000, ge=8, le=1_000_000, description="trained vocabularies")
    path: str | None = Field(None, description="tokenizer.json or checkpoint (file, pretrained)")
    lowercase: bool = False
    min_frequency: int = Field(2, ge=1, description="trained vocabularies: rarest kept pair/word")
    max_length: int = Field(256, ge=1, description="tokens per example (longer ones truncated)")
    truncation: Literal["truncate", "error"] = "truncate"

    @model_validator(mode="after")
    def _path(self) -> TokenizerConfig:
        if self.type in ("file", "pretrained") and not self.path:
            raise ValueError(f"tokenizer type {self.type} needs `path`")
        return self


class CheckConfig(Section):
    on_blockers: Literal["stop", "warn"] = Field(
        "stop", description="what training does when `data check` finds a blocker"
    )
    label_noise: bool = Field(True, description="flag examples a baseline confidently relabels")
    max_rows: int = Field(20_000, ge=100, description="rows used by the costlier checks")


class SufficiencyConfig(Section):
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = [0.1, 0.2, 0.4, 0.8]  # noqa: RUF012
    seeds: int = Field(3, ge=1, le=20, description="repeats per fraction")
    model: Literal["baseline", "configured"] = Field(
        "baseline", description="a quick scikit-learn baseline, or the configured model"
    )
    max_steps: int | None = Field(None, ge=1, description="configured model: steps per fit")
    project_to: list[Annotated[float, Field(gt=0)]] = [1.0, 2.0, 4.0]  # noqa: RUF012


class DataConfig(Section):
    dataset: str = Field(description="built-in name | file | folder")
    task: Literal["classification", "regression", "language_modeling", "seq2seq", "chat"] | None = (
        Field(None, description="default: the built-in dataset's task, else classification")
    )
    label: str | None = Field(None, description="label column of a table")
    text: str | None = Field(None, description="text column (the source side for seq2seq)")
    target: str | None = Field(None, description="seq2seq: the target text column")
    tokenizer: TokenizerConfig | None = Field(None, description="text: how text becomes tokens")
    block_size: int = Field(256, ge=2, description="language modelling: tokens per block")
    pack: bool = Field(True, description="language modelling: pack documents into blocks")
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="undecodable bytes: error naming file and offset, or replace"
    )
    memory_cap_mb: int | None = Field(
        None, ge=1, description="token cache: stream corpora larger than this (MB)"
    )
    max_words: int | None = Field(
        None, ge=1, description="seq2seq: keep pairs with at most this many words per side"
    )
    features: list[str] | None = Field(None, description="feature columns (default: all others)")
    columns: dict[str, Literal["numeric", "categorical", "ignore"]] = Field(
        default_factory=dict, description="declared column types; others are inferred"
    )
    missing: Literal["error", "drop", "mean", "constant"] = "error"
    fill_value: float | str = Field(0, description="value used by missing: constant")
    split: SplitConfig = SplitConfig()
    normalize: bool = Field(True, description="standardize with training-split statistics")
    image: ImageConfig = ImageConfig()
    augment: AugmentConfig | None = None
    max_samples: int | None = Field(None, ge=1, description="use at most N training examples")
    max_eval_samples: int | None = Field(None, ge=1, description="at most N val/test examples")
    mirror: str | None = Field(None, description="base URL replacing built-in download URLs")
    cache_dir: str | None = Field(None, description="download cache (default ~/.cache/danlu)")
    download: bool = Field(True, description="download built-in datasets missing locally")
    check: CheckConfig = CheckConfig()
    sufficiency: SufficiencyConfig = SufficiencyConfig()
    redact_pii: bool = Field(False, description="replace PII with typed placeholders first")
    pii: PIIConfig = PIIConfig()


# --------------------------------------------------------------------------------- train


class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    nesterov: bool = Field(False, description="sgd only, needs momentum > 0")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="layer-wise lr decay: layer i of L gets lr × decay^(L−i)"
    )
    head_lr: float | None = Field(None, gt=0, description="learning rate of the task head")

    @model_validator(mode="after")
    def _sgd_options(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs name: sgd and momentum > 0")
        if self.momentum and self.name != "sgd":
            raise ValueError(f"momentum applies to sgd only (got name: {self.name})")
        return self


class ScheduleConfig(Section):
    name: Literal["constant", "step", "cosine", "plateau"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 (all schedules)")
    step_size: int = Field(1000, ge=1, description="step: multiply lr by gamma every N steps")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: floor as a fraction of lr")
    factor: float = Field(0.5, gt=0, lt=1, description="plateau: multiply lr by this")
    patience: int = Field(2, ge=0, description="plateau: evaluations without improvement")


class EarlyStoppingConfig(Section):
    metric: str | None = Field(None, description="default: train.monitor")
    patience: int = Field(5, ge=1, description="evaluations without improvement")
    min_delta: float = Field(0.0, ge=0)


# --- numerical safety: train.nonfinite ---
class NonFiniteConfig(Section):
    policy: Literal["stop", "skip"] = Field(
        "stop", description="stop: save nonfinite.json and stop; skip: skip the step, count it"
    )
    max_consecutive: int = Field(5, ge=1, description="skip: stop after this many in a row")


class TrainConfig(Section):
    epochs: int | None = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; wins over epochs")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1, description="default: 2 × batch_size")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    objective: Literal["auto", "supervised", "causal_lm", "masked_lm", "seq2seq"] = Field(
        "auto", description="auto: from data.task and model.type (bert → masked_lm)"
    )
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="masked_lm: tokens predicted")
    loss: Literal["auto", "cross_entropy", "bce", "mse", "hinge"] = "auto"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["none", "auto"] | list[float] = "none"
    sampler: Literal["shuffle", "weighted", "sequential"] = "shuffle"
    group_by_length: bool = Field(
        True, description="text with shuffle: batches of similar lengths (less padding)"
    )
    l1: float = Field(0.0, ge=0, description="L1 penalty on weights")
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto = bf16 autocast where the hardware runs it fast, fp16 with a grad "
        "scaler on GPUs without bf16, else fp32; fp16 is CUDA-only",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    eval_every: int | None = Field(None, ge=1, description="steps; default once per epoch")
    log_every: int = Field(50, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="steps; default each eval")
    keep_checkpoints: int = Field(2, ge=1, description="last K checkpoints kept (plus best)")
    monitor: str = Field(
        "val_loss",
        pattern=r"^val_\w+$",
        description="validation metric that picks the best weights",
    )
    early_stopping: EarlyStoppingConfig | None = None
    tensorboard: bool = True
    privacy: PrivacyConfig | None = Field(None, description="differential privacy (Opacus)")
    # --- numerical safety, precision, scale ---
    nonfinite: NonFiniteConfig = Field(
        NonFiniteConfig(), description="what a NaN/Inf loss or gradient does"
    )
    compile: bool = Field(False, description="torch.compile the model for training")
    gradient_checkpointing: bool = Field(
        False, description="Transformers: recompute each layer's activations in backward"
    )

    @model_validator(mode="after")
    def _not_with_privacy(self) -> TrainConfig:
        for key in ("compile", "gradient_checkpointing"):
            if getattr(self, key) and self.privacy is not None:
                raise ValueError(f"train.{key} does not work with train.privacy (Opacus hooks)")
        return self

    mlflow: MLflowConfig | None = Field(None, description="MLflow tracking (train/tracking.py)")
    estimate: bool = Field(True, description="print the pre-flight estimate before training")
    memory_limit_gb: float | None = Field(
        None, gt=0, description="memory training may use (GB); default: what is free"
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: auto = DDP; fsdp shards the model (FSDP2)"
    )
    collective_timeout_s: float = Field(
        300, gt=0, description="a rank waiting this long in a collective stops the run (watchdog)"
    )

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set train.epochs or train.max_steps")
        return self


class EvaluateConfig(Section):
    split: Literal["train", "val", "test"] = "test"
    metrics: list[str] | None = Field(None, description="default: the task's standard set")
    batch_size: int | None = Field(None, ge=1)
    generate_samples: int | None = Field(
        500, ge=1, description="seq2seq: sources translated and scored (null = the whole split)"
    )
    num_beams: int = Field(1, ge=1, le=16, description="seq2seq: beam width when scoring")
    max_new_tokens: int | None = Field(None, ge=1, description="default: the tokenizer's max")
    bootstrap: int = Field(
        200, ge=0, le=10_000, description="bootstrap replicates for the headline CI (0 = none)"
    )
    worst: int = Field(10, ge=0, le=1000, description="worst errors kept for the report")
    memory_mb: float = Field(
        256.0, gt=0, description="cap on per-example scores kept for ROC/PR curves"
    )
    slices: list[str] | None = Field(
        None, description="columns to report every metric per group of (fairness slices)"
    )


class Config(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    runs_dir: str = Field("runs", description="runs go to <runs_dir>/<name>/")
    data: DataConfig
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compress: CompressConfig | None = None
    serve: ServeSettings | None = None
    tune: TuneConfig | None = None
    pipeline: PipelineConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        out["model"] = {"type": out["model"]["type"], **out["model"]}  # the family first
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------- load


def examples() -> list[str]:
    """Names of the example configs bundled with danlu (also in the repository's configs/)."""
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))


def find(path: str | Path) -> Path:
    """A config file path, or the bundled example of that name."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(
            f"'{p}' is a folder, expected a YAML config file",
            fix="pass a file such as configs/fashion_cnn.yaml (a run folder goes to --resume)",
        )
    example = EXAMPLES_DIR / f"{p.stem}.yaml"
    if p.suffix in ("", ".yaml", ".yml") and len(p.parts) <= 2 and example.is_file():
        return example
    close = difflib.get_close_matches(p.stem, examples(), n=1)
    hint = f"did you mean '{close[0]}'? " if close and len(p.parts) <= 2 else ""
    raise ConfigError(
        f"config file '{p}' not found",
        fix=f"{hint}check the path; bundled examples: {', '.join(examples())}",
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        where = f" line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {e.problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file '{path}': {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`0.1`, `true`, `[1, 2]`)."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override '{item}' is not key=value",
                fix="write it like train.max_steps=200 or model.hidden_sizes=[64,32]",
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(f"override '{item}': '{prefix}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def load(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Read, override and validate a config; relative data paths resolve next to the file."""
    if isinstance(source, dict):
        raw, origin = _deep_copy(source), "config"
    else:
        path = find(source)
        raw, origin = read_yaml(path), str(path)
        _resolve_data_path(raw, path.parent)
    raw = apply_overrides(raw, list(overrides))
    return validate(raw, origin)


def validate(raw: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{origin}: " + "; ".join(describe(e.errors(), Config))) from None


def _resolve_data_path(raw: dict[str, Any], base: Path) -> None:
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("dataset"), str):
        candidate = base / data["dataset"]
        if not Path(data["dataset"]).is_absolute() and candidate.exists():
            data["dataset"] = str(candidate.resolve())


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf where two nested dicts (configs) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]
