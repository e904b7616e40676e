"""Typed configuration: one dataclass per Hydra config group, registered with the ConfigStore.

The YAML files in ``conf/`` fill these schemas in, so an unknown key or a wrong type fails at
composition with Hydra's own message. ``validate`` adds the cross-field checks that a schema
cannot express, and runs before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value and the fix."""


@dataclass
class ModelConfig:
    """GPTMini's shape. ``vocab_size`` comes from the tokenizer at run time."""

    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    num_layers: int = 4
    max_len: int = 128  # number of learned positions: the longest context the model can see
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers


@dataclass
class TokenizerConfig:
    """Which tokenizer, and how it is trained.

    kind: ``bpe`` (ours), ``hf_bpe`` (Hugging Face ``tokenizers``, trained) or ``hf_file``
    (a ready ``tokenizer.json`` at ``path``).
    """

    kind: str = "bpe"
    vocab_size: int = 8192
    pattern: str = "gpt2"  # pre-tokenization regex: gpt2 | gpt4
    path: str | None = None  # hf_file: a tokenizer.json; bpe: a saved pocketgpt tokenizer to reuse
    special_tokens: list[str] = field(default_factory=lambda: ["<unk>", "<pad>", "<bos>", "<eos>"])


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training windows.

    source: ``wikitext2_mini`` (embedded, offline), ``wikitext2`` (the Hugging Face Hub) or
    ``files`` (local text or parquet files, one path or glob per split).
    """

    source: str = "wikitext2_mini"
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text_column: str = "text"  # parquet files: which column holds the text
    hub_name: str = "Salesforce/wikitext"
    hub_config: str = "wikitext-2-raw-v1"
    block_size: int = 128  # tokens of context per training window
    stride: int | None = None  # distance between window starts; null = block_size (no overlap)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warm-up, then cosine decay)."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3  # measured best at the default shape: BENCHMARKS.md (e)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | constant


@dataclass
class TrainerConfig:
    """The training loop: device, precision, budget, batching, evaluation."""

    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    compile: str = "auto"  # auto | true | false
    epochs: int = 1000  # an upper bound; max_steps and max_time usually stop first
    max_steps: int = 1000
    max_time: float | None = None  # seconds of training before a final evaluation; null = no limit
    batch_size: int = 16
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_interval: int = 200
    eval_at_start: bool = True  # also evaluate before the first step (a fresh run, not a resume)
    eval_max_batches: int | None = None  # null = the whole validation (and test) split
    log_interval: int = 10
    patience: int | None = None  # evaluations without improvement before stopping; null = off
    seed: int = 1337
    threads: int | None = None  # torch intra-op threads; null = torch's default
    checkpoint_interval: int | None = 100  # steps between checkpoints (and one at the end)
    checkpoint_dir: str | None = None  # null = <Hydra output folder>/checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (and in MLflow)
    checkpoint_to_mlflow: bool = False  # also copy each checkpoint into the run's artifacts
    resume: str | None = None  # auto | a checkpoint file or folder | an MLflow run id
    on_nonfinite: str = "fail"  # fail | skip: what a NaN/inf loss does
    sample_tokens: int = 40  # length of the greedy sample printed at the end
    sample_prompt: str = "The meaning of life is"
    progress: bool = True  # a tqdm progress bar on stderr


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` null means $MLFLOW_TRACKING_URI, else SQLite in ./mlruns."""

    uri: str | None = None
    experiment_name: str = "pocketgpt"
    run_name: str | None = None
    log_model: bool = True
    register_as: str | None = None  # NAME or NAME@ALIAS: register the final model as a version


@dataclass
class TrainConfig:
    """The whole training job, as composed by ``conf/train.yaml``."""

    model: ModelConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    cache_dir: str = ".cache/pocketgpt"  # tokenized corpora and trained tokenizers


def register_configs(cs: ConfigStore | None = None) -> None:
    """Register every schema so YAML files can extend them (``defaults: [base_*]``)."""
    cs = cs or ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="tokenizer", name="base_tokenizer", node=TokenizerConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="optim", name="base_optim", node=OptimConfig)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="tracking", name="base_tracking", node=TrackingConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "tokenizer.kind": ("bpe", "hf_bpe", "hf_file"),
    "tokenizer.pattern": ("gpt2", "gpt4"),
    "data.source": ("wikitext2_mini", "wikitext2", "files"),
    "optim.name": ("adamw", "sgd"),
    "optim.schedule": ("cosine", "constant"),
    "trainer.device": ("auto", "cpu", "cuda", "mps"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.compile": ("auto", "true", "false"),
    "trainer.on_nonfinite": ("fail", "skip"),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: TrainConfig) -> None:
    """Cross-field and range checks; raises ConfigError naming the value and the fix."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if str(value).lower() not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")

    m, t, d, o, tr = cfg.model, cfg.tokenizer, cfg.data, cfg.optim, cfg.trainer
    positive = {
        "model.d_model": m.d_model,
        "model.n_heads": m.n_heads,
        "model.d_ff": m.d_ff,
        "model.num_layers": m.num_layers,
        "model.max_len": m.max_len,
        "data.block_size": d.block_size,
        "trainer.batch_size": tr.batch_size,
        "trainer.grad_accum": tr.grad_accum,
        "trainer.epochs": tr.epochs,
        "trainer.max_steps": tr.max_steps,
        "trainer.eval_interval": tr.eval_interval,
        "trainer.log_interval": tr.log_interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
            f"pick n_heads among the divisors of d_model"
        )
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if d.block_size > m.max_len:
        raise ConfigError(
            f"data.block_size={d.block_size} is longer than model.max_len={m.max_len}; "
            f"lower data.block_size or raise model.max_len"
        )
    if d.stride is not None and d.stride <= 0:
        raise ConfigError(f"data.stride={d.stride} must be positive (or null for block_size)")
    if d.source == "files" and not d.train:
        raise ConfigError("data=files needs data.train=PATH (and data.validation, data.test)")
    n_special = len(t.special_tokens)
    if t.kind != "hf_file" and t.vocab_size < 256 + n_special:
        raise ConfigError(
            f"tokenizer.vocab_size={t.vocab_size} is smaller than the 256 byte tokens plus "
            f"{n_special} special tokens; use at least {256 + n_special}"
        )
    if t.kind == "hf_file" and not t.path:
        raise ConfigError("tokenizer=hf_file needs tokenizer.path=/path/to/tokenizer.json")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ConfigError(f"optim.lr={o.lr} must be a positive number")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    if tr.grad_clip < 0:
        raise ConfigError(f"trainer.grad_clip={tr.grad_clip} must be >= 0 (0 disables clipping)")
    if tr.max_time is not None and tr.max_time <= 0:
        raise ConfigError(f"trainer.max_time={tr.max_time} must be positive seconds, or null")
    if tr.patience is not None and tr.patience <= 0:
        raise ConfigError(f"trainer.patience={tr.patience} must be positive, or null for off")
    if tr.checkpoint_interval is not None and tr.checkpoint_interval <= 0:
        raise ConfigError(
            f"trainer.checkpoint_interval={tr.checkpoint_interval} must be positive, or null"
        )
    if tr.keep_checkpoints <= 0:
        raise ConfigError(f"trainer.keep_checkpoints={tr.keep_checkpoints} must be at least 1")
    if tr.eval_max_batches is not None and tr.eval_max_batches <= 0:
        raise ConfigError(f"trainer.eval_max_batches={tr.eval_max_batches} must be positive")
    reg = cfg.tracking.register_as
    if reg is not None:
        if not cfg.tracking.log_model:
            raise ConfigError(
                f"tracking.register_as={reg!r} needs tracking.log_model=true (nothing to register)"
            )
        name, _, alias = reg.partition("@")
        if not name.strip() or "@" in alias or (reg.count("@") and not alias.strip()):
            raise ConfigError(f"tracking.register_as={reg!r} must be NAME or NAME@ALIAS")
        if alias and alias[0] == "v" and alias[1:].isdigit():
            raise ConfigError(
                f"tracking.register_as={reg!r}: alias {alias!r} looks like a version; pick "
                "another alias, e.g. best"
            )
